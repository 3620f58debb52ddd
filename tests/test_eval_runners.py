"""Evaluation runners and ``cloc-eval`` on a tiny synthetic dataset with a tiny random model.

Values from a random model are only checked for range; the known answers come from models whose
features are monkeypatched to the answer (the text embedding of the right class / phrase / box), and
from hand-drawn images whose crops and masks are checked pixel by pixel.
"""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import cloc_hf
from cloc_data.shards import SkipCounter
from cloc_data.synthetic import SyntheticSceneConfig, write_synthetic_dataset
from cloc_hf.box_ops import box_iou
from cloc_hf.processing_cloc import CLOCProcessor
from eval.baselines import (
    EncodeOptions,
    box_pixel_bounds,
    crop_region,
    encode_regions,
    encode_texts,
    mask_background,
)
from eval.cli import main
from eval.rec import load_refs, rec_by_box_head, rec_by_ranking
from eval.region import load_coco_regions, region_recognition
from eval.report import render_markdown
from eval.retrieval import (
    deduplicate_texts,
    image_text_retrieval,
    read_shard_samples,
    region_text_retrieval,
    zero_shot_classification,
)
from eval.runner import METHODS, ROW_KEYS, evaluate

ONE_CHUNK = EncodeOptions(batch_size=64)  # every image in one call, so patched features can index images
RED, BLUE = (220, 30, 30), (40, 70, 230)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cloc_hf.create_model("cloc-tiny").eval()


