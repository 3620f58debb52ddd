"""Box text: reading boxes out of MLLM answers and writing boxes into prompts, per box convention.

One codec for the LLaVA bridge, the data builders and evaluation (it sits in ``llava_bridge`` so
that training code can use it without depending on ``eval``).

Two levels:

* :func:`format_box` / :func:`parse_box` / :func:`parse_boxes` convert between text and a
  normalised ``xyxy`` box ``(x1, y1, x2, y2)`` in ``[0, 1]`` **of the frame the convention refers
  to**, and nothing else.
* :func:`box_to_text` / :func:`text_to_box` take and return *pixel* boxes of the original image and
  make the frame explicit: ``"original"`` (normalised by the image's width and height) or ``"pad"``
  (normalised in the square the image is padded to, LLaVA's ``expand2square``). A convention with a
  fixed frame uses it unless told otherwise; ``"llava"``, whose frame is disputed, needs ``frame=``.

Parsing never raises on model output: text without a readable box (or anything that is not text)
gives ``None``, "no box". Bad *arguments* (an unknown convention or frame) still raise.

====================  =====================================  ===========  ==============================
convention            written as                             scale        frame
====================  =====================================  ===========  ==============================
``"llava"``           ``[0.61, 0.36, 0.92, 0.83]``           2 decimals   disputed (see below)
``"shikra"``          ``[0.612,0.364,0.920,0.833]``          3 decimals   padded square (expand2square)
``"ferret"``          ``[612, 364, 920, 833]``               int 0..999   original image
``"qwen"``            ``<box>(612,364),(920,833)</box>``     int 0..999   original image
``"lmms_eval"``       ``[0.612, 0.364, 0.92, 0.833]``        floats 0..1  original image
====================  =====================================  ===========  ==============================

Sources and the disputed frame:

* lmms-eval REC (``EvolvingLMMs-Lab/lmms-eval``, ``lmms_eval/tasks/refcoco/utils_rec.py``; the
  refcoco+/refcocog copies are identical): the prompt asks for floats in ``[0, 1]``, the ground truth
  is the COCO box divided by the *original* image width/height, and ``parse_float_sequence_within``
  takes the first ``[a, b, c, d]`` it finds; when there is none it scores ``[0, 0, 0, 0]``.
* LLaVA-1.5 ``[0.61, ...]``: its VG boxes are normalised in the padded square, its RefCOCO boxes in
  the original image (``haotian-liu/LLaVA`` issues #606, #623, #822). The caller must pick.
* Shikra normalises after expand-to-square and rounds to 3 decimals; several boxes in one bracket are
  separated by ``;`` (we read the first).
* Ferret (``apple/ml-ferret``, ``ferret/train/train.py`` / ``ferret/eval/eval_refexp.py``): pixel
  box clipped to ``[0, W-1]``, written as ``int(x * 1000 / W)``, read back as ``v / 1000 * W``.
* Qwen-VL: coordinates "normalised to [0, 1000)" of the original image; its grounding evaluation
  takes the first ``(x1,y1),(x2,y2)`` and divides by 1000.

Parsed values are *not* validated or clipped: a model that answers in pixels gets a box far outside
``[0, 1]`` and an IoU of about 0, which is also what lmms-eval scores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from cloc_hf.box_ops import FrameTransform, validate_boxes

# --- grammar -----------------------------------------------------------------------------------
# lmms-eval's number: optional minus, digits, optional ".digits". No "+", no ".5", no exponent.
_STRICT_NUM = r"-?\d+(?:\.\d+)?"
# Lenient number: also "+1", ".5", "5.", "1e-3".
_LENIENT_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def _bracket_pattern(num: str, sep: str, close: str) -> re.Pattern:
    n = f"({num})"
    return re.compile(rf"\[\s*{n}{sep}{n}{sep}{n}{sep}{n}\s*{close}")


# lmms-eval: whitespace allowed after "[", after each comma and before "]", but not before a comma.
_STRICT_BRACKET = _bracket_pattern(_STRICT_NUM, r",\s*", r"\]")
# Lenient: whitespace anywhere between tokens; Shikra's ";" may end the first of several boxes.
_LENIENT_BRACKET = _bracket_pattern(_LENIENT_NUM, r"\s*,\s*", r"[\];]")
# Qwen-VL: "(x1,y1),(x2,y2)", the "<box>" tags optional (the prompt often ends with "<box>").
_PAIR = rf"\(\s*({_LENIENT_NUM})\s*,\s*({_LENIENT_NUM})\s*\)"
_QWEN_PAIRS = re.compile(rf"{_PAIR}\s*,\s*{_PAIR}")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class BoxConvention:
    """How one family of MLLMs writes a box.

    Attributes:
        name: registry key.
        scale: written value = normalised value * ``scale`` (1 for floats, 1000 for integer grids).
        decimals: digits after the point when writing; ``None`` writes integers.
        separator: between the four numbers (``", "`` or ``","``); unused for ``"qwen"``.
        frame: ``"original"``, ``"pad"`` (expand-to-square) or ``"disputed"`` (caller decides).
        max_int: largest integer written on an integer grid (``floor`` then clip, ``[0, 1000)``).
    """

    name: str
    scale: float
    decimals: int | None
    separator: str
    frame: str
    max_int: int | None = None


CONVENTIONS: dict[str, BoxConvention] = {
    c.name: c
    for c in (
        BoxConvention("llava", 1.0, 2, ", ", "disputed"),
        BoxConvention("shikra", 1.0, 3, ",", "pad"),
        BoxConvention("ferret", 1000.0, None, ", ", "original", max_int=999),
        BoxConvention("qwen", 1000.0, None, ",", "original", max_int=999),
        BoxConvention("lmms_eval", 1.0, 3, ", ", "original"),
    )
}


def get_convention(convention: str | BoxConvention) -> BoxConvention:
    if isinstance(convention, BoxConvention):
        return convention
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise ValueError(
            f"unknown box convention {convention!r}; expected one of {sorted(CONVENTIONS)}"
        ) from None


# --- parsing -----------------------------------------------------------------------------------
def _as_text(text) -> str | None:
    """Model output as a string: ``str`` as is, bytes decoded leniently, anything else ``None``."""
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    return None


def parse_bracket_box(text: str, *, lenient: bool = True) -> Box | None:
    """The first ``[a, b, c, d]`` in ``text`` as four floats, as written (no rescaling), or ``None``.

    ``lenient=False`` is exactly lmms-eval's ``parse_float_sequence_within`` grammar (except that it
    returns ``None`` where lmms-eval returns ``[0, 0, 0, 0]``). ``lenient=True`` also accepts
    whitespace before commas, ``+``, ``.5``, ``5.``, exponents and a ``;`` after the fourth number.
    The two can disagree on which box is *first* when an earlier box is only leniently readable.
    """
    text = _as_text(text)
    if text is None:
        return None
    match = (_LENIENT_BRACKET if lenient else _STRICT_BRACKET).search(text)
    if match is None:
        return None
    return _finite_or_none(float(g) for g in match.groups())


def parse_qwen_box(text: str) -> Box | None:
    """The first ``(x1,y1),(x2,y2)`` in ``text`` as four floats on the 0..1000 grid, or ``None``."""
    text = _as_text(text)
    if text is None:
        return None
    match = _QWEN_PAIRS.search(text)
    if match is None:
        return None
    return _finite_or_none(float(g) for g in match.groups())


def _finite_or_none(values: Iterable[float]) -> Box | None:
    box = tuple(values)
    return box if all(math.isfinite(v) for v in box) else None  # "1e999" parses to inf


def parse_box(
    text: str, convention: str | BoxConvention = "lmms_eval", *, lenient: bool | None = None
) -> Box | None:
    """Read the first box of ``convention`` from an answer -> normalised xyxy in its frame, or ``None``.

    ``lenient`` defaults to ``False`` for ``"lmms_eval"`` (reproduce its numbers) and ``True`` for
    the others; it has no effect on ``"qwen"``, whose pair grammar is always lenient about spaces.
    Never raises on ``text``: anything without a readable box (``None``, numbers, garbage) gives ``None``.
    """
    conv = get_convention(convention)
    if conv.name == "qwen":
        raw = parse_qwen_box(text)
    else:
        raw = parse_bracket_box(text, lenient=(conv.name != "lmms_eval") if lenient is None else lenient)
    if raw is None:
        return None
    return tuple(v / conv.scale for v in raw)


def parse_boxes(
    texts: Sequence[str], convention: str | BoxConvention = "lmms_eval", *, lenient: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse many answers -> ``(boxes (N, 4) float64, valid (N,) bool)``; unreadable rows are NaN.

    The NaN rows are what :func:`eval.metrics.rec_accuracy` counts as invalid answers.
    """
    parsed = [parse_box(t, convention, lenient=lenient) for t in texts]
    nan_box = (math.nan,) * 4
    boxes = torch.tensor([b if b is not None else nan_box for b in parsed], dtype=torch.float64).reshape(
        -1, 4
    )
    valid = torch.tensor([b is not None for b in parsed], dtype=torch.bool)
    return boxes, valid


