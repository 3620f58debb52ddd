"""The demo's report: goals, steps-to-accuracy, the seeds' average, pictures and ``report.md``.

:mod:`cloc_demo.demo` trains and evaluates; this module turns its results into ``OUT/report.json`` and
``OUT/report.md``. One seed's report is the dict :func:`cloc_demo.demo.run_seed` returns; several seeds' become one
with :func:`aggregate_reports` (tables of mean ± std, each seed's values kept under ``per_seed``).
Learning curves, and so steps-to-accuracy, are measured on the **val** split during training; the
tables are the **test** split, evaluated once after the last step (the demo keeps the final model
and selects nothing on test numbers).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from eval.report import render_markdown
from eval.results import CLIP_METHODS, aggregate_rows, markdown_table

# Region mAcc levels (percent, val curves) whose first crossing the steps-to-accuracy table reports.
STEP_THRESHOLDS: tuple[float, ...] = (50.0, 80.0, 90.0)


# --------------------------------------------------------------------------------------------------
# steps to accuracy (val curves)
# --------------------------------------------------------------------------------------------------


def first_reached(curve: Sequence[Mapping[str, Any]], method: str, threshold: float) -> dict[str, float] | None:
    """``{"step", "seconds"}`` of the first curve point where ``method``'s val region mAcc is at least
    ``threshold``; ``None`` when no point reaches it (the curve is sampled every ``eval_every`` steps)."""
    for point in curve:
        result = point.get(method)
        if isinstance(result, Mapping) and result.get("macc") is not None and result["macc"] >= threshold:
            return {"step": point["step"], "seconds": point["elapsed"]}
    return None


def steps_to_accuracy(runs: Mapping[str, Mapping[str, Any]],
                      thresholds: Sequence[float] = STEP_THRESHOLDS) -> list[dict[str, Any]]:
    """One row per (run, region method) of the runs' val curves: ``{"run", "method", "steps" (the
    run's length), "reached": {threshold: first_reached(...)}}``, runs in ``runs`` order."""
    rows = []
    for name, run in runs.items():
        methods = [m for m in ("cloc", *CLIP_METHODS) if any(m in p for p in run["curve"])]
        for method in methods:
            rows.append({"run": name, "method": method, "steps": run["steps"],
                         "reached": {f"{t:g}": first_reached(run["curve"], method, t) for t in thresholds}})
    return rows


def _reached_cell(reached: Sequence[Mapping[str, float] | None], steps: Sequence[Any]) -> str:
    cells = [f"{int(r['step'])} ({r['seconds']:.0f} s)" if r else f"not reached in {int(n)}"
             for r, n in zip(reached, steps)]
    return " / ".join(cells)