@pytest.fixture(scope="module")
def processor():
    return CLOCProcessor.offline(size=32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(SyntheticSceneConfig(seed=3), root, n_train=0, n_val=3, n_test=12)
    return root


def _in_range(value):
    return value is None or 0.0 <= value <= 100.0


def _two_boxes_image(width=40, height=20):
    """Blue image with a red box at x 10..20, y 4..12 (pixel edges) and a green one at x 26..36, y 6..16."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = BLUE
    pixels[4:12, 10:20] = RED
    pixels[6:16, 26:36] = (30, 170, 50)
    return PIL.Image.fromarray(pixels)


# --- the pixel baselines ------------------------------------------------------------------------------
def test_crop_adds_margin_and_clips_to_the_image():
    image = _two_boxes_image()
    # box 10 x 8: margin 1.5 px left/right, 1.2 px top/bottom -> floor/ceil outward
    assert box_pixel_bounds((10, 4, 20, 12), 40, 20, 0.15) == (8, 2, 22, 14)
    crop = np.asarray(crop_region(image, (10, 4, 20, 12), 0.15))
    assert crop.shape == (12, 14, 3)
    assert (crop[2:10, 2:12] == RED).all()
    assert (crop[0, :] == BLUE).all() and (crop[:, 0] == BLUE).all()
    # near the border the margin is clipped, never wrapped
    assert box_pixel_bounds((0, 0, 10, 20), 40, 20, 0.15) == (0, 0, 12, 20)
    exact = np.asarray(crop_region(image, (10, 4, 20, 12), 0.0))
    assert exact.shape == (8, 10, 3) and (exact == RED).all()


def test_mask_background_keeps_the_box_and_fills_the_rest(processor):
    image = _two_boxes_image()
    fill = processor.image_processor.pad_color
    masked = np.asarray(mask_background(image, (10, 4, 20, 12), fill))
    assert masked.shape == (20, 40, 3)  # the object keeps its place and scale
    assert (masked[4:12, 10:20] == RED).all()
    outside = np.ones((20, 40), bool)
    outside[4:12, 10:20] = False
    assert (masked[outside] == fill).all()  # the green object is gone too


@pytest.mark.parametrize("method", ["clip-crop", "clip-maskbg"])
def test_pixel_baselines_encode_the_cut_image(model, processor, monkeypatch, method):
    image = _two_boxes_image()
    seen = []
    original = model.get_image_features

    def spy(pixel_values, **kwargs):
        seen.append(pixel_values.clone())
        return original(pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(model, "get_image_features", spy)
    box = (26, 6, 36, 16)
    opts = EncodeOptions(crop_margin=0.0)
    (embeds,) = encode_regions(model, processor, [image], [torch.tensor([box])], method, opts)
    expected_image = (
        crop_region(image, box, 0.0)
        if method == "clip-crop"
        else mask_background(image, box, processor.image_processor.pad_color)
    )
    expected = processor(images=[expected_image])["pixel_values"]
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    with torch.no_grad():
        direct = F.normalize(original(pixel_values=expected).pooler_output, dim=-1)
    assert embeds.shape == (1, model.config.projection_dim)
    torch.testing.assert_close(embeds, direct)


def test_clip_roi_of_the_whole_image_is_the_projected_mean_patch(model, processor):
    # RoI-Align with 2x2 bins x 2x2 samples on an 8x8 grid samples every pair of cells equally, so a
    # full-frame box pools the plain mean of the 64 patch tokens
    image = _two_boxes_image(32, 32)
    (embeds,) = encode_regions(
        model, processor, [image], [torch.tensor([[0.0, 0.0, 32.0, 32.0]])], "clip-roi"
    )
    with torch.no_grad():
        tokens = model.get_image_features(
            pixel_values=processor(images=[image])["pixel_values"]
        ).last_hidden_state
        expected = model.visual_projection(model.vision_model.post_layernorm(tokens[:, 1:].mean(1)))
    torch.testing.assert_close(embeds, F.normalize(expected, dim=-1))


@pytest.mark.parametrize("method", METHODS)
def test_chunking_keeps_every_region_with_its_image(model, processor, method):
    images = [_two_boxes_image(), _two_boxes_image(32, 32), _two_boxes_image(24, 40)]
    boxes = [
        torch.tensor([[10.0, 4, 20, 12], [26, 6, 36, 16]]),
        torch.zeros(0, 4),
        torch.tensor([[2.0, 3, 20, 30]]),
    ]
    whole = encode_regions(model, processor, images, boxes, method, ONE_CHUNK)
    one_by_one = encode_regions(model, processor, images, boxes, method, EncodeOptions(batch_size=1))
    assert [tuple(e.shape) for e in whole] == [(2, 32), (0, 32), (1, 32)]
    for a, b in zip(whole, one_by_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(a)))


# --- known answers through patched features --------------------------------------------------------
def _patch_regions(monkeypatch, model, per_image):
    """``get_region_features`` returns ``per_image[i][j]`` for box ``j`` of image ``i`` of the call."""

    def fake(pixel_values=None, boxes=None, points=None, vision_outputs=None):
        assert len(boxes) == len(per_image), "the patched model expects every image in one call"
        return [per_image[i][: len(b)] for i, b in enumerate(boxes)]

    monkeypatch.setattr(model, "get_region_features", fake)


def test_region_recognition_is_perfect_when_regions_equal_class_texts(
    model, processor, synthetic, monkeypatch
):
    data = load_coco_regions(synthetic / "instances_test.json", synthetic / "test" / "images")
    assert set(data.attributes) == {"shape", "colour"}
    assert any(data.sizes)
    names = encode_texts(model, processor, data.class_names)
    _patch_regions(monkeypatch, model, [names[labels] for labels in data.labels])
    result = region_recognition(model, processor, data, "cloc", ONE_CHUNK)
    assert result["macc"] == pytest.approx(100.0) and result["acc"] == pytest.approx(100.0)
    assert result["attributes"] == {"shape": pytest.approx(100.0), "colour": pytest.approx(100.0)}
    assert sum(v["count"] for v in result["by_size"].values()) == result["num_regions"] == data.num_regions

    # the same class texts shifted by one class: every prediction wrong
    _patch_regions(monkeypatch, model, [names[(labels + 1) % len(names)] for labels in data.labels])
    assert region_recognition(model, processor, data, "cloc", ONE_CHUNK)["macc"] == 0.0


def test_region_text_retrieval_counts_duplicate_phrases_as_positives(
    model, processor, synthetic, monkeypatch
):
    items = [s for s in read_shard_samples(synthetic / "test") if s.regions]
    texts, ids = deduplicate_texts([[r.phrase] for s in items for r in s.regions])
    assert len(texts) < sum(len(s.regions) for s in items), "the fixture should repeat a phrase"
    embeds = encode_texts(model, processor, texts)
    per_image, row = [], 0
    for s in items:
        per_image.append(embeds[[i for (i,) in ids[row : row + len(s.regions)]]])
        row += len(s.regions)
    _patch_regions(monkeypatch, model, per_image)
    result = region_text_retrieval(model, processor, items, "cloc", options=ONE_CHUNK)
    assert result["r2t_r1"] == pytest.approx(100.0) and result["t2r_r1"] == pytest.approx(100.0)
    assert result["num_texts"] == len(texts)


def test_deduplicate_texts_ignores_case_and_spacing():
    texts, ids = deduplicate_texts([["A red  circle"], ["a red circle", "a ring"], ["a ring"]])
    assert texts == ["A red  circle", "a ring"] and ids == [[0], [0, 1], [1]]


def test_image_text_retrieval_known_answer(model, processor, synthetic, monkeypatch):
    items = [s for s in read_shard_samples(synthetic / "test") if s.caption.strip()]
    texts, ids = deduplicate_texts([[s.caption] for s in items])
    caption_embeds = encode_texts(model, processor, texts)
    pixels = processor(images=[it.image for it in items])["pixel_values"]

    class Output:
        def __init__(self, pooled):
            self.pooler_output = pooled

    def fake(pixel_values, **kwargs):  # identify each image by its pixels
        rows = [next(i for i in range(len(pixels)) if torch.equal(pixels[i], p)) for p in pixel_values]
        return Output(caption_embeds[[ids[r][0] for r in rows]])

    monkeypatch.setattr(model, "get_image_features", fake)
    result = image_text_retrieval(model, processor, items, options=EncodeOptions(batch_size=5))
    assert result["i2t_r1"] == pytest.approx(100.0) and result["t2i_r1"] == pytest.approx(100.0)
    assert result["num_images"] == len(items)


def test_zero_shot_classification_in_range(model, processor):
    images = [_two_boxes_image(32, 32), _two_boxes_image(32, 16)]
    result = zero_shot_classification(
        model, processor, images, [0, 1], ["red", "blue"], templates=["a {} box", "{}"]
    )
    assert result["num_images"] == 2 and result["top1"] in (0.0, 50.0, 100.0) and "top5" not in result
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        zero_shot_classification(model, processor, images, [0, 1], ["red", "blue"], templates=["a box"])


# --- REC on a non-square image, so the frame mapping matters --------------------------------------------
@pytest.fixture
def refer_files(tmp_path):
    """One 40x20 image (padded to a square by the processor), two objects, two expressions."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    _two_boxes_image().save(image_dir / "a.png")
    instances = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 4, 10, 8], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [26, 6, 10, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "red box"}, {"id": 2, "name": "green box"}],
    }
    refs = [
        {
            "ref_id": 1,
            "ann_id": 11,
            "image_id": 1,
            "split": "val",
            "sentences": [{"sent": "the red box", "sent_id": 1}],
        },
        {
            "ref_id": 2,
            "ann_id": 12,
            "image_id": 1,
            "split": "val",
            "sentences": [{"sent": "the green box", "sent_id": 2}],
        },
        {
            "ref_id": 3,
            "ann_id": 12,
            "image_id": 1,
            "split": "train",
            "sentences": [{"sent": "ignored", "sent_id": 3}],
        },
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs(test).json").write_text(json.dumps(refs))
    return tmp_path


def test_rec_box_head_maps_boxes_back_to_original_pixels(model, processor, refer_files, monkeypatch):
    data = load_refs(refer_files / "refs(test).json", refer_files / "instances.json", refer_files / "images")
    assert list(data) == ["val"]  # train refs are not evaluated by default
    (image,) = data["val"]
    assert image.sentences == ["the red box", "the green box"]
    frame = processor.image_processor.frame_transform(40, 20)
    truth = frame.to_model(image.targets.float())
    assert not torch.allclose(truth, image.targets.float() / 40)  # padding moved y

    monkeypatch.setattr(model, "ground", lambda **kwargs: [truth.clone()])  # one (n_i, 4) per image
    result = rec_by_box_head(model, processor, data["val"])
    assert result["acc@0.5"] == pytest.approx(100.0) and result["miou"] == pytest.approx(100.0, abs=1e-3)
    assert result["center_acc"] == 100.0 and result["num_expressions"] == 2

    # the two predictions swapped: both wrong
    monkeypatch.setattr(model, "ground", lambda **kwargs: [truth.flip(0)])
    assert rec_by_box_head(model, processor, data["val"])["acc@0.1"] == 0.0


def test_rec_ranking_picks_the_candidate_matching_the_expression(model, processor, refer_files, monkeypatch):
    data = load_refs(refer_files / "refs(test).json", refer_files / "instances.json", refer_files / "images")
    (image,) = data["val"]
    assert image.candidates.shape == (2, 4)
    texts = encode_texts(model, processor, ["the red box", "the green box"])
    _patch_regions(monkeypatch, model, [texts])  # candidate j looks like expression j
    result = rec_by_ranking(model, processor, data["val"], "cloc")
    assert result["acc@0.5"] == pytest.approx(100.0) and result["chance_acc@0.5"] == pytest.approx(50.0)
    _patch_regions(monkeypatch, model, [texts.flip(0)])
    assert rec_by_ranking(model, processor, data["val"], "cloc")["acc@0.5"] == 0.0


# --- evaluation reads the converters' samples: hand-built data, hand-computed answers ---------------------
def _write_images(folder, sizes):
    folder.mkdir(exist_ok=True)
    for name, (width, height) in sizes.items():
        _two_boxes_image(width, height).save(folder / name)


@pytest.fixture
def messy_coco(tmp_path):
    """Two classes (listed out of id order) and one annotation for each skip rule of the COCO converter."""
    _write_images(tmp_path / "images", {"a.png": (40, 20), "b.png": (30, 30), "c.png": (10, 10)})

    def ann(i, image, cat, bbox, **extra):
        return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, **extra}

    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 10, "height": 10},
        ],
        "annotations": [
            ann(11, 1, 2, [10, 4, 10, 8], size="small"),
            ann(12, 1, 1, [26, 6, 10, 10]),
            ann(13, 1, 1, [5, 5, 0, 3]),  # no width: region_invalid_box
            ann(14, 1, 9, [5, 5, 3, 3]),  # unknown class: region_bad_entry
            ann(15, 1, 1, [5, 5, 3, 3], iscrowd=1),  # region_crowd
            ann(16, 1, 1, [0, 0, 80, 20]),  # twice the image width: region_outside_image
            ann(17, 1, 1, [-1, 0, 10, 10]),  # 1 px outside (within the tolerance): clipped to x1 = 0
            ann(21, 2, 2, [1, 2, 3, 4]),
            ann(31, 3, 1, [1, 1, 2, 2], iscrowd=1),  # region_crowd, then image 3 has none: no_regions
            ann(41, 99, 1, [1, 1, 2, 2]),  # region_unknown_image
        ],
        "categories": [
            {"id": 2, "name": "red box", "shape": "box", "colour": "red"},
            {"id": 1, "name": "green box", "shape": "box", "colour": "green"},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    return path


def test_region_data_are_the_coco_converters_samples_with_its_skip_rules(messy_coco):
    skipped = SkipCounter()
    data = load_coco_regions(messy_coco, messy_coco.parent / "images", skipped=skipped)
    assert data.class_names == ["green box", "red box"] and data.category_ids == [1, 2]  # sorted by id
    assert data.attributes == {"colour": {0: "green", 1: "red"}, "shape": {0: "box", 1: "box"}}
    assert [s.meta["image_id"] for s in data.samples] == [1, 2]
    assert data.images == [str(messy_coco.parent / "images" / n) for n in ("a.png", "b.png")]
    expected = torch.tensor([[10.0, 4, 20, 12], [26, 6, 36, 16], [0, 0, 9, 10]])
    torch.testing.assert_close(data.boxes[0], expected)
    torch.testing.assert_close(data.boxes[1], torch.tensor([[1.0, 2, 4, 6]]))
    assert [t.tolist() for t in data.labels] == [[1, 0, 0], [1]]
    assert data.sizes == [["small", None, None], None] and data.num_regions == 4
    assert dict(skipped.counts) == {
        "region_invalid_box": 1,
        "region_bad_entry": 1,
        "region_crowd": 2,
        "region_outside_image": 1,
        "no_regions": 1,
        "region_unknown_image": 1,
    }
    first = load_coco_regions(messy_coco, messy_coco.parent / "images", max_images=1)
    assert len(first.samples) == 1 and first.num_regions == 3


def test_region_recognition_numbers_by_hand(model, processor, messy_coco, monkeypatch):
    data = load_coco_regions(messy_coco, messy_coco.parent / "images")
    green, red = encode_texts(model, processor, data.class_names)
    # true classes [red, green, green] and [red]; the second box is predicted red
    _patch_regions(monkeypatch, model, [torch.stack([red, red, green]), red[None]])
    result = region_recognition(model, processor, data, "cloc", ONE_CHUNK)
    # green: 1 of 2 right, red: 2 of 2 -> mAcc (50 + 100) / 2; overall 3 of 4
    assert result["macc"] == pytest.approx(75.0) and result["acc"] == pytest.approx(75.0)
    assert result["attributes"] == {"colour": pytest.approx(75.0), "shape": pytest.approx(100.0)}
    assert result["by_size"] == {"small": {"macc": 100.0, "acc": 100.0, "count": 1}}
    assert (result["num_images"], result["num_regions"], result["num_classes"]) == (2, 4, 2)


@pytest.fixture
def messy_refs(tmp_path):
    """Refs of two images with a crowd referent, a missing annotation, a blank sentence and several splits."""
    _write_images(tmp_path / "images", {"a.png": (40, 20), "b.png": (30, 30)})
    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 4, 10, 8]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [26, 6, 10, 10]},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 21, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10]},
        ],
        "categories": [{"id": 1, "name": "box"}],
    }

    def ref(i, ann, image, split, *sentences):
        return {"ref_id": i, "ann_id": ann, "image_id": image, "split": split, "sentences": list(sentences)}

    refs = [
        ref(1, 11, 1, "val", {"sent": "the  red box", "sent_id": 1}, {"sent": " ", "sent_id": 2}),
        ref(2, 13, 1, "val", {"sent": "", "raw": "the corner", "sent_id": 3}),  # a crowd box; raw text
        ref(3, 99, 1, "val", {"sent": "no such annotation"}),
        ref(4, 21, 2, "testA", {"sent": "the blue one"}),
        ref(5, 12, 1, "train", {"sent": "not evaluated"}),
        ref(6, 21, 2, "val", {"sent": "the second image"}),
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs(test).json").write_text(json.dumps(refs))
    return tmp_path


def test_rec_data_are_the_refcoco_converters_samples_with_candidates(messy_refs):
    skipped = SkipCounter()
    args = (messy_refs / "refs(test).json", messy_refs / "instances.json", messy_refs / "images")
    data = load_refs(*args, skipped=skipped)
    assert list(data) == ["val", "testA"]  # first-seen order, train left out
    assert [v.image_id for v in data["val"]] == [1, 2] and [v.image_id for v in data["testA"]] == [2]
    first = data["val"][0]
    assert first.image == str(messy_refs / "images" / "a.png")
    assert first.sentences == ["the red box", "the corner"]  # whitespace collapsed, blank dropped, raw used
    assert first.targets.tolist() == [[10, 4, 20, 12], [0, 0, 5, 5]] and first.targets.dtype == torch.float64
    # every usable box of the image, then the crowd box that a ref points to
    assert first.candidates.tolist() == [[10, 4, 20, 12], [26, 6, 36, 16], [0, 0, 5, 5]]
    assert skipped.counts["bad_record"] == 1 and skipped.counts["region_empty_phrase"] == 1
    assert skipped.counts["region_crowd"] == 1
    assert [len(v) for v in load_refs(*args, max_images=1).values()] == [1, 1]
    assert list(load_refs(*args, splits=("train",))) == ["train"]


def test_rec_ranking_numbers_by_hand(model, processor, messy_refs, monkeypatch):
    args = (messy_refs / "refs(test).json", messy_refs / "instances.json", messy_refs / "images")
    (image,) = load_refs(*args, splits=("val",), max_images=1)["val"]
    red, corner, other = encode_texts(model, processor, ["the red box", "the corner", "something else"])
    _patch_regions(monkeypatch, model, [torch.stack([red, other, corner])])
    result = rec_by_ranking(model, processor, [image], "cloc", ONE_CHUNK)
    # each expression's box is one of the 3 candidates and overlaps no other: chance 1/3
    assert result["acc@0.5"] == pytest.approx(100.0) and result["chance_acc@0.5"] == pytest.approx(100 / 3)
    assert (result["num_expressions"], result["num_images"]) == (2, 1)
    _patch_regions(monkeypatch, model, [torch.stack([other, red, corner])])  # "the red box" -> 2nd box
    result = rec_by_ranking(model, processor, [image], "cloc", ONE_CHUNK)
    assert result["acc@0.5"] == pytest.approx(50.0) and result["acc@0.1"] == pytest.approx(50.0)


# --- the runner and the CLI -------------------------------------------------------------------------------
def test_evaluate_runs_every_task_and_method(model, processor, synthetic):
    results = evaluate(model, processor, synthetic, max_images=6, model_name="tiny")
    assert results["meta"]["skipped"] == {}
    assert [row["name"] for row in results["rows"]] == list(METHODS)
    for row in results["rows"]:
        assert set(ROW_KEYS) <= set(row) and {"region_shape_acc", "region_colour_acc"} <= set(row)
        assert row["model"] == "tiny"
        for key, value in row.items():
            if key not in ("name", "model"):
                assert _in_range(value), (row["name"], key, value)
        for key in ("region_macc", "region_r2t_r10", "region_t2r_r10", "image_i2t_r1", "rec_acc50",
                    "region_r2t_r1", "region_r2t_chance1", "region_t2r_r1", "region_t2r_chance1", "rec_chance50",
                    "rec_pool_acc50", "rec_pool_chance50"):
            assert row[key] is not None, key
        assert (row["rec_head_acc50"] is not None) == (row["name"] == "cloc")
        assert row["rec_pool_chance50"] < row["rec_chance50"]
    assert results["region"]["cloc"]["num_images"] == 6
    # retrieval ranks against every phrase of the split, not only those of the 6 evaluated images
    split_phrases = {r.phrase for s in read_shard_samples(synthetic / "test") for r in s.regions}
    evaluated = {r.phrase for s in read_shard_samples(synthetic / "test", max_images=6) for r in s.regions}
    assert results["region_retrieval"]["cloc"]["num_texts"] == len(split_phrases) > len(evaluated)
    assert results["region_retrieval"]["cloc"]["num_queries_t2r"] == len(evaluated)
    assert results["rec"]["ranking_pool"]["cloc"]["test"]["num_candidates"] == 20
    assert set(results["rec"]["ranking_pool"]["cloc"]) == {"test"}  # the reported split only (cost)
    assert set(results["rec"]["ranking"]["cloc"]) == {"val", "test"}
    assert set(results["rec"]["box_head"]) == {"val", "test"}
    assert results["zeroshot"]["num_images"] >= 1
    json.dumps(results, allow_nan=False)  # strict JSON


def test_evaluate_skips_tasks_without_data_and_checks_names(model, processor, tmp_path):
    results = evaluate(model, processor, tmp_path, tasks=["region", "rec"], methods=["clip-roi"])
    assert set(results["meta"]["skipped"]) == {"region", "rec"}
    assert results["rows"][0]["region_macc"] is None
    with pytest.raises(ValueError, match="unknown region method"):
        evaluate(model, processor, tmp_path, methods=["clip"])
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate(model, processor, tmp_path, tasks=["detection"])


def test_cli_writes_json_and_markdown(model, synthetic, tmp_path):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)  # no processor files: the CLI falls back to the offline one
    out, md = tmp_path / "out" / "results.json", tmp_path / "out" / "results.md"
    argv = ["--model", str(model_dir), "--data", str(synthetic), "--out", str(out), "--markdown", str(md)]
    argv += ["--tasks", "region,image_retrieval,rec", "--methods", "cloc,clip-crop", "--max-images", "4"]
    with pytest.warns(UserWarning, match="no processor files"):
        assert main(argv) == 0
    results = json.loads(out.read_text())
    assert [row["name"] for row in results["rows"]] == ["cloc", "clip-crop"]
    assert results["rows"][0]["model"] == "model"
    assert results["rows"][1]["region_r2t_r10"] is None  # task not asked for
    text = md.read_text()
    assert "| method | model | region mAcc |" in text and "| clip-crop | model |" in text
    assert "### Referring expressions by split" in text
    assert "text→region" not in text  # columns empty in every row are left out