# --- writing -----------------------------------------------------------------------------------
def format_box(box, convention: str | BoxConvention = "lmms_eval") -> str:
    """Write one normalised xyxy box (in the convention's frame) the way the convention's model reads it.

    ``box`` is 4 numbers in ``[0, 1]``; slightly-outside values are clipped and invalid boxes raise
    (``cloc_hf.box_ops.validate_boxes``). Integer grids use ``floor(v * 1000)`` clipped to 999, as
    Ferret's data pipeline does.
    """
    conv = get_convention(convention)
    norm = validate_boxes(torch.as_tensor(box, dtype=torch.float64).reshape(1, 4), name="box")[0].tolist()
    if conv.decimals is None:
        values = [str(min(max(int(math.floor(v * conv.scale)), 0), conv.max_int)) for v in norm]
    else:
        values = [f"{v * conv.scale:.{conv.decimals}f}" for v in norm]
    if conv.name == "qwen":
        return f"<box>({values[0]},{values[1]}),({values[2]},{values[3]})</box>"
    return "[" + conv.separator.join(values) + "]"


# --- pixels of the original image, with the frame explicit --------------------------------------
FRAMES = ("original", "pad")


def resolve_frame(convention: str | BoxConvention, frame: str | None = None) -> str:
    """The frame a convention's numbers refer to: ``frame`` when given, else the convention's own.

    ``frame`` overrides a convention's usual frame (a model fine-tuned on other data); the
    ``"llava"`` convention has no agreed frame, so it raises without one.
    """
    conv = get_convention(convention)
    if frame is None:
        if conv.frame not in FRAMES:
            raise ValueError(
                f"the {conv.name!r} box convention's frame is {conv.frame}: pass frame='original' or frame='pad' "
                "(the frame of the data the model was trained on)"
            )
        return conv.frame
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")
    return frame


