"""Training-step cost of CLOC vs its CLIP baseline: seconds per step and peak memory, equal batch.

The CLIP baseline of this project is the same :class:`cloc_hf.CLOCModel` called without region inputs
(``objective="clip"`` in ``cloc-pretrain``), so the two steps share the architecture, the images and
the captions; CLOC adds up to ``--max-regions`` box prompts per image, their phrases and the losses.
One step = forward with ``return_loss=True``, backward, gradient clipping at 1.0, AdamW step (the
pretraining recipe's betas/eps/weight decay and parameter groups), ``zero_grad`` and the temperature
clamp, as in ``training.pretrain.Trainer.train_step``.

Inputs are real batches: synthetic scenes (``cloc_data.synthetic.generate_split``) collated by
``cloc_data.loader.RegionTextCollator`` (``max_regions=M`` for CLOC, 0 for CLIP) from the same
samples; ``--num-batches`` distinct batches are cycled. Collation is done before timing (its cost per
batch is reported on its own line).

What is measured

* **s/step**: after ``--warmup`` steps of each, ``--repeats`` rounds that alternate CLOC and CLIP
  steps (ABBA order, so load drifts on a shared machine hit both alike); median, min and max.
  Two models with identical initial weights, each with its own optimiser. Goal: CLOC/CLIP <= 1.15,
  on the ratio of the medians; the median of the per-round ratios (the two steps of a round run
  back to back) and the ratio of the fastest steps are printed beside it, as a check on a busy machine.
* **peak memory**, each mode in a fresh child process (CPU ``ru_maxrss`` never decreases, so one
  process cannot measure two modes): the child builds its model, optimiser and batch, then runs
  ``--memory-steps`` steps. CPU: the kernel's RSS high-water mark is reset just before the steps
  (``/proc/self/clear_refs``; without it the lifetime ``ru_maxrss`` is used and flagged), and the
  table shows the peak RSS during the steps and its growth over the RSS before them (optimiser state,
  gradients, activations). CUDA: ``torch.cuda.max_memory_allocated`` during the steps, growth over
  ``memory_allocated`` before them.
* **CLOC extra-cost breakdown**: the region-only parts of the CLOC step, each timed alone forward +
  backward on the step's own tensors (leaf copies of the ViT tokens / embeddings): the Prompter's box
  pass, the region phrases through the text tower (unique phrases only, as the model does), the
  text-prompt pass + box head (on the image side the box pass computed: the step shares it), and the
  region + grounding loss terms (CLOC's loss minus CLIP's).
  The parts are timed interleaved with full CLOC and CLIP steps, and their sum is compared with the
  CLOC - CLIP difference of that same schedule; the rest is the optimiser on the extra parameters,
  indexing and validation (a part timed alone also pays some fixed per-call costs).

A benchmark, not a test: it exits 0 whenever it ran, whatever the goal line says.

Usage (CPU, from the repository root; the demo's regime, ~1-2 min on 2 threads)::

    .venv/bin/python benchmarks/train_step.py                      # cloc-tiny-demo, batch 128, 32 px, fp32
    .venv/bin/python benchmarks/train_step.py --arch cloc-tiny --batch-size 32 --repeats 4   # seconds
    .venv/bin/python benchmarks/train_step.py --json runs/train_step_tiny_demo_cpu.json

GPU (one H100/H200; ViT-B/16 @224 with bf16 autocast, fp32 master weights as ``cloc-pretrain`` on GPU)::

    python benchmarks/train_step.py --arch cloc-vit-b-16 --batch-size 256 --device cuda --dtype bf16 \\
        --json "${OUT:-runs}/train_step_b16_bf16_cuda.json"

On a busy machine (other processes on the same cores) two OpenMP threads wait on each other and steps
slow down 5-20x, erratically; ``--threads 1`` is then far more stable. The script prints a warning when
the load average at start leaves fewer free cores than ``--threads``.

``--dtype bf16`` runs the forward under ``torch.autocast`` (weights and optimiser stay fp32). On this
project's CPU bf16 autocast is far slower than fp32, so keep CPU runs in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent, _HERE):  # the repo root (cloc_hf, training) and this folder (_timing)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _timing import (  # noqa: E402
    environment_info,
    format_seconds,
    format_table,
    synchronize,
    time_interleaved,
    write_json,
)

import cloc_hf  # noqa: E402
from cloc_hf.modeling_cloc import CLOCOutput  # noqa: E402

MODES = ("clip", "cloc")
GOAL_RATIO = 1.15
MEMORY_TAG = "TRAIN_STEP_MEMORY "
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Data, models, one step
# --------------------------------------------------------------------------------------------------


def make_batches(arch: str, batch_size: int, num_batches: int, max_regions: int, device: str, seed: int = 0):
    """``{"clip": [batch, ...], "cloc": [batch, ...]}`` from the same synthetic samples, plus the
    collation seconds per batch of each mode."""
    from accelerate.utils import send_to_device

    from cloc_data.loader import RegionTextCollator
    from cloc_data.synthetic import SyntheticSceneConfig, generate_split

    image_size = cloc_hf.get_model_config(arch).vision_config.image_size
    processor = cloc_hf.CLOCProcessor.offline(size=image_size)
    # Scenes are drawn at the demo's 32 px; the processor resizes them to the model's input size.
    samples = list(generate_split(SyntheticSceneConfig(seed=seed), "train", batch_size * num_batches))
    chunks = [list(enumerate(samples))[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]
    batches, collate_s = {}, {}
    for mode, regions in (("clip", 0), ("cloc", max_regions)):
        collator = RegionTextCollator(processor, max_regions=regions, seed=seed)
        start = time.perf_counter()
        collated = [collator(chunk) for chunk in chunks]
        collate_s[mode] = (time.perf_counter() - start) / num_batches
        batches[mode] = [send_to_device(b, device) for b in collated]  # tensors and per-image region lists
    return batches, collate_s


def build_model(arch: str, device: str, seed: int = 0, joint_text_pass: bool = False):
    from training.pretrain import parameter_groups

    torch.manual_seed(seed)
    model = cloc_hf.create_model(arch, joint_text_pass=joint_text_pass).to(device).train()
    # the pretraining recipe (training.config.PretrainConfig defaults): AdamW 0.9/0.98, eps 1e-6, wd 0.2
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    return model, optimizer


def autocast_for(device: str, dtype: str):
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def train_step(model, optimizer, batch: dict, device: str, dtype: str) -> torch.Tensor:
    """One optimiser step, as ``training.pretrain.Trainer.train_step`` does it (grad clip 1.0)."""
    with autocast_for(device, dtype):
        loss = model(**batch, return_loss=True).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.detach()


def stepper(model, optimizer, batches: list[dict], device: str, dtype: str):
    """A no-argument callable that runs one step on the next batch of the cycle."""
    cycle = itertools.cycle(batches)
    return lambda: train_step(model, optimizer, next(cycle), device, dtype)


# --------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per mode
# --------------------------------------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib(reset_worked: bool) -> int:
    if reset_worked:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def memory_child(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: peak memory of ``--memory-steps`` steps of one mode."""
    mode = args.memory_child
    batches, _ = make_batches(args.arch, args.batch_size, 1, args.max_regions, args.device, args.seed)
    model, optimizer = build_model(args.arch, args.device, args.seed, args.joint_text_pass)
    batch = batches[mode][0]
    out: dict = {"mode": mode, "steps": args.memory_steps}
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(args.memory_steps):
            train_step(model, optimizer, batch, args.device, args.dtype)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(kind="cuda_max_memory_allocated", before_mib=before / 2**20, peak_mib=peak / 2**20)
    else:
        before = _rss_kib()
        reset = _reset_peak_rss()
        for _ in range(args.memory_steps):
            train_step(model, optimizer, batch, args.device, args.dtype)
        peak = _peak_rss_kib(reset)
        out.update(kind="cpu_peak_rss" if reset else "cpu_lifetime_maxrss", before_mib=before / 1024,
                   peak_mib=peak / 1024, hwm_reset=reset)
    out["growth_mib"] = out["peak_mib"] - out["before_mib"]
    return out


