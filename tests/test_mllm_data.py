"""Instruction data for referring and grounding (training.mllm): records, boxes as text, CLI."""

from __future__ import annotations

import json

import pytest

from cloc_data.format import Region, RegionSample
from cloc_data.shards import ShardWriter
from cloc_data.synthetic import SyntheticSceneConfig, generate_split
from llava_bridge.box_text import parse_box
from llava_bridge.constants import REGION_TOKEN
from training.mllm import data_cli
from training.mllm.instructions import InstructionBuilder, InstructionConfig, collect_phrases


def _sample(key="k1", caption="a red circle left of a blue square", width=200, height=100):
    return RegionSample(
        key=key, caption=caption, width=width, height=height,
        regions=[Region((10, 20, 60, 80), "a red circle"), Region((120, 10, 190, 90), "a blue square")],
    )


def test_rec_answer_is_the_box_in_the_original_frame():
    builder = InstructionBuilder(InstructionConfig(tasks=("rec",), convention="lmms_eval"))
    records = builder.records(_sample())
    assert len(records) == 2
    for record in records:
        human, gpt = (turn["value"] for turn in record["conversations"])
        assert human.startswith("<image>\n")
        box = parse_box(gpt, "lmms_eval")
        phrase = "a red circle" if "red" in human else "a blue square"
        expected = {"a red circle": (0.05, 0.2, 0.3, 0.8), "a blue square": (0.6, 0.1, 0.95, 0.9)}[phrase]
        assert box == pytest.approx(expected, abs=1e-3)
        assert record["regions"] == []


def test_pad_frame_normalises_in_the_padded_square():
    """200x100 image padded to 200x200 with the image centred: y shifts by 50 px."""
    builder = InstructionBuilder(InstructionConfig(tasks=("rec",), convention="shikra", frame="pad"))
    sample = _sample()
    sample.regions = sample.regions[:1]
    box = parse_box(builder.records(sample)[0]["conversations"][1]["value"], "shikra")
    assert box == pytest.approx((10 / 200, 70 / 200, 60 / 200, 130 / 200), abs=1e-3)


def test_region_tasks_name_one_region_per_token():
    sample = _sample()
    pool = collect_phrases([sample, _sample("k2", "")]) + ["a green cross", "a yellow ring"]
    builder = InstructionBuilder(InstructionConfig(tasks=("ref_desc", "ref_cls"), seed=3), pool)
    records = builder.records(sample)
    assert {r["task"] for r in records} == {"ref_desc", "ref_cls"}
    for record in records:
        human, gpt = (turn["value"] for turn in record["conversations"])
        assert human.count(REGION_TOKEN) == len(record["regions"]) == 1
        assert gpt in ("a red circle", "a blue square")
        assert list(map(float, record["regions"][0])) in ([10, 20, 60, 80], [120, 10, 190, 90])
        if record["task"] == "ref_cls":
            assert gpt in human
            others = [p for p in ("a green cross", "a yellow ring") if p in human]
            assert len(others) == 1, "the distractor comes from the pool and is not an object of this image"


def test_ref_cls_without_a_distractor_is_counted_not_invented():
    builder = InstructionBuilder(InstructionConfig(tasks=("ref_cls",)), phrase_pool=["a red circle", "a blue square"])
    assert builder.records(_sample()) == []
    assert builder.skipped.as_dict() == {"ref_cls_no_usable_region": 1}


def test_grounded_caption_puts_a_box_after_each_mentioned_phrase():
    builder = InstructionBuilder(InstructionConfig(tasks=("grounded_caption",), convention="ferret"))
    (record,) = builder.records(_sample())
    answer = record["conversations"][1]["value"]
    assert answer == "a red circle [50, 200, 300, 800] left of a blue square [600, 100, 950, 900]"


def test_templates_are_varied_and_seeded():
    samples = list(generate_split(SyntheticSceneConfig(seed=0), "train", 30))
    def questions(seed):
        builder = InstructionBuilder(InstructionConfig(tasks=("rec",), seed=seed))
        return [r["conversations"][0]["value"].split("\n", 1)[1] for s in samples for r in builder.records(s)]
    first = questions(0)
    assert first == questions(0)
    assert first != questions(1)
    assert len({q.split()[0] for q in first}) > 1, "several phrasings are used"


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown or no tasks"):
        InstructionConfig(tasks=("caption",))
    with pytest.raises(ValueError, match="box convention"):
        InstructionConfig(convention="yolo")
    with pytest.raises(ValueError, match="frame"):
        InstructionConfig(frame="crop")


def _write_shards(tmp_path, samples):
    with ShardWriter(tmp_path / "shards", max_samples_per_shard=10) as writer:
        for sample in samples:
            writer.write(sample)
    return tmp_path / "shards"


def test_cli_writes_llava_json_images_and_counts(tmp_path):
    samples = list(generate_split(SyntheticSceneConfig(seed=0), "train", 12))
    samples.append(RegionSample(key="empty", caption="", width=32, height=32, image=samples[0].image))
    shards = _write_shards(tmp_path, samples)
    out = tmp_path / "mllm"
    assert data_cli.main(["--input", str(shards), "--out", str(out), "--tasks", "rec,ref_cls"]) == 0
    records = json.loads((out / "data.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"] == len(records) > 12
    assert stats["skipped_records"]["rec_no_usable_region"] == 1  # the sample without regions
    for record in records:
        assert (out / record["image"]).is_file()
        assert record["conversations"][0]["from"] == "human" and record["conversations"][1]["from"] == "gpt"


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert data_cli.main(["--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cloc-mllm-data: error:") and "empty" in err[0]
    shards = _write_shards(tmp_path, list(generate_split(SyntheticSceneConfig(seed=0), "train", 2)))
    assert data_cli.main(["--input", str(shards), "--out", str(tmp_path / "o"), "--tasks", "nope"]) == 2
    assert "unknown or no tasks" in capsys.readouterr().err
