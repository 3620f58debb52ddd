"""Metric functions on hand-made cases whose answers are worked out in the comments."""

import math

import pytest
import torch

from eval.metrics import (
    REC_THRESHOLDS,
    bidirectional_retrieval,
    center_accuracy,
    mean_per_class_accuracy,
    per_class_accuracy,
    per_group_accuracy,
    positives_to_mask,
    rec_accuracy,
    rec_accuracy_by_ranking,
    retrieval_recall_at_k,
    topk_accuracy,
)
from llava_bridge.box_text import CONVENTIONS, format_box, parse_box, parse_boxes

# --- classification ----------------------------------------------------------------------------
# class 0: 3/4 right, class 1: 1/2, class 2: 4/6  ->  mAcc = (75 + 50 + 66.67) / 3, overall = 8/12
TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
PRED = [0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 1, 0]


def test_mean_per_class_accuracy_known_confusion():
    assert mean_per_class_accuracy(PRED, TRUE) == pytest.approx((75 + 50 + 400 / 6) / 3)
    # differs from plain accuracy (66.67): the rare class weighs as much as the frequent ones
    assert mean_per_class_accuracy(PRED, TRUE) != pytest.approx(100 * 8 / 12)


def test_per_class_accuracy_leaves_absent_classes_out():
    pred = PRED[:-1] + [3]  # class 3 is predicted but never true: lowers class 2, adds no class
    acc = per_class_accuracy(pred, TRUE, num_classes=5)
    assert acc[:3].tolist() == pytest.approx([75.0, 50.0, 400 / 6])
    assert math.isnan(acc[3]) and math.isnan(acc[4])
    assert mean_per_class_accuracy(pred, TRUE, num_classes=5) == pytest.approx((75 + 50 + 400 / 6) / 3)


def test_per_class_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        mean_per_class_accuracy([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="length"):
        mean_per_class_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no samples"):
        mean_per_class_accuracy([], [])
    with pytest.raises(ValueError, match="integer"):
        mean_per_class_accuracy(torch.tensor([0.0]), torch.tensor([0]))


def test_per_group_accuracy_credits_right_attribute_of_wrong_class():
    # classes: 0 red apple, 1 red car, 2 blue car
    groups = {
        "colour": {0: "red", 1: "red", 2: "blue"},
        "kind": ["fruit", "vehicle", "vehicle"],  # a sequence indexed by class id
        "material": {0: "organic", 1: "metal"},  # class 2 has no material
        "unused": {5: "x"},
    }
    true = [0, 2, 1, 1, 2]
    pred = [1, 1, 1, 0, 2]
    # colour: red=red ok, blue!=red, ok, red=red ok, ok -> 4/5
    # kind:   fruit!=vehicle, ok, ok, vehicle!=fruit, ok -> 3/5
    # material: only true in {0, 1}: organic!=metal, ok, metal!=organic -> 1/3
    out = per_group_accuracy(pred, true, groups)
    assert out["colour"] == pytest.approx(80.0)
    assert out["kind"] == pytest.approx(60.0)
    assert out["material"] == pytest.approx(100 / 3)
    assert math.isnan(out["unused"])


def test_per_group_prediction_without_attribute_is_wrong():
    out = per_group_accuracy([2], [0], {"material": {0: "organic", 1: "metal"}})
    assert out["material"] == 0.0


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.9, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([1, 2, 0])
    # top-1: [1, 0, 3] -> 1/3; top-2: {1,2}, {0,2}, {3,2} -> 2/3; top-4: all
    assert topk_accuracy(logits, labels, k=1) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, labels, k=2) == pytest.approx(200 / 3)
    assert topk_accuracy(logits, labels, k=4) == 100.0
    with pytest.raises(ValueError):
        topk_accuracy(logits, labels, k=5)


# --- retrieval ---------------------------------------------------------------------------------
def test_recall_single_positive():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0],  # positive 0 at rank 0
            [0.8, 0.3, 0.7, 0.0],  # positive 1 at rank 2
            [0.1, 0.2, 0.3, 0.9],  # positive 2 at rank 1
        ]
    )
    out = retrieval_recall_at_k(sim, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert out == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0}


def test_recall_multiple_positives_any_hit_counts():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]])
    # query 0: positives {1, 2}; best positive item 1 has one item above it -> rank 1
    # query 1: positives {0, 3}; item 3 scores highest -> rank 0
    expected = {1: 50.0, 2: 100.0}
    assert retrieval_recall_at_k(sim, [{1, 2}, {0, 3}], ks=(1, 2)) == expected
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    assert retrieval_recall_at_k(sim, mask, ks=(1, 2)) == expected


def test_recall_ties_count_against_the_model():
    sim = torch.ones(3, 3)
    assert retrieval_recall_at_k(sim, torch.arange(3), ks=(1, 3)) == {1: 0.0, 3: 100.0}


