"""`make demo-mllm` (cloc_demo.demo_mllm): its instruction data, tokenizer, and the whole path at toy size."""

import json
import math
import re

import pytest


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A few synthetic scenes as `make demo` writes them (shards + refs + the demo's data marker)."""
    from cloc_data.synthetic import SyntheticSceneConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("scenes")
    config = SyntheticSceneConfig(seed=3, region_phrase="mention")
    write_synthetic_dataset(config, root, 24, 8, 8, overwrite=True)
    (root / "demo_data.json").write_text(json.dumps({"config": config.to_dict(), "sizes": [24, 8, 8]}))
    return root


def test_records_rec_from_expressions_and_hard_distractors(scenes, tmp_path):
    from cloc_data.shards import iter_shard_samples, list_shards
    from cloc_demo.demo_mllm import CONVENTION, build_records
    from eval.mllm_rec import ref_cls_options
    from llava_bridge.box_text import text_to_box

    path = build_records(scenes, "train", tmp_path, limit=24, seed=0)
    records = json.loads(path.read_text())
    scenes_by_key = {s.key: s for s in iter_shard_samples(list_shards(scenes / "train"), decode_images=False)}
    rec = [r for r in records if r["task"] == "rec"]
    cls = [r for r in records if r["task"] == "ref_cls"]
    assert rec and cls and {r["task"] for r in records} == {"rec", "ref_cls"}
    multi = 0
    for r in records:
        assert (tmp_path / r["image"]).is_file()
        scene = scenes_by_key[r["id"].rsplit("-", 2)[0]]
        objects = scene.meta["objects"]
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"] == "rec":  # the expression of an object, answered with its box
            obj = next(o for o in objects if o.get("ref") and f" {o['ref']['sent']} " in re.sub(r"[?.\n]", " ", f" {question} "))
            box = text_to_box(answer, (32, 32), CONVENTION)
            assert all(abs(a - b) <= 32 / 1000 + 1e-6 for a, b in zip(box, obj["box"]))
        else:
            classes = {f"{o['colour']} {o['shape']}" for o in objects}
            assert answer in classes and len(r["regions"]) == 1
            options = ref_cls_options(question)
            assert answer in options
            distractor = next(o for o in options if o != answer)
            if len(classes) > 1:  # another object of the scene, not a class the image lacks
                multi += 1
                assert distractor in classes
    assert multi > 0


def test_training_records_do_not_answer_each_other(scenes, tmp_path):
    """Multi-turn training records: a scene's REC questions together, each classification question on its
    own, so no answer can be copied from the box text of another turn or found by elimination."""
    from cloc_demo.demo_mllm import build_records
    from eval.mllm_rec import ref_cls_options

    records = json.loads(build_records(scenes, "train", tmp_path, limit=24, seed=0, multi_turn=True).read_text())
    single = json.loads(build_records(scenes, "train", tmp_path / "single", limit=24, seed=0).read_text())
    merged = [r for r in records if r["task"] == "multi"]
    cls = [r for r in records if r["task"] == "ref_cls"]
    assert merged and cls and {r["task"] for r in records} == {"multi", "ref_cls"}
    assert any(len(r["conversations"]) > 2 for r in merged)
    for r in merged:  # REC turns only: questions carry no box text and no <region>
        questions = [t["value"] for t in r["conversations"][0::2]]
        assert r["regions"] == [] and not any("[" in q or "<region>" in q for q in questions)
        answers = [t["value"] for t in r["conversations"][1::2]]
        assert len(set(answers)) == len(answers)  # different objects
    for r in cls:
        assert len(r["conversations"]) == 2 and ref_cls_options(r["conversations"][0]["value"])
    # every REC question of the one-question records is in the merged ones; one classification per scene
    rec_questions = sorted(r["conversations"][0]["value"].replace("<image>\n", "") for r in single if r["task"] == "rec")
    merged_questions = sorted(t["value"].replace("<image>\n", "") for r in merged for t in r["conversations"][0::2])
    assert merged_questions == rec_questions
    assert len({r["image"] for r in cls}) == len(cls)


def test_ref_cls_share_keeps_every_rec_record(scenes, tmp_path):
    """``ref_cls_share`` thins out the classification records only; a share outside (0, 1] is refused."""
    from cloc_demo.demo_mllm import build_records

    full = json.loads(build_records(scenes, "train", tmp_path / "a", limit=24, seed=0, multi_turn=True).read_text())
    half = json.loads(build_records(scenes, "train", tmp_path / "b", limit=24, seed=0, multi_turn=True,
                                    ref_cls_share=0.5).read_text())
    n_cls = {name: sum(r["task"] == "ref_cls" for r in recs) for name, recs in (("full", full), ("half", half))}
    assert n_cls["full"] == 24 and 0 < n_cls["half"] < 24
    rec_ids = sorted(r["id"] for r in full if r["task"] == "multi")
    assert rec_ids and rec_ids == sorted(r["id"] for r in half if r["task"] == "multi")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="ref_cls_share"):
            build_records(scenes, "train", tmp_path / "c", limit=24, seed=0, multi_turn=True, ref_cls_share=bad)


