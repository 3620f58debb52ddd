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

A benchmark, not a test: it exits 0 whenever it ran, whatever the goals say.
"""

from __future__ import annotations

import argparse
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
IMAGE_ID, REGION_ID, WORD_ID, VOCAB = 4, 5, 6, 64


def _text_config() -> LlamaConfig:
    """A tiny Llama: the measurements are about the tower and the region path, not the LM."""
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )


def _llava(vision_config) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=vision_config, text_config=_text_config(), image_token_id=IMAGE_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def tower_pass(vision: dict, batch: int, args) -> dict:
    """CLOC vs CLIP tower inside ``LlavaForConditionalGeneration``, same weights, timed ABBA."""
    torch.manual_seed(0)
    cloc = _llava(cloc_hf.CLOCVisionConfig(**vision))
    clip = _llava(CLIPVisionConfig(**vision))
    clip.load_state_dict(cloc.state_dict())
    px = torch.randn(batch, 3, vision["image_size"], vision["image_size"])
    with torch.inference_mode():
        a = cloc.model.get_image_features(px).pooler_output
        b = clip.model.get_image_features(px).pooler_output
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "CLOC and CLIP towers disagree with the same weights"
        timings = time_interleaved(
            {"cloc": lambda: cloc.model.get_image_features(px), "clip": lambda: clip.model.get_image_features(px)},
            warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats, budget_s=args.budget_s,
        )
    speed = timings["clip"].median / timings["cloc"].median
    per_round = sorted(b / a for a, b in zip(timings["cloc"].times, timings["clip"].times))
    return {
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "cloc_speed_vs_clip": speed,
        "speed_per_round_median": per_round[len(per_round) // 2],
        "goal": ">= 0.95",
    }


def region_tokens(vision: dict, regions: int, args) -> dict:
    """A CLOCLlava forward with ``regions`` <region> prompts vs the same-length forward without any."""
    torch.manual_seed(0)
    config = CLOCLlavaConfig(
        vision_config=cloc_hf.CLOCVisionConfig(**vision), text_config=_text_config(), image_token_id=IMAGE_ID,
        region_token_id=REGION_ID, prompter_config={}, prompter_projection_dim=512,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = CLOCLlavaForConditionalGeneration(config).eval()
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    prompt = [2] + [IMAGE_ID] * grid + [7, 8, 9]
    with_regions = torch.tensor([prompt + [10, REGION_ID] * regions + [11]])
    plain = with_regions.masked_fill(with_regions == REGION_ID, WORD_ID)
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(regions, 2, 2, generator=generator).sort(dim=1).values * 0.9
    boxes = [torch.cat([corners[:, 0], corners[:, 1] + 0.1], dim=-1)]
    px = torch.randn(1, 3, vision["image_size"], vision["image_size"])
    with torch.inference_mode():
        timings = time_interleaved(
            {
                "with_regions": lambda: model(input_ids=with_regions, pixel_values=px, region_boxes=boxes),
                "plain": lambda: model(input_ids=plain, pixel_values=px),
            },
            warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats, budget_s=args.budget_s,
        )
        image_outputs = model.model.get_image_features(px)
        alone = time_fn(lambda: model.model.get_region_features(image_outputs, region_boxes=boxes), warmup=3, repeats=30)
    ratio = timings["with_regions"].median / timings["plain"].median
    per_round = sorted(a / b for a, b in zip(timings["with_regions"].times, timings["plain"].times))
    return {
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "region_path_alone": alone.to_dict(),
        "regions": regions,
        "sequence_length": with_regions.shape[1],
        "ratio_regions_vs_plain": ratio,
        "ratio_per_round_median": per_round[len(per_round) // 2],
        "region_path_share_of_plain": alone.median / timings["plain"].median,
        "goal": "<= 1.1",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision", choices=sorted(VISION), default="b16", help="tower size (default ViT-B/16 @224)")
    parser.add_argument("--batch", type=int, default=2, help="images per tower pass (default 2)")
    parser.add_argument("--regions", type=int, default=16, help="<region> prompts in the region forward (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--min-repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=20.0, help="timed seconds per measurement (default 20)")
    parser.add_argument("--json", help="write every timing, the ratios and the environment here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vision = VISION[args.vision]
    env = environment_info("cpu")
    tower = tower_pass(vision, args.batch, args)
    region = region_tokens(vision, args.regions, args)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    t = tower["timings"]
    print(f"vision {args.vision}, tiny Llama LM, CPU {args.threads} threads, load {env.get('loadavg_start')} -> {env['loadavg_end']}")
    print(
        f"tower pass in LlavaForConditionalGeneration (batch {args.batch}): CLOC {format_seconds(t['cloc']['median_s'])}, "
        f"CLIP {format_seconds(t['clip']['median_s'])}; CLOC speed = {tower['cloc_speed_vs_clip']:.3f}x CLIP's "
        f"(per-round median {tower['speed_per_round_median']:.3f}x; goal >= 0.95x)"
    )
    r = region["timings"]
    print(
        f"CLOCLlava forward, {args.regions} <region> prompts vs none (same {region['sequence_length']} tokens): "
        f"{format_seconds(r['with_regions']['median_s'])} vs {format_seconds(r['plain']['median_s'])} "
        f"= {region['ratio_regions_vs_plain']:.3f}x (per-round median {region['ratio_per_round_median']:.3f}x; goal <= 1.1x)"
    )
    print(
        f"region path alone (Prompter + region projector on the same tower outputs, {args.regions} boxes): "
        f"{format_seconds(region['region_path_alone']['median_s'])} = {region['region_path_share_of_plain']:.4f} of a plain forward"
    )
    if args.json:
        print("wrote", write_json(args.json, {"args": vars(args), "env": env, "tower_pass": tower, "region_tokens": region}))


if __name__ == "__main__":
    main()