def test_markdown_from_rows_prints_missing_values_as_dashes():
    rows = [
        {"name": "cloc", "region_macc": 92.94, "rec_head_acc50": None, "region_shape_acc": math.nan},
        {"name": "clip-crop", "region_macc": None, "rec_head_acc50": None, "region_shape_acc": 20.0},
    ]
    text = render_markdown(rows)
    assert "| method | region mAcc | shape acc |" in text
    assert "| cloc | 92.9 | - |" in text
    assert "| clip-crop | - | 20.0 |" in text


# --- the results-row schema (eval.results) ------------------------------------------------------------
def test_schema_methods_are_the_baselines_methods():
    from eval.baselines import REGION_METHODS
    from eval.results import CLIP_METHODS, METHOD_SPECS, method_spec

    assert tuple(REGION_METHODS) == METHODS and set(CLIP_METHODS) == set(METHODS) - {"cloc"}
    assert all(m.description for m in METHOD_SPECS)
    with pytest.raises(ValueError, match="'clip'.*clip-crop"):
        method_spec("clip")


def test_schema_columns_titles_and_model_index_ids():
    from eval.results import field_for, metric_keys, summary_columns

    rows = [
        {"name": "cloc", "model": "m", "paper_sign": "lower", "region_shape_acc": 1.0, "region_macc": 2.0},
        {"name": "clip-roi", "model": "m", "zeroshot_top1": None, "region_colour_acc": 3.0},
    ]
    # schema order, attributes after region_acc (here absent), outside keys last, empty columns dropped
    assert summary_columns(rows) == ["name", "model", "region_macc", "region_shape_acc", "region_colour_acc",
                                     "paper_sign"]
    assert metric_keys(rows) == ["region_macc", "region_shape_acc", "region_colour_acc"]
    import eval.results

    for key in ROW_KEYS:
        spec = field_for(key)
        chance = spec.chance_of is not None
        assert spec.title and spec.meaning and (spec.is_metric == (key not in ("name", "model") and not chance))
        assert not chance or field_for(spec.chance_of).is_metric, key
        assert f"``{key}``" in eval.results.__doc__, f"{key} is missing from the schema's table"
    shape = field_for("region_shape_acc")
    assert (shape.title, shape.metric_config, shape.task.type) == ("shape acc", "shape", "image-classification")
    assert field_for("paper_sign") is None and field_for("region__acc") is None


