"""Choosing grounding's "not found" threshold: presence pairs, the AUROC / threshold arithmetic, and a
run of ``ground(..., return_scores=True)`` over a tiny model."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

import cloc_hf
from cloc_data.format import Region, RegionSample
from eval.grounding_threshold import presence_pairs, presence_scores, separation
from eval.region import RegionRecognitionView

CLASSES = ["red circle", "blue square", "green triangle", "white star"]


def _view(n=6):
    samples = []
    for i in range(n):
        regions = [Region(box=(2.0, 2.0, 14.0, 14.0), phrase=CLASSES[i % 4], meta={"category_id": i % 4}),
                   Region(box=(16.0, 10.0, 30.0, 28.0), phrase=CLASSES[(i + 1) % 4], meta={"category_id": (i + 1) % 4})]
        image = PIL.Image.new("RGB", (32, 32), (10 * i, 50, 90))
        samples.append(RegionSample(key=f"s{i}", caption="", width=32, height=32, regions=regions, image=image))
    return RegionRecognitionView(samples, CLASSES, [0, 1, 2, 3])


def test_presence_pairs_draw_absent_classes_the_image_lacks():
    view = _view()
    pairs = presence_pairs(view, seed=1)
    assert pairs == presence_pairs(view, seed=1)
    for index, phrase, present in pairs:
        in_image = {CLASSES[int(c)] for c in view.labels[index]}
        assert (phrase in in_image) == present
    assert sum(p for *_, p in pairs) == sum(not p for *_, p in pairs) == 12


def test_separation_auroc_and_threshold():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.75, 0.1])
    present = torch.tensor([True, True, True, False, False, False])
    out = separation(scores, present)
    assert out["auroc"] == pytest.approx(100 * 8 / 9)  # 0.75 beats one present score
    assert out["threshold"] == pytest.approx(0.7) and out["balanced_accuracy"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # 0.7 and 0.8 tie: the lower wins
    assert separation(torch.tensor([0.5, 0.5]), torch.tensor([True, False]))["auroc"] == 50.0  # ties count half
    with pytest.raises(ValueError, match="both present and absent"):
        separation(torch.tensor([0.5]), torch.tensor([True]))


def test_presence_scores_are_grounds_confidences():
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny").eval()
    processor = cloc_hf.CLOCProcessor.offline(size=32)
    view = _view(3)
    scores, present = presence_scores(model, processor, view, batch_images=2)
    assert scores.shape == present.shape == (12,)
    assert ((scores >= -1) & (scores <= 1)).all()
    # the first image's first present phrase, scored by ground() directly
    pixels = processor(images=[view.images[0]], return_tensors="pt")["pixel_values"]
    text = processor(text=[CLASSES[0]], return_tensors="pt")
    with torch.no_grad():
        direct = model.ground(pixels, [text["input_ids"]], [text["attention_mask"]], return_scores=True)
    torch.testing.assert_close(scores[0], direct.scores[0][0], atol=1e-5, rtol=1e-4)
