"""Region-text samples -> LLaVA-style instruction records for referring and grounding.

Every converter in ``cloc_data`` (RefCOCO/+/g, Visual Genome, GRIT, Flickr30k Entities, COCO/LVIS,
VESL output, the synthetic scenes) writes :class:`~cloc_data.format.RegionSample`s; this module
turns them into conversation records in LLaVA's JSON layout, one task per record:

``rec``
    "Where is <expression>?" -> the box as text.
``ref_desc``
    "What is <box> <region>?" -> the region's phrase.
``ref_cls``
    "Is the object <box> <region> X or Y?" -> the region's phrase; the distractor is another phrase
    drawn from the same data (Ferret's referring classification).
``grounded_caption``
    "Describe the image ..." -> the caption with a box written after each phrase it mentions.

A record::

    {"id": "KEY-rec-0", "image": "images/KEY.jpg", "width": 640, "height": 480,
     "conversations": [{"from": "human", "value": "<image>\\nWhere is the red mug? ..."},
                       {"from": "gpt", "value": "[0.12, 0.30, 0.41, 0.77]"}],
     "regions": [[40.0, 60.0, 220.0, 300.0]], "task": "rec"}

``regions`` holds, in original-image pixels (xyxy), the box of each ``<region>`` token in the human
turn, in order: the MLLM's processor maps them into the tower's frame and replaces each token by
that region's feature (Ferret's hybrid representation: coordinates in the text plus a feature).
Boxes written as text use a box convention of :mod:`llava_bridge.box_text` in an explicit frame
(``"original"``: normalised by the image's width and height; ``"pad"``: normalised in the square the
image is padded to, LLaVA's ``expand2square``).

Templates are varied (several phrasings per task, chosen with a seeded generator, so a build is
reproducible). Samples and regions that cannot make a record are counted by reason, never dropped
silently.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloc_data.format import RegionSample
from cloc_data.shards import SkipCounter
from llava_bridge.box_text import FRAMES, box_to_text, get_convention
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

TASKS = ("rec", "ref_desc", "ref_cls", "grounded_caption")

# Several phrasings per task; "{expr}", "{box}", "{region}", "{a}", "{b}" are filled in.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "rec": (
        "Where is {expr}? Answer with a bounding box.",
        "Give the bounding box of {expr}.",
        "Locate {expr} in the image.",
        "What is the location of {expr} in the image?",
    ),
    "ref_desc": (
        "What is {box} {region}?",
        "Describe the object {box} {region} in a few words.",
        "What is the region {box} {region}?",
    ),
    "ref_cls": (
        "Is the object {box} {region} {a} or {b}?",
        "Which is the region {box} {region}: {a} or {b}?",
        "Is {box} {region} {a} or {b}? Answer with one of them.",
    ),
    "grounded_caption": (
        "Describe the image and give a bounding box after each object you mention.",
        "Write a short caption; put the box of every object you name right after it.",
    ),
}


@dataclass
class InstructionConfig:
    """How instruction records are built.

    Attributes:
        tasks: which of :data:`TASKS` to build (default: all).
        convention: box-text convention (:data:`llava_bridge.box_text.CONVENTIONS`); default
            ``"llava"``, the two-decimal 0..1 form LLaVA-1.5 was trained on.
        frame: ``"original"`` or ``"pad"``, the frame the written coordinates are normalised in; must
            match what the MLLM's image preprocessing does (``pad`` for ``image_aspect_ratio='pad'``).
        max_regions_per_task: regions of one sample used per task (default 4), so a sample with many
            regions does not dominate the data.
        seed: seed of the template, region and distractor choices.
        image_prefix: prefix of the ``image`` field (default ``"images/"``); the file name is
            ``KEY.EXT`` or the sample's ``meta["image_path"]``.
    """

    tasks: Sequence[str] = TASKS
    convention: str = "llava"
    frame: str = "original"
    max_regions_per_task: int = 4
    seed: int = 0
    image_prefix: str = "images/"

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown or no tasks {list(self.tasks)}; choose from {TASKS}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame={self.frame!r}; expected one of {FRAMES}")
        get_convention(self.convention)  # raises with the list of known conventions
        if self.max_regions_per_task < 1:
            raise ValueError(f"max_regions_per_task must be >= 1, got {self.max_regions_per_task}")


@dataclass
class InstructionBuilder:
    """Builds records from samples; ``skipped`` counts what could not become a record."""

    config: InstructionConfig = field(default_factory=InstructionConfig)
    phrase_pool: Sequence[str] = ()
    skipped: SkipCounter = field(default_factory=lambda: SkipCounter("instruction records", max_logged_per_reason=5))

    def __post_init__(self):
        self.rng = random.Random(self.config.seed)
        self._pool = sorted({_clean(p) for p in self.phrase_pool if _clean(p)})

    # -- geometry ---------------------------------------------------------------------------------
    def box_text(self, sample: RegionSample, box: Sequence[float]) -> str:
        """An original-pixel box of ``sample`` written in the configured convention and frame."""
        return box_to_text(box, (sample.width, sample.height), self.config.convention, frame=self.config.frame)

    # -- records ----------------------------------------------------------------------------------
    def records(self, sample: RegionSample) -> list[dict[str, Any]]:
        """All records of one sample, for every configured task (possibly none, counted)."""
        out: list[dict[str, Any]] = []
        for task in self.config.tasks:
            made = getattr(self, f"_{task}")(sample)
            if not made:
                self.skipped.skip(f"{task}_no_usable_region", sample.key)
            out.extend(made)
        return out

    def _pick_regions(self, sample: RegionSample):
        regions = [r for r in sample.regions if _clean(r.phrase)]
        if len(regions) > self.config.max_regions_per_task:
            regions = self.rng.sample(regions, self.config.max_regions_per_task)
        return regions

    def _record(self, sample, task, index, question, answer, regions=()) -> dict[str, Any]:
        return {
            "id": f"{sample.key}-{task}-{index}",
            "image": self.config.image_prefix + image_name(sample),
            "width": sample.width,
            "height": sample.height,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "regions": [[float(v) for v in box] for box in regions],
            "task": task,
        }

    def _template(self, task: str) -> str:
        return self.rng.choice(TEMPLATES[task])

    def _rec(self, sample):
        return [
            self._record(sample, "rec", i, self._template("rec").format(expr=_clean(r.phrase)), self.box_text(sample, r.box))
            for i, r in enumerate(self._pick_regions(sample))
        ]

    def _ref_desc(self, sample):
        return [
            self._record(
                sample, "ref_desc", i,
                self._template("ref_desc").format(box=self.box_text(sample, r.box), region=REGION_TOKEN),
                _clean(r.phrase), [r.box],
            )
            for i, r in enumerate(self._pick_regions(sample))
        ]

    def _ref_cls(self, sample):
        records = []
        for i, region in enumerate(self._pick_regions(sample)):
            answer = _clean(region.phrase)
            distractor = self._distractor(answer, sample)
            if distractor is None:
                continue
            a, b = (answer, distractor) if self.rng.random() < 0.5 else (distractor, answer)
            question = self._template("ref_cls").format(
                box=self.box_text(sample, region.box), region=REGION_TOKEN, a=a, b=b
            )
            records.append(self._record(sample, "ref_cls", i, question, answer, [region.box]))
        return records

    def _distractor(self, answer: str, sample: RegionSample) -> str | None:
        """A phrase of the data set that names something else than ``answer`` or this image's objects."""
        taken = {_clean(r.phrase) for r in sample.regions} | {answer}
        for _ in range(20):  # the pool is large in practice; a few draws find a free phrase
            if not self._pool:
                break
            candidate = self.rng.choice(self._pool)
            if candidate not in taken:
                return candidate
        free = [p for p in self._pool if p not in taken]
        return self.rng.choice(free) if free else None

    def _grounded_caption(self, sample):
        caption = sample.caption.strip()
        if not caption:
            return []
        spans = []  # (start, end, box) of each region phrase found in the caption, first match wins
        for region in sample.regions:
            phrase = _clean(region.phrase)
            match = re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", caption, flags=re.IGNORECASE) if phrase else None
            if match and not any(s < match.end() and match.start() < e for s, e, _ in spans):
                spans.append((match.start(), match.end(), region.box))
        if not spans:
            return []
        pieces, last = [], 0
        for _start, end, box in sorted(spans, key=lambda s: s[0]):
            pieces += [caption[last:end], " ", self.box_text(sample, box)]
            last = end
        pieces.append(caption[last:])
        return [self._record(sample, "grounded_caption", 0, self._template("grounded_caption"), "".join(pieces))]


