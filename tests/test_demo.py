import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    """The whole main job at toy size: data, CLOC + CLIP (+ equal-time CLIP) training, evaluation, report."""
    from transformers import AutoModel

    import cloc_hf  # noqa: F401
    from cloc_demo.demo import run_demo

    report = run_demo("smoke", tmp_path, seed=1)
    names = [row["name"] for row in report["rows"]]
    assert names == ["clip-crop", "clip-maskbg", "clip-roi", "cloc"]
    required = ("region_macc", "region_r2t_r10", "region_t2r_r10", "image_i2t_r1", "image_t2i_r1", "rec_acc50",
                "region_shape_acc", "region_colour_acc")
    for row in report["rows"]:
        for key in required:
            assert key in row
            assert row[key] is None or 0.0 <= row[key] <= 100.0
    cloc_row = report["rows"][-1]
    assert cloc_row["rec_head_acc50"] is not None
    assert [r["name"] for r in report["rows_equal_time"]] == names
    assert report["runs"]["clip-time"]["steps"] >= report["runs"]["clip"]["steps"]
    assert "region_macc_gap_equal_steps" in report["goals"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    for picture in ("learning_curves.png", "examples.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    assert "Equal steps" in (tmp_path / "report.md").read_text()
    assert type(AutoModel.from_pretrained(tmp_path / "cloc")).__name__ == "CLOCModel"
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "cloc" / "README.md")
    assert card.data.library_name == "transformers" and card.data.eval_results
    curve = report["runs"]["cloc"]["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4] and "cloc" in curve[-1]


@pytest.mark.slow
def test_ablation_rows_run_and_change_what_they_say(tmp_path):
    """Table 2 in miniature at toy size: each switch reaches the model it names, and gets its own row."""
    from cloc_demo.demo import ABLATIONS, run_demo

    chosen = ("roi_align", "prompt_token", "noisy_labels")
    report = run_demo("smoke", tmp_path, seed=1, overrides={"ablations": chosen, "equal_time_run": False})
    rows = report["ablations"]
    assert [r["name"] for r in rows] == [f"cloc-{name}" for name in chosen]
    for row, name in zip(rows, chosen):
        assert row["paper_sign"] == ABLATIONS[name]["paper_sign"]
        assert 0.0 <= row["region_macc"] <= 100.0
    prompter = json.loads((tmp_path / "ablation-roi_align" / "config.json").read_text())["prompter_config"]
    assert prompter["prompter_type"] == "roi_align"
    prompter = json.loads((tmp_path / "ablation-prompt_token" / "config.json").read_text())["prompter_config"]
    assert prompter["prompt_position"] == "token"
    noisy = json.loads((tmp_path / "data-noisy_labels" / "demo_data.json").read_text())["config"]
    assert noisy["missed_region_prob"] > 0 and noisy["region_phrase"] == "mention"
    assert "Ablations" in (tmp_path / "report.md").read_text()


# Every run's effective settings as they were when the presets were a dataclass mirroring PretrainConfig
# (arch, objective, steps, batch, lr, eval_every, save_every, regions the collator samples per image,
# text-filter threshold, prompter type, prompt position, grounding loss on): the named overrides must
# resolve to exactly these, so `make demo`, `make demo-long` and `make ablations` train the same runs.
RESOLVED_BEFORE = {
    "demo/cloc": ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", True),
    "demo/clip": ("cloc-tiny-demo", "clip", 600, 128, 0.0015, 100, 150, 0, 0.9999, "transformer", "attention", True),
    "long/cloc": ("cloc-tiny-demo", "cloc", 1500, 128, 0.0015, 250, 375, 4, 0.9999, "transformer", "attention", True),
    "long/clip": ("cloc-tiny-demo", "clip", 1500, 128, 0.0015, 250, 375, 0, 0.9999, "transformer", "attention", True),
    "ablations/cloc": ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", True),
    "ablations/ablation-roi_align":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "roi_align", "attention", True),
    "ablations/ablation-no_text_filter":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, None, "transformer", "attention", True),
    "ablations/ablation-no_grounding":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", False),
    "ablations/ablation-m2": ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 2, 0.9999, "transformer", "attention", True),
    "ablations/ablation-noisy_labels":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", True),
    "ablations/ablation-prompt_token":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "token", True),
}
# the only CLOCConfig entries a demo run may change relative to its named architecture
OVERRIDABLE = {"text_filter_threshold", "use_grounding_loss", "prompter_config.prompter_type",
               "prompter_config.prompt_position"}


def _flat(d, prefix=""):
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_presets_resolve_to_the_same_runs_as_before(tmp_path):
    import cloc_hf
    from cloc_demo.demo import ABLATIONS, resolve_preset, run_config

    seen = set()
    for key, expected in RESOLVED_BEFORE.items():
        preset_name, run = key.split("/")
        preset = resolve_preset(preset_name)
        ablation = run.removeprefix("ablation-") if run.startswith("ablation-") else None
        assert ablation is None or ablation in preset.ablations
        objective = "clip" if run == "clip" else "cloc"
        steps = preset.base_config().steps
        config = run_config(run, tmp_path, tmp_path, preset, objective, steps, 0,
                            ABLATIONS[ablation]["training"] if ablation else None)
        model = config.model_config()
        got = (config.arch, config.objective, config.steps, config.batch_size, config.lr, config.eval_every,
               config.save_every, config.collator_regions, model.text_filter_threshold,
               model.prompter_config.prompter_type, model.prompter_config.prompt_position, model.use_grounding_loss)
        assert got == expected, key
        changed = {k for k, v in _flat(model.to_dict()).items()
                   if v != _flat(cloc_hf.get_model_config(config.arch).to_dict()).get(k)}
        assert changed <= OVERRIDABLE, (key, changed - OVERRIDABLE)
        seen.add(preset_name)
    assert seen == {"demo", "long", "ablations"}
    assert resolve_preset("ablations").ablations == (
        "roi_align", "no_text_filter", "no_grounding", "m2", "noisy_labels", "prompt_token")


def test_presets_are_overrides_not_a_mirror_of_pretrain_config():
    import dataclasses

    from cloc_demo.demo import ABLATIONS, DemoSettings, resolve_preset, run_config
    from training.config import PretrainConfig

    pretrain_fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert not {f.name for f in dataclasses.fields(DemoSettings)} & pretrain_fields
    for name, spec in ABLATIONS.items():  # every row is PretrainConfig overrides
        assert set(spec["training"]) <= pretrain_fields, name
        PretrainConfig.from_dict(spec["training"])
    with pytest.raises(ValueError, match=r"\['steps'\] are not DemoSettings fields"):
        resolve_preset("demo", {"steps": 10})  # training settings go under "training"
    assert resolve_preset("demo", {"training": {"steps": 10}}).base_config().steps == 10
    with pytest.raises(ValueError, match="unknown ablations"):
        resolve_preset("demo", {"ablations": ("no_such_row",)})
    with pytest.raises(ValueError, match=r"\['seed'\] are set by the demo"):
        run_config("x", Path("."), Path("."), resolve_preset("demo"), "cloc", 1, 0, {"seed": 3})
