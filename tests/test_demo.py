import dataclasses
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
                "region_shape_acc", "region_colour_acc", "region_r2t_r1", "region_r2t_chance1", "rec_chance50",
                "rec_pool_acc50", "rec_pool_chance50")
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
    text = (tmp_path / "report.md").read_text()
    assert "Equal steps" in text and "What CLOC trains on" in text and "the val split" in text
    assert "(`make demo-seeds`) adds a `cloc-noisy_labels` row" in text  # no such row here: says where it is
    assert "| (chance) |" in text and "R@10" not in text  # chance beside its metric; saturated recall in JSON only
    assert "Steps to region mAcc" in text and "±" not in text  # one seed: plain numbers
    assert report["seeds"] == [1] and not (tmp_path / "seed1").exists()  # one seed: the layout as before
    assert {(r["run"], r["method"]) for r in report["steps_to_accuracy"]} >= {("cloc", "cloc"), ("clip", "clip-roi"),
                                                                              ("clip-time", "clip-maskbg")}
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
    text = (tmp_path / "report.md").read_text()
    assert "Ablations" in text and "The `cloc-noisy_labels` row trains on the same scenes" in text


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
    # added with issue 11: the paper's threshold back in Table 2, and the noisy-label row in the main demo
    "ablations/ablation-text_filter_0.9":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9, "transformer", "attention", True),
    "headline/ablation-noisy_labels":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", True),
    "ablations/ablation-no_grounding":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", False),
    "ablations/ablation-m2": ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 2, 0.9999, "transformer", "attention", True),
    "ablations/ablation-noisy_labels":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", True),
    "ablations/ablation-prompt_token":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "token", True),
    # added with the box prior and attention box head becoming the defaults: rows without them
    "ablations/ablation-no_box_prior":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "attention", True),
    "ablations/ablation-paper_prompter":
        ("cloc-tiny-demo", "cloc", 600, 128, 0.0015, 100, 150, 4, 0.9999, "transformer", "token", True),
}
# the only CLOCConfig entries a demo run may change relative to its named architecture
OVERRIDABLE = {"text_filter_threshold", "use_grounding_loss", "prompter_config.prompter_type",
               "prompter_config.prompt_position", "prompter_config.box_attention_bias",
               "prompter_config.box_head_input", "prompter_config.type_embeddings",
               "prompter_config.image_position_encoding", "grounding_loss_type"}


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
    assert seen == {"demo", "headline", "long", "ablations"}
    assert resolve_preset("ablations").ablations == (
        "roi_align", "no_box_prior", "paper_prompter", "no_text_filter", "text_filter_0.9", "no_grounding", "m2",
        "noisy_labels", "prompt_token")
    assert resolve_preset("demo").ablations == () and resolve_preset("headline").ablations == ("noisy_labels",)
    # the headline is the demo plus its noisy-label row: same training, data and goals
    demo, headline = resolve_preset("demo"), resolve_preset("headline")
    assert dataclasses.replace(headline, ablations=()) == demo
    # the equal wall-clock comparison is demo-long's (plain `make demo` stays ~15 min)
    assert [resolve_preset(n).equal_time_run for n in ("demo", "headline", "long", "ablations")] == [
        False, False, True, False]


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


@pytest.mark.slow
def test_several_seeds_give_mean_and_std_and_keep_each_seed(tmp_path):
    from cloc_demo.demo import run_demo

    report = run_demo("smoke", tmp_path, seed=3, seeds=2, overrides={"ablations": ("noisy_labels",)})
    assert report["seeds"] == [3, 4]
    seed_reports = [json.loads((tmp_path / f"seed{s}" / "report.json").read_text()) for s in (3, 4)]
    assert [r["seeds"] for r in seed_reports] == [[3], [4]]
    cloc = next(r for r in report["rows"] if r["name"] == "cloc")
    per_seed = [next(r for r in sr["rows"] if r["name"] == "cloc")["region_macc"] for sr in seed_reports]
    assert cloc["per_seed"]["region_macc"] == per_seed and cloc["seeds"] == 2
    assert cloc["region_macc"] == pytest.approx(sum(per_seed) / 2) and cloc["std"]["region_macc"] is not None
    assert report["goals"]["region_macc_gap_equal_steps"]["cloc"] == pytest.approx(cloc["region_macc"])  # the mean
    (noisy,) = report["ablations"]
    deltas = [sr["ablations"][0]["region_macc"] - p for sr, p in zip(seed_reports, per_seed)]
    assert noisy["per_seed"]["vs_cloc"] == pytest.approx(deltas)  # paired with each seed's own CLOC run
    assert [p["seed"] for p in report["per_seed"]] == [3, 4] and report["per_seed"][1]["rows"] == seed_reports[1]["rows"]
    assert len(report["steps_to_accuracy"][0]["per_seed"]) == 2
    assert report["goals"]["steps_to_80"]["cloc_steps"] == [None, None]
    assert report["goals"]["rec_head_acc50"]["value"] == pytest.approx(cloc["rec_head_acc50"])
    text = (tmp_path / "report.md").read_text()
    assert "2 seeds (3, 4)" in text and " ± " in text and "cloc-noisy_labels" in text
    assert (tmp_path / "cloc").exists() is False and (tmp_path / "seed4" / "cloc" / "README.md").exists()
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["seeds"] == [3, 4]


