"""Peak memory of ``cloc-swap-tower`` on a synthetic sharded LLaVA checkpoint of a few GB.

Builds, in a temporary folder, a LLaVA-1.5-7B-shaped checkpoint (LLaMA width 4096 / MLP 11008 /
vocabulary 32000, as many layers as fit ``--size-gb``, a CLIP ViT-L/14-336 tower, the real saved key
layout ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``) in ``--shards`` safetensors shards, and a CLOC ViT checkpoint
(``--arch``, fp32, as training saves it). Both are written tensor by tensor from one repeated block of
random bytes (the values do not matter to a byte copy), so building them needs little memory. Then
``python -m llava_bridge.swap_tower`` runs in a child process; its peak resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, which counts file pages it maps too) is compared
with the goal: largest source shard + CLOC tower file + margin, where the margin is the child
interpreter's own footprint after its imports (measured in a second child) plus 256 MiB. Everything
is deleted afterwards unless ``--keep``. Always exits 0 once it has run (it measures, it does not test).

    .venv/bin/python benchmarks/swap_tower_memory.py                 # 3 GB in 4 shards, bf16 (~1 min)
    .venv/bin/python benchmarks/swap_tower_memory.py --size-gb 1 --json runs/swap_tower_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1 << 20
_BLOCK = os.urandom(64 * MiB)
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_SAVED_LAYOUT = (  # transformers' in-memory names -> the names it saves (and llava-hf checkpoints use)
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _write_random_shard(path: Path, tensors: list[tuple[str, str, list[int], int]]) -> None:
    """A safetensors file with the given (name, dtype, shape, bytes) entries, filled with random bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        remaining = offset
        while remaining:
            chunk = min(remaining, len(_BLOCK))
            out.write(memoryview(_BLOCK)[:chunk])
            remaining -= chunk


def _entries(model: torch.nn.Module, dtype: torch.dtype, rename=()) -> list[tuple[str, str, list[int], int]]:
    out = []
    for name, tensor in model.state_dict().items():
        for old, new in rename:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out.append((name, _DTYPE_NAMES[dtype], list(tensor.shape), tensor.numel() * dtype.itemsize))
    return out


def build_llava(folder: Path, size_gb: float, shards: int, dtype: torch.dtype) -> int:
    """Write the synthetic LLaVA checkpoint; returns the size of its largest shard in bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    hidden, mlp, vocab = 4096, 11008, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * mlp) * dtype.itemsize
    fixed = (2 * vocab * hidden + 304_000_000) * dtype.itemsize  # embeddings, LM head, ViT-L tower
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, dtype=str(dtype).split(".")[-1])
    with torch.device("meta"):
        entries = _entries(LlavaForConditionalGeneration(config), dtype, _SAVED_LAYOUT)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    target = sum(e[3] for e in entries) / shards
    groups: list[list] = [[]]
    for entry in entries:  # consecutive tensors, a new shard once the current one reaches its share
        if groups[-1] and sum(e[3] for e in groups[-1]) >= target and len(groups) < shards:
            groups.append([])
        groups[-1].append(entry)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_random_shard(folder / name, group)
        weight_map |= {e[0]: name for e in group}
    total = sum(e[3] for e in entries)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    words = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "a", "photo"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(folder)
    return max(sum(e[3] for e in group) for group in groups)


def build_cloc(folder: Path, arch: str) -> tuple[int, int]:
    """Write a CLOC ViT-only checkpoint (fp32) of the named architecture; returns its weight bytes and width."""
    import cloc_hf

    vision = cloc_hf.get_model_config(arch).vision_config
    with torch.device("meta"):
        entries = _entries(cloc_hf.CLOCVisionModel(vision), torch.float32)
    folder.mkdir(parents=True)
    vision.save_pretrained(folder)
    _write_random_shard(folder / "model.safetensors", entries)
    return sum(e[3] for e in entries), vision.hidden_size


def _baseline_rss() -> int:
    """Peak RSS (bytes) of a fresh interpreter after the swap's imports, before any work."""
    code = ("import resource, torch, transformers, cloc_hf, llava_bridge.swap_tower; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of the synthetic LLaVA checkpoint (default 3)")
    parser.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="LLaVA weights' dtype (default bf16)")
    parser.add_argument("--arch", default="cloc-vit-l-14-336", help="CLOC architecture of the new tower")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temporary folder, deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swap_tower_memory."))
    try:
        start = time.perf_counter()
        largest = build_llava(work / "llava", args.size_gb, args.shards, dtype)
        tower, width = build_cloc(work / "cloc", args.arch)
        build_s = time.perf_counter() - start
        source_bytes = sum(f.stat().st_size for f in (work / "llava").glob("*.safetensors"))
        start = time.perf_counter()
        projector = "keep" if width == 1024 else "reinit"  # the source projector reads 1024 (CLIP ViT-L) features
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from llava_bridge.swap_tower import main; sys.exit(main())",
             "--llava", str(work / "llava"), "--cloc", str(work / "cloc"), "--out", str(work / "out"),
             "--projector", projector], capture_output=True, text=True, cwd=REPO,
        )
        swap_s = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the first (only) child so far
        baseline = _baseline_rss()
        out_bytes = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors")) if result.returncode == 0 else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    margin = baseline + 256 * MiB
    goal = largest + tower + margin
    numbers = {
        "source_checkpoint_mib": source_bytes / MiB, "shards": args.shards, "dtype": args.dtype,
        "largest_shard_mib": largest / MiB, "cloc_tower_file_mib": tower / MiB, "output_weights_mib": out_bytes / MiB,
        "interpreter_after_imports_mib": baseline / MiB, "peak_rss_mib": peak / MiB, "goal_mib": goal / MiB,
        "goal_met": peak < goal, "projector": projector, "swap_s": swap_s, "build_s": build_s, "returncode": result.returncode,
    }
    print(f"source {source_bytes / MiB:,.0f} MiB in {args.shards} {args.dtype} shards (largest {largest / MiB:,.0f} MiB); "
          f"CLOC tower {args.arch} {tower / MiB:,.0f} MiB (fp32 file)")
    print(f"cloc-swap-tower (--projector {projector}): {swap_s:.1f} s, exit {result.returncode}, output {out_bytes / MiB:,.0f} MiB of weights")
    print(f"peak RSS {peak / MiB:,.0f} MiB (interpreter after imports alone: {baseline / MiB:,.0f} MiB)")
    print(f"goal: peak < largest shard + tower + (imports + 256 MiB) = {goal / MiB:,.0f} MiB -> "
          f"{'met' if peak < goal else 'NOT met'}")
    if result.returncode != 0:
        print(result.stderr[-2000:])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
