"""MLLM evaluation by generation: REC on RefCOCO-format data, referring classification and description.

**REC, scored as lmms-eval scores its refcoco tasks** (``EvolvingLMMs-Lab/lmms-eval``,
``lmms_eval/tasks/refcoco/utils_rec.py``; refcoco+ and refcocog use the same code):

* one question per referring expression (lmms-eval explodes each ref's list of sentences into one row
  per sentence; the converter's per-ref samples hold one region per sentence, so an
  :class:`RecExample` is one region);
* the full original image, and the prompt :data:`LMMS_EVAL_PROMPT` + the expression (the box format is
  stated; floats in ``[0, 1]``);
* ground truth: the COCO ``[x, y, w, h]`` box as ``xyxy`` divided by the **original** width and height;
* the answer's **first** ``[a, b, c, d]`` read with lmms-eval's grammar
  (:func:`llava_bridge.box_text.parse_box`, convention ``"lmms_eval"``, strict); an answer without one
  scores as the box ``[0, 0, 0, 0]`` (IoU 0; its centre ``(0, 0)`` still counts for centre accuracy
  when the truth touches the origin) and is counted in ``parse_fail``;
* Acc@t is ``IoU >= t``, centre accuracy is "the predicted box's centre lies in the truth, borders
  included", mean IoU averages all rows; each split is scored on its own (lmms-eval's tasks are per
  split). Values are percentages; lmms-eval prints fractions.

:func:`prompt_style` also gives the ``"instruction"`` style for models fine-tuned on the project's
instruction data (the first ``rec`` phrasing of ``training.mllm.instructions.TEMPLATES``, answers in a
chosen box convention and frame), or any template, convention and frame.

**Referring classification / description** (:func:`evaluate_referring`) read instruction records (the
JSON the ``cloc-mllm-data`` command writes; read directly, ``eval`` does not import ``training``) and
score the exact match of the normalised answer with the record's answer (:func:`normalise_answer`).

Results rows (:func:`mllm_rows`) use the keys of :mod:`eval.results` (``rec_acc50``, ``ref_cls_acc``,
``ref_desc_acc``, ``parse_fail``, ...), one row per split.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloc_data.format import RegionSample
from eval.metrics import rec_accuracy
from llava_bridge.box_text import FRAMES, get_convention, parse_box, resolve_frame, text_to_box
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

# lmms-eval's refcoco REC prompt (utils_rec.refcoco_bbox_rec_doc_to_text), the expression appended.
LMMS_EVAL_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
    "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
    "bounding box coordinate of the region this sentence describes: "
)
# The first phrasing of training.mllm.instructions.TEMPLATES["rec"] (a test keeps the two in step).
INSTRUCTION_REC_TEMPLATE = "Where is {expr}? Answer with a bounding box."
MLLM_REC_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Generator = Callable[..., list[str]]  # (questions, images, boxes=None) -> answers; eval.mllm_generate.HFGenerator


# --- prompt styles ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptStyle:
    """How a REC question is written and its answer read.

    Attributes:
        name: label stored with the results.
        template: the question, with ``{expr}`` where the expression goes.
        convention: the box convention answers are read in (:data:`llava_bridge.box_text.CONVENTIONS`).
        frame: ``"original"`` or ``"pad"``, the frame the answer's numbers are normalised in.
        lenient: parser leniency (``None``: the convention's default; strict for ``"lmms_eval"``).
        clean: collapse whitespace and drop a trailing full stop in the expression (as the instruction
            builder writes it); lmms-eval inserts the sentence as it is.
    """

    name: str
    template: str
    convention: str
    frame: str
    lenient: bool | None = None
    clean: bool = False

    def __post_init__(self):
        get_convention(self.convention)
        if self.frame not in FRAMES:
            raise ValueError(f"frame={self.frame!r}; expected one of {FRAMES}")
        if "{expr}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{expr}} field")

    def question(self, expression: str) -> str:
        expr = " ".join(str(expression).split()).rstrip(".") if self.clean else str(expression)
        return self.template.replace("{expr}", expr)

    def parse(self, answer, width: int, height: int) -> tuple[float, float, float, float] | None:
        """The answer's first box as normalised xyxy of the *original* image, or ``None`` (no box).

        In the original frame the parsed numbers are used as written (exactly lmms-eval's values);
        in the padded frame they go through original pixels first.
        """
        if self.frame == "original":
            return parse_box(answer, self.convention, lenient=self.lenient)
        pixels = text_to_box(answer, (width, height), self.convention, frame=self.frame, lenient=self.lenient)
        if pixels is None:
            return None
        return (pixels[0] / width, pixels[1] / height, pixels[2] / width, pixels[3] / height)


PROMPT_STYLES = ("lmms_eval", "instruction")


def prompt_style(
    name: str = "lmms_eval", *, convention: str | None = None, frame: str | None = None, template: str | None = None
) -> PromptStyle:
    """A :class:`PromptStyle` preset, optionally overridden.

    ``"lmms_eval"``: :data:`LMMS_EVAL_PROMPT`, convention ``"lmms_eval"``, original frame, strict parse
    (the protocol papers report against). ``"instruction"``: :data:`INSTRUCTION_REC_TEMPLATE`, convention
    ``"llava"`` and the original frame by default (the instruction builder's defaults); pass the
    ``convention``/``frame`` the model's data was built with.
    """
    if name == "lmms_eval":
        base = PromptStyle("lmms_eval", LMMS_EVAL_PROMPT + "{expr}", "lmms_eval", "original")
    elif name == "instruction":
        base = PromptStyle("instruction", INSTRUCTION_REC_TEMPLATE, "llava", "original", clean=True)
    else:
        raise ValueError(f"unknown prompt style {name!r}; expected one of {PROMPT_STYLES}")
    conv = convention or base.convention
    if frame is None:  # a convention with a usual frame brings it; "llava" (disputed) keeps the preset's
        frame = get_convention(conv).frame if convention is not None and get_convention(conv).frame in FRAMES else base.frame
    chosen_frame = resolve_frame(conv, frame)
    return PromptStyle(base.name, template or base.template, conv, chosen_frame, base.lenient, base.clean)


# --- examples ---------------------------------------------------------------------------------------
@dataclass
class RecExample:
    """One referring expression: the question unit of REC.

    Attributes:
        key: ``SAMPLEKEY-k`` (the k-th expression of the converter's sample).
        image: what the generator loads (path, bytes or PIL image).
        width, height: the original image size in pixels.
        expression: the referring expression.
        box: the referred box, xyxy pixels of the original image.
        split: the data split (``meta["split"]``; ``"all"`` when the data has none).
        meta: ids to trace the row (``ref_id``, ``ann_id``, ``image_id``, ``sent_id`` when known).
    """

    key: str
    image: Any
    width: int
    height: int
    expression: str
    box: tuple[float, float, float, float]
    split: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def gt_normalised(self) -> tuple[float, float, float, float]:
        """lmms-eval's ground truth: xyxy divided by the original width and height."""
        x1, y1, x2, y2 = self.box
        return (x1 / self.width, y1 / self.height, x2 / self.width, y2 / self.height)


def _split_of(sample: RegionSample, region_meta: Mapping[str, Any]) -> str:
    split = region_meta.get("split") or sample.meta.get("split")
    if isinstance(split, (list, tuple)):  # a per-image sample spanning several splits: the region's own
        split = split[0] if len(split) == 1 else None
    return str(split) if split else "all"


def rec_examples(samples: Iterable[RegionSample], *, splits: Sequence[str] | None = None) -> list[RecExample]:
    """The converter's samples -> one :class:`RecExample` per region (per expression), in order.

    ``splits``: keep these splits only (default: every split but ``"train"``). A region without a
    phrase is skipped; a sample without a usable size raises ``ValueError`` naming it.
    """
    out = []
    for sample in samples:
        if not (sample.width and sample.height) or sample.width < 1 or sample.height < 1:
            raise ValueError(f"sample {sample.key!r} has no image size ({sample.width}x{sample.height})")
        ids = {k: sample.meta[k] for k in ("ref_id", "ann_id", "image_id") if k in sample.meta}
        for k, region in enumerate(sample.regions):
            split = _split_of(sample, region.meta)
            if (splits is None and split == "train") or (splits is not None and split not in splits):
                continue
            if not str(region.phrase).strip():
                continue
            meta = {**ids, **{k2: region.meta[k2] for k2 in ("ref_id", "ann_id", "sent_id") if k2 in region.meta}}
            box = tuple(float(v) for v in region.box)
            out.append(RecExample(f"{sample.key}-{k}", sample.image, int(sample.width), int(sample.height),
                                  str(region.phrase), box, split, meta))
    return out


def rec_examples_from_refs(
    refs: str | os.PathLike,
    instances: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    max_images: int | None = None,
) -> list[RecExample]:
    """A refer-toolkit ``refs(*).p``/``.json`` + COCO instances, read by :func:`eval.rec.load_refs`
    (the converter with its restricted unpickler) -> examples of the asked splits (default: all but train)."""
    from eval.rec import load_refs

    data = load_refs(refs, instances, image_dir, splits=splits, max_images=max_images)
    return rec_examples((ref for views in data.values() for view in views for ref in view.refs), splits=splits)


def rec_examples_from_rows(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str | None = None,
    splits: Sequence[str] | None = None,
) -> list[RecExample]:
    """lmms-lab ``RefCOCO*`` parquet / JSON-lines rows (the files lmms-eval reads, images embedded), read
    by :func:`cloc_data.converters.refcoco.iter_refcoco_rows` -> examples; the image size is read from the
    embedded image, as lmms-eval does. ``split`` as the converter takes it (the file's split when its name
    does not give one); ``splits`` filters as in :func:`rec_examples`. A row without an embedded image
    raises ``ValueError`` naming it (jxu124 rows: convert them with ``cloc-data convert`` first).
    """
    import io

    import PIL.Image

    from cloc_data.converters.common import SIZE_UNKNOWN, resolve_size
    from cloc_data.converters.refcoco import iter_refcoco_rows
    from cloc_data.shards import SkipCounter

    skipped = SkipCounter("REC rows", max_logged_per_reason=5)
    samples = []
    for sample in iter_refcoco_rows(inputs, skipped, split=split):
        if not isinstance(sample.image, (bytes, bytearray)):
            raise ValueError(f"row {sample.key!r} has no embedded image; convert such rows with `cloc-data convert`")
        if sample.meta.get(SIZE_UNKNOWN):
            with PIL.Image.open(io.BytesIO(sample.image)) as img:
                sample = resolve_size(sample, img.size, skipped)
        if sample is not None:
            samples.append(sample)
    return rec_examples(samples, splits=splits)


# --- scoring ----------------------------------------------------------------------------------------
def score_rec(
    answers: Sequence[str],
    examples: Sequence[RecExample],
    style: PromptStyle,
    thresholds: Sequence[float] = MLLM_REC_THRESHOLDS,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Score answers -> ``({split: metrics}, predictions)``.

    ``metrics``: ``acc@t`` per threshold, ``miou``, ``center_acc``, ``parse_fail`` (percent of answers
    without a box), ``num_expressions``. ``predictions``: one dict per example (key, split, expression,
    answer, parsed normalised box or ``None``, normalised truth: enough to re-score).
    """
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    by_split: dict[str, list[int]] = defaultdict(list)
    preds, rows = [], []
    for i, (answer, ex) in enumerate(zip(answers, examples)):
        box = style.parse(answer, ex.width, ex.height)
        preds.append(box)
        by_split[ex.split].append(i)
        rows.append({"key": ex.key, "split": ex.split, "expression": ex.expression, "answer": answer,
                     "pred": None if box is None else list(box), "gt": list(ex.gt_normalised), **ex.meta})
    out = {}
    for split, idx in by_split.items():
        metrics = rec_accuracy([preds[i] for i in idx], [examples[i].gt_normalised for i in idx], thresholds,
                               invalid_as_zero_box=True)
        metrics.pop("invalid")  # always 0 with invalid_as_zero_box; the failures are counted here
        metrics["parse_fail"] = 100.0 * sum(preds[i] is None for i in idx) / len(idx)
        metrics["num_expressions"] = len(idx)
        out[split] = metrics
    return out, rows


def evaluate_rec_generation(
    generator: Generator,
    examples: Sequence[RecExample],
    style: PromptStyle | None = None,
    thresholds: Sequence[float] = MLLM_REC_THRESHOLDS,
) -> dict[str, Any]:
    """Ask ``generator`` every question, score -> ``{"style", "splits": {split: metrics}, "predictions"}``."""
    if not examples:
        raise ValueError("REC: no referring expressions to evaluate")
    style = style or prompt_style()
    answers = generator([style.question(ex.expression) for ex in examples], [ex.image for ex in examples])
    splits, predictions = score_rec(answers, examples, style, thresholds)
    return {"style": style.__dict__.copy(), "splits": splits, "predictions": predictions}


# --- referring classification / description ---------------------------------------------------------
REFERRING_TASKS = ("ref_cls", "ref_desc")


def normalise_answer(text) -> str:
    """Lower case, whitespace collapsed, surrounding quotes and a trailing full stop dropped."""
    text = " ".join(str(text).lower().split())
    return text.strip("\"'` ").rstrip(".").strip()


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Instruction records from a ``.json`` list or a ``.jsonl`` file (``cloc-mllm-data`` output)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of instruction records (LLaVA's JSON layout)")
    return records


def _turns(record: Mapping[str, Any]) -> tuple[str, str]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise ValueError(f"record {record.get('id')!r} has no human/gpt conversation pair")
    return str(conv[0]["value"]), str(conv[1]["value"])


def ref_cls_options(question: str) -> tuple[str, str] | None:
    """The two options ``X or Y`` after the ``<region>`` token of a classification question, or ``None``."""
    tail = question.rsplit(REGION_TOKEN, 1)[-1]
    match = re.match(r"[\s:]*(.+?) or (.+?)\?", tail)
    return (match.group(1).strip(), match.group(2).strip()) if match else None


def evaluate_referring(
    generator: Generator,
    records: Sequence[Mapping[str, Any]],
    image_root: str | os.PathLike,
    tasks: Sequence[str] = REFERRING_TASKS,
) -> dict[str, Any]:
    """Referring classification / description accuracy over instruction records.

    Each record's human turn is asked as written (box text and ``<region>`` tokens included), with its
    ``regions`` (original pixels) as the region prompts and ``image_root / record["image"]`` as the
    image. Returns ``{task: {"acc", "num", ...}, "predictions": [...]}``; ``ref_cls`` also reports
    ``other_option`` (percent answering the distractor) and ``neither`` (percent answering neither).
    """
    unknown = [t for t in tasks if t not in REFERRING_TASKS]
    if unknown:
        raise ValueError(f"unknown referring tasks {unknown}; expected some of {REFERRING_TASKS}")
    chosen = [r for r in records if r.get("task") in tasks]
    if not chosen:
        raise ValueError(f"no records of the tasks {list(tasks)} to evaluate")
    questions, answers_true = zip(*(_turns(r) for r in chosen))
    images = [Path(image_root) / str(r["image"]) for r in chosen]
    boxes = [r.get("regions") or [] for r in chosen]
    answers = generator([q.replace(f"{IMAGE_TOKEN}\n", "", 1) for q in questions], images, boxes)
    out: dict[str, Any] = {}
    predictions = []
    for task in tasks:
        idx = [i for i, r in enumerate(chosen) if r.get("task") == task]
        if not idx:
            continue
        hits = [normalise_answer(answers[i]) == normalise_answer(answers_true[i]) for i in idx]
        metrics = {"acc": 100.0 * sum(hits) / len(idx), "num": len(idx)}
        if task == "ref_cls":
            others = []
            for i in idx:
                options = ref_cls_options(questions[i]) or ()
                wrong = [normalise_answer(o) for o in options if normalise_answer(o) != normalise_answer(answers_true[i])]
                others.append(normalise_answer(answers[i]) in wrong)
            metrics["other_option"] = 100.0 * sum(others) / len(idx)
            metrics["neither"] = 100.0 - metrics["acc"] - metrics["other_option"]
        out[task] = metrics
    for i, record in enumerate(chosen):
        predictions.append({"id": record.get("id"), "task": record.get("task"), "answer": answers[i],
                            "truth": answers_true[i]})
    out["predictions"] = predictions
    return out


# --- rows ---------------------------------------------------------------------------------------------
def mllm_rows(name: str, model: str | None, rec: Mapping[str, Any] | None, referring: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Results rows (:mod:`eval.results` keys), one per REC split (one ``split="-"`` row without REC).

    Referring accuracies are split-free and repeated on every row.
    """
    ref = {
        "ref_cls_acc": (referring or {}).get("ref_cls", {}).get("acc"),
        "ref_desc_acc": (referring or {}).get("ref_desc", {}).get("acc"),
    }
    splits = (rec or {}).get("splits") or {"-": None}
    rows = []
    for split, m in splits.items():
        row = {"name": name, "model": model, "split": split}
        row.update(
            rec_acc50=None if m is None else m["acc@0.5"],
            rec_center_acc=None if m is None else m["center_acc"],
            rec_miou=None if m is None else m["miou"],
            parse_fail=None if m is None else m["parse_fail"],
            **ref,
        )
        rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return rows