def measure_memory(args: argparse.Namespace) -> dict:
    """Peak memory of each mode, each in its own child process (run one after the other)."""
    results = {}
    for mode in MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", mode, "--arch", args.arch,
               "--batch-size", str(args.batch_size), "--max-regions", str(args.max_regions), "--device",
               args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(args.seed),
               "--memory-steps", str(args.memory_steps)] + (["--joint-text-pass"] if args.joint_text_pass else [])
        log(f"memory: {mode} in a child process")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_TAG)]
        if proc.returncode != 0 or not lines:
            results[mode] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            log(f"memory child {mode} failed:\n{results[mode]['error']}")
            continue
        results[mode] = json.loads(lines[-1][len(MEMORY_TAG) :])
    return results


# --------------------------------------------------------------------------------------------------
# Breakdown of the CLOC extra cost
# --------------------------------------------------------------------------------------------------


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def breakdown(model, batch_cloc: dict, batch_clip: dict, steps: dict, device: str, dtype: str, repeats: int) -> dict:
    """Forward + backward time of each region-only part of the CLOC step, alone, on the step's tensors.

    The parts are timed interleaved with full CLOC and CLIP steps (``steps``), so that the extra cost
    they are compared with is measured under the same load."""
    config = model.config
    with torch.no_grad(), autocast_for(device, dtype):
        out_cloc = model(**batch_cloc, return_loss=False)
        out_clip = model(**batch_clip, return_loss=False)
    tokens = out_cloc.vision_model_output.last_hidden_state
    index = out_cloc.region_image_index
    boxes = out_cloc.region_target_boxes
    phrase_ids = torch.cat(batch_cloc["region_input_ids"])  # the forward's flat order: image by image
    phrase_mask = torch.cat(batch_cloc["region_attention_mask"])
    with torch.no_grad():
        phrase_embeds = model._encode_phrases(phrase_ids, phrase_mask)

    def run(forward):
        def fn():
            model.zero_grad(set_to_none=True)
            with autocast_for(device, dtype):
                value = forward()
            value.float().sum().backward()

        return fn

    def box_pass():
        return model.prompter(_leaf(tokens), index, boxes=boxes.to(tokens.dtype))


    def phrase_encoding():
        return model._encode_phrases(phrase_ids, phrase_mask)

    # The step computes the Prompter's image side once and shares it between its prompt passes; the box
    # pass above pays for it here, so the text-prompt part reuses a precomputed one (no gradient into it).
    shared_tokens = _leaf(tokens)
    with torch.no_grad(), autocast_for(device, dtype):
        shared_memory = model.prompter.encode_image(shared_tokens)
        for value_positions in {False, config.prompter_config.text_value_positions}:
            shared_memory.layer_keys_values(value_positions)

    def point_pass():  # only with config.point_prompt_loss: box centres as point prompts
        centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
        return model.prompter(shared_tokens, index, points=centres.to(tokens.dtype), memory=shared_memory)

    def text_prompt_and_box_head():  # whichever head input the config uses
        return model._predict_boxes(shared_tokens, index, _leaf(phrase_embeds), shared_memory)

    def loss_of(out: CLOCOutput):
        fields = ("image_embeds", "text_embeds", "region_embeds", "region_text_embeds", "pred_boxes")
        leaves = {k: _leaf(getattr(out, k)) for k in fields if getattr(out, k) is not None}
        copy = CLOCOutput(**leaves, region_image_index=out.region_image_index,
                          region_target_boxes=out.region_target_boxes, images_with_regions=out.images_with_regions)
        return lambda: model.compute_loss(copy)["loss"]

    parts = {
        "prompter_box_pass": box_pass,
        "prompter_point_pass": point_pass,
        "region_phrase_encoding": phrase_encoding,
        "text_prompt_pass_box_head": text_prompt_and_box_head,
    }
    if not (config.point_prompt_loss and config.prompter_config.prompter_type == "transformer"):
        parts.pop("prompter_point_pass")
    if not (model.box_head is not None and config.use_grounding_loss):
        parts.pop("text_prompt_pass_box_head")
    fns = {name: run(fn) for name, fn in parts.items()}
    fns.update(cloc_loss=run(loss_of(out_cloc)), clip_loss=run(loss_of(out_clip)))
    fns.update(cloc_step=steps["cloc"], clip_step=steps["clip"])
    timings = time_interleaved(fns, device=device, warmup=1, repeats=repeats)
    result = {name: timings[name].to_dict() for name in fns}
    result["region_grounding_losses"] = {"median_s": timings["cloc_loss"].median - timings["clip_loss"].median}
    result["extra_step_s"] = timings["cloc_step"].median - timings["clip_step"].median
    result["num_regions"] = int(phrase_ids.shape[0])
    result["num_unique_phrases"] = int(torch.unique(torch.cat([phrase_ids, phrase_mask], -1), dim=0).shape[0])
    return result


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", default="cloc-tiny-demo", choices=cloc_hf.list_models(), help="named architecture")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step, both modes (default 128)")
    parser.add_argument("--max-regions", type=int, default=4, help="regions per image for CLOC (paper: 4)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16: autocast forward")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per mode (default: 2 cpu, 5 cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per mode (default: 10 cpu, 30 cuda)")
    parser.add_argument("--num-batches", type=int, default=2, help="distinct batches cycled (default 2)")
    parser.add_argument("--breakdown-repeats", type=int, default=None, help="per part (default: 7 cpu, 20 cuda)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory child (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the CLOC extra-cost breakdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--joint-text-pass", action="store_true",
                        help="CLOCConfig.joint_text_pass: captions and region phrases in one text-tower call")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write all numbers to this JSON file")
    parser.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    for name, (on_gpu, on_cpu) in dict(warmup=(5, 2), repeats=(30, 10), breakdown_repeats=(20, 7)).items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.batch_size < 2 or args.repeats < 1 or args.max_regions < 1:
        parser.error("need --batch-size >= 2, --repeats >= 1, --max-regions >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    env = environment_info(args.device)
    memory = {} if args.no_memory else measure_memory(args)

    log(f"building batches and models ({args.arch}, batch {args.batch_size})")
    batches, collate_s = make_batches(args.arch, args.batch_size, args.num_batches, args.max_regions, args.device,
                                      args.seed)
    models = {mode: build_model(args.arch, args.device, args.seed, args.joint_text_pass) for mode in MODES}
    log(f"timing: {args.warmup} warm-up + {args.repeats} interleaved steps per mode")
    steps = {mode: stepper(*models[mode], batches[mode], args.device, args.dtype) for mode in MODES}
    timing = time_interleaved(steps, device=args.device, warmup=args.warmup, repeats=args.repeats)
    ratio = timing["cloc"].median / timing["clip"].median
    # each ABBA round's CLOC and CLIP steps ran next to each other: their ratio is less exposed to
    # load that changes between rounds than the ratio of the medians
    paired = statistics.median(c / k for c, k in zip(timing["cloc"].times, timing["clip"].times))

    parts = None
    if not args.no_breakdown:
        log("breakdown of the CLOC extra cost")
        parts = breakdown(models["cloc"][0], batches["cloc"][0], batches["clip"][0], steps, args.device, args.dtype,
                          args.breakdown_repeats)
    synchronize(args.device)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = os.getloadavg()
    regions = [sum(len(boxes) for boxes in b["region_boxes"]) for b in batches["cloc"]]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "memory_child"},
        "image_size": cloc_hf.get_model_config(args.arch).vision_config.image_size,
        "regions_per_batch": regions,
        "environment": env,
        "timing": {mode: timing[mode].to_dict() for mode in MODES},
        "ratio_cloc_over_clip": ratio,
        "ratio_paired_median": paired,
        "ratio_of_min": min(timing["cloc"].times) / min(timing["clip"].times),
        "goal": {"max_ratio": GOAL_RATIO, "met": ratio <= GOAL_RATIO},
        "collate_s_per_batch": collate_s,
        "memory": memory,
        "breakdown": parts,
    }