def test_results_file_round_trip_is_strict_json(tmp_path):
    from eval.results import load_results, save_results

    path = tmp_path / "sub" / "results.json"
    save_results({"rows": [{"name": "cloc", "region_macc": math.nan, "pair": (1, 2)}]}, path)
    assert load_results(path) == {"rows": [{"name": "cloc", "region_macc": None, "pair": [1, 2]}]}
    (tmp_path / "bad.json").write_text('{"region": {}}')
    with pytest.raises(ValueError, match="bad.json.*rows"):
        load_results(tmp_path / "bad.json")


def test_headline_columns_put_chance_beside_its_metric_and_leave_saturated_recall_to_the_json():
    from eval.results import CHANCE_KEYS, field_for, metric_keys, summary_columns

    row = {"name": "cloc", "region_r2t_r10": 100.0, "region_r2t_r1": 60.0, "region_r2t_chance1": 2.5,
           "rec_acc50": 90.0, "rec_chance50": 51.0, "rec_pool_acc50": 70.0, "rec_pool_chance50": 6.0}
    assert summary_columns([row]) == ["name", "region_r2t_r1", "region_r2t_chance1", "rec_acc50", "rec_chance50",
                                      "rec_pool_acc50", "rec_pool_chance50"]
    assert "region_r2t_r10" in summary_columns([row], details=True)
    # the model-index keeps recall@10 and never files a chance level
    assert metric_keys([row]) == ["region_r2t_r1", "region_r2t_r10", "rec_acc50", "rec_pool_acc50"]
    assert set(CHANCE_KEYS) == {"region_r2t_chance1", "region_t2r_chance1", "rec_chance50", "rec_pool_chance50"}
    assert field_for("rec_pool_chance50").chance_of == "rec_pool_acc50"
    assert "R@10" not in render_markdown([row]) and "| 60.0 | 2.5 |" in render_markdown([row])


