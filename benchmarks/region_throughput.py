"""Region-feature throughput of CLOC: one ViT pass + the Prompter vs crop-and-encode.

The claim under test (docs/design.md, section 2): the ViT runs once per image and any number of box
prompts reuse its tokens through the lightweight Prompter, whereas crop-and-encode CLIP pays one full
encoder pass per region. For a named architecture this script measures, at batch 1 (one image):

* the image pass alone: ``model.vision_model(pixel_values)``;
* image pass + K boxes through the Prompter in one call:
  ``model.get_region_features(pixel_values, boxes=[(K, 4)])``, for both Prompter pooling modes
  (``"prompt"``: only the prompt tokens are pooled, the cheap mode; ``"all"``: every region runs the
  layer over all image tokens). The two models share every weight (``load_state_dict``);
* the Prompter alone given precomputed ViT outputs (``vision_outputs=``), same K;
* crop-and-encode: each box cropped from the image, resized to the input size (bilinear) and
  encoded by the ViT + projection (``get_image_features``), in chunks of ``--crop-chunk``. K above
  ``--max-crop-k`` is extrapolated linearly from the largest measured K that is a whole number of
  chunks, and marked ``*``;
* ``get_image_features`` images/s of ``CLOCModel`` vs a Hugging Face ``CLIPModel`` built from the same
  text/vision config numbers with the CLOC weights copied in (verified to compute the same
  embeddings), batch ``--clip-batch``, measured interleaved (ABBA) to share the machine's noise.

Every time is the median of the timed repeats after warm-up (``time.perf_counter``, with
``torch.cuda.synchronize`` on GPU), under ``torch.inference_mode``. Repeats adapt to the cost of one
call (``--budget-s`` of timed work per cell, between ``--min-repeats`` and ``--repeats``). Each cell
is timed in alternation (ABBA) with the image pass alone and its ratio ``x img`` is the ratio of the
two paired medians, so ratios survive slow load drifts on a shared machine. They do not survive heavy
contention: with other jobs on the same 2 cores the batch-1 image pass (many small ops, OpenMP
barriers) slows down far more than the large batched matmuls of crop-and-encode or all-token
pooling, which then look cheaper than they are. The caption prints the load average at start and
end and a warning above 1.5. Goals printed under the table: K=64 with prompt pooling <= 1.5x the
image pass; CLOC/CLIP images/s >= 0.95x. This is a benchmark, not a test: it exits 0 whenever it
ran, whatever the goals say.

Usage (CPU, from the repository root)::

    .venv/bin/python benchmarks/region_throughput.py                   # cloc-vit-b-16 @224, fp32, 2 threads, ~3-4 min
    .venv/bin/python benchmarks/region_throughput.py --arch cloc-tiny  # quick mode, seconds
    .venv/bin/python benchmarks/region_throughput.py --json runs/region_throughput_b16_cpu.json

GPU (one H100/H200; the paper's ViT-L/14 @336 in bf16; nothing to install beyond torch +
transformers, ``cloc_hf`` is imported from this checkout)::

    python benchmarks/region_throughput.py --arch cloc-vit-l-14-336 --device cuda --dtype bf16 \\
        --json "${OUT:-runs}/region_throughput_l14_336_bf16_cuda.json"

bf16 casts the weights (``model.to(torch.bfloat16)``, no autocast); on this project's CPU bf16 is
~16x slower than fp32, so keep CPU runs in fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent, _HERE):  # the repo root (for cloc_hf) and this folder (for _timing)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _timing import (  # noqa: E402
    environment_info,
    format_seconds,
    format_table,
    time_fn,
    time_interleaved,
    write_json,
)

import cloc_hf  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Inputs and models
# --------------------------------------------------------------------------------------------------


def random_boxes(k: int, generator: torch.Generator) -> torch.Tensor:
    """``(k, 4)`` valid normalised xyxy boxes, sides between 5% and 60% of the frame."""
    wh = 0.05 + 0.55 * torch.rand(k, 2, generator=generator)
    x1y1 = torch.rand(k, 2, generator=generator) * (1.0 - wh)
    return torch.cat([x1y1, x1y1 + wh], dim=-1)


def build_models(arch: str, seed: int):
    """Two CLOC models that differ only in Prompter pooling and share every weight."""
    torch.manual_seed(seed)
    model_prompt = cloc_hf.create_model(arch, prompter_config=dict(pooling="prompt")).eval()
    model_all = cloc_hf.create_model(arch, prompter_config=dict(pooling="all")).eval()
    model_all.load_state_dict(model_prompt.state_dict())
    return model_prompt, model_all


def build_clip_twin(cloc_model):
    """A ``transformers.CLIPModel`` with the CLOC model's text/vision config numbers and weights.

    CLOC's CLIP towers keep CLIP's parameter names, so weights are copied where name and shape match;
    every CLIP tensor must be covered (else the two would not compute the same thing).
    """
    from transformers import CLIPConfig, CLIPModel

    drop = {"model_type", "architectures", "transformers_version", "_name_or_path"}

    def tower(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k not in drop}

    config = cloc_model.config
    clip_config = CLIPConfig(
        text_config=tower(config.text_config),
        vision_config=tower(config.vision_config),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )
    clip_config._attn_implementation = cloc_model.config._attn_implementation
    clip = CLIPModel(clip_config).eval()
    source = cloc_model.state_dict()
    target = clip.state_dict()
    copied = {k: source[k] for k in target if k in source and source[k].shape == target[k].shape}
    missing = sorted(set(target) - set(copied))
    if missing:
        raise RuntimeError(f"CLIP twin: {len(missing)} tensors without a CLOC counterpart, e.g. {missing[:3]}")
    clip.load_state_dict(copied)
    return clip, len(copied)


def crop_resize(pixel_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each normalised xyxy box from a ``(1, C, H, W)`` image and resize it to ``(H, W)``.

    One batched bilinear ``grid_sample`` per call (an affine grid per box), in float32.
    """
    n = boxes.shape[0]
    _, channels, height, width = pixel_values.shape
    x1, y1, x2, y2 = boxes.to(torch.float32).unbind(-1)
    theta = torch.zeros(n, 2, 3, device=pixel_values.device)
    theta[:, 0, 0] = x2 - x1
    theta[:, 0, 2] = x1 + x2 - 1.0
    theta[:, 1, 1] = y2 - y1
    theta[:, 1, 2] = y1 + y2 - 1.0
    grid = F.affine_grid(theta, (n, channels, height, width), align_corners=False)
    image = pixel_values.to(torch.float32).expand(n, -1, -1, -1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_and_encode(model, pixel_values: torch.Tensor, boxes: torch.Tensor, chunk: int) -> torch.Tensor:
    """The CLIP baseline: K crops through the ViT + projection (K full encoder passes)."""
    out = []
    for start in range(0, boxes.shape[0], chunk):
        crops = crop_resize(pixel_values, boxes[start : start + chunk]).to(pixel_values.dtype)
        out.append(model.get_image_features(pixel_values=crops).pooler_output)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", default="cloc-vit-b-16", choices=cloc_hf.list_models(), help="named architecture")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--ks", default="1,16,64,256", help="comma-separated numbers of boxes K")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per cell (default: 1 cpu, 3 cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="max timed repeats per cell (default: 9 cpu, 30 cuda)")
    parser.add_argument("--min-repeats", type=int, default=2, help="min timed repeats per cell (default 2)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="timed seconds aimed at per cell (default: 6 cpu, 2 cuda)"
    )
    parser.add_argument(
        "--max-crop-k", type=int, default=None, help="largest K measured for crop-and-encode (default: 64 cpu, 256 cuda)"
    )
    parser.add_argument("--crop-chunk", type=int, default=16, help="crops per ViT batch in crop-and-encode")
    parser.add_argument("--clip-batch", type=int, default=8, help="batch of the CLOC vs CLIP comparison")
    parser.add_argument(
        "--clip-repeats", type=int, default=None, help="interleaved rounds, CLOC vs CLIP (default: 6 cpu, 30 cuda)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", default=None, help="also write all numbers to this JSON file")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = dict(warmup=(3, 1), repeats=(30, 9), budget_s=(2.0, 6.0), max_crop_k=(256, 64), clip_repeats=(30, 6))
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    if not args.ks or min(args.ks) < 1:
        parser.error("--ks needs positive integers")
    return args


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.dtype == "bf16":
        log("warning: bf16 on this CPU is ~16x slower than fp32 (ENVIRONMENT.md); numbers will be slow")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment_info(device)
    wall_start = time.perf_counter()

    log(f"building {args.arch} x2 (pooling prompt/all, shared weights) + CLIP twin ...")
    model_prompt, model_all = build_models(args.arch, args.seed)
    clip, n_copied = build_clip_twin(model_prompt)
    for m in (model_prompt, model_all, clip):
        m.to(device=device, dtype=dtype)
    vcfg = model_prompt.config.vision_config
    size = vcfg.image_size
    gen = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(1, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    pixels_batch = torch.randn(args.clip_batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    boxes = {k: random_boxes(k, gen) for k in args.ks}  # float32 CPU, as users pass them; moved by the model
    boxes_dev = {k: b.to(device) for k, b in boxes.items()}

    common = dict(device=device, min_repeats=args.min_repeats, repeats=args.repeats, budget_s=args.budget_s)
    results: dict = {"image_pass": None, "rows": []}
    with torch.inference_mode():
        # sanity: the CLIP twin computes what CLOC's image path computes
        twin_diff = (
            (model_prompt.get_image_features(pixel_values=pixels).pooler_output - clip.get_image_features(pixel_values=pixels).pooler_output)
            .abs()
            .max()
            .item()
        )
        # sanity: both pooling modes run and return (K, D)
        for m in (model_prompt, model_all):
            out = m.get_region_features(pixels, boxes=[boxes[args.ks[0]]])
            assert out[0].shape == (args.ks[0], model_prompt.config.projection_dim)

        def image_pass():
            return model_prompt.vision_model(pixel_values=pixels)

        log("image pass alone ...")
        image_start = time_fn(image_pass, warmup=args.warmup + 1, **common)
        image_samples = list(image_start.times)  # every image-pass sample of the run (alone + paired)
        log(f"  {format_seconds(image_start.median)} ({image_start.repeats} reps)")
        vision_outputs = image_pass()

        cells: dict[tuple[str, int], dict] = {}

        def measure(kind: str, k: int, call, warmup: int) -> None:
            """Time ``call`` in alternation (ABBA) with the image pass; x img = ratio of the paired medians."""
            pair = time_interleaved({"image": image_pass, "cell": call}, warmup=warmup, **common)
            image_samples.extend(pair["image"].times)
            row = {"kind": kind, "K": k, **pair["cell"].to_dict(), "extrapolated": False}
            row["paired_image_pass_s"] = pair["image"].median
            row["ratio_to_image_pass"] = row["median_s"] / row["paired_image_pass_s"]
            add(row)

        def add(row: dict) -> None:
            cells[(row["kind"], row["K"])] = row
            results["rows"].append(row)
            log(
                f"  {row['kind']:<22} K={row['K']:<4} {format_seconds(row['median_s']):>9}  "
                f"{row['ratio_to_image_pass']:7.2f}x img  {row.get('note', '')}"
            )

        chunk_size = model_prompt.config.prompter_config.region_chunk_size
        for pooling, model in (("prompt", model_prompt), ("all", model_all)):
            log(f"Prompter, pooling={pooling} ...")
            for k in args.ks:
                # "all" pools in chunks of `region_chunk_size` regions: larger K repeat shapes already warm
                warm = 0 if pooling == "all" and k > chunk_size and any(j >= chunk_size for j in args.ks if j < k) else args.warmup
                b = [boxes[k]]
                measure(f"image+prompter:{pooling}", k, lambda m=model, b=b: m.get_region_features(pixels, boxes=b), warm)
                measure(
                    f"prompter_only:{pooling}",
                    k,
                    lambda m=model, b=b: m.get_region_features(boxes=b, vision_outputs=vision_outputs),
                    warm,
                )

        log(f"crop-and-encode (chunks of {args.crop_chunk}) ...")
        measured_full: int | None = None  # largest measured K that is a whole number of chunks
        for k in args.ks:
            if k <= args.max_crop_k:
                warm = 0 if k > args.crop_chunk and measured_full is not None else args.warmup
                measure(
                    "crop_and_encode", k, lambda k=k: crop_and_encode(model_prompt, pixels, boxes_dev[k], args.crop_chunk), warm
                )
                if k % args.crop_chunk == 0:
                    measured_full = k
            else:  # linear in K: the reference's per-crop time and per-crop ratio, times K
                ref = cells[("crop_and_encode", measured_full or max(j for j in args.ks if j <= args.max_crop_k))]
                add(
                    {
                        "kind": "crop_and_encode",
                        "K": k,
                        "median_s": ref["median_s"] / ref["K"] * k,
                        "ratio_to_image_pass": ref["ratio_to_image_pass"] / ref["K"] * k,
                        "paired_image_pass_s": ref["paired_image_pass_s"],
                        "extrapolated": True,
                        "note": f"extrapolated from K={ref['K']}",
                    }
                )

        log(f"get_image_features, batch {args.clip_batch}: CLOC vs CLIP, interleaved ...")
        both = time_interleaved(
            {
                "cloc": lambda: model_prompt.get_image_features(pixel_values=pixels_batch),
                "clip": lambda: clip.get_image_features(pixel_values=pixels_batch),
            },
            device=device,
            warmup=args.warmup,
            repeats=args.clip_repeats,
        )
    t_img = statistics.median(image_samples)
    results["image_pass"] = {
        "median_s": t_img,
        "samples": len(image_samples),
        "min_s": min(image_samples),
        "max_s": max(image_samples),
        "alone_at_start": image_start.to_dict(),
    }
    ips = {name: args.clip_batch / t.median for name, t in both.items()}
    results["image_features"] = {
        "batch": args.clip_batch,
        "cloc_images_per_s": ips["cloc"],
        "clip_images_per_s": ips["clip"],
        "ratio_cloc_over_clip": ips["cloc"] / ips["clip"],
        "clip_twin_tensors_copied": n_copied,
        "clip_twin_max_abs_diff": twin_diff,
        "cloc": both["cloc"].to_dict(),
        "clip": both["clip"].to_dict(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = time.perf_counter() - wall_start
    results["env"] = env
    results["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    results["model"] = {
        "arch": args.arch,
        "image_size": size,
        "patch_size": vcfg.patch_size,
        "image_tokens": 1 + (size // vcfg.patch_size) ** 2,
        "vision_hidden": vcfg.hidden_size,
        "vision_layers": vcfg.num_hidden_layers,
        "prompter": model_prompt.config.prompter_config.to_dict(),
    }
    key = ("image+prompter:prompt", 64)
    results["goals"] = {
        "k64_prompt_ratio": cells[key]["ratio_to_image_pass"] if key in cells else None,
        "k64_prompt_goal": 1.5,
        "cloc_over_clip": ips["cloc"] / ips["clip"],
        "cloc_over_clip_goal": 0.95,
    }
    return results


def render(results: dict) -> str:
    """The one table (plus its caption and goal lines) printed to stdout."""
    env, args, model = results["env"], results["args"], results["model"]
    image = results["image_pass"]
    t_img = image["median_s"]
    cells = {(r["kind"], r["K"]): r for r in results["rows"]}

    def cell(kind, k):
        row = cells.get((kind, k))
        if row is None:
            return ["-", "-"]
        star = "*" if row["extrapolated"] else ""
        return [format_seconds(row["median_s"]) + star, f"{row['ratio_to_image_pass']:.2f}x" + star]

    kinds = [
        "image+prompter:prompt",
        "image+prompter:all",
        "prompter_only:prompt",
        "prompter_only:all",
        "crop_and_encode",
    ]
    groups = [
        [("", 1), ("image + Prompter, one call", 4), ("Prompter alone (vision_outputs=)", 4), ("crop-and-encode", 2)],
        [("", 1)] + [("pool=prompt", 2), ("pool=all", 2)] * 2 + [(f"K ViT passes, x{args['crop_chunk']}", 2)],
    ]
    headers = [["K"] + ["time", "x img"] * 5]
    rows = [["image pass alone", format_seconds(t_img), "1.00x"]]
    for k in args["ks"]:
        rows.append([str(k)] + sum((cell(kind, k) for kind in kinds), []))
    where = env.get("gpu") or f"cpu, {env['cpu_threads']} threads"
    load = env.get("loadavg_start"), env.get("loadavg_end")
    busy = args["device"] == "cpu" and load[0] and max(load[0][0], load[1][0]) > 1.5
    lines = [
        f"CLOC region throughput: {model['arch']} @{model['image_size']} ({model['image_tokens']} ViT tokens, "
        f"width {model['vision_hidden']} x {model['vision_layers']} layers), batch 1, {args['dtype']}, {where}, "
        f"torch {env['torch']}, transformers {env['transformers']}",
        "time: median of the timed repeats after warm-up (* = extrapolated); x img: each cell is timed in "
        "alternation (ABBA) with the image pass alone and divided by that paired median",
        f"image pass alone: {format_seconds(image['alone_at_start']['median_s'])} at start, "
        f"{format_seconds(t_img)} over all {image['samples']} samples of the run (min {format_seconds(image['min_s'])}, "
        f"max {format_seconds(image['max_s'])})"
        + (f"; load avg (1 min) {load[0][0]:.2f} at start, {load[1][0]:.2f} at end" if load[0] and load[1] else ""),
        *(["WARNING: load average above 1.5: other processes shared the CPU, timings are unreliable"] if busy else []),
        "",
        format_table(headers, rows, align="<" + ">" * 10, groups=groups),
        "",
    ]
    goals = results["goals"]
    ratio = goals["k64_prompt_ratio"]
    if ratio is None:
        lines.append("goal: K=64 prompt-pool <= 1.5x image pass: n/a (K=64 not measured)")
    else:
        verdict = "MET" if ratio <= goals["k64_prompt_goal"] else "MISSED"
        lines.append(f"goal: K=64 prompt-pool <= 1.5x image pass: {ratio:.2f}x  {verdict}")
    feats = results["image_features"]
    verdict = "MET" if feats["ratio_cloc_over_clip"] >= goals["cloc_over_clip_goal"] else "MISSED"
    lines.append(
        f"goal: get_image_features batch {feats['batch']}, CLOC {feats['cloc_images_per_s']:.2f} img/s vs HF CLIPModel "
        f"{feats['clip_images_per_s']:.2f} img/s (interleaved, {feats['cloc']['repeats']} rounds): "
        f"CLOC/CLIP {feats['ratio_cloc_over_clip']:.3f}x >= 0.95x  {verdict}  "
        f"[twin: {feats['clip_twin_tensors_copied']} tensors copied, max |diff| {feats['clip_twin_max_abs_diff']:.1e}]"
    )
    lines.append(f"total wall time {env['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(render(results))
    if args.json:
        log(f"wrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