def _memory_cells(entry: dict | None) -> list[str]:
    if not entry:
        return ["-", "-"]
    if "error" in entry:
        return ["failed", "-"]
    flag = "" if entry.get("hwm_reset", True) else " (lifetime)"
    return [f"{entry['peak_mib']:.0f} MiB{flag}", f"+{entry['growth_mib']:.0f} MiB"]


def render(results: dict) -> str:
    cfg, env = results["config"], results["environment"]
    where = f"{cfg['device']}" + (f" ({env.get('gpu')})" if cfg["device"] == "cuda" else f", {env['cpu_threads']} threads")
    regions = results["regions_per_batch"]
    head = (
        f"CLOC vs CLIP training step: {cfg['arch']} @{results['image_size']} px, batch {cfg['batch_size']}, "
        f"{cfg['dtype']}, {where}; AdamW + grad clip; CLOC: <= {cfg['max_regions']} regions/image "
        f"({min(regions)}-{max(regions)} per batch)\n"
        f"{cfg['warmup']} warm-up + {cfg['repeats']} interleaved (ABBA) steps per mode; load average "
        f"{env.get('loadavg_start', ('?',))[0]:.2f} at start, {env.get('loadavg_end', ('?',))[0]:.2f} at end"
    )
    memory = results["memory"]
    mem_label = "peak GPU alloc" if cfg["device"] == "cuda" else "peak RSS"
    rows = []
    for mode, label in (("clip", "CLIP (no regions)"), ("cloc", f"CLOC (M={cfg['max_regions']})")):
        t = results["timing"][mode]
        rows.append([label, format_seconds(t["median_s"]), format_seconds(t["min_s"]), format_seconds(t["max_s"]),
                     format_seconds(results["collate_s_per_batch"][mode]), *_memory_cells(memory.get(mode))])
    ratio = results["ratio_cloc_over_clip"]
    mem_ratio = "-"
    if all(memory.get(m) and "peak_mib" in memory[m] for m in MODES):
        mem_ratio = f"{memory['cloc']['peak_mib'] / memory['clip']['peak_mib']:.2f}x"
    rows.append(["ratio CLOC/CLIP", f"{ratio:.2f}x", f"{results['ratio_of_min']:.2f}x", "", "", mem_ratio, ""])
    table = format_table(
        [["mode", "s/step (median)", "min", "max", "collate/batch", mem_label, "growth in steps"]], rows
    )
    goal = results["goal"]
    load = env.get("loadavg_start")
    busy = []
    if cfg["device"] == "cpu" and load and load[0] + cfg["threads"] > env["cpu_count"] + 0.5:
        busy = [f"WARNING: busy machine (load average {load[0]:.1f} on {env['cpu_count']} cores with "
                f"{cfg['threads']} threads here): CPU timings are unreliable; rerun when idle"
                + (" or with --threads 1" if cfg["threads"] > 1 else ""), ""]
    lines = [head, "", *busy, table, "",
             f"goal: CLOC/CLIP step time <= {goal['max_ratio']:.2f}x: {'met' if goal['met'] else 'NOT met'} "
             f"(ratio of medians {ratio:.2f}x; median of the per-round ratios {results['ratio_paired_median']:.2f}x; "
             f"ratio of the fastest steps {results['ratio_of_min']:.2f}x)"]
    if memory and cfg["device"] != "cuda":
        lines.append(f"memory: each mode in a fresh process, {cfg['memory_steps']} steps; peak RSS during the steps "
                     "(high-water mark reset before them), growth over the RSS before them")
    parts = results["breakdown"]
    if parts:
        names = {
            "prompter_box_pass": "Prompter box pass",
            "prompter_point_pass": "Prompter point pass (point_prompt_loss)",
            "region_phrase_encoding": f"region phrases through the text tower ({parts['num_unique_phrases']} "
                                      f"unique of {parts['num_regions']})",
            "text_prompt_pass_box_head": "text-prompt pass + box head (shared image side)",
            "region_grounding_losses": "region + grounding losses (CLOC loss - CLIP loss)",
        }
        extra = parts["extra_step_s"]
        total = sum(parts[k]["median_s"] for k in names if k in parts)
        rows = [[names[k], format_seconds(parts[k]["median_s"]), f"{100 * parts[k]['median_s'] / extra:.0f}%"
                 if extra > 0 else "-"] for k in names if k in parts]
        rows.append(["sum of the parts", format_seconds(total), f"{100 * total / extra:.0f}%" if extra > 0 else "-"])
        rows.append(["CLOC step - CLIP step", format_seconds(extra), "100%" if extra > 0 else "-"])
        lines += ["", f"CLOC extra cost, each part alone (forward + backward), interleaved with full steps, "
                  f"median of {cfg['breakdown_repeats']}:",
                  format_table([["part", "time", "of extra"]], rows)]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(MEMORY_TAG + json.dumps(memory_child(args)), flush=True)
        return 0
    results = run(args)
    print(render(results))
    if args.json:
        log(f"wrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
