"""Model cards: built from results rows and for the paper architectures, parsed back with huggingface_hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from eval.results import empty_row
from model_cards.generate import (
    PAPER_ARCHS,
    PAPER_RESULTS,
    PAPER_URL,
    TEMPLATES,
    card_from_results,
    main,
    paper_card,
    paper_number,
    select_row,
    write_demo_card,
    write_paper_card,
)

CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards" / "cards"
CARD_FILES = sorted(CARDS_DIR.glob("*.md"))


def _row(name, model, **values):
    row = empty_row(name, model)
    row.update(values)
    return row


IMAGE_LEVEL = dict(image_i2t_r1=23.9, image_t2i_r1=40.0, zeroshot_top1=61.25)


def make_results() -> dict:
    return {
        "rows": [
            _row("cloc", "demo-cloc", region_macc=98.3, region_acc=98.0, region_colour_acc=99.1,
                 region_shape_acc=98.7, region_r2t_r10=91.0, region_t2r_r10=88.5, rec_acc50=80.0,
                 rec_head_acc50=55.5, **IMAGE_LEVEL),
            _row("clip-crop", "demo-cloc", region_macc=21.9, region_acc=25.0, region_colour_acc=80.0,
                 region_shape_acc=27.0, **IMAGE_LEVEL),
            _row("clip-roi", "demo-cloc", region_macc=3.4, **IMAGE_LEVEL),
        ],
        "meta": {"data": "runs/demo/data", "split": "test", "tasks": ["region", "rec"], "max_images": None,
                 "seconds": 12.345, "skipped": {}},
    }


def build_card(results=None, **overrides):
    kwargs = dict(
        model_name="demo-cloc",
        base_arch="cloc-tiny-demo",
        dataset_name="CLOC synthetic scenes",
        dataset_id="cloc-synthetic-scenes",
        training_summary="Trained for 700 steps at batch 128 on 30k synthetic scenes.",
    )
    kwargs.update(overrides)
    return card_from_results(results or make_results(), **kwargs)


# --------------------------------------------------------------------------------------------------
# cards from results
# --------------------------------------------------------------------------------------------------


def test_results_card_round_trips_through_a_file(tmp_path):
    card = build_card()
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    data = loaded.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert {"cloc", "clip", "region-text", "grounding", "vision-language"} <= set(data.tags)
    assert data.datasets == ["cloc-synthetic-scenes"]
    assert data.model_name == "demo-cloc"
    assert data.eval_results == card.data.eval_results
    # parsing the string content gives the same metadata as the file
    assert ModelCard(str(card)).data.eval_results == card.data.eval_results


def test_results_card_reports_the_cloc_row_only():
    results = build_card().data.eval_results
    by_name = {r.metric_name: r for r in results}
    measured = {k for k, v in make_results()["rows"][0].items() if v is not None and k not in ("name", "model")}
    assert len(results) == len(measured) == 11
    assert by_name["Region mAcc"].metric_value == 98.3
    assert by_name["Region mAcc"].task_type == "image-classification"
    assert by_name["Region mAcc"].metric_type == "mean_per_class_accuracy"
    assert by_name["Region colour accuracy"].metric_config == "colour"
    assert by_name["REC Acc@0.5, box head"].metric_value == 55.5
    assert by_name["REC Acc@0.5, box head"].metric_args == {"iou_threshold": 0.5}
    assert by_name["Zero-shot top-1 accuracy"].metric_value == 61.25
    assert all(r.dataset_split == "test" and r.dataset_type == "cloc-synthetic-scenes" for r in results)
    assert all(r.source_url is None for r in results)  # measured here, not taken from a paper
    # every metric of one task type carries the same task name (the Hub keeps the first one per group)
    names = {}
    for r in results:
        assert names.setdefault(r.task_type, r.task_name) == r.task_name


def test_results_card_body():
    text = build_card().text
    assert "| method | region mAcc | region acc | colour acc | shape acc |" in text  # one model: no model column
    assert "| clip-roi | 3.4 | - | - | - |" in text
    assert "`clip-maskbg` = the whole image with everything outside the box greyed out" in text
    assert "not** meant for real" in text
    assert "Trained for 700 steps at batch 128" in text
    assert "AutoModel.from_pretrained" in text and "trust_remote_code=True" in text
    assert "| image encoder (ViT) | 32 px, patch 4, width 96, 3 layers, 4 heads, conv stem 32 channels |" in text
    assert "- split: `test`" in text and "seconds: `12.3`" in text


def test_results_card_without_the_method_row_has_no_model_index():
    results = make_results()
    results["rows"] = results["rows"][1:]
    card = build_card(results)
    assert not card.data.eval_results
    assert "No `cloc` row was found" in card.text
    ModelCard(str(card))  # still a valid card


def test_row_selection_between_several_models():
    results = make_results()
    results["rows"].append(_row("cloc", "demo-clip", region_macc=5.0))
    assert build_card(results).data.eval_results[0].metric_value == 98.3  # model_name picks the row
    picked = build_card(results, model_name="my-card", results_model="demo-clip").data.eval_results
    assert [r.metric_value for r in picked] == [5.0]
    with pytest.raises(ValueError, match="several models"):
        build_card(results, model_name="unrelated-name")
    with pytest.raises(ValueError, match="demo-nope"):
        select_row(results["rows"], "cloc", "demo-nope")
    assert "| method | model |" in build_card(results).text  # two models: the table names them


def test_results_without_rows_are_rejected():
    with pytest.raises(ValueError, match="rows"):
        build_card({"meta": {}})


def test_cards_read_the_row_schema_of_eval_results():
    """A metric added to the schema reaches the card's table and model-index without touching model_cards."""
    from dataclasses import replace

    import eval.results as schema

    extra = replace(schema.field_for("zeroshot_top1"), key="detection_ap50", title="det AP50", metric_name="New")
    results = make_results()
    results["rows"][0]["detection_ap50"] = 12.5
    assert "det AP50" not in build_card(results).text  # a key outside the schema is not a card metric
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "FIELDS", (*schema.FIELDS, extra))
        card = build_card(results)
    assert "| det AP50 |" in card.text
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["New"] == 12.5


