"""CLOC inside Hugging Face LLaVA: tower pass CLOC vs CLIP, and the cost of ``<region>`` tokens.

Two side-by-side measurements, each timed in alternation (ABBA, ``_timing.time_interleaved``) under
``torch.inference_mode`` so that load drifts on a shared machine hit both sides alike:

* **tower pass**: ``LlavaForConditionalGeneration.model.get_image_features(pixel_values)`` (ViT pass,
  layer selection, projector) with a CLOC tower (``CLOCVisionConfig``) vs a CLIP tower
  (``CLIPVisionConfig``) of the same numbers and the same weights, inside two otherwise identical
  LLaVA models (ViT-B/16 @224 by default, a tiny Llama). Reported as CLOC's speed relative to
  CLIP's (``t_clip / t_cloc`` of the medians, and the median of the per-round ratios; goal >= 0.95x).
* **region tokens**: a full ``CLOCLlavaForConditionalGeneration`` forward with ``--regions`` (16)
  ``<region>`` prompts (Prompter + region projector, same tower pass) vs the same forward on the same
  ``input_ids`` with those tokens replaced by a plain word and no boxes (same text length). Reported
  as ``t_regions / t_plain`` (goal <= 1.1x), with the median of the per-round ratios beside it, and
  the region path alone (``get_region_features`` on the same tower outputs: Prompter + projector) as
  a share of the plain forward, a figure that contention on a shared machine distorts far less.

Usage (CPU, from the repository root; one run takes about a minute on 2 threads)::

    .venv/bin/python benchmarks/llava_regions.py
    .venv/bin/python benchmarks/llava_regions.py --vision tiny   # seconds, for a smoke run
    .venv/bin/python benchmarks/llava_regions.py --json runs/llava_regions_cpu.json

GPU (one H100/H200): the ``llava-1.5`` geometry, a CLOC ViT-L/14 @336 tower
(``cloc_hf.get_model_config("cloc-vit-l-14-336")``, 576 image tokens) and a CLIP tower of the same
numbers, LLaVA's ``mlp2x_gelu`` projector at a real width (1024 -> 4096) and a small Llama of that
width (2 layers, 64-token vocabulary: the LM is there to give the projector and the region tokens
their real width, not to measure a 7B LM), forward + backward in bf16::

    python benchmarks/llava_regions.py --vision l14-336 --device cuda --dtype bf16 --train \\
        --json "${OUT:-runs}/llava_regions_l14_336_bf16_cuda_train.json"

* ``--dtype bf16`` runs every timed call under ``torch.autocast(dtype=torch.bfloat16)`` (weights and
  gradients stay fp32, as in mixed-precision training); CUDA timings are synchronised by ``_timing``.
* ``--train`` times a training step instead of a forward: ``model(..., labels=...).loss.backward()``
  with gradients cleared first (no optimizer step), the loss on the text tokens only (image and
  ``<region>`` positions are ``-100``, and the same positions in the plain twin, so both losses
  count the same tokens). The tower pair is then a full ``LlavaForConditionalGeneration`` step
  (tower + projector + LM, batch ``--batch``), not ``get_image_features``. The tower is trainable by
  default, so the backward runs through the ViT, the part that differs between CLOC and CLIP;
  ``--freeze-tower`` freezes it as LLaVA's stage 2 does (the backward then stops at the projector,
  the Prompter and the region projector). The "region path alone" figure stays a forward pass.

A benchmark, not a test: it exits 0 whenever it ran, whatever the goals say.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import environment_info, format_seconds, time_fn, time_interleaved, write_json  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

import cloc_hf  # noqa: E402
from llava_bridge import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration  # noqa: E402

VISION = {
    "b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32),
}
REGISTRY_VISION = {"l14-336": "cloc-vit-l-14-336"}
"""Towers taken from ``cloc_hf``'s registry (vision numbers and Prompter as the CLOC checkpoint has them)."""
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size", "hidden_act", "layer_norm_eps")
IMAGE_ID, REGION_ID, WORD_ID, VOCAB = 4, 5, 6, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def geometry(name: str) -> tuple[dict, object, int]:
    """``(vision numbers, prompter_config, prompter_projection_dim)`` of a ``--vision`` choice.

    ``b16`` / ``tiny`` keep a default Prompter (``{}``) with a 512-wide output; registry towers take
    the CLOC architecture's own Prompter and ``projection_dim`` so the region path has its real cost.
    """
    if name in VISION:
        return VISION[name], {}, 512
    config = cloc_hf.get_model_config(REGISTRY_VISION[name])
    vision = {key: getattr(config.vision_config, key) for key in VISION_KEYS}
    return vision, config.prompter_config, config.projection_dim