def test_tokenizer_keeps_coordinates_whole_and_adds_bos(scenes, tmp_path):
    from cloc_demo.demo_mllm import build_records, train_tokenizer

    records = json.loads(build_records(scenes, "train", tmp_path, limit=24, seed=0).read_text())
    tokenizer = train_tokenizer(records, 1000)  # room for every merge of this small corpus (the demo's has 5,000 scenes)
    answer = next(r for r in records if r["task"] == "rec")["conversations"][1]["value"]
    ids = tokenizer(" " + answer)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    pieces = tokenizer.convert_ids_to_tokens(ids[1:])
    numbers = [p for p in pieces if p.lstrip("Ġ").isdigit()]
    assert len(numbers) == 4, pieces  # each coordinate one token
    assert tokenizer.decode(ids, skip_special_tokens=True) == " " + answer
    for special in ("<image>", "<region>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1


def test_settings_reject_unknown_names():
    from cloc_demo.demo_mllm import resolve_settings

    with pytest.raises(ValueError, match="instruct_stepz"):
        resolve_settings("demo", {"instruct_stepz": 3})
    with pytest.raises(ValueError, match="unknown demo-mllm preset"):
        resolve_settings("nope")


@pytest.mark.slow
def test_demo_mllm_end_to_end(tmp_path):
    """Pretraining smoke demo -> both towers' two-stage fine-tuning, 2 seeds -> report, picture, models, card."""
    from huggingface_hub import ModelCard
    from transformers import AutoProcessor

    from cloc_demo.demo import run_demo as run_pretraining_demo
    from cloc_demo.demo_mllm import run_demo
    from llava_bridge import CLOCLlavaForConditionalGeneration

    run_pretraining_demo("smoke", tmp_path / "demo", seed=0)
    report = run_demo("smoke", tmp_path / "mllm", tmp_path / "demo", workers=2)  # two worker processes
    assert report["workers"] == 2 and report["total_cpu_seconds"] > sum(report["per_seed"]["cloc"][0][k] for k in (
        "train_cpu_seconds", "eval_cpu_seconds"))  # the workers' CPU time is counted
    saved = json.loads((tmp_path / "mllm" / "report.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["cloc", "clip"]
    for row in saved["rows"]:
        for key in ("rec_acc50", "ref_cls_acc", "parse_fail"):
            assert 0.0 <= row[key] <= 100.0 and row[f"{key}_std"] >= 0.0
            assert len(row[f"{key}_per_seed"]) == 2
            assert math.isclose(row[key], sum(row[f"{key}_per_seed"]) / 2)
    assert set(saved["goals"]) == {"rec_acc50", "ref_cls_acc"} and saved["total_seconds"] > 0
    assert report["num_rec"] > 0 and report["num_ref_cls"] > 0
    text = (tmp_path / "mllm" / "report.md").read_text()
    assert "REC Acc@0.5" in text and "![REC answers](rec_examples.png)" in text
    assert (tmp_path / "mllm" / "rec_examples.png").stat().st_size > 1000
    for tower, prompter in (("cloc", True), ("clip", False)):
        folder = tmp_path / "mllm" / f"{tower}-llava"
        model = CLOCLlavaForConditionalGeneration.from_pretrained(folder)
        assert (model.config.prompter_config is not None) == prompter
        processor = AutoProcessor.from_pretrained(folder)
        assert processor.tokenizer.bos_token == "<s>" and processor.box_convention == "ferret"
        assert not list(folder.glob("checkpoint-*"))
    card = ModelCard.load(tmp_path / "mllm" / "cloc-llava" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.eval_results
    assert not (tmp_path / "mllm" / "work" / "data").exists()
    # a second run with reuse=True evaluates the same fine-tuned models again (on val here) without training
    info = (tmp_path / "mllm" / "work" / "cloc-seed1" / "run_info.json").read_text()
    again = run_demo("smoke", tmp_path / "mllm", tmp_path / "demo", split="val", reuse=True)
    assert (tmp_path / "mllm" / "work" / "cloc-seed1" / "run_info.json").read_text() == info
    assert again["split"] == "val"
    assert again["rows"][0]["train_seconds_per_seed"] == report["rows"][0]["train_seconds_per_seed"]
