"""The model logic behind the demo page (:mod:`cloc_demo.app`), without any Gradio, so it is unit-tested.

:class:`AppBackend` holds three checkpoints and answers the page's three questions about an image:

* :meth:`AppBackend.classify`: a box (or point) -> the top-5 labels of an editable vocabulary, by
  CLOC's Prompter and, side by side, by the best CLIP baseline of :mod:`eval.baselines` on the same box.
* :meth:`AppBackend.ground`: a phrase -> the box CLOC's box head draws, with its confidence ("not
  found" below a threshold), and the candidate boxes ranked by region-text similarity.
* :meth:`AppBackend.ask`: a question to a CLOC-LLaVA model, optionally about the drawn box (the
  ``<region>`` token path), with a box read out of the answer by :mod:`llava_bridge.box_text`.

CLOC's ViT runs once per image: its outputs are cached per image (``vit_passes`` counts the passes),
and every box, point and phrase on that image reuses them. User input (files, boxes, vocabularies)
is checked here; a problem raises :class:`InputError`, whose message the page shows as is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from cloc_hf.image_inputs import load_rgb_image
from eval.baselines import REGION_METHODS, encode_class_names, encode_regions, encode_texts
from llava_bridge.box_text import FRAMES, box_to_text, get_convention, resolve_frame, text_to_box
from llava_bridge.constants import REGION_TOKEN

logger = logging.getLogger(__name__)
DEFAULT_CLOC = "runs/demo/cloc"
DEFAULT_CLIP = "runs/demo/clip"
DEFAULT_MLLM = "runs/demo-mllm/cloc-llava"
DEFAULT_DATA = "runs/demo/data"
TOP_K = 5
DEFAULT_GROUND_THRESHOLD = 0.69
"""Grounding confidence (region-text cosine at the predicted box, in [-1, 1]) below which the page says
"not found": the best balanced-accuracy threshold of ``python -m eval.grounding_threshold`` on the
demo's validation scenes for the default recipe (``docs/grounding_report.md``); a flag of the app
(`--ground-threshold`): choose it again, the same way, for another model."""
MAX_PIXELS = 40_000_000
"""Largest image accepted (width x height): bigger ones are refused before decoding, which would take
seconds and gigabytes for an image the 32 px demo model sees at 32 px anyway."""
MAX_FILE_BYTES = 50 * 2**20
MIN_SIDE = 2
"""Smallest image side: a box needs at least two pixels of room to have corners."""
MAX_VOCABULARY = 1000
CACHED_IMAGES = 8
"""Images kept (with CLOC's ViT outputs) for the page; at most 8 x 40 MP of pixels in memory."""
FALLBACK_CLIP_METHOD = "clip-maskbg"
"""The CLIP baseline used when no ``report.json`` names the best one (the best in the demo's reports)."""


def demo_mllm_convention() -> str:
    """The box convention ``make demo-mllm`` trains its CLOC-LLaVA with (``cloc_demo.demo_mllm.CONVENTION``),
    the app's default for the MLLM's box text; ``"ferret"`` where that module is absent."""
    try:
        from .demo_mllm import CONVENTION
    except ImportError:
        return "ferret"
    return CONVENTION


class InputError(ValueError):
    """Something the user gave (file, box, phrase, vocabulary) cannot be used; the message says why."""


# --- images ------------------------------------------------------------------------------------------
def read_image(source, name: str = "the upload") -> tuple[PIL.Image.Image, list[str]]:
    """``(8-bit RGB image, notes)`` from a path, file bytes, PIL image or array; notes say what was
    converted (grayscale, transparency, animation). Raises :class:`InputError` naming the problem."""
    notes: list[str] = []
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        source = _open_file(source, name, notes)
    elif isinstance(source, PIL.Image.Image):
        _check_size(source.width, source.height, name)
    mode = getattr(source, "mode", None)
    try:
        image = load_rgb_image(source, name=name)
    except ValueError as err:
        raise InputError(str(err)) from None
    _check_size(image.width, image.height, name)
    if mode is not None and mode != "RGB":
        what = " with transparency (composited onto white)" if mode in ("RGBA", "LA", "PA", "RGBa", "La") else ""
        notes.append(f"{mode} image{what}: converted to RGB")
    return image, notes


def _open_file(source, name: str, notes: list[str]) -> PIL.Image.Image:
    """Decode a path or bytes with PIL after checking the header's size; first frame of an animation."""
    if isinstance(source, (bytes, bytearray)):
        size, opener = len(source), lambda: PIL.Image.open(io.BytesIO(source))
    else:
        if not os.path.isfile(source):
            raise InputError(f"{name}: no such file {os.fspath(source)!r}")
        size, opener = os.path.getsize(source), lambda: PIL.Image.open(source)
    if size > MAX_FILE_BYTES:
        raise InputError(f"{name} is a {size / 2**20:.0f} MB file; the page takes files up to {MAX_FILE_BYTES // 2**20} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        try:
            with opener() as opened:
                _check_size(opened.width, opened.height, name)
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    notes.append(f"animated image: the first of {frames} frames is used")
                opened.seek(0)
                opened.load()
                return opened.copy()
        except PIL.UnidentifiedImageError:
            raise InputError(f"{name} is not an image file PIL can read (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)") from None
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
            raise InputError(f"{name} is too large to decode: {err}") from None
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
            raise InputError(f"{name} is a damaged or unsupported image file: {err}") from None


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} MP); the page takes images up to "
            f"{MAX_PIXELS / 1e6:.0f} MP: downscale it first"
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{name} is {width} x {height} pixels; a box needs at least {MIN_SIDE} x {MIN_SIDE}")