def test_recall_chunking_matches_unchunked(monkeypatch):
    import eval.metrics as metrics

    g = torch.Generator().manual_seed(0)
    sim = torch.randn(37, 11, generator=g)
    pos = torch.randint(0, 11, (37,), generator=g)
    full = retrieval_recall_at_k(sim, pos)
    monkeypatch.setattr(metrics, "_RETRIEVAL_CHUNK", 5)
    assert retrieval_recall_at_k(sim, pos) == full


def test_recall_rejects_query_without_positive():
    with pytest.raises(ValueError, match="no positive"):
        retrieval_recall_at_k(torch.rand(2, 3), [{0}, set()])


def test_bidirectional_retrieval_coco_style():
    # 2 images x 4 captions, captions {0, 1} belong to image 0 and {2, 3} to image 1
    sim = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.6, 0.7]])
    out = bidirectional_retrieval(sim, [{0, 1}, {2, 3}], ks=(1,))
    # i2t: image 0 top caption 0 (hit); image 1 top caption 1 (miss) -> 50
    # t2i: caption 0 -> img 0 hit, 1 -> img 1 miss, 2 -> img 1 hit, 3 -> img 1 hit -> 75
    assert out == {"i2t_r1": 50.0, "t2i_r1": 75.0}
    names = bidirectional_retrieval(sim, [{0, 1}, {2, 3}], ks=(1,), names=("r2t", "t2r"))
    assert set(names) == {"r2t_r1", "t2r_r1"}


def test_positives_to_mask_forms_agree():
    a = positives_to_mask(torch.tensor([2, 0]), 2, 3)
    b = positives_to_mask([{2}, {0}], 2, 3)
    assert torch.equal(a, b) and a.sum() == 2
    with pytest.raises(ValueError):
        positives_to_mask(torch.tensor([3, 0]), 2, 3)


# --- REC ---------------------------------------------------------------------------------------
def test_rec_iou_boundaries_are_inclusive():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    pred = torch.tensor(
        [
            [0.0, 0.0, 10.0, 5.0],  # IoU 50/100 = 0.5 exactly
            [0.0, 0.0, 10.0, 4.9],  # IoU 0.49
            [5.0, 0.0, 15.0, 10.0],  # IoU 50/150 = 1/3
        ]
    )
    out = rec_accuracy(pred, gt)
    assert set(out) == {f"acc@{t:g}" for t in REC_THRESHOLDS} | {"miou", "center_acc", "invalid"}
    assert out["acc@0.5"] == pytest.approx(100 / 3)
    assert out["acc@0.3"] == 100.0 and out["acc@0.1"] == 100.0
    assert out["acc@0.7"] == 0.0
    assert out["miou"] == pytest.approx(100 * (0.5 + 0.49 + 1 / 3) / 3)
    assert out["invalid"] == 0.0
    # centres (5, 2.5), (5, 2.45), (10, 5): all inside [0, 10]^2, the last on its border
    assert out["center_acc"] == 100.0


def test_rec_custom_thresholds_key_format():
    out = rec_accuracy([[0, 0, 10, 5]], [[0, 0, 10, 10]], thresholds=(0.25, 0.5, 0.75))
    assert {"acc@0.25", "acc@0.5", "acc@0.75"} <= set(out)


def test_center_accuracy_border_counts_and_outside_does_not():
    gt = [[0, 0, 15, 15], [0, 0, 15, 15]]
    pred = [[10, 10, 20, 20], [12, 12, 20, 20]]  # centres (15, 15) on the corner, (16, 16) outside
    assert center_accuracy(pred, gt) == 50.0


def test_rec_invalid_answers_are_counted_and_wrong():
    gt = [[0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 8, 8]]
    pred = [[0, 0, 10, 10], None, None]
    out = rec_accuracy(pred, gt)
    assert out["acc@0.5"] == pytest.approx(100 / 3)
    assert out["invalid"] == pytest.approx(200 / 3)
    assert out["center_acc"] == pytest.approx(100 / 3)
    # lmms-eval scores them as [0, 0, 0, 0]: IoU 0, but its centre (0, 0) is inside a GT at the origin
    lmms = rec_accuracy(pred, gt, invalid_as_zero_box=True)
    assert lmms["acc@0.1"] == pytest.approx(100 / 3)
    assert lmms["center_acc"] == pytest.approx(200 / 3)
    assert lmms["invalid"] == 0.0


def test_rec_nan_rows_equal_none():
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    nan_pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [math.nan] * 4])
    assert rec_accuracy(nan_pred, gt) == rec_accuracy([[0, 0, 1, 1], None], gt)


def test_rec_flipped_prediction_scores_zero_iou():
    out = rec_accuracy([[8, 8, 2, 2]], [[0, 0, 10, 10]])
    assert out["acc@0.1"] == 0.0 and out["miou"] == 0.0


