"""Synthetic scenes generator: determinism, geometry, captions, noise rates, referring expressions, export."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cloc_data.shards import iter_shard_samples, list_shards
from cloc_data.synthetic import (
    SHAPES,
    SceneObject,
    SyntheticSceneConfig,
    attribute_values,
    class_attributes,
    class_index,
    class_names,
    coco_instances,
    generate_scene,
    generate_split,
    per_attribute_accuracy,
    referring_expressions,
    shape_mask,
    write_synthetic_dataset,
)
from cloc_data.synthetic.scenes import assign_referring_expressions
from cloc_data.synthetic.shapes import plural
from cloc_hf.box_ops import box_iou

CONFIG = SyntheticSceneConfig(seed=3)


@pytest.fixture(scope="module")
def val_samples():
    return list(generate_split(CONFIG, "val", 400))


def image_hash(sample) -> str:
    return hashlib.sha1(sample.image.tobytes()).hexdigest()


def object_mask_in_image(obj: dict, size: int) -> np.ndarray:
    full = np.zeros((size, size), dtype=bool)
    x0, y0 = obj["origin"]
    side = obj["side"]
    full[y0 : y0 + side, x0 : x0 + side] = shape_mask(obj["shape"], side).mask
    return full


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_objects": 3, "max_objects": 2}, "max_objects"),
        ({"shapes": ("circle", "blob")}, "shapes"),
        ({"colours": {"red": (300, 0, 0)}}, "colours"),
        ({"colours": {"red": (1, 2, 3), "crimson": (1, 2, 3)}}, "colours"),
        ({"size_classes": {"small": (0.5, 0.2)}}, "size_classes"),
        ({"caption_min_mentions": 2, "caption_max_mentions": 1}, "caption_max_mentions"),
        ({"caption_templates": ("a picture",)}, "caption_templates"),
        ({"regions_for": "some"}, "regions_for"),
        ({"region_phrase": "caption"}, "region_phrase"),
        ({"backgrounds": ("stripes",)}, "backgrounds"),
        ({"wrong_phrase_prob": 1.5}, "wrong_phrase_prob"),
        ({"noise_splits": ("dev",)}, "noise_splits"),
        ({"referring_relations": ("behind",)}, "referring_relations"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SyntheticSceneConfig\.{field}\b"):
        SyntheticSceneConfig(**kwargs)


def test_config_defaults_follow_calibration_round_2():
    config = SyntheticSceneConfig()
    assert config.image_size == 32
    assert config.shapes == ("circle", "square", "triangle", "cross", "ring")
    assert len(config.colours) == 6 and len(class_names(config)) == 30
    assert config.size_range_px("small") == (9, 12) and config.size_range_px("large") == (13, 17)
    assert (config.min_objects, config.max_objects) == (1, 3)
    assert (config.caption_min_mentions, config.caption_max_mentions) == (1, 2)
    assert config.attribute_only_prob == pytest.approx(0.3)
    # size classes scale with the image
    assert SyntheticSceneConfig(image_size=64).size_range_px("large") == (26, 34)


def test_config_json_round_trip():
    config = SyntheticSceneConfig(seed=7, shapes=("ring", "star"), regions_for="mentioned", box_jitter=0.1)
    again = SyntheticSceneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="no field"):
        SyntheticSceneConfig.from_dict({"sede": 1})


# --- shapes -------------------------------------------------------------------------------------------


def test_shape_masks_are_distinct_and_tight():
    for side in range(9, 18):
        masks = {}
        for shape in SHAPES:
            drawn = shape_mask(shape, side)
            rows, cols = np.nonzero(drawn.mask)
            assert drawn.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert drawn.area == drawn.mask.sum() > 0
            masks[shape] = drawn.mask.tobytes()
        assert len(set(masks.values())) == len(SHAPES), f"two shapes draw the same mask at side {side}"
        centre = side // 2
        assert shape_mask("circle", side).mask[centre, centre]
        assert not shape_mask("ring", side).mask[centre, centre]
    assert plural("cross") == "crosses" and plural("ring") == "rings"


# --- determinism and splits ---------------------------------------------------------------------------


def test_same_config_and_seed_give_identical_samples(val_samples):
    again = list(generate_split(CONFIG, "val", 60))
    for a, b in zip(val_samples[:60], again):
        assert a.image.tobytes() == b.image.tobytes()
        assert a.to_json() == b.to_json()
    # random access and offsets agree with the stream
    assert generate_scene(CONFIG, "val", 17).to_json() == val_samples[17].to_json()
    assert next(generate_split(CONFIG, "val", 1, start=5)).to_json() == val_samples[5].to_json()
    other = list(generate_split(SyntheticSceneConfig(seed=4), "val", 60))
    assert sum(a.image.tobytes() == b.image.tobytes() for a, b in zip(again, other)) == 0


def test_splits_never_share_an_image(val_samples):
    train = {image_hash(s) for s in generate_split(CONFIG, "train", 400)}
    test = {image_hash(s) for s in generate_split(CONFIG, "test", 400)}
    val = {image_hash(s) for s in val_samples}
    assert len(train) == len(val) == len(test) == 400
    assert not (train & val) and not (train & test) and not (val & test)
    with pytest.raises(ValueError, match="unknown split"):
        next(generate_split(CONFIG, "dev", 1))


# --- geometry -----------------------------------------------------------------------------------------


def test_boxes_are_tight_inside_and_match_drawn_pixels(val_samples):
    size = CONFIG.image_size
    counts = []
    for sample in val_samples:
        pixels = np.asarray(sample.image)
        assert pixels.shape == (size, size, 3)
        objects = sample.meta["objects"]
        counts.append(len(objects))
        occupied = np.zeros((size, size), dtype=bool)
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            mask = object_mask_in_image(obj, size)
            rows, cols = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert (pixels[mask] == obj["rgb"]).all(), f"{sample.key}: wrong colour inside {obj['shape']}"
            palette = np.array(CONFIG.colours[obj["colour"]])
            assert np.abs(np.array(obj["rgb"]) - palette).max() <= CONFIG.colour_jitter
            assert obj["class_id"] == class_index(CONFIG, obj["shape"], obj["colour"])
            lo, hi = CONFIG.size_range_px(obj["size"])
            assert lo <= obj["side"] <= hi
            assert not (occupied & mask).any(), f"{sample.key}: objects overlap"
            occupied |= mask
        if len(objects) > 1:
            boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32)
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(iou.max()) <= CONFIG.max_box_iou + 1e-6
        # clean labels: one region per object, its box and phrase exact
        assert [r.meta["instance_id"] for r in sample.regions] == [o["instance_id"] for o in objects]
        for region, obj in zip(sample.regions, objects):
            assert region.box == tuple(float(v) for v in obj["box"])
            assert region.phrase == f"a {obj['colour']} {obj['shape']}"
            assert region.meta["class_id"] == obj["class_id"] and region.source == "synthetic"
        sample.validate()
    assert set(counts) == {1, 2, 3}
    assert {s.meta["background"] for s in val_samples} == {"plain", "gradient", "noise"}


def test_crowded_configs_keep_min_objects_or_fail_clearly():
    crowded = SyntheticSceneConfig(image_size=64, min_objects=4, max_objects=6, shapes=tuple(SHAPES))
    counts = [len(s.meta["objects"]) for s in generate_split(crowded, "train", 40)]
    assert min(counts) >= 4 and max(counts) == 6
    impossible = SyntheticSceneConfig(
        min_objects=6, max_objects=6, size_classes={"large": (13 / 32, 17 / 32)}
    )
    with pytest.raises(RuntimeError, match="min_objects"):
        generate_scene(impossible, "train", 0)


# --- captions -----------------------------------------------------------------------------------------


def test_captions_mention_a_subset_of_the_objects(val_samples):
    shape_words = set(CONFIG.shapes) | {plural(s) for s in CONFIG.shapes}
    mentions = []
    for sample in val_samples:
        objects = sample.meta["objects"]
        mentioned = [o for o in objects if o["mention"] is not None]
        assert 1 <= len(mentioned) <= min(2, len(objects))
        for obj in mentioned:
            words = obj["mention"].split()
            assert words[0] == "a" and words[-1] == obj["shape"]
            assert words[1:-1] in ([], [obj["colour"]])
            mentions.append(obj["mention"])
            if sum(o["mention"] == obj["mention"] for o in mentioned) == 1:
                assert obj["mention"] in sample.caption
            else:
                assert f"two {' '.join(words[1:-1] + [plural(obj['shape'])])}" in sample.caption
        # every shape or colour the caption names is in the image
        tokens = re.findall(r"[a-z]+", sample.caption)
        for token in tokens:
            if token in shape_words:
                assert any(token in (o["shape"], plural(o["shape"])) for o in mentioned)
            if token in CONFIG.colours:
                assert any(o["colour"] == token for o in mentioned)
    shape_only = np.mean([len(m.split()) == 2 for m in mentions])
    assert abs(shape_only - CONFIG.attribute_only_prob) < 0.06
    mentioned_fraction = np.mean([o["mention"] is not None for s in val_samples for o in s.meta["objects"]])
    assert 0.6 < mentioned_fraction < 0.75  # calibration round 2: ~67%


def test_regions_for_mentioned_and_size_in_phrase():
    config = SyntheticSceneConfig(seed=3, regions_for="mentioned", size_in_phrase=True)
    for sample in generate_split(config, "val", 100):
        objects = sample.meta["objects"]
        mentioned = [o["instance_id"] for o in objects if o["mention"] is not None]
        assert [r.meta["instance_id"] for r in sample.regions] == mentioned
        for region in sample.regions:
            obj = objects[region.meta["instance_id"]]
            assert region.phrase == f"a {obj['size']} {obj['colour']} {obj['shape']}"
            assert obj["mention"].split()[1] == obj["size"]


def test_region_phrase_mention_uses_the_caption_wording_and_keeps_the_scene():
    full = list(generate_split(SyntheticSceneConfig(seed=5), "train", 200))
    mention = list(generate_split(SyntheticSceneConfig(seed=5, region_phrase="mention"), "train", 200))
    shape_only = 0
    for a, b in zip(full, mention):
        assert a.caption == b.caption and a.image.tobytes() == b.image.tobytes()  # same draws, same scene
        assert [r.box for r in a.regions] == [r.box for r in b.regions]
        for region_full, region in zip(a.regions, b.regions):
            obj = b.meta["objects"][region.meta["instance_id"]]
            assert region_full.phrase == f"a {obj['colour']} {obj['shape']}"
            assert region.phrase == (obj["mention"] or region_full.phrase)
            assert obj["mention"] is None or obj["mention"] in b.caption or "two" in b.caption
            shape_only += region.phrase == f"a {obj['shape']}"
    assert shape_only > 20  # ~30% of mentions name the shape only


# --- pseudo-label noise -------------------------------------------------------------------------------


def test_noise_knobs_hit_the_requested_rates():
    noisy = SyntheticSceneConfig(seed=3, box_jitter=0.2, missed_region_prob=0.2, wrong_phrase_prob=0.3)
    clean_samples = list(generate_split(SyntheticSceneConfig(seed=3), "train", 1200))
    noisy_samples = list(generate_split(noisy, "train", 1200))
    total = kept = wrong = 0
    offsets = []
    for clean, sample in zip(clean_samples, noisy_samples):
        # noise touches region labels only
        assert sample.image.tobytes() == clean.image.tobytes() and sample.caption == clean.caption
        objects = sample.meta["objects"]
        total += len(objects)
        kept += len(sample.regions)
        for region in sample.regions:
            obj = objects[region.meta["instance_id"]]
            true_phrase = f"a {obj['colour']} {obj['shape']}"
            if region.phrase != true_phrase:
                wrong += 1
                assert region.phrase.removeprefix("a ") in class_names(noisy)
            x1, y1, x2, y2 = obj["box"]
            scale = np.array([x2 - x1, y2 - y1] * 2, dtype=float)
            offset = (np.array(region.box) - np.array(obj["box"])) / scale
            assert np.abs(offset).max() <= 0.2 + 1e-3
            assert all(0 <= v <= noisy.image_size for v in region.box)
            offsets.append(offset)
    assert abs(1 - kept / total - 0.2) < 0.03
    assert abs(wrong / kept - 0.3) < 0.03
    # uniform in [-0.2, 0.2] has mean |offset| 0.1; clipping at the image border lowers it a little
    assert 0.085 < np.abs(np.array(offsets)).mean() < 0.105
    # evaluation splits stay clean by default
    for sample in generate_split(noisy, "val", 50):
        assert len(sample.regions) == len(sample.meta["objects"])
        assert all(
            r.box == tuple(float(v) for v in o["box"]) for r, o in zip(sample.regions, sample.meta["objects"])
        )


# --- referring expressions ----------------------------------------------------------------------------


def _object(instance_id, box, side=None, shape="circle", colour="red"):
    x1, y1, x2, y2 = box
    return SceneObject(
        instance_id=instance_id,
        shape=shape,
        colour=colour,
        size="small",
        side=side or x2 - x1,
        origin=(x1, y1),
        box=box,
        rgb=(220, 30, 30),
        area=1,
        class_id=class_index(CONFIG, shape, colour),
    )


def test_referring_expressions_for_a_same_kind_pair():
    rng = np.random.default_rng(0)
    horizontal = SyntheticSceneConfig(referring_relations=("horizontal",))
    left, right = _object(0, (2, 10, 12, 20)), _object(1, (18, 12, 28, 22))
    blue = _object(2, (2, 22, 12, 32), colour="blue", shape="square")
    assign_referring_expressions(rng, horizontal, [left, right, blue])
    assert left.ref == {"sent": "the left red circle", "needs_context": True, "relation": "left"}
    assert right.ref["sent"] == "the right red circle"
    assert blue.ref == {"sent": "the blue square", "needs_context": False, "relation": None}

    size = SyntheticSceneConfig(referring_relations=("size",))
    big, small = _object(0, (2, 2, 17, 17)), _object(1, (20, 20, 30, 30))
    assign_referring_expressions(rng, size, [big, small])
    assert (big.ref["sent"], small.ref["sent"]) == ("the larger red circle", "the smaller red circle")

    vertical = SyntheticSceneConfig(referring_relations=("vertical",))
    a, b = _object(0, (2, 2, 12, 12)), _object(1, (5, 4, 15, 14))  # 2 px apart: under the 3.2 px margin
    assign_referring_expressions(rng, vertical, [a, b])
    assert a.ref is None and b.ref is None


_BASE_RELATION = {
    "leftmost": "left",
    "rightmost": "right",
    "topmost": "upper",
    "bottommost": "lower",
    "largest": "larger",
    "smallest": "smaller",
}


def _singles_out(obj: dict, other: dict, relation: str, config: SyntheticSceneConfig) -> bool:
    """Whether ``relation`` ("left", "topmost", "larger"...) holds for ``obj`` against ``other``."""
    margin = config.referring_margin * config.image_size
    relation = _BASE_RELATION.get(relation, relation)
    if relation in ("larger", "smaller"):
        big, small = (obj, other) if relation == "larger" else (other, obj)
        return big["side"] >= config.referring_size_ratio * small["side"]
    axis = 0 if relation in ("left", "right") else 1
    mine = (obj["box"][axis] + obj["box"][axis + 2]) / 2
    theirs = (other["box"][axis] + other["box"][axis + 2]) / 2
    return mine + margin <= theirs if relation in ("left", "upper") else mine - margin >= theirs


def test_generated_referring_expressions_are_correct():
    config = SyntheticSceneConfig(seed=5, duplicate_prob=0.7)
    seen = set()
    for sample in generate_split(config, "test", 300):
        objects = sample.meta["objects"]
        for obj in objects:
            twins = [o for o in objects if o is not obj and o["class_id"] == obj["class_id"]]
            ref = obj["ref"]
            if not twins:
                assert ref == {
                    "sent": f"the {obj['colour']} {obj['shape']}",
                    "needs_context": False,
                    "relation": None,
                }
                continue
            if ref is None:
                continue
            assert (
                ref["needs_context"]
                and ref["sent"] == f"the {ref['relation']} {obj['colour']} {obj['shape']}"
            )
            relation = ref["relation"]
            seen.add(relation)
            assert relation.endswith("most") or relation.endswith("est") or len(twins) == 1
            assert all(_singles_out(obj, o, relation, config) for o in twins), (
                f"{sample.key}: {ref['sent']} is wrong"
            )
    assert {"left", "right", "upper", "lower", "larger", "smaller"} <= seen


# --- class vocabulary ----------------------------------------------------------------------------------


def test_class_names_and_attribute_lookups():
    names = class_names(CONFIG)
    assert names[0] == "red circle" and names[class_index(CONFIG, "ring", "cyan")] == "cyan ring"
    attrs = class_attributes(CONFIG)
    assert all(
        a["name"] == f"{a['colour']} {a['shape']}" and names[a["class_id"]] == a["name"] for a in attrs
    )
    assert attribute_values(CONFIG) == {
        "shape": list(CONFIG.shapes),
        "colour": list(CONFIG.colours),
        "size": ["small", "large"],
    }
    red_circle, blue_circle = class_index(CONFIG, "circle", "red"), class_index(CONFIG, "circle", "blue")
    red_ring = class_index(CONFIG, "ring", "red")
    scores = per_attribute_accuracy(
        CONFIG,
        [red_circle, red_circle, red_ring, blue_circle],
        [red_circle, blue_circle, red_circle, blue_circle],
        sizes=["small", "large", "large", "small"],
    )
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["shape"] == pytest.approx(0.75) and scores["colour"] == pytest.approx(0.75)
    assert scores["mean_class_accuracy"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert scores["by_size"] == {"small": 1.0, "large": 0.0}
    with pytest.raises(ValueError, match="not a class"):
        class_index(CONFIG, "circle", "white")


# --- export -------------------------------------------------------------------------------------------


def test_write_dataset_shards_coco_and_refs(tmp_path):
    config = SyntheticSceneConfig(seed=3, duplicate_prob=0.5)
    info = write_synthetic_dataset(
        config, tmp_path / "a", n_train=20, n_val=12, n_test=10, max_samples_per_shard=8
    )
    root = tmp_path / "a"
    assert [p.split("/")[-1] for p in list_shards(str(root / "train"))] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert info == json.loads((root / "dataset_info.json").read_text())
    assert SyntheticSceneConfig.from_dict(info["config"]) == config
    assert {s: e["counts"]["images"] for s, e in info["splits"].items()} == {
        "train": 20,
        "val": 12,
        "test": 10,
    }

    for split, n in (("train", 20), ("val", 12), ("test", 10)):
        expected = list(generate_split(config, split, n))
        read = list(iter_shard_samples(list_shards(str(root / split))))
        assert [s.to_json() for s in read] == [s.to_json() for s in expected]
        assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(read, expected))
        assert info["splits"][split]["counts"]["objects"] == sum(len(s.meta["objects"]) for s in expected)
        if split == "train":
            assert not (root / "instances_train.json").exists()
            continue
        coco = json.loads((root / f"instances_{split}.json").read_text())
        assert coco == json.loads(
            json.dumps(coco_instances(config, expected, description=coco["info"]["description"]))
        )
        assert len(coco["categories"]) == 30
        categories = {c["id"]: c for c in coco["categories"]}
        assert all(c["name"] == f"{c['colour']} {c['shape']}" for c in categories.values())
        images = {im["id"]: im for im in coco["images"]}
        assert len(images) == n
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for sample in expected:
            image = next(im for im in coco["images"] if im["file_name"] == f"{sample.key}.png")
            assert (image["width"], image["height"]) == (32, 32)
            with Image.open(root / split / "images" / image["file_name"]) as png:
                assert png.convert("RGB").tobytes() == sample.image.tobytes()
            anns = by_image[image["id"]]
            assert len(anns) == len(sample.meta["objects"])
            for ann, obj in zip(anns, sample.meta["objects"]):
                x, y, w, h = ann["bbox"]
                assert (
                    [x, y, x + w, y + h] == obj["box"] and ann["iscrowd"] == 0 and ann["area"] == obj["area"]
                )
                category = categories[ann["category_id"]]
                assert (category["shape"], category["colour"]) == (obj["shape"], obj["colour"])

    refs = json.loads((root / "refs(synthetic).json").read_text())
    assert refs == referring_expressions(
        list(generate_split(config, "val", 12)) + list(generate_split(config, "test", 10))
    )
    anns = {
        a["id"]: a
        for split in ("val", "test")
        for a in json.loads((root / f"instances_{split}.json").read_text())["annotations"]
    }
    assert {r["split"] for r in refs} == {"val", "test"}
    assert any(r["needs_context"] for r in refs) and any(not r["needs_context"] for r in refs)
    for ref in refs:
        ann = anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
        sent = ref["sentences"][0]["sent"]
        assert sent.startswith("the ") and sent.endswith(f"{ann['colour']} {ann['shape']}")
        assert len(ref["sentences"]) == 1 and isinstance(ref["needs_context"], bool)

    # same config and seed -> byte-identical files; no silent overwrite
    write_synthetic_dataset(config, tmp_path / "b", n_train=20, n_val=12, n_test=10, max_samples_per_shard=8)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(config, root, n_train=4, n_val=0, n_test=0)
    info = write_synthetic_dataset(config, root, n_train=4, n_val=0, n_test=0, overwrite=True)
    assert list(info["splits"]) == ["train"] and not (root / "instances_val.json").exists()
    assert not (root / "val" / "images" / "val-00000000.png").exists()
    assert len(list(iter_shard_samples(list_shards(str(root / "train"))))) == 4