def test_how_to_use_snippet_runs(tmp_path, monkeypatch):
    """The card's loading example works on a saved model + processor."""
    import torch
    from PIL import Image

    import cloc_hf

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    cloc_hf.create_model("cloc-tiny").save_pretrained(model_dir)
    cloc_hf.CLOCProcessor.offline(size=32).save_pretrained(model_dir)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    text = build_card(base_arch="cloc-tiny", load_path=str(model_dir)).text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)
    assert namespace["regions"][0].shape == (1, 32)
    assert namespace["image_embeds"].shape == (1, 32)


# --------------------------------------------------------------------------------------------------
# paper cards
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(PAPER_ARCHS))
def test_paper_card_marks_every_number_as_paper_reported(arch):
    card = ModelCard(str(paper_card(arch)))
    results = card.data.eval_results
    assert results and card.data.model_name == arch
    for result in results:
        assert result.source_url == PAPER_URL and "paper-reported" in result.source_name
        assert "paper-reported" in result.metric_name
        assert result.verified is None  # the Hub's evaluation service sets it, never us
    assert "No official CLOC weights exist" in card.text
    assert f"cloc_hf.create_model('{arch}').save_pretrained" in card.text
    assert f"cloc-convert --from-hf-clip {PAPER_ARCHS[arch]['convert_from']}" in card.text


def test_paper_numbers_come_from_the_data_file():
    data = json.loads(PAPER_RESULTS.read_text(encoding="utf-8"))
    for arch, spec in data["architectures"].items():
        card = paper_card(arch)
        in_index = [n for n in spec["results"] if n.get("model_index")]
        assert [r.metric_value for r in card.data.eval_results] == [n["value"] for n in in_index]
        for number in spec["results"]:
            assert f"| {number['benchmark']} | {number['metric']} | {number['value']:.1f} |" in card.text
            assert number["source"] and number["id"]
    assert paper_number("cloc-vit-b-16", "coco_macc_roi_align") == 67.1
    with pytest.raises(KeyError, match="coco_macc"):
        paper_number("cloc-vit-b-16", "nope")


def test_paper_numbers_as_reported():
    b16 = {(r.dataset_type, r.metric_value) for r in paper_card("cloc-vit-b-16").data.eval_results}
    assert b16 == {("coco", 71.1), ("lvis", 28.5)}
    l14 = paper_card("cloc-vit-l-14-336")
    assert {(r.dataset_type, r.metric_value) for r in l14.data.eval_results} == {
        ("coco", 72.9), ("lvis", 32.6), ("ILSVRC/imagenet-1k", 80.1)
    }
    b16_text = paper_card("cloc-vit-b-16").text
    assert "| 67.1 |" in b16_text and "| 25.4 |" in b16_text and "RoI-Align" in b16_text
    for value in ("89.0", "88.0", "55.1", "50.7"):
        assert value in l14.text
    with pytest.raises(ValueError, match="no paper card"):
        paper_card("cloc-tiny")


# --------------------------------------------------------------------------------------------------
# checked-in cards
# --------------------------------------------------------------------------------------------------


def test_cards_folder_holds_the_paper_cards():
    assert {p.stem for p in CARD_FILES} >= set(PAPER_ARCHS)


