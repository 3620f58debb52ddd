import json

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
