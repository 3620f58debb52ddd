"""The report of ``make demo-mllm`` (:mod:`cloc_demo.demo_mllm`): rows over seeds, goals, the REC picture,
``report.md``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from eval.results import markdown_table

METRICS = ("rec_acc50", "ref_cls_acc", "parse_fail")


def summarise(name: str, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One report row: the mean of each metric over seeds, its population std and the per-seed values."""
    row: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in per_seed]}
    for key in METRICS + ("rec_miou", "rec_center_acc", "train_seconds", "eval_seconds", "train_cpu_seconds",
                          "eval_cpu_seconds"):
        values = [float(r[key]) for r in per_seed]
        row[key] = statistics.fmean(values)
        row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        row[f"{key}_per_seed"] = values
    return row


def goals(rows: dict[str, dict[str, Any]], margin: float = 5.0) -> dict[str, Any]:
    """CLOC minus CLIP per metric, on the mean and on every seed, against the ``margin`` goal."""
    out = {}
    for key in ("rec_acc50", "ref_cls_acc"):
        gaps = [a - b for a, b in zip(rows["cloc"][f"{key}_per_seed"], rows["clip"][f"{key}_per_seed"])]
        mean_gap = rows["cloc"][key] - rows["clip"][key]
        out[key] = {"cloc": rows["cloc"][key], "clip": rows["clip"][key], "gap": mean_gap, "gap_per_seed": gaps,
                    "goal": margin, "met_on_every_seed": all(g >= margin for g in gaps)}
    return out


def draw_predictions(predictions: dict[str, Path], instances: Path, image_dir: Path, path: Path, count: int = 8,
                     scale: int = 6) -> None:
    """Test images, one row per tower: the truth (green) and the REC answer (red; none drawn when the
    answer had no box) of the first expression of each image, the expression written under it."""
    from PIL import Image, ImageDraw

    files = {img["id"]: img["file_name"] for img in json.loads(instances.read_text())["images"]}
    rows = []
    for tower, pred_path in predictions.items():
        seen, tiles = set(), []
        for line in pred_path.read_text().splitlines():
            p = json.loads(line)
            if "gt" not in p or p.get("image_id") in seen:
                continue
            seen.add(p["image_id"])
            image = Image.open(image_dir / files[p["image_id"]]).convert("RGB")
            w, h = image.size
            tile = Image.new("RGB", (w * scale, h * scale + 24), (255, 255, 255))
            tile.paste(image.resize((w * scale, h * scale), Image.NEAREST), (0, 0))
            draw = ImageDraw.Draw(tile)
            for box, colour in ((p["gt"], (0, 220, 0)), (p["pred"], (255, 0, 0))):
                if box is not None:
                    draw.rectangle([box[0] * w * scale, box[1] * h * scale, box[2] * w * scale, box[3] * h * scale],
                                   outline=colour, width=2)
            draw.text((2, h * scale + 1), p["expression"][:32], fill=(0, 0, 0))
            draw.text((2, h * scale + 12), tower, fill=(90, 90, 90))
            tiles.append(tile)
            if len(tiles) == count:
                break
        rows.append(tiles)
    tw, th = rows[0][0].size
    sheet = Image.new("RGB", (max(len(r) for r in rows) * (tw + 4), len(rows) * (th + 4)), (255, 255, 255))
    for i, tiles in enumerate(rows):
        for j, tile in enumerate(tiles):
            sheet.paste(tile, (j * (tw + 4), i * (th + 4)))
    sheet.save(path)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``out/report.md`` from the report dict."""
    s = report["settings"]
    table_rows = [{**r, **{k: f"{r[k]:.1f} ± {r[f'{k}_std']:.1f}" for k in METRICS}} for r in report["rows"]]
    seeds = ", ".join(str(v) for v in s["seeds"])
    lines = [
        f"# CLOC vs CLIP towers inside a tiny LLaVA (`{report['preset']}` preset, {report['split']} split)", "",
        f"The frozen CLOC and CLIP-baseline towers of `make demo`, each inside the same LLaVA: a {s['lm']['num_hidden_layers']}"
        f"-layer, width-{s['lm']['hidden_size']} Llama language model trained from scratch with a {report['vocab_size']}-token "
        f"BPE tokenizer trained on the instruction text. CLOC's region tokens come from its Prompter, CLIP's from RoI-Align "
        f"over its patch tokens (layer {s['vision_feature_layer']}, as the image tokens). Same data, steps and seeds for both: "
        f"`align` {s['align_steps']} steps (lr {s['align_lr']}), then `instruct` {s['instruct_steps']} steps (lr {s['instruct_lr']}, "
        f"whole language model), batch {s['batch_size']}, {report['num_train_records']} training records (per scene a "
        "multi-turn record of its REC questions and a record of one of its referring-classification questions, so that "
        f"no answer can be read off another turn); seeds {seeds} (mean ± std).", "",
        f"Evaluation on the first {s['n_eval']} {report['split']} images ({report['num_rec']} REC expressions, "
        f"{report['num_ref_cls']} referring-classification questions whose distractor is another object of the scene when "
        "there is one), by greedy generation: REC Acc@0.5 with answers read in the `ferret` convention (an answer without a "
        "box scores as [0, 0, 0, 0] and counts as a parse failure), referring classification by exact match.", "",
        markdown_table(table_rows, ["name", *METRICS], {"rec_acc50": "REC Acc@0.5", "ref_cls_acc": "ref. cls acc",
                                                         "parse_fail": "parse failures (% of REC answers)"}), "",
        "Different REC answers per model (out of the REC questions; a handful means the model writes the same few "
        "boxes whatever the image): " + ", ".join(f"{k} {v}" for k, v in report["rec_distinct_answers"].items()) + ".", "",
        "## Goals (CLOC − CLIP ≥ 5 points on every seed)", "", "```json", json.dumps(report["goals"], indent=1), "```", "",
        f"Time beyond `make demo`, {report.get('workers', 1)} fine-tuning run(s) at once, one thread each "
        "(`torch.set_num_threads(1)`, OMP_NUM_THREADS=1): "
        f"{report['total_cpu_seconds']:.0f} CPU seconds (training {report['train_cpu_seconds']:.0f}, evaluation "
        f"{report['eval_cpu_seconds']:.0f}), {report['total_seconds']:.0f} s of wall-clock time (the "
        "workers' CPU seconds add up; the wall-clock also counts waiting for cores that other processes use)"
        + (f"; the fine-tuning runs {', '.join(report['reused_runs'])} were trained by an earlier invocation with the same "
           "settings (`--reuse`) and their recorded times are included." if report["reused_runs"] else "."), "",
        "![REC answers](rec_examples.png)", "",
        "Top row CLOC tower, bottom row CLIP tower, same test images (seed "
        f"{s['seeds'][0]}): green = the truth, red = the box the model wrote.", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