def test_rows_of_several_seeds_become_mean_and_std():
    from eval.results import aggregate_rows, markdown_table, summary_columns

    seeds = [
        [{"name": "cloc", "model": "m", "region_macc": 70.0, "rec_head_acc50": None, "paper_sign": "lower"}],
        [{"name": "cloc", "model": "m", "region_macc": 80.0, "rec_head_acc50": 40.0, "paper_sign": "lower"}],
        [{"name": "cloc", "model": "m", "region_macc": 90.0, "rec_head_acc50": 50.0, "paper_sign": "lower"}],
    ]
    (row,) = aggregate_rows(seeds)
    assert row["region_macc"] == pytest.approx(80.0) and row["std"]["region_macc"] == pytest.approx(10.0)
    assert row["per_seed"]["region_macc"] == [70.0, 80.0, 90.0] and row["seeds"] == 3
    # a seed without a value is left out of its mean and kept as None in per_seed
    assert row["rec_head_acc50"] == pytest.approx(45.0) and row["per_seed"]["rec_head_acc50"] == [None, 40.0, 50.0]
    assert row["paper_sign"] == "lower" and row["model"] == "m"
    assert summary_columns([row]) == ["name", "model", "region_macc", "rec_head_acc50", "paper_sign"]
    assert "| cloc | m | 80.0 ± 10.0 | 45.0 ± 7.1 | lower |" in markdown_table([row], summary_columns([row]))
    assert aggregate_rows(seeds[:1]) == seeds[0]  # one seed: its rows as they are, no spread
    with pytest.raises(ValueError, match="seed 1's rows"):
        aggregate_rows([seeds[0], [{"name": "clip-roi", "model": "m"}]])