def _curve(*points):
    return [{"step": step, "elapsed": step / 10, "cloc": {"macc": macc}} for step, macc in points]


def test_steps_to_accuracy_reads_the_first_val_point_at_each_level():
    from cloc_demo.report import first_reached, steps_table, steps_to_accuracy

    curve = _curve((0, 3.0), (100, 55.0), (200, 49.0), (300, 85.0))
    assert first_reached(curve, "cloc", 50) == {"step": 100, "seconds": 10.0}
    assert first_reached(curve, "cloc", 80)["step"] == 300 and first_reached(curve, "cloc", 90) is None
    clip = [{"step": s, "elapsed": s / 8, "clip-crop": {"macc": m}, "clip-roi": {"macc": 1.0}}
            for s, m in ((0, 1.0), (300, 60.0))]
    rows = steps_to_accuracy({"cloc": {"steps": 300, "curve": curve}, "clip": {"steps": 300, "curve": clip}})
    assert [(r["run"], r["method"]) for r in rows] == [("cloc", "cloc"), ("clip", "clip-crop"), ("clip", "clip-roi")]
    assert rows[1]["reached"] == {"50": {"step": 300, "seconds": 37.5}, "80": None, "90": None}
    text = steps_table(rows)
    assert "| cloc | cloc | 100 (10 s) | 300 (30 s) | not reached in 300 |" in text
    two = [{"run": "cloc", "method": "cloc", "per_seed": [rows[0], {**rows[0], "reached": {"50": None, "80": None,
                                                                                          "90": None}}]}]
    assert "100 (10 s) / not reached in 300" in steps_table(two)


def test_steps_goal_counts_a_clip_run_that_never_gets_there_as_its_length():
    from cloc_demo.report import steps_goal

    def rows(cloc_step, clip_step, length=1500):
        def reached(step):
            return {"80": None if step is None else {"step": step, "seconds": 1.0}}

        return [{"run": "cloc", "method": "cloc", "steps": length, "reached": reached(cloc_step)},
                {"run": "clip", "method": "clip-crop", "steps": length, "reached": reached(clip_step)},
                {"run": "clip", "method": "clip-maskbg", "steps": length, "reached": reached(None)},
                {"run": "clip-time", "method": "clip-maskbg", "steps": 2000, "reached": reached(250)}]

    # CLIP never reaches 80 in 1,500 steps: counted as 1,500, so CLOC at 500 and 750 (mean 625) is within half
    goal = steps_goal([rows(500, None), rows(750, None)], 80.0, 0.5)
    assert goal["best_clip_steps"] == [1500, 1500] and goal["clip_reached"] == [False, False]
    assert goal["cloc_mean"] == 625 and goal["met"] is True
    goal = steps_goal([rows(500, 900), rows(750, None)], 80.0, 0.5)  # mean 1,200: 625 > 600
    assert goal["best_clip_mean"] == 1200 and goal["met"] is False
    assert steps_goal([rows(None, 900)], 80.0, 0.5)["met"] is False  # CLOC not there: no claim
    assert steps_goal([rows(100, 900)], 80.0, None)["met"] is None  # no goal set


def test_demo_cli_passes_seeds(monkeypatch, tmp_path):
    import cloc_demo.demo as demo

    calls = []

    def fake(preset, out, seed, overrides, seeds=1, reuse=False):
        calls.append((preset, str(out), seed, overrides, seeds, reuse))
        (Path(out) / "report.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.md").write_text("report")
        return {"total_seconds": 0.0}

    monkeypatch.setattr(demo, "run_demo", fake)
    assert demo.main(["--preset", "ablations", "--seeds", "3", "--reuse", "--out", str(tmp_path)]) == 0
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert [c[4] for c in calls] == [3, 1] and calls[0][0] == "ablations"
    assert [c[5] for c in calls] == [True, False]