def test_rec_accuracy_by_ranking_picks_best_candidate():
    gt = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    boxes = [
        [[20, 20, 30, 30], [0, 0, 10, 10]],  # best score on the right box
        [[20, 20, 30, 30], [0, 0, 10, 10]],  # best score on the wrong box
        [],  # no candidates: invalid
    ]
    scores = [[0.1, 0.9], [0.9, 0.1], []]
    out = rec_accuracy_by_ranking(scores, boxes, gt)
    assert out["acc@0.5"] == pytest.approx(100 / 3)
    assert out["invalid"] == pytest.approx(100 / 3)


def test_rec_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        rec_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="no samples"):
        rec_accuracy([], torch.zeros(0, 4))


# --- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The box is [0.12, 0.3,0.5, 0.9].", (0.12, 0.3, 0.5, 0.9)),
        ("[ 0.1,0.2,  0.3,0.4 ]", (0.1, 0.2, 0.3, 0.4)),
        ("[12, 30, 50, 90]", (12.0, 30.0, 50.0, 90.0)),  # ints kept as written, as lmms-eval
        ("[-0.1, 0.2, 0.3, 0.4]", (-0.1, 0.2, 0.3, 0.4)),
        ("see [1, 2] and [0.1, 0.2, 0.3, 0.4] then [0.5, 0.6, 0.7, 0.8]", (0.1, 0.2, 0.3, 0.4)),
        ("I cannot find it.", None),
        ("[0.1, 0.2, 0.3]", None),
        ("", None),
        ("[0.1 ,0.2, 0.3, 0.4]", None),  # lmms-eval allows no space before a comma
        ("[.1, 0.2, 0.3, 0.4]", None),  # nor a bare leading dot
    ],
)
def test_parse_lmms_eval_grammar(text, expected):
    got = parse_box(text, "lmms_eval")
    assert got == (pytest.approx(expected) if expected else None)


def test_lenient_grammar_accepts_more():
    assert parse_box("[0.1 ,0.2 , .3, 4e-1]", "lmms_eval", lenient=True) == pytest.approx(
        (0.1, 0.2, 0.3, 0.4)
    )
    assert parse_box("[0.1 ,0.2, 0.3, 0.4]", "llava") == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert parse_box("[1e999, 0, 1, 1]", "llava") is None  # inf is not a box


def test_parse_model_conventions():
    assert parse_box("[0.612,0.364,0.920,0.833;0.1,0.2,0.3,0.4]", "shikra") == pytest.approx(
        (0.612, 0.364, 0.92, 0.833)
    )
    assert parse_box("the dog [612, 364, 920, 833].", "ferret") == pytest.approx((0.612, 0.364, 0.92, 0.833))
    qwen = "<ref>the man</ref><box>(612,364),(920,833)</box>"
    assert parse_box(qwen, "qwen") == pytest.approx((0.612, 0.364, 0.92, 0.833))
    assert parse_box("(612, 364), (920, 833)</box>", "qwen") == pytest.approx((0.612, 0.364, 0.92, 0.833))
    assert parse_box("<box>(612,364)</box>", "qwen") is None
    with pytest.raises(ValueError, match="unknown box convention"):
        parse_box("[0, 0, 1, 1]", "nope")


def test_format_box_per_convention():
    box = (0.6123, 0.3641, 0.92, 0.8333)
    assert format_box(box, "llava") == "[0.61, 0.36, 0.92, 0.83]"
    assert format_box(box, "shikra") == "[0.612,0.364,0.920,0.833]"
    assert format_box(box, "ferret") == "[612, 364, 920, 833]"
    assert format_box(box, "qwen") == "<box>(612,364),(920,833)</box>"
    assert format_box(box, "lmms_eval") == "[0.612, 0.364, 0.920, 0.833]"
    assert format_box((0.0, 0.0, 1.0, 1.0), "ferret") == "[0, 0, 999, 999]"  # the grid is [0, 1000)
    with pytest.raises(ValueError):
        format_box((0.5, 0.5, 0.4, 0.9), "llava")  # flipped


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_format_parse_round_trip(name):
    box = torch.tensor([0.1234, 0.25, 0.875, 0.9999])
    back = torch.tensor(parse_box(format_box(box, name), name))
    step = {"llava": 0.005, "shikra": 0.0005, "lmms_eval": 0.0005}.get(name, 0.001)  # rounding vs floor
    assert (back - box).abs().max() <= step + 1e-9


def test_parse_boxes_feeds_rec_accuracy():
    texts = ["[0.0, 0.0, 0.5, 1.0]", "no idea", "Sure: [0.5, 0.0, 1.0, 1.0]"]
    boxes, valid = parse_boxes(texts)
    assert valid.tolist() == [True, False, True]
    assert boxes.shape == (3, 4) and boxes[1].isnan().all()
    gt = torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 3)
    out = rec_accuracy(boxes, gt)
    assert out["acc@0.5"] == pytest.approx(100 / 3)
    assert out["invalid"] == pytest.approx(100 / 3)
