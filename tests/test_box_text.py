"""Box text with explicit frames, and parsing that never raises on model output.

The per-convention grammar (lmms-eval's strict numbers, Shikra's ``;``, Qwen's pairs) is tested in
``tests/test_metrics.py`` next to the REC metrics that consume it.
"""

import pytest
import torch

from llava_bridge.box_text import CONVENTIONS, box_to_text, parse_box, parse_boxes, resolve_frame, text_to_box

GARBAGE = [
    None,
    123,
    0.5,
    ["[0.1, 0.2, 0.3, 0.4]"],
    "",
    "[",
    "[0.1, 0.2, 0.3]",
    "[0.1, 0.2, 0.3, 0.4",
    "[nan, 0, 1, 1]",
    "[1e999, 0, 1, 1]",
    "(1,2),(3",
    "\x00\ufffd[a, b, c, d]",
    "[0.1, 0.2, 0.3, 0.4e]",
    "[" * 50_000 + "0.1, 0.2",
    "9" * 5000,
]


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_garbage_is_no_box_never_an_error(name):
    for text in GARBAGE:
        assert parse_box(text, name) is None, text
        assert text_to_box(text, (640, 480), name, frame="original") is None, text
    boxes, valid = parse_boxes(GARBAGE, name)
    assert boxes.shape == (len(GARBAGE), 4) and not valid.any() and boxes.isnan().all()


def test_bytes_and_huge_numbers_are_read_as_text():
    assert parse_box(b"answer: [0.1, 0.2, 0.3, 0.4]", "llava") == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert parse_box("[" + "9" * 300 + ", 0, 1, 1]", "llava") is not None  # 1e300: finite, far outside (IoU 0)


def test_frame_must_be_explicit_where_disputed():
    with pytest.raises(ValueError, match="'llava' box convention's frame is disputed"):
        box_to_text([0, 0, 10, 10], (20, 20), "llava")
    with pytest.raises(ValueError, match="unknown frame 'padded'"):
        resolve_frame("shikra", "padded")
    assert resolve_frame("shikra") == "pad" and resolve_frame("ferret") == "original"
    assert resolve_frame("llava", "pad") == "pad" and resolve_frame("qwen", "pad") == "pad"


def test_pixel_boxes_in_each_frame():
    """A 200x100 image: the padded square has side 200 and the image starts 50 px down."""
    box = [0, 0, 100, 100]
    assert box_to_text(box, (200, 100), "lmms_eval") == "[0.000, 0.000, 0.500, 1.000]"
    assert box_to_text(box, (200, 100), "shikra") == "[0.000,0.250,0.500,0.750]"
    assert box_to_text(box, (200, 100), "llava", frame="original") == "[0.00, 0.00, 0.50, 1.00]"
    assert box_to_text(box, (200, 100), "llava", frame="pad") == "[0.00, 0.25, 0.50, 0.75]"
    assert box_to_text(box, (200, 100), "ferret") == "[0, 0, 500, 999]"
    assert text_to_box("[0.000,0.250,0.500,0.750]", (200, 100), "shikra") == pytest.approx((0, 0, 100, 100))
    assert text_to_box("[0.0, 0.25, 0.5, 0.75]", (200, 100), "lmms_eval", frame="pad") == pytest.approx(
        (0, 0, 100, 100)
    )
    with pytest.raises(ValueError, match="box"):
        box_to_text([50, 50, 10, 90], (200, 100), "shikra")  # flipped


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
@pytest.mark.parametrize("frame", ["original", "pad"])
def test_pixel_round_trip(name, frame):
    size = (640, 360)
    box = torch.tensor([40.0, 60.0, 500.0, 300.0])
    back = torch.tensor(text_to_box(box_to_text(box, size, name, frame=frame), size, name, frame=frame))
    tolerance = 640 * (0.01 if CONVENTIONS[name].decimals == 2 else 0.002)  # the written precision
    assert (back - box).abs().max() <= tolerance