def _normaliser(image_size: tuple[int, int], frame: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``normalised = (pixels + shift) / scale`` per xyxy coordinate."""
    width, height = (int(v) for v in image_size)
    geometry = FrameTransform(width, height, max(width, height), "pad")  # validates the size
    if frame == "original":
        return torch.tensor([width, height] * 2, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    ox, oy = geometry.pad_offset
    side = geometry.pad_side
    return torch.full((4,), float(side), dtype=torch.float64), torch.tensor([ox, oy] * 2, dtype=torch.float64)


def box_to_text(
    box, image_size: tuple[int, int], convention: str | BoxConvention = "lmms_eval", *, frame: str | None = None
) -> str:
    """Write one original-image pixel box ``(x1, y1, x2, y2)`` as ``convention`` writes it in ``frame``.

    ``image_size`` is ``(width, height)`` of the original image; ``frame`` as in :func:`resolve_frame`.
    An invalid box (flipped, empty, NaN, far outside the image) raises ``ValueError``.
    """
    chosen = resolve_frame(convention, frame)
    width, height = (int(v) for v in image_size)
    pixels = validate_boxes(
        torch.as_tensor(box, dtype=torch.float64).reshape(1, 4), name="box", width=width, height=height
    )[0]
    scale, shift = _normaliser((width, height), chosen)
    return format_box(((pixels + shift) / scale).tolist(), convention)


def text_to_box(
    text,
    image_size: tuple[int, int],
    convention: str | BoxConvention = "lmms_eval",
    *,
    frame: str | None = None,
    lenient: bool | None = None,
) -> Box | None:
    """Read the first box from model output -> pixel xyxy of the original image, or ``None`` (no box).

    The inverse of :func:`box_to_text`. Values are not clipped to the image (an answer outside it
    scores as such). Never raises on ``text``.
    """
    chosen = resolve_frame(convention, frame)
    norm = parse_box(text, convention, lenient=lenient)
    if norm is None:
        return None
    scale, shift = _normaliser(image_size, chosen)
    return tuple((torch.tensor(norm, dtype=torch.float64) * scale - shift).tolist())
