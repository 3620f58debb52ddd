"""``cloc-convert`` (also ``python -m cloc_hf.convert``): convert a CLIP checkpoint and save it only if
the converted model reproduces the source; see :mod:`cloc_hf.convert` for the options."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..modeling_cloc import CLOCModel
from .common import DEFAULT_ATOL, ConversionError
from .hf_clip import hf_clip_model_and_reference
from .open_clip import open_clip_model_and_reference
from .open_clip_config import unwrap_model_cfg
from .processor import build_processor
from .save import check_out_dir, save_converted


def build_parser() -> argparse.ArgumentParser:
    """The ``cloc-convert`` argument parser (exactly one of ``--from-hf-clip`` / ``--from-open-clip``)."""
    parser = argparse.ArgumentParser(
        prog="cloc-convert",
        description="Convert a CLIP checkpoint into a CLOC model (CLIP towers copied, Prompter and box head "
        "freshly initialised). Nothing is saved unless the converted model reproduces the source's image "
        "and text embeddings to --atol.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-hf-clip", metavar="SRC", help="Hugging Face CLIPModel: hub id or local directory"
    )
    source.add_argument(
        "--from-open-clip", metavar="STATE_DICT", help="open_clip state dict (.safetensors, .bin, .pt)"
    )
    parser.add_argument(
        "--open-clip-config",
        metavar="CFG.json",
        help="open_clip model config json (e.g. open_clip/model_configs/ViT-B-16.json, or an hf-hub "
        "open_clip_config.json); required with --from-open-clip",
    )
    parser.add_argument("--out", required=True, metavar="DST", help="output directory (empty or absent)")
    parser.add_argument(
        "--atol", type=float, default=DEFAULT_ATOL, help="parity tolerance (default: %(default)g)"
    )
    parser.add_argument(
        "--pooling", choices=("prompt", "all"), default=None, help="Prompter pooling (default: CLOC's)"
    )
    parser.add_argument(
        "--resize-mode",
        choices=("pad", "center_crop"),
        default="pad",
        help="processor resize mode: CLOC's pad-to-square (default) or CLIP's center crop",
    )
    parser.add_argument(
        "--tokenizer", metavar="TOK", help="tokenizer to save (default: the source's, else OpenAI CLIP's)"
    )
    parser.add_argument("--no-processor", action="store_true", help="save the model only")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return parser


def _open_clip_processor_hints(config: Mapping) -> tuple[str | None, dict | None]:
    """(tokenizer name, image statistics) an open_clip config json names: a non-CLIP tokenizer in
    ``text_cfg.hf_tokenizer_name`` (loaded from the hub unless --tokenizer is given), and the mean/std
    of an hf-hub config's ``preprocess_cfg``; ``None`` for what it does not name."""
    preprocess = config.get("preprocess_cfg", {})
    tokenizer = unwrap_model_cfg(config)["text_cfg"].get("hf_tokenizer_name")
    stats = {k: preprocess[k] for k in ("image_mean", "image_std") if k in preprocess} or None
    return tokenizer, stats


def _convert_for_cli(args: argparse.Namespace) -> tuple[CLOCModel, Any, Any]:
    """(model, reference, processor) for the parsed arguments; processor ``False`` with --no-processor."""
    prompter_config = {"pooling": args.pooling} if args.pooling else None
    tokenizer = args.tokenizer
    if args.from_hf_clip:
        model, reference = hf_clip_model_and_reference(args.from_hf_clip, prompter_config)
        source, stats = args.from_hf_clip, None
    else:
        config = json.loads(Path(args.open_clip_config).read_text())
        model, reference = open_clip_model_and_reference(args.from_open_clip, config, prompter_config)
        named_tokenizer, stats = _open_clip_processor_hints(config)
        tokenizer, source = tokenizer or named_tokenizer, None
    processor = False
    if not args.no_processor:
        processor = build_processor(
            model.config, source=source, tokenizer=tokenizer, resize_mode=args.resize_mode, image_stats=stats
        )
    return model, reference, processor


def main(argv: list[str] | None = None) -> int:
    """``cloc-convert``: see :mod:`cloc_hf.convert`. Returns the exit status (0 on success, 1 when the
    conversion is refused); bad arguments exit through argparse (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_open_clip and not args.open_clip_config:
        parser.error("--from-open-clip needs --open-clip-config")
    if args.from_hf_clip and args.open_clip_config:
        parser.error("--open-clip-config only applies to --from-open-clip")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_out_dir(args.out, args.overwrite)  # fail before a long conversion, not after
        model, reference, processor = _convert_for_cli(args)
        diffs = save_converted(
            model, args.out, processor, reference=reference, atol=args.atol, overwrite=args.overwrite
        )
    except (ConversionError, OSError) as err:  # OSError: missing files, unreachable hub, non-empty --out
        print(f"cloc-convert: error: {err}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{name} {d:.1e}" for name, d in diffs.items())
    print(f"saved {args.out} (parity max |diff|: {summary}; atol {args.atol:g})")
    return 0