def test_chance_recall_by_hand():
    from eval.retrieval import chance_recall

    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # query 1: 1 of 4 -> R@1 1/4, R@2 1/2; query 2: 2 of 4 -> R@1 1/2, R@2 1 - (2/4)(1/3) = 5/6
    assert chance_recall(mask, 1) == pytest.approx(100 * (1 / 4 + 1 / 2) / 2)
    assert chance_recall(mask, 2) == pytest.approx(100 * (1 / 2 + 5 / 6) / 2)
    assert chance_recall(mask, 10) == pytest.approx(100.0)


def test_region_retrieval_gallery_adds_distractor_texts_for_region_to_text_only(
    model, processor, synthetic, monkeypatch
):
    samples = read_shard_samples(synthetic / "test", max_images=2)
    phrases = [r.phrase for s in samples for r in s.regions]
    texts, _ = deduplicate_texts([phrases])
    _patch_regions(monkeypatch, model, [encode_texts(model, processor, [r.phrase for r in s.regions]) for s in samples])
    base = region_text_retrieval(model, processor, samples, "cloc", options=ONE_CHUNK)
    assert base["r2t_r1"] == pytest.approx(100.0) and base["num_texts"] == len(texts)
    assert base["r2t_chance1"] == pytest.approx(100.0 / len(texts))
    # the gallery holds one text equal to a region's phrase (a duplicate, ignored) and two new ones
    wider = region_text_retrieval(model, processor, samples, "cloc", options=ONE_CHUNK,
                                  gallery=[phrases[0].upper(), "a zebra", "a lonely tree"])
    assert wider["num_texts"] == len(texts) + 2 and wider["num_queries_t2r"] == len(texts)
    assert wider["r2t_chance1"] == pytest.approx(100.0 / (len(texts) + 2))
    assert wider["t2r_r1"] == base["t2r_r1"] and wider["t2r_chance1"] == base["t2r_chance1"]
    assert wider["r2t_r1"] == pytest.approx(100.0)