def _text_config(width: int = 256, layers: int = 2) -> LlamaConfig:
    """A small Llama: the measurements are about the tower and the region path, not the LM.

    Width 256 (default, CPU): 512-wide MLP, 4 heads. Widths >= 1024 take Llama-7B's proportions
    (MLP 11008 at 4096, head size 128) so that ``--lm-width 4096`` is a LLaVA-1.5-7B layer.
    """
    if width < 1024:
        intermediate, heads = 2 * width, max(1, width // 64)
    else:
        intermediate, heads = 11008 * width // 4096, width // 128
    if width % heads:
        raise ValueError(f"--lm-width {width} is not a multiple of its {heads} attention heads")
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048, pad_token_id=0,
        bos_token_id=2, eos_token_id=3,
    )


def _llava(vision_config, args) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=vision_config, text_config=_text_config(args.lm_width, args.lm_layers), image_token_id=IMAGE_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def _precision(args):
    """The context every timed call runs in: bf16 autocast on ``args.device``, or nothing for fp32."""
    if args.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device, dtype=DTYPES[args.dtype])


def _build_device(args):
    """Where models are built: on CUDA directly (initialising ~2B parameters on the CPU takes long);
    on the CPU the plain default, so CPU runs draw the same random weights as they always did."""
    return torch.device(args.device) if args.device == "cuda" else contextlib.nullcontext()


def _prepare(model, args):
    """Move to the device, switch to training mode for ``--train``, freeze the tower on request."""
    model.to(args.device).train(args.train)
    if args.freeze_tower:
        model.model.vision_tower.requires_grad_(False)
    return model


def _step(model, args, **inputs):
    """The timed call: a forward, or with ``--train`` a forward + backward of the text loss."""
    if not args.train:
        return lambda: model(**inputs)

    def train_step():
        model.zero_grad(set_to_none=True)
        with _precision(args):
            loss = model(**inputs).loss
        loss.backward()

    return train_step