def image_key(image: PIL.Image.Image) -> str:
    """Content hash of an RGB image: the same picture uploaded twice shares one cache entry."""
    digest = hashlib.sha1(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:16]


# --- user text -----------------------------------------------------------------------------------------
def parse_vocabulary(text: str) -> list[str]:
    """Labels from text, one per line or comma-separated; blanks and repeats dropped, order kept."""
    labels = list(dict.fromkeys(p.strip() for p in re.split(r"[\n,]", text or "") if p.strip()))
    if not labels:
        raise InputError("the vocabulary is empty: write one label per line")
    if len(labels) > MAX_VOCABULARY:
        raise InputError(f"the vocabulary has {len(labels)} labels; at most {MAX_VOCABULARY}")
    return labels


def parse_box(text: str, width: int, height: int) -> list[float]:
    """``"x1, y1, x2, y2"`` in image pixels -> a box inside the ``width x height`` image."""
    numbers = re.findall(r"[-+]?\d+(?:\.\d*)?|[-+]?\.\d+", text or "")
    if len(numbers) != 4:
        raise InputError(f"a box is four numbers x1, y1, x2, y2 in pixels; got {text!r}")
    x1, y1, x2, y2 = (float(v) for v in numbers)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise InputError(
            f"box {[x1, y1, x2, y2]} must satisfy 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} "
            "(the image's size)"
        )
    return [x1, y1, x2, y2]


def corners_to_box(first, second, width: int, height: int) -> list[float]:
    """The box spanned by two clicked pixel positions, at least one pixel wide and high, inside the image."""
    x1, x2 = sorted((float(first[0]), float(second[0])))
    y1, y2 = sorted((float(first[1]), float(second[1])))
    x1, y1 = min(max(x1, 0.0), width - 1.0), min(max(y1, 0.0), height - 1.0)
    x2, y2 = min(max(x2, x1 + 1.0), float(width)), min(max(y2, y1 + 1.0), float(height))
    return [x1, y1, x2, y2]