def test_pool_candidates_are_seeded_distractors_after_the_gt_boxes(messy_refs):
    from eval.rec import pool_candidates

    args = (messy_refs / "refs(test).json", messy_refs / "instances.json", messy_refs / "images")
    images = load_refs(*args, splits=("val",))["val"]  # a 40x20 image with 3 candidates, a 30x30 with 1
    pools = pool_candidates(images, size=8, seed=5)
    assert [len(p) for p in pools] == [8, 8]
    for img, pool in zip(images, pools):
        torch.testing.assert_close(pool[: len(img.candidates)], img.candidates)
        width, height = img.refs[0].width, img.refs[0].height
        assert (pool[:, 2:] > pool[:, :2]).all()
        assert (pool[:, :2] >= 0).all() and (pool[:, 2] <= width + 1e-4).all() and (pool[:, 3] <= height + 1e-4).all()
    # the second image's 7 distractors: 3 boxes of the first image in its own 30x30 frame, then 4 random
    first = images[0].candidates / torch.tensor([40.0, 20, 40, 20])
    moved = pools[1][1:4] / 30
    assert all(any(torch.allclose(m, f, atol=1e-5) for f in first) for m in moved)
    for a, b in zip(pools, pool_candidates(images, size=8, seed=5)):
        torch.testing.assert_close(a, b)
    assert not torch.equal(pools[1], pool_candidates(images, size=8, seed=6)[1])
    assert [len(p) for p in pool_candidates(images, size=2)] == [3, 2]  # never fewer than the GT boxes