def _text_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for a loss on the text only: image and ``<region>`` positions are ignored (-100)."""
    return input_ids.masked_fill((input_ids == IMAGE_ID) | (input_ids == REGION_ID), -100)


def _grad_context(args):
    return contextlib.nullcontext() if args.train else torch.inference_mode()


def tower_pass(vision: dict, batch: int, args) -> dict:
    """CLOC vs CLIP tower inside ``LlavaForConditionalGeneration``, same weights, timed ABBA.

    Forward only: ``get_image_features`` (tower + projector). With ``--train``: a training step of
    the whole model on ``batch`` image + text prompts.
    """
    torch.manual_seed(0)
    with _build_device(args):
        cloc = _llava(cloc_hf.CLOCVisionConfig(**vision), args)
        clip = _llava(CLIPVisionConfig(**vision), args)
    clip.load_state_dict(cloc.state_dict())
    cloc, clip = _prepare(cloc, args), _prepare(clip, args)
    px = torch.randn(batch, 3, vision["image_size"], vision["image_size"]).to(args.device)
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    ids = torch.tensor([[2] + [IMAGE_ID] * grid + list(range(7, 7 + 2 * args.regions + 4))] * batch, device=args.device)
    with torch.inference_mode(), _precision(args):
        a = cloc.model.get_image_features(px).pooler_output
        b = clip.model.get_image_features(px).pooler_output
    max_diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    if args.device == "cpu" and args.dtype == "fp32":  # elsewhere kernels may differ by rounding: recorded, not asserted
        assert max_diff == 0, f"CLOC and CLIP towers disagree with the same weights ({max_diff})"
    if args.train:
        fns = {
            name: _step(m, args, input_ids=ids, pixel_values=px, labels=_text_labels(ids))
            for name, m in (("cloc", cloc), ("clip", clip))
        }
    else:
        fns = {"cloc": lambda: cloc.model.get_image_features(px), "clip": lambda: clip.model.get_image_features(px)}
    with _grad_context(args), (contextlib.nullcontext() if args.train else _precision(args)):
        timings = time_interleaved(
            fns, device=args.device, warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats,
            budget_s=args.budget_s,
        )
    speed = timings["clip"].median / timings["cloc"].median
    per_round = sorted(b / a for a, b in zip(timings["cloc"].times, timings["clip"].times))
    return {
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "timed": "train step (forward + backward)" if args.train else "get_image_features",
        "sequence_length": ids.shape[1] if args.train else None,
        "tower_max_abs_diff": max_diff,
        "cloc_speed_vs_clip": speed,
        "speed_per_round_median": per_round[len(per_round) // 2],
        "goal": ">= 0.95",
    }


def region_tokens(geom: tuple, regions: int, args) -> dict:
    """A CLOCLlava forward (or ``--train`` step) with ``regions`` <region> prompts vs the same length without any."""
    vision, prompter_config, projection_dim = geom
    torch.manual_seed(0)
    config = CLOCLlavaConfig(
        vision_config=cloc_hf.CLOCVisionConfig(**vision), text_config=_text_config(args.lm_width, args.lm_layers),
        image_token_id=IMAGE_ID, region_token_id=REGION_ID, prompter_config=prompter_config,
        prompter_projection_dim=projection_dim, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    with _build_device(args):
        model = _prepare(CLOCLlavaForConditionalGeneration(config).eval(), args)
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    prompt = [2] + [IMAGE_ID] * grid + [7, 8, 9]
    with_regions = torch.tensor([prompt + [10, REGION_ID] * regions + [11]])
    plain = with_regions.masked_fill(with_regions == REGION_ID, WORD_ID)
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(regions, 2, 2, generator=generator).sort(dim=1).values * 0.9
    boxes = [torch.cat([corners[:, 0], corners[:, 1] + 0.1], dim=-1)]
    px = torch.randn(1, 3, vision["image_size"], vision["image_size"])
    with_regions, plain, px = with_regions.to(args.device), plain.to(args.device), px.to(args.device)
    labels = {"labels": _text_labels(with_regions)} if args.train else {}
    fns = {
        "with_regions": _step(model, args, input_ids=with_regions, pixel_values=px, region_boxes=boxes, **labels),
        "plain": _step(model, args, input_ids=plain, pixel_values=px, **labels),
    }
    with _grad_context(args), (contextlib.nullcontext() if args.train else _precision(args)):
        timings = time_interleaved(
            fns, device=args.device, warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats,
            budget_s=args.budget_s,
        )
    with torch.inference_mode(), _precision(args):
        image_outputs = model.model.get_image_features(px)
        alone = time_fn(
            lambda: model.model.get_region_features(image_outputs, region_boxes=boxes), device=args.device,
            warmup=3, repeats=30,
        )
    ratio = timings["with_regions"].median / timings["plain"].median
    per_round = sorted(a / b for a, b in zip(timings["with_regions"].times, timings["plain"].times))
    return {
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "timed": "train step (forward + backward)" if args.train else "forward",
        "region_path_alone": alone.to_dict(),
        "regions": regions,
        "sequence_length": with_regions.shape[1],
        "ratio_regions_vs_plain": ratio,
        "ratio_per_round_median": per_round[len(per_round) // 2],
        "region_path_share_of_plain": alone.median / timings["plain"].median,
        "goal": "<= 1.1",
    }


def parse_args(argv=None) -> argparse.Namespace:
    """Command line; ``None`` defaults depend on ``--device`` (CPU defaults are the historical ones)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision", choices=sorted([*VISION, *REGISTRY_VISION]), default="b16",
                        help="tower size (default ViT-B/16 @224; l14-336: cloc-vit-l-14-336, LLaVA-1.5's geometry)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16: autocast (default fp32)")
    parser.add_argument("--train", action="store_true", help="time forward + backward of the text loss, not a forward")
    parser.add_argument("--freeze-tower", action="store_true", help="with --train: no gradients for the ViT (LLaVA stage 2)")
    parser.add_argument("--lm-width", type=int, help="Llama hidden size (default 256 on CPU, 4096 = LLaVA-1.5-7B on CUDA)")
    parser.add_argument("--lm-layers", type=int, default=2, help="Llama layers (default 2: a small LM of real width)")
    parser.add_argument("--batch", type=int, default=2, help="images per tower pass (default 2)")
    parser.add_argument("--regions", type=int, default=16, help="<region> prompts in the region forward (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--warmup", type=int, help="untimed calls per side (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--repeats", type=int, help="most timed rounds (default 9 on CPU, 30 on CUDA)")
    parser.add_argument("--min-repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, help="timed seconds per measurement (default 20 on CPU, 5 on CUDA)")
    parser.add_argument("--json", help="write every timing, the ratios and the environment here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = {"lm_width": 4096 if gpu else 256, "warmup": 3 if gpu else 1, "repeats": 30 if gpu else 9, "budget_s": 5.0 if gpu else 20.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.freeze_tower and not args.train:
        parser.error("--freeze-tower only means something with --train")
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    geom = geometry(args.vision)
    env = environment_info(args.device)
    tower = tower_pass(geom[0], args.batch, args)
    region = region_tokens(geom, args.regions, args)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.device == "cuda":
        env["peak_gpu_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20

    t = tower["timings"]
    where = env.get("gpu", "?") if args.device == "cuda" else f"CPU {args.threads} threads"
    lm = "tiny Llama LM" if args.lm_width == 256 and args.lm_layers == 2 else f"Llama LM {args.lm_width} wide x {args.lm_layers} layers"
    mode = f"{args.dtype}, " + ("forward + backward" + (" (tower frozen)" if args.freeze_tower else " (tower trainable)") if args.train else "forward")
    print(f"vision {args.vision}, {lm}, {mode}, {where}, load {env.get('loadavg_start')} -> {env['loadavg_end']}")
    what = f"train step of LlavaForConditionalGeneration ({tower['sequence_length']} tokens, " if args.train else "tower pass in LlavaForConditionalGeneration ("
    print(
        f"{what}batch {args.batch}): CLOC {format_seconds(t['cloc']['median_s'])}, "
        f"CLIP {format_seconds(t['clip']['median_s'])}; CLOC speed = {tower['cloc_speed_vs_clip']:.3f}x CLIP's "
        f"(per-round median {tower['speed_per_round_median']:.3f}x; goal >= 0.95x)"
    )
    r = region["timings"]
    print(
        f"CLOCLlava {'train step' if args.train else 'forward'}, {args.regions} <region> prompts vs none (same {region['sequence_length']} tokens): "
        f"{format_seconds(r['with_regions']['median_s'])} vs {format_seconds(r['plain']['median_s'])} "
        f"= {region['ratio_regions_vs_plain']:.3f}x (per-round median {region['ratio_per_round_median']:.3f}x; goal <= 1.1x)"
    )
    print(
        f"region path alone (Prompter + region projector on the same tower outputs, {args.regions} boxes, forward): "
        f"{format_seconds(region['region_path_alone']['median_s'])} = {region['region_path_share_of_plain']:.4f} of a plain "
        f"{'step' if args.train else 'forward'}"
    )
    if "peak_gpu_alloc_mib" in env:
        print(f"peak GPU memory allocated: {env['peak_gpu_alloc_mib']:,.0f} MiB")
    if args.json:
        print("wrote", write_json(args.json, {"args": vars(args), "env": env, "tower_pass": tower, "region_tokens": region}))


if __name__ == "__main__":
    main()