def point_box(point, width: int, height: int, fraction: float = 0.125) -> list[float]:
    """A box around a point, ``fraction`` of the longer image side wide: how the CLIP baselines, which
    take no point prompts, read a clicked point."""
    half = max(1.0, fraction * max(width, height) / 2)
    x, y = float(point[0]), float(point[1])
    return [max(0.0, x - half), max(0.0, y - half), min(float(width), x + half), min(float(height), y + half)]


# --- results -----------------------------------------------------------------------------------------
@dataclass
class Label:
    """One row of a top-k list: ``probability`` is the softmax over the vocabulary at the model's
    logit scale, ``cosine`` the region-text cosine similarity."""

    label: str
    probability: float
    cosine: float


@dataclass
class Grounding:
    """A phrase grounded in an image: the box head's ``box`` (pixels) and its ``score`` (region-text
    cosine at that box), ``found`` when ``score >= threshold``, and ``ranking``: ``(index, box, cosine)``
    of the candidate boxes, most similar first."""

    box: list[float]
    score: float
    threshold: float
    ranking: list[tuple[int, list[float], float]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.score >= self.threshold


@dataclass
class Answer:
    """An MLLM answer: the ``prompt`` asked (chat format aside), the ``text`` and the ``box`` read from
    it in original pixels (``None``: no box in the answer)."""

    prompt: str
    text: str
    box: list[float] | None


@dataclass
class ImageEntry:
    image: PIL.Image.Image
    notes: list[str]
    vision: object = None  # CLOC's cached ViT outputs


def top_k(region: torch.Tensor, texts: torch.Tensor, labels: list[str], scale: float, k: int = TOP_K) -> list[Label]:
    """The ``k`` labels whose normalised text embeddings are closest to the normalised ``region``."""
    cosine = texts @ region
    probs = torch.softmax(cosine * scale, dim=0)
    order = torch.argsort(cosine, descending=True)[:k].tolist()
    return [Label(labels[i], float(probs[i]), float(cosine[i])) for i in order]


def best_clip_method(report: str | os.PathLike | None) -> str:
    """The CLIP baseline with the best region mAcc in a demo ``report.json`` (``FALLBACK_CLIP_METHOD``
    when the report is absent or names none)."""
    try:
        rows = json.loads(Path(report).read_text())["rows"]
        clip = [r for r in rows if r.get("name") in REGION_METHODS and r["name"] != "cloc" and r.get("region_macc") is not None]
        return max(clip, key=lambda r: r["region_macc"])["name"] if clip else FALLBACK_CLIP_METHOD
    except (OSError, TypeError, KeyError, ValueError):
        return FALLBACK_CLIP_METHOD


def load_scenes(data_dir: str | os.PathLike, limit: int = 100) -> list[dict]:
    """Test scenes of a synthetic dataset folder: ``name``, ``path``, ``caption``, ``boxes`` (pixel
    xyxy) and ``labels`` of its objects; empty when the folder has no test split."""
    root = Path(data_dir)
    try:
        instances = json.loads((root / "instances_test.json").read_text())
    except (OSError, ValueError):
        return []
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    per_image: dict[int, list[dict]] = {}
    for ann in instances.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
    scenes = []
    for info in instances.get("images", [])[:limit]:
        anns = per_image.get(info["id"], [])
        scenes.append({
            "name": Path(info["file_name"]).stem, "path": str(root / "test" / "images" / info["file_name"]),
            "caption": info.get("caption", ""),
            "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
            "labels": [names.get(a["category_id"], "?") for a in anns],
        })
    return scenes


def default_vocabulary(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The dataset's category names when ``data_dir`` has them, else the synthetic scenes' colour+shape
    classes ("red circle", ...), the vocabulary the demo checkpoints were trained on."""
    path = Path(data_dir) / "instances_test.json" if data_dir is not None else None
    if path is not None and path.is_file():
        try:
            return [c["name"] for c in json.loads(path.read_text())["categories"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s: no readable category names (%s); using the synthetic scenes' classes", path, err)
    from cloc_data.synthetic import SyntheticSceneConfig
    from cloc_data.synthetic.config import class_names

    return class_names(SyntheticSceneConfig())


def render(image: PIL.Image.Image, boxes=(), side: int = 512) -> tuple[PIL.Image.Image, float]:
    """``(picture, scale)``: ``image`` scaled so its longer side is about ``side`` (integer factors and
    sharp pixels when enlarging) with ``boxes`` drawn: ``(pixel box, colour, caption)`` tuples."""
    longest = max(image.width, image.height)
    scale = float(max(1, side // longest)) if longest <= side else side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = image.resize(size, PIL.Image.Resampling.NEAREST if scale >= 1 else PIL.Image.Resampling.BILINEAR)
    draw = PIL.ImageDraw.Draw(shown)
    for box, colour, caption in boxes:
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=3)
        if caption:
            draw.text((x1 + 3, y1 + 2), str(caption), fill=colour)
    return shown, scale


# --- the backend ---------------------------------------------------------------------------------------
class AppBackend:
    """CLOC, the CLIP baseline and (optionally) a CLOC-LLaVA model behind the page.

    Args:
        cloc, cloc_processor: a ``CLOCModel`` and its ``CLOCProcessor``.
        clip, clip_processor: the CLIP baseline (a ``CLOCModel`` trained as CLIP) and its processor.
        clip_method: how the baseline encodes a box, a CLIP method of :data:`eval.baselines.REGION_METHODS`
            (default :data:`FALLBACK_CLIP_METHOD`; :func:`best_clip_method` reads a demo report).
        generator: an :class:`eval.mllm_generate.HFGenerator` over a CLOC-LLaVA model, or ``None``
            (the MLLM questions then raise :class:`InputError` saying so).
        box_convention, box_frame: how the MLLM writes boxes (:mod:`llava_bridge.box_text`); default
            ``"llava"`` in the ``"original"`` frame, the instruction data's default.
        ground_threshold: default confidence below which a grounding is "not found".
    """

    def __init__(self, cloc, cloc_processor, clip, clip_processor, clip_method: str = FALLBACK_CLIP_METHOD,
                 generator=None, box_convention: str = "llava", box_frame: str = "original",
                 ground_threshold: float = DEFAULT_GROUND_THRESHOLD):
        if clip_method == "cloc" or clip_method not in REGION_METHODS:
            raise ValueError(f"clip_method {clip_method!r} is not a CLIP baseline of {sorted(REGION_METHODS)}")
        self.cloc, self.cloc_processor = cloc.eval(), cloc_processor
        self.clip, self.clip_processor, self.clip_method = clip.eval(), clip_processor, clip_method
        self.generator = generator
        self.box_convention, self.box_frame = box_convention, resolve_frame(box_convention, box_frame)
        self.ground_threshold = float(ground_threshold)
        self.vit_passes = 0
        self._images: OrderedDict[str, ImageEntry] = OrderedDict()
        self._texts: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_paths(cls, cloc: str, clip: str, mllm: str | None = None, *, clip_method: str = "auto",
                   box_convention: str | None = None, box_frame: str | None = None, chat_format: str = "llava",
                   max_new_tokens: int = 32, ground_threshold: float = DEFAULT_GROUND_THRESHOLD) -> AppBackend:
        """Load the checkpoints from folders. ``clip_method="auto"``: the best baseline of the demo
        ``report.json`` next to ``clip``. ``mllm=None`` or a missing folder: no MLLM. The box convention
        and frame default to the MLLM processor's own, else :func:`demo_mllm_convention` in its own frame
        (``"original"`` for a convention without one); ``chat_format`` defaults to ``"llava"``
        (``USER: <image>\\n... ASSISTANT:``), the format ``cloc-finetune-mllm`` trains with."""
        import cloc_hf

        for what, path in (("CLOC", cloc), ("CLIP baseline", clip)):
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"no {what} checkpoint in {path!r} (`make demo` writes one)")
        models = [(cloc_hf.CLOCModel.from_pretrained(p), cloc_hf.CLOCProcessor.from_pretrained(p)) for p in (cloc, clip)]
        method = best_clip_method(Path(clip).parent / "report.json") if clip_method == "auto" else clip_method
        generator = None
        if mllm and (Path(mllm) / "config.json").is_file():
            from eval.mllm_generate import HFGenerator, load_mllm

            model, processor = load_mllm(str(mllm))
            generator = HFGenerator(model, processor, batch_size=1, max_new_tokens=max_new_tokens,
                                    chat_format=chat_format, progress=False)
            box_convention = box_convention or getattr(processor, "box_convention", None)
            box_frame = box_frame or getattr(processor, "box_frame", None)
        box_convention = box_convention or demo_mllm_convention()
        if box_frame is None:
            box_frame = get_convention(box_convention).frame if get_convention(box_convention).frame in FRAMES else "original"
        return cls(*models[0], *models[1], clip_method=method, generator=generator,
                   box_convention=box_convention, box_frame=box_frame,
                   ground_threshold=ground_threshold)

    # -- images -----------------------------------------------------------------------------------
    def add_image(self, source, name: str = "the upload") -> tuple[str, list[str]]:
        """Read an image (see :func:`read_image`) -> ``(image id, notes)``; kept in a small LRU cache."""
        image, notes = read_image(source, name)
        key = image_key(image)
        if key not in self._images:
            self._images[key] = ImageEntry(image, notes)
            while len(self._images) > CACHED_IMAGES:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        return key, list(self._images[key].notes)

    def image(self, image_id: str) -> PIL.Image.Image:
        try:
            return self._images[image_id].image
        except KeyError:
            raise InputError("the image is no longer in the server's cache: pick or upload it again") from None

    def _vision(self, image_id: str):
        """CLOC's ViT outputs of an image, computed on first use and cached with the image."""
        entry = self._images.get(image_id)
        self.image(image_id)  # raises for an unknown id
        if entry.vision is None:
            pixels = self.cloc_processor(images=[entry.image], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                entry.vision = self.cloc.get_image_features(pixel_values=pixels.to(self.cloc.dtype))
            self.vit_passes += 1
        return entry.vision

    def _frame(self, image_id: str):
        image = self.image(image_id)
        return self.cloc_processor.image_processor.frame_transform(image.width, image.height)

    def _text_embeddings(self, which: str, labels: list[str]) -> torch.Tensor:
        key = (which, tuple(labels))
        if key not in self._texts:
            model, processor = (self.cloc, self.cloc_processor) if which == "cloc" else (self.clip, self.clip_processor)
            if len(self._texts) > 32:
                self._texts.clear()
            self._texts[key] = encode_class_names(model, processor, labels)
        return self._texts[key]

    def _cloc_regions(self, image_id: str, boxes=None, points=None) -> torch.Tensor:
        """Normalised CLOC region embeddings ``(n, D)`` of pixel boxes or points, from the cached ViT outputs."""
        frame = self._frame(image_id)
        try:
            prompt = {"boxes": [frame.to_model(torch.tensor(boxes, dtype=torch.float32))]} if points is None else {
                "points": [frame.points_to_model(torch.tensor(points, dtype=torch.float32))]}
        except ValueError as err:
            raise InputError(str(err)) from None
        with torch.inference_mode():
            regions = self.cloc.get_region_features(vision_outputs=self._vision(image_id), **prompt)[0]
        return F.normalize(regions.float(), dim=-1)

    # -- the page's three questions -----------------------------------------------------------------
    def classify(self, image_id: str, vocabulary: list[str], box=None, point=None) -> dict:
        """Top-5 labels of a pixel ``box`` (or ``point``) for CLOC and the CLIP baseline.

        Returns ``{"cloc": [Label], "clip": [Label], "clip_method": str, "clip_box": box the baseline read}``.
        """
        if (box is None) == (point is None):
            raise InputError("draw a box (two clicks) or click a point first")
        image = self.image(image_id)
        region = self._cloc_regions(image_id, boxes=[box] if box is not None else None,
                                    points=[point] if point is not None else None)[0]
        clip_box = list(box) if box is not None else point_box(point, image.width, image.height)
        clip_region = encode_regions(self.clip, self.clip_processor, [image], [torch.tensor([clip_box])],
                                     self.clip_method)[0][0]
        return {
            "cloc": top_k(region, self._text_embeddings("cloc", vocabulary), vocabulary, self._scale(self.cloc)),
            "clip": top_k(clip_region, self._text_embeddings("clip", vocabulary), vocabulary, self._scale(self.clip)),
            "clip_method": self.clip_method,
            "clip_box": clip_box,
        }

    @staticmethod
    def _scale(model) -> float:
        return float(model.logit_scale.detach().exp().clamp(max=100)) if hasattr(model, "logit_scale") else 100.0

    def ground(self, image_id: str, phrase: str, candidates=(), threshold: float | None = None) -> Grounding:
        """The box head's box for ``phrase`` with its confidence, and ``candidates`` (pixel boxes)
        ranked by the cosine between their CLOC region embeddings and the phrase's text embedding."""
        phrase = (phrase or "").strip()
        if not phrase:
            raise InputError("type a phrase to ground")
        if self.cloc.box_head is None:
            raise InputError("this CLOC checkpoint has no box head (prompter_type='roi_align'): nothing to ground with")
        tokens = self.cloc_processor(text=[phrase], return_tensors="pt")
        with torch.inference_mode():
            found = self.cloc.ground(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                     vision_outputs=self._vision(image_id), return_scores=True)
        box = self._frame(image_id).to_original(found.pred_boxes[0].float()).tolist()
        ranking = []
        if len(candidates):
            text = encode_texts(self.cloc, self.cloc_processor, [phrase])[0]
            sims = (self._cloc_regions(image_id, boxes=[list(b) for b in candidates]) @ text).tolist()
            ranking = sorted(((i, list(b), s) for i, (b, s) in enumerate(zip(candidates, sims))), key=lambda r: -r[2])
        return Grounding([float(v) for v in box], float(found.scores[0]),
                         self.ground_threshold if threshold is None else float(threshold), ranking)

    def ask(self, image_id: str, question: str, box=None) -> Answer:
        """Ask the MLLM about the image. A ``<region>`` in ``question`` stands for ``box`` (its coordinates
        are written before it in the model's box convention, as in the instruction data); any box in
        the answer is read back into pixels (``Answer.box``, ``None`` for "no box")."""
        if self.generator is None:
            raise InputError("no CLOC-LLaVA checkpoint is loaded (`make demo-mllm` writes one; or pass --mllm)")
        question = (question or "").strip()
        if not question:
            raise InputError("type a question")
        image = self.image(image_id)
        size = (image.width, image.height)
        regions = question.count(REGION_TOKEN)
        if regions and box is None:
            raise InputError(f"the question refers to {REGION_TOKEN}: draw a box first")
        if regions > 1:
            raise InputError(f"one drawn box, so at most one {REGION_TOKEN} in the question")
        boxes = None
        if regions:
            written = box_to_text(box, size, self.box_convention, frame=self.box_frame)
            question = question.replace(REGION_TOKEN, f"{written} {REGION_TOKEN}")
            boxes = [[list(box)]]
        text = self.generator([question], [image], boxes)[0]
        parsed = text_to_box(text, size, self.box_convention, frame=self.box_frame)
        return Answer(question, text, None if parsed is None else [float(v) for v in parsed])