@pytest.mark.parametrize("path", CARD_FILES, ids=lambda p: p.name)
def test_checked_in_card_parses(path):
    card = ModelCard.load(path)
    assert card.data.license
    assert card.data.library_name == "transformers"
    if path.stem in PAPER_ARCHS or any(r.source_url == PAPER_URL for r in card.data.eval_results or []):
        assert "paper-reported" in card.content
        assert all(r.source_url == PAPER_URL for r in card.data.eval_results)


@pytest.mark.parametrize("arch", sorted(PAPER_ARCHS))
def test_checked_in_paper_cards_are_up_to_date(arch):
    """Regenerate with `python -m model_cards.generate --paper-cards model_cards/cards/` when this fails."""
    assert (CARDS_DIR / f"{arch}.md").read_text(encoding="utf-8") == str(paper_card(arch))


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def test_cli_results_card_uses_pretrain_config(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_results()))
    out = tmp_path / "demo-cloc" / "README.md"
    out.parent.mkdir()
    (out.parent / "pretrain_config.json").write_text(json.dumps(
        {"arch": "cloc-tiny-demo", "objective": "cloc", "steps": 400, "batch_size": 128, "lr": 0.0015,
         "weight_decay": 0.2, "max_regions": 4, "train_data": "runs/demo/data/train"}
    ))
    assert main(["--results", str(report), "--out", str(out)]) == 0
    card = ModelCard.load(out)
    assert card.data.model_name == "demo-cloc"  # the rows' single model
    assert "400 steps at batch 128" in card.text and "runs/demo/data/train" in card.text
    assert f'AutoModel.from_pretrained("{out.parent}")' in card.text
    assert len(card.data.eval_results) == 11


def test_cli_paper_cards(tmp_path):
    assert main(["--paper-cards", str(tmp_path / "cards")]) == 0
    written = sorted(p.name for p in (tmp_path / "cards").glob("*.md"))
    assert written == sorted(f"{arch}.md" for arch in PAPER_ARCHS)
    for path in (tmp_path / "cards").glob("*.md"):
        assert ModelCard.load(path).data.license == "apache-2.0"


def test_cli_results_needs_out(tmp_path):
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path / "r.json")])


def test_non_demo_card_drops_the_demo_warning():
    text = build_card(demo=False).text
    assert "demonstration model" not in text and "synthetic scenes only" not in text
    assert "one seed" in text


# --------------------------------------------------------------------------------------------------
# the demo's card, templates and data file
# --------------------------------------------------------------------------------------------------


def _demo_report() -> dict:
    """What ``cloc_demo.demo.run_demo`` passes to :func:`write_demo_card`: rows of two models, no top-level
    ``meta``; the CLOC run's evaluation setup under ``details``."""
    results = make_results()
    rows = [dict(r, model="cloc") for r in results["rows"][:1]] + [dict(r, model="clip") for r in results["rows"][1:]]
    meta = {"data": "runs/demo/data", "split": "test", "max_images": 600, "methods": ["cloc"], "seconds": {"x": 1}}
    return {"preset": "demo", "rows": rows, "details": {"cloc": {"meta": meta}}}


def test_write_demo_card_states_the_split_and_setup(tmp_path):
    run_dir = tmp_path / "cloc"
    run_dir.mkdir()
    (run_dir / "pretrain_config.json").write_text(json.dumps({"arch": "cloc-tiny-demo", "steps": 600}))
    path = write_demo_card(_demo_report(), run_dir)
    assert path == run_dir / "README.md"
    card = ModelCard.load(path)
    assert card.data.model_name == "cloc"  # the folder's name: the rows compare two models
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}  # was None: the report has no meta
    assert "(split `test`)" in card.text and "- max_images: `600`" in card.text
    assert "seconds" not in card.text  # timings are not a property of the model
    assert "600 steps at batch ?" in card.text
    assert "| method | model |" in card.text and "| clip-crop | clip |" in card.text


@pytest.mark.parametrize("path", [*CARD_FILES, *sorted(TEMPLATES.glob("*.md"))], ids=lambda p: p.name)
def test_cards_and_templates_point_to_docs_not_notes_users_lack(path):
    text = path.read_text(encoding="utf-8")
    assert "DESIGN.md" not in text and "design notes" not in text
    if path.parent == CARDS_DIR:
        assert "{{" not in text and "{%" not in text  # fully rendered


def test_write_paper_card(tmp_path):
    path = write_paper_card("cloc-vit-b-16", tmp_path / "sub" / "b16.md")
    assert path.read_text(encoding="utf-8") == str(paper_card("cloc-vit-b-16"))
    assert "docs/design.md" in path.read_text(encoding="utf-8")