def image_name(sample: RegionSample) -> str:
    """The image file name a record points to: ``meta["image_path"]`` if given, else ``KEY.EXT``."""
    path = sample.meta.get("image_path")
    if path:
        return str(path)
    return f"{sample.key}.{image_extension(sample.image)}"


def image_extension(image: Any) -> str:
    """File extension of an encoded image (``bytes``); ``"png"`` for PIL images and ``None``."""
    from cloc_data.shards import detect_image_extension

    if isinstance(image, (bytes, bytearray)):
        return detect_image_extension(bytes(image)) or "jpg"
    return "png"


def collect_phrases(samples: Iterable[RegionSample]) -> list[str]:
    """Every distinct (cleaned) region phrase of ``samples``: the distractor pool of ``ref_cls``."""
    return sorted({_clean(r.phrase) for s in samples for r in s.regions if _clean(r.phrase)})


def build_records(
    samples: Iterable[RegionSample], config: InstructionConfig, phrase_pool: Sequence[str] = ()
) -> tuple[Iterator[dict[str, Any]], InstructionBuilder]:
    """``(records, builder)``: a lazy stream of records and the builder whose ``skipped`` counts skips."""
    builder = InstructionBuilder(config, phrase_pool)

    def stream():
        for sample in samples:
            yield from builder.records(sample)

    return stream(), builder


def _clean(phrase: str) -> str:
    """A phrase as it is written into a prompt: whitespace collapsed, no trailing full stop."""
    return " ".join(str(phrase).split()).rstrip(".")