def test_rec_ranking_over_distractors_has_low_chance(model, processor, messy_refs, monkeypatch):
    from eval.rec import pool_candidates

    args = (messy_refs / "refs(test).json", messy_refs / "instances.json", messy_refs / "images")
    (image,) = load_refs(*args, splits=("val",), max_images=1)["val"]
    pool = pool_candidates([image], size=10, seed=0)[0]
    red, corner = encode_texts(model, processor, ["the red box", "the corner"])
    others = F.normalize(torch.randn(7, red.shape[0], generator=torch.Generator().manual_seed(0)), dim=-1)
    _patch_regions(monkeypatch, model, [torch.cat([torch.stack([red, others[0], corner]), others])])
    result = rec_by_ranking(model, processor, [image], "cloc", ONE_CHUNK, candidates=[pool])
    assert result["acc@0.5"] == pytest.approx(100.0) and result["num_candidates"] == 10
    hits = [int((box_iou(pool.double(), t[None].double())[:, 0] >= 0.5).sum()) for t in image.targets]
    assert result["chance_acc@0.5"] == pytest.approx(100 * sum(h / 10 for h in hits) / 2)
    assert result["chance_acc@0.5"] < 100 / 3  # below the GT-only protocol's chance
    # a distractor that looks like the expression wins: wrong (it does not overlap the referred box)
    far = next(j for j in range(3, 10) if box_iou(pool[j : j + 1].double(), image.targets[:1])[0, 0] < 0.5)
    embeds = torch.cat([torch.stack([red, others[0], corner]), others])
    embeds[far], embeds[0] = red, F.normalize(red + others[1], dim=-1)  # the referred box now scores lower
    _patch_regions(monkeypatch, model, [embeds])
    assert rec_by_ranking(model, processor, [image], "cloc", ONE_CHUNK, candidates=[pool])["acc@0.5"] == 50.0
    with pytest.raises(ValueError, match="1 images but 2 candidate sets"):
        rec_by_ranking(model, processor, [image], "cloc", ONE_CHUNK, candidates=[pool, pool])


def test_evaluate_rec_pool_splits_and_off(model, processor, refer_files):
    from eval.rec import evaluate_rec

    data = load_refs(refer_files / "refs(test).json", refer_files / "instances.json", refer_files / "images")
    both = evaluate_rec(model, processor, data, pool_size=6)
    assert both["ranking_pool"]["cloc"]["val"]["num_candidates"] == 6
    assert evaluate_rec(model, processor, data, pool_size=0)["ranking_pool"] is None
    assert evaluate_rec(model, processor, data, pool_splits=("test",))["ranking_pool"] is None  # no such split


def test_jitter_boxes_moves_boxes_reproducibly_and_keeps_them_valid():
    from cloc_data.format import Region, RegionSample
    from eval.region import RegionRecognitionView, jitter_boxes

    samples = [
        RegionSample(key=f"s{i}", caption="", width=40, height=30, image=None,
                     regions=[Region(box=[2.0, 3.0, 20.0, 25.0], phrase="a", meta={"category_id": 1}),
                              Region(box=[30.0, 0.0, 40.0, 30.0], phrase="b", meta={"category_id": 2})])
        for i in range(20)
    ]
    view = RegionRecognitionView(samples, ["a", "b"], [1, 2])
    noisy, again = jitter_boxes(view, 0.2, seed=3), jitter_boxes(view, 0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(noisy.boxes, again.boxes))
    assert all(torch.equal(a, b) for a, b in zip(jitter_boxes(view, 0.0).boxes, view.boxes))
    moved = torch.cat(noisy.boxes)
    assert not torch.equal(moved, torch.cat(view.boxes))
    assert (moved[:, 2] - moved[:, 0] >= 1).all() and (moved[:, 3] - moved[:, 1] >= 1).all()
    assert (moved[:, [0, 2]] >= 0).all() and (moved[:, [0, 2]] <= 40).all() and (moved[:, [1, 3]] <= 30).all()
    assert view.labels is noisy.labels and len(view.boxes[0]) == 2  # the original view is untouched
    spread = (moved - torch.cat(view.boxes)).abs().mean()
    assert 0.5 < float(spread) < 6.0
    with pytest.raises(ValueError, match="scale"):
        jitter_boxes(view, -1)
