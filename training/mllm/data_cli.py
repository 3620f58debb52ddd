"""``cloc-mllm-data``: region-text shards -> LLaVA-style instruction data for referring and grounding.

Examples::

    # RefCOCO train split (from `cloc-data convert --format refcoco --split train`), Ferret's boxes
    cloc-mllm-data --input data/refcoco-train --out mllm/refcoco --convention ferret --frame original
    # the synthetic scenes, REC + referring classification only, LLaVA-1.5 boxes in the padded frame
    cloc-mllm-data --input runs/demo/data/train --out mllm/demo --tasks rec,ref_cls --frame pad

``--format json`` writes ``OUT/data.json`` (one list of records, LLaVA's layout) and the images under
``OUT/images/``; ``--format jsonl`` writes one record per line (streams, for large data). The skip
counts are printed and written to ``OUT/stats.json``. Errors a user can cause (no shards, no records
at all, an unknown task or convention) end in one ``cloc-mllm-data: error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cloc_data.json_io import write_json_atomic
from cloc_data.shards import SkipCounter, iter_shard_samples, list_shards

from .instructions import FRAMES, TASKS, InstructionBuilder, InstructionConfig, collect_phrases, image_name

logger = logging.getLogger("cloc-mllm-data")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cloc-mllm-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="region-text shards: a folder, a glob or a .tar")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--convention", default="llava", help="box-text convention (llava, shikra, ferret, qwen, lmms_eval)")
    parser.add_argument("--frame", default="original", choices=FRAMES, help="frame the written boxes are normalised in")
    parser.add_argument("--max-regions", type=int, default=4, help="regions of one sample used per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="json", choices=("json", "jsonl"))
    parser.add_argument("--no-images", action="store_true", help="do not copy images (records still name them)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        config = InstructionConfig(
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
            convention=args.convention,
            frame=args.frame,
            max_regions_per_task=args.max_regions,
            seed=args.seed,
        )
        shards = list_shards(args.input)
    except (ValueError, FileNotFoundError) as err:
        return _fail(f"{args.input}: {err}")
    if not shards:
        return _fail(f"{args.input}: no .tar shards found (write them with `cloc-data convert`)")

    read_skips = SkipCounter("samples", max_logged_per_reason=5)
    pool = collect_phrases(iter_shard_samples(shards, decode_images=False, require_image=False))
    samples = iter_shard_samples(shards, decode_images=False, skipped=read_skips, require_image=False)
    builder = InstructionBuilder(config, pool)

    out = Path(args.out)
    image_dir = None if args.no_images else out / "images"
    written = _write(samples, builder, out, args.format, image_dir)
    stats = {"records": written, "skipped_samples": read_skips.as_dict(), "skipped_records": builder.skipped.as_dict()}
    write_json_atomic(out / "stats.json", stats)
    logger.info("wrote %d records to %s\n%s\n%s", written, out, read_skips.report(), builder.skipped.report())
    if written == 0:
        return _fail(f"{args.input}: no instruction records could be built (see the skip counts above)")
    return 0


def _write(samples, builder: InstructionBuilder, out: Path, fmt: str, image_dir: Path | None) -> int:
    """Write every sample's records (and its image once) to ``out``; returns the number of records."""
    out.mkdir(parents=True, exist_ok=True)
    name = "data.jsonl" if fmt == "jsonl" else "data.json"
    tmp = out / f"{name}.partial"
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("" if fmt == "jsonl" else "[\n")
        for sample in samples:
            made = builder.records(sample)
            if made and image_dir is not None and sample.image is not None:
                _save_image(sample.image, image_dir / image_name(sample))
            for record in made:
                sep = "" if fmt == "jsonl" or written == 0 else ",\n"
                f.write(sep + json.dumps(record) + ("\n" if fmt == "jsonl" else ""))
                written += 1
        f.write("" if fmt == "jsonl" else "\n]\n")
    tmp.replace(out / name)  # a killed run leaves only the .partial file, never a truncated data file
    return written


def _save_image(image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, (bytes, bytearray)):
        target.write_bytes(image)
    else:
        image.save(target)


def _fail(message: str) -> int:
    print(f"cloc-mllm-data: error: {message}", file=sys.stderr)
    return 2


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