def steps_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown of :func:`steps_to_accuracy` rows (one seed) or of their seeds' lists (``per_seed``):
    each cell the first step (and seconds) per seed, ``/`` between seeds."""
    if not rows:
        return "_no curves_"
    thresholds = list(rows[0]["reached"] if "reached" in rows[0] else rows[0]["per_seed"][0]["reached"])
    table = []
    for row in rows:
        seeds = row.get("per_seed") or [row]
        cells = {t: _reached_cell([s["reached"][t] for s in seeds], [s["steps"] for s in seeds]) for t in thresholds}
        table.append({"run": row["run"], "method": row["method"], **cells})
    titles = {t: f"steps to {t}" for t in thresholds}
    return markdown_table(table, ["run", "method", *thresholds], titles)


# --------------------------------------------------------------------------------------------------
# goals
# --------------------------------------------------------------------------------------------------


def best_clip_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    clip_rows = [r for r in rows if r["name"] in CLIP_METHODS and r.get("region_macc") is not None]
    return max(clip_rows, key=lambda r: r["region_macc"])


def steps_goal(steps_rows_per_seed: Sequence[Sequence[Mapping[str, Any]]], threshold: float,
               ratio: float | None) -> dict[str, Any]:
    """CLOC's steps to ``threshold`` val region mAcc against the best CLIP baseline's (same-steps run),
    per seed and as means. A CLIP baseline that never reaches it counts as the run's length (a lower
    bound on what it would need, so the check errs against CLOC); CLOC not reaching it fails the goal."""
    key = f"{threshold:g}"
    cloc, clip, clip_reached = [], [], []
    for rows in steps_rows_per_seed:
        own = next(r for r in rows if r["run"] == "cloc" and r["method"] == "cloc")
        cloc.append(own["reached"][key]["step"] if own["reached"][key] else None)
        steps = [r["reached"][key]["step"] for r in rows if r["run"] == "clip" and r["reached"][key]]
        clip_length = next(r["steps"] for r in rows if r["run"] == "clip")
        clip.append(min(steps) if steps else clip_length)
        clip_reached.append(bool(steps))
    cloc_mean = None if None in cloc else statistics.fmean(cloc)
    clip_mean = statistics.fmean(clip)
    return {"threshold": threshold, "cloc_steps": cloc, "best_clip_steps": clip, "clip_reached": clip_reached,
            "cloc_mean": cloc_mean, "best_clip_mean": clip_mean, "goal_ratio": ratio,
            "met": None if ratio is None else cloc_mean is not None and cloc_mean <= ratio * clip_mean}


def goals_report(rows, rows_time, goals: Mapping[str, float],
                 steps_rows_per_seed: Sequence[Sequence[Mapping[str, Any]]] = ()) -> dict[str, Any]:
    """The goals of ``goals`` (a preset's) checked on ``rows`` (means over seeds, when several)."""
    cloc = next(r for r in rows if r["name"] == "cloc")
    out: dict[str, Any] = {}
    margin = goals.get("region_macc_margin")
    for label, table in (("equal_steps", rows), ("equal_time", rows_time)):
        if not table:
            continue
        best = best_clip_row(table)
        gap = cloc["region_macc"] - best["region_macc"]
        out[f"region_macc_gap_{label}"] = {
            "cloc": cloc["region_macc"], "best_clip": best["region_macc"], "best_clip_method": best["name"],
            "gap": gap, "goal": margin, "met": None if margin is None else gap >= margin,
        }
    clip_any = next(r for r in rows if r["name"] in CLIP_METHODS)
    for key in ("image_i2t_r1", "image_t2i_r1"):
        if cloc.get(key) is not None and clip_any.get(key) is not None:
            out[key] = {"cloc": cloc[key], "clip": clip_any[key], "met": cloc[key] >= clip_any[key]}
    for key, goal_key in (("rec_head_acc50", "rec_head_acc50"), ("region_macc", "cloc_region_macc")):
        value, goal = cloc.get(key), goals.get(goal_key)
        if goal is not None or key == "rec_head_acc50":
            out[goal_key] = {"value": value, "goal": goal,
                             "met": None if goal is None else value is not None and value >= goal}
    if "clip_shape_acc" in goals:
        best = best_clip_row(rows)
        shape = best.get("region_shape_acc")
        out["clip_shape_acc"] = {"best_clip_method": best["name"], "value": shape,
                                 "goal": goals["clip_shape_acc"],
                                 "met": shape is not None and shape >= goals["clip_shape_acc"]}
    if steps_rows_per_seed and all(steps_rows_per_seed):
        out["steps_to_80"] = steps_goal(steps_rows_per_seed, 80.0, goals.get("steps_to_80_ratio"))
    return out


# --------------------------------------------------------------------------------------------------
# several seeds
# --------------------------------------------------------------------------------------------------


def aggregate_reports(reports: Sequence[Mapping[str, Any]], seeds: Sequence[int], dirs: Sequence[Path],
                      goals: Mapping[str, float]) -> dict[str, Any]:
    """One report of several seeds' :func:`cloc_demo.demo.run_seed` reports: rows, equal-time rows and ablation rows as
    mean ± std (:func:`eval.results.aggregate_rows`), run lengths as means, steps-to-accuracy with each
    seed's value, goals checked on the means; each seed's rows, goals and folder under ``per_seed``."""
    first = reports[0]
    runs = {}
    for name in first["runs"]:
        per = [{"steps": r["runs"][name]["steps"], "seconds": r["runs"][name]["seconds"], "dir": r["runs"][name]["dir"]}
               for r in reports]
        runs[name] = {"steps": statistics.fmean(p["steps"] for p in per),
                      "seconds": statistics.fmean(p["seconds"] for p in per), "per_seed": per}
    steps_rows = [
        {"run": row["run"], "method": row["method"], "per_seed": [r["steps_to_accuracy"][i] for r in reports]}
        for i, row in enumerate(first["steps_to_accuracy"])
    ]
    rows = aggregate_rows([r["rows"] for r in reports])
    rows_time = aggregate_rows([r["rows_equal_time"] for r in reports]) if first.get("rows_equal_time") else None
    report = {
        "preset": first["preset"],
        "settings": first["settings"],
        "seeds": list(seeds),
        "rows": rows,
        "rows_equal_time": rows_time,
        "ablations": aggregate_rows([r["ablations"] for r in reports]) if first["ablations"] else [],
        "runs": runs,
        "steps_to_accuracy": steps_rows,
        "goals": goals_report(rows, rows_time, goals, [r["steps_to_accuracy"] for r in reports]),
        "per_seed": [
            {"seed": s, "dir": str(d), **{k: r.get(k) for k in ("rows", "rows_equal_time", "ablations", "goals")}}
            for s, r, d in zip(seeds, reports, dirs)
        ],
    }
    return report


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------


def plot_curves(runs: Sequence[Any], path: Path) -> None:
    """Val region mAcc against steps and seconds for each run (``name`` and ``curve``) and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        methods = sorted({m for point in run.curve for m in point if isinstance(point[m], dict)})
        for method in methods:
            steps = [p["step"] for p in run.curve if method in p]
            secs = [p["elapsed"] for p in run.curve if method in p]
            vals = [p[method]["macc"] for p in run.curve if method in p]
            label = f"{run.name}: {method}"
            axes[0].plot(steps, vals, marker="o", label=label)
            axes[1].plot(secs, vals, marker="o", label=label)
    for ax, xlabel in zip(axes, ("training step", "training seconds (this CPU)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("region mAcc on val (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Region recognition learning curves: CLOC Prompter vs CLIP region baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_examples(run: Any, data: Path, path: Path, count: int = 6, scale: int = 8) -> None:
    """Test images with ground-truth boxes (green, predicted class name) and the box head's grounding
    of each object's phrase (red)."""
    from PIL import Image, ImageDraw

    from eval.baselines import encode_class_names, encode_regions

    instances = json.loads((data / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    cat_ids = sorted(names)
    per_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    model, processor = run.model, run.processor
    class_embeds = encode_class_names(model, processor, [names[c] for c in cat_ids])
    tiles = []
    for info in instances["images"][:count]:
        image = Image.open(data / "test" / "images" / info["file_name"]).convert("RGB")
        anns = per_image.get(info["id"], [])
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(big)
        if boxes:
            regions = encode_regions(model, processor, [image], [torch.tensor(boxes, dtype=torch.float32)], "cloc")[0]
            labels = (regions @ class_embeds.t()).argmax(-1).tolist()
            phrases = [names[a["category_id"]] for a in anns]
            inputs = processor(images=[image] * len(phrases), text=phrases, return_tensors="pt")
            with torch.no_grad():
                pred = model.ground(inputs["pixel_values"][:1], [inputs["input_ids"]], [inputs["attention_mask"]])
            pred = processor.post_process_boxes(pred, inputs["original_sizes"][:1])[0]
            for box, label, ann, guess in zip(boxes, labels, anns, pred.tolist()):
                draw.rectangle([v * scale for v in box], outline=(0, 255, 0), width=2)
                draw.rectangle([v * scale for v in guess], outline=(255, 0, 0), width=1)
                ok = cat_ids[label] == ann["category_id"]
                draw.text((box[0] * scale + 2, box[1] * scale + 1), names[cat_ids[label]],
                          fill=(255, 255, 255) if ok else (255, 80, 80))
        tiles.append(big)
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 4
    sheet.save(path)


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _signed(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    std = (row.get("std") or {}).get(key)
    return f"{value:+.1f}" + (f" ± {std:.1f}" if std is not None else "")


def _header(preset_name: str, preset: Any, base: Any, report: Mapping[str, Any], noise: Mapping[str, Any]) -> list[str]:
    seeds = report["seeds"]
    threshold = base.model_config().text_filter_threshold
    seed_text = (f"one seed ({seeds[0]})" if len(seeds) == 1 else
                 f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): every cell is the mean ± standard deviation "
                 "over seeds (each seed's values are in `report.json` under `per_seed`, each seed's own report in "
                 "its `seed<N>/` folder)")
    noisy = ", ".join(f"{k}={v}" for k, v in noise.items())
    return [
        f"# CLOC vs CLIP in miniature (`{preset_name}` preset)", "",
        f"Synthetic scenes ({preset.n_train} train / {preset.n_val} val / {preset.n_test} test images, 32 px, "
        f"5 shapes x 6 colours), `{base.arch}`, batch {base.batch_size}, lr {base.lr}, {base.steps} steps per run, "
        f"{seed_text}. CLIP is the same code and data without region losses; its region numbers come from three "
        f"baselines on its towers. Region-text false-negative filter: caption cosine > {threshold} (the paper uses "
        "0.9; see the `text_filter_threshold` note in `cloc_demo/demo.py` for why 0.9 stalls shape learning at this "
        f"scale). Scene knobs beyond the defaults: {json.dumps(preset.scene)}.",
        "",
        "**What CLOC trains on.** CLOC's region labels are the scene generator's own: exact boxes and, for each "
        "box, the generator's phrase (`region_phrase=mention`: the caption's own wording where the caption names "
        "the object, e.g. \"a circle\", else the full \"a red circle\"). They are not pseudo-labels from a "
        "detector or VESL, so the main rows are an upper bound on what noisy real labels give. "
        + (f"The `cloc-noisy_labels` row trains on the same scenes with simulated VESL-like noise ({noisy}) and is "
           "evaluated on the same clean test split." if "noisy_labels" in preset.ablations else
           f"The `headline` preset (`make demo-seeds`) adds a `cloc-noisy_labels` row that trains on the same "
           f"scenes with simulated VESL-like noise ({noisy})."),
        "",
        f"**Val and test.** Learning curves and steps-to-accuracy are measured on the val split "
        f"({preset.curve_images} images) during training; the tables are the test split "
        f"({preset.test_images or preset.n_test} images), evaluated once after the last step. The demo keeps each "
        "run's final model and selects no checkpoint or setting on test numbers.",
        "",
        "**Reading the columns.** `(chance)` is the column to its left for a random guess. Region→text R@1 ranks "
        "every distinct region phrase of the test split (all its images, not only those evaluated); text→region "
        "R@1 ranks the evaluated regions (recall@10, near 100 for every model, is in `report.json` only). REC "
        "(ranking) picks among the image's own ground-truth boxes (1-3, so chance is high); REC (ranking GT + "
        "distractors) picks among 20 candidates per image: its ground-truth boxes plus boxes of other images and "
        "random boxes.",
    ]


def write_report(out: Path, preset_name: str, preset: Any, report: Mapping[str, Any],
                 noise: Mapping[str, Any]) -> None:
    """``out/report.md`` from a one-seed or several-seed report; ``noise`` is the noisy-label row's."""
    base = preset.base_config()
    lines = _header(preset_name, preset, base, report, noise)
    lines += ["", "## Equal steps", "", render_markdown(report["rows"])]
    if report.get("rows_equal_time"):
        t = report["runs"]
        lines += ["", f"## Equal wall-clock (CLIP trained {t['clip-time']['steps']:.0f} steps in "
                      f"{t['clip-time']['seconds']:.0f} s; CLOC {t['cloc']['steps']:.0f} steps in "
                      f"{t['cloc']['seconds']:.0f} s)", "", render_markdown(report["rows_equal_time"])]
    if report.get("ablations"):
        table = [{**row, "vs_cloc": _signed(row, "vs_cloc")} for row in report["ablations"]]
        titles = {"name": "run", "vs_cloc": "vs CLOC (paired)", "paper_sign": "paper's sign"}
        lines += ["", "## Ablations and noisy labels (CLOC variants; the paper's Table 2 in miniature)", "",
                  markdown_table(table, ["name", "region_macc", "vs_cloc", "region_noisy_macc", "rec_head_acc50",
                                                "paper_sign"], titles)]
    if report.get("steps_to_accuracy"):
        lines += ["", "## Steps to region mAcc 50 / 80 / 90 (val curves)", "",
                  "First curve point (every `eval_every` steps) at which each run's region method reaches the "
                  "level, with the training seconds at that point" + (", per seed" if len(report["seeds"]) > 1 else "")
                  + ".", "", steps_table(report["steps_to_accuracy"])]
    lines += ["", "## Goals", "", "```json", json.dumps(report["goals"], indent=1), "```", "",
              "![learning curves](learning_curves.png)", "", "![examples](examples.png)", "",
              "Examples" + (f" (seed {report['seeds'][0]})" if len(report["seeds"]) > 1 else "") + ": green = "
              "ground-truth box labelled with the Prompter's predicted class (red text = wrong), red = the box "
              "head's grounding of that object's class name."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