def test_run_demo_rejects_zero_seeds(tmp_path):
    from cloc_demo.demo import run_demo

    with pytest.raises(ValueError, match="seeds must be at least 1"):
        run_demo("smoke", tmp_path, seeds=0)


def test_goals_are_checked_on_the_rows_given():
    from cloc_demo.report import goals_report

    rows = [{"name": "clip-maskbg", "region_macc": 30.0, "region_shape_acc": 31.0, "image_i2t_r1": 5.0},
            {"name": "clip-roi", "region_macc": 20.0, "image_i2t_r1": 5.0},
            {"name": "cloc", "region_macc": 75.0, "rec_head_acc50": 59.0, "image_i2t_r1": 8.0}]
    goals = goals_report(rows, None, {"region_macc_margin": 30.0, "rec_head_acc50": 60.0, "cloc_region_macc": 74.0})
    assert goals["region_macc_gap_equal_steps"] == {"cloc": 75.0, "best_clip": 30.0, "best_clip_method": "clip-maskbg",
                                                     "gap": 45.0, "goal": 30.0, "met": True}
    assert goals["rec_head_acc50"] == {"value": 59.0, "goal": 60.0, "met": False}
    assert goals["cloc_region_macc"]["met"] is True and goals["image_i2t_r1"]["met"] is True
    assert "region_macc_gap_equal_time" not in goals and "steps_to_80" not in goals
    assert goals_report(rows, None, {})["rec_head_acc50"] == {"value": 59.0, "goal": None, "met": None}


@pytest.mark.slow
def test_reuse_loads_finished_runs_and_retrains_changed_ones(tmp_path, monkeypatch):
    """--reuse: a second call with the same settings trains nothing and reports the same numbers; a run
    whose settings changed is trained again."""
    import cloc_demo.demo as demo

    overrides = {"equal_time_run": False}
    first = demo.run_demo("smoke", tmp_path, seed=2, overrides=overrides, reuse=True)
    marker = json.loads((tmp_path / "cloc" / demo.RUN_MARKER).read_text())
    assert marker["steps"] == 4 and marker["identity"]["training"]["seed"] == 2

    trained = []
    real_trainer = demo.Trainer

    def counting_trainer(config, **kwargs):
        trained.append(Path(config.output_dir).name)
        return real_trainer(config, **kwargs)

    evaluated = []
    real_evaluate = demo.evaluate

    def counting_evaluate(model, processor, data, **kwargs):
        evaluated.append(kwargs["model_name"])
        return real_evaluate(model, processor, data, **kwargs)

    monkeypatch.setattr(demo, "Trainer", counting_trainer)
    monkeypatch.setattr(demo, "evaluate", counting_evaluate)
    second = demo.run_demo("smoke", tmp_path, seed=2, overrides=overrides, reuse=True)
    assert trained == [] and evaluated == []  # the kept test results of unchanged runs are reused
    assert second["rows"] == first["rows"]
    assert second["runs"]["cloc"]["seconds"] == first["runs"]["cloc"]["seconds"]
    # a run whose saved model config differs from what the settings build now (a changed library default)
    saved = json.loads((tmp_path / "clip" / "config.json").read_text())
    saved["prompter_config"]["box_attention_bias"] = 1.23
    (tmp_path / "clip" / "config.json").write_text(json.dumps(saved))
    demo.run_demo("smoke", tmp_path, seed=2, overrides=overrides, reuse=True)
    assert trained == ["clip"] and evaluated == ["clip"]  # a retrained run is evaluated again
    trained.clear()
    evaluated.clear()
    # other test settings: the same runs, evaluated again
    demo.run_demo("smoke", tmp_path, seed=2, overrides={**overrides, "test_images": 4}, reuse=True)
    assert trained == [] and sorted(evaluated) == ["clip", "cloc"]
    # a changed training setting (here the learning rate) makes both runs train again
    demo.run_demo("smoke", tmp_path, seed=2, reuse=True, overrides={**overrides, "training": {"lr": 1e-4}})
    assert trained == ["cloc", "clip"]
    # without --reuse everything is trained again
    trained.clear()
    demo.run_demo("smoke", tmp_path, seed=2, overrides=overrides)
    assert trained == ["cloc", "clip"]
