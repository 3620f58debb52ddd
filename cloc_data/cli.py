"""``cloc-data``: convert public region-text datasets into shards, and summarise shards.

Convert (one CPU process; run several on disjoint inputs to go faster)::

    cloc-data convert --format coco --input annotations/instances_val2017.json --images coco/ --out shards/coco_val
    cloc-data convert --format lvis --input lvis_v1_val.json --images coco/ --out shards/lvis_val
    cloc-data convert --format refcoco --input refer/refcoco --split val --images coco/train2014 --out shards/refcoco_val
    cloc-data convert --format refcoco --input refer/refcoco --split train --images coco/train2014 --out shards/refcoco_train
    cloc-data convert --format refcoco --input RefCOCO/data/val-00000-of-00004.parquet --split val --out shards/rc
    cloc-data convert --format vg --input region_descriptions.json --image-data image_data.json --images VG/ --out shards/vg
    cloc-data convert --format flickr30k --input flickr30k_entities/ --split test --images flickr30k-images/ --out shards/f30k
    cloc-data convert --format grit --input grit_img2dataset/ --out shards/grit      # img2dataset's .tar shards
    cloc-data convert --format grit --input grit-20m/ --annotations-only --out shards/grit_ann --max-samples 1000

Summarise::

    cloc-data stats shards/coco_val

Images: with ``--images DIR`` each sample's ``meta["image_path"]`` is looked up under ``DIR`` (see
:class:`~cloc_data.converters.common.ImageResolver`) and stored in the shard as it is (JPEG, PNG
and WebP bytes unchanged; other formats re-encoded as ``--image-format``). Images embedded in the
input rows (lmms-lab RefCOCO) need no ``--images``. A sample whose image is not found is skipped
and counted as ``missing_image``, unless ``--annotations-only``: then it is written without an
image (``KEY.txt`` + ``KEY.json``), except when its size is unknown (``unknown_size``).

Every skipped record/region is counted; the report is printed at the end and saved as
``OUT/conversion_report.json``. A conversion that writes no sample at all is an error.

RefCOCO needs ``--split``: REC is evaluated on its val/testA/testB/test expressions, so a training
shard must be built with ``--split train``; ``--split all`` keeps every split (with a warning) and
each sample records its split in ``meta["split"]``, which the pretraining loader checks.

Errors: one line ``cloc-data: error: <file>: <what happened and what to do>``; exit status 2 for a
wrong command line (argparse's convention: flags, paths that do not exist, a file of the wrong kind
for ``--format``), 1 for input that cannot be used (see :mod:`cloc_data.cli_errors`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cloc_data.cli_errors import (
    EXIT_USAGE,
    CLIError,
    check_convert_inputs,
    error_from_exception,
    known_errors,
    no_samples_error,
)
from cloc_data.converters import (
    FORMATS,
    REFCOCO_SPLITS,
    SIZE_UNKNOWN,
    ImageResolver,
    iter_coco_instances,
    iter_flickr30k,
    iter_grit,
    iter_refcoco,
    iter_visual_genome,
    resolve_size,
)
from cloc_data.format import MalformedSample, RegionSample
from cloc_data.json_io import write_json_atomic
from cloc_data.shards import (
    ShardWriter,
    SkipCounter,
    detect_image_extension,
    iter_shard_samples,
    list_shards,
)

logger = logging.getLogger("cloc-data")

REPORT_NAME = "conversion_report.json"
# --split / --per are meaningful only for some formats; anything else is a user mistake
_SPLITS = {"refcoco": (*REFCOCO_SPLITS, "all"), "flickr30k": ("train", "val", "test", "all")}
_PER_CHOICES = {"refcoco": ("ref", "image"), "flickr30k": ("image", "sentence")}
ALL_SPLITS_WARNING = (
    "cloc-data: warning: --split all keeps RefCOCO's val/testA/testB/test expressions, which REC is "
    "evaluated on; each sample records its split in meta['split'] and cloc-pretrain refuses evaluation "
    "splits unless allow_eval_splits is set. Use --split train for training shards."
)


# --- convert --------------------------------------------------------------------------------------


def _single_input(args: argparse.Namespace) -> str:
    if len(args.input) != 1:
        raise CLIError(
            " ".join(args.input), f"--format {args.format} takes exactly one --input, got {len(args.input)}",
            EXIT_USAGE,
        )  # fmt: skip
    return args.input[0]


def _split(args: argparse.Namespace) -> str | None:
    """The converter's ``split``: ``None`` keeps every split (``--split all``, or none given)."""
    return None if args.split in (None, "all") else args.split


def build_source(args: argparse.Namespace, skipped: SkipCounter) -> Iterator[RegionSample]:
    """The converter generator selected by ``args.format``."""
    fmt = args.format
    if fmt == "grit":
        return iter_grit(args.input, skipped, phrases=args.grit_phrases, min_score=args.min_score)
    if fmt == "vg":
        return iter_visual_genome(_single_input(args), skipped, image_data=args.image_data)
    if fmt == "refcoco":
        return iter_refcoco(
            args.input, skipped, split=_split(args), per=args.per or "ref", instances=args.instances
        )
    if fmt == "flickr30k":
        return iter_flickr30k(
            _single_input(args), skipped, split=_split(args), boxes=args.flickr_boxes, per=args.per or "image"
        )
    if fmt in ("coco", "lvis"):
        return (s for path in args.input for s in iter_coco_instances(path, skipped, lvis=fmt == "lvis"))
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def attach_image(
    sample: RegionSample,
    resolver: ImageResolver | None,
    annotations_only: bool,
    skipped: SkipCounter,
) -> RegionSample | None:
    """Load the sample's image (or keep embedded bytes), fill/check its size; ``None`` if skipped."""
    image_path = sample.meta.get("image_path")
    if sample.image is None and resolver is not None:
        path = resolver(image_path)
        if path is not None:
            try:
                sample.image = path.read_bytes()
            except OSError as err:
                skipped.skip("bad_image", sample.key, f"{path}: {err}")
                return None
    if sample.image is None:
        if not annotations_only:
            where = f"not found under {resolver.root}" if resolver is not None else "no --images given"
            skipped.skip("missing_image", sample.key, f"{image_path!r} {where}")
            return None
        if sample.meta.get(SIZE_UNKNOWN):
            skipped.skip("unknown_size", sample.key, "no image to read the size from (annotation-only)")
            return None
        return sample
    data = sample.image
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if detect_image_extension(data) is None:  # e.g. GIF/BMP: re-encode, the shard keeps jpg/png/webp
                img.load()
                sample.image = img.convert("RGB")
    except Exception as err:  # PIL raises many exception types on corrupt files
        skipped.skip("bad_image", sample.key, f"{image_path!r}: {err!r}")
        return None
    return resolve_size(sample, size, skipped)


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Run one conversion; returns the report (also written to ``OUT/conversion_report.json``).

    Raises :class:`~cloc_data.cli_errors.CLIError` when no sample at all was written (after
    writing the report), so that a wrong input never passes as an empty success.
    """
    skipped = SkipCounter("records", max_logged_per_reason=args.log_skips)
    resolver = ImageResolver(args.images) if args.images else None
    written = with_image = regions = 0
    with ShardWriter(
        args.out, prefix=args.prefix, max_samples_per_shard=args.shard_size, image_format=args.image_format
    ) as writer:
        for sample in build_source(args, skipped):
            if args.max_samples is not None and written >= args.max_samples:
                break
            sample = attach_image(sample, resolver, args.annotations_only, skipped)
            if sample is None:
                continue
            try:
                writer.write(sample)
            except MalformedSample as err:
                skipped.skip("invalid_sample", sample.key, str(err))
                continue
            except ValueError as err:
                reason = "duplicate_key" if "duplicate sample key" in str(err) else "bad_key"
                skipped.skip(reason, sample.key, str(err))
                continue
            written += 1
            with_image += sample.image is not None
            regions += len(sample.regions)
    report = {
        "format": args.format,
        "input": [str(p) for p in args.input],
        "split": args.split,
        "samples": written,
        "samples_with_image": with_image,
        "regions": regions,
        "shards": [Path(p).name for p in writer.shard_paths],
        "skipped": skipped.as_dict(),
        "skipped_total": skipped.total,
    }
    write_json_atomic(Path(args.out) / REPORT_NAME, report, indent=2)
    print(
        f"wrote {written} samples ({with_image} with images, {regions} regions) in {len(writer.shard_paths)} shards"
    )
    print(skipped.report())
    if not written:
        raise no_samples_error(args.format, list(args.input), skipped, args.split)
    return report


# --- stats ----------------------------------------------------------------------------------------


def shard_stats(path: str, decode_images: bool = False) -> dict[str, Any]:
    """Samples, images, regions per image, sources and skip counts of the shards at ``path``."""
    skipped = SkipCounter("samples")
    paths = list_shards(path)
    per_image: list[int] = []
    sources: Counter[str] = Counter()
    datasets: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    with_image = 0
    for sample in iter_shard_samples(
        paths, decode_images=decode_images, skipped=skipped, require_image=False
    ):
        per_image.append(len(sample.regions))
        with_image += sample.image is not None
        datasets[str(sample.meta.get("dataset"))] += 1
        splits[str(sample.meta.get("split"))] += 1
        sources.update(str(r.source) for r in sample.regions)
    stats: dict[str, Any] = {
        "shards": len(paths),
        "samples": len(per_image),
        "samples_with_image": with_image,
        "regions": sum(per_image),
        "regions_per_image": {
            "mean": statistics.fmean(per_image) if per_image else 0.0,
            "median": statistics.median(per_image) if per_image else 0,
            "min": min(per_image, default=0),
            "max": max(per_image, default=0),
        },
        "datasets": dict(datasets),
        "splits": dict(splits),
        "region_sources": dict(sources),
        "skipped": skipped.as_dict(),
    }
    report = Path(path) / REPORT_NAME
    if report.is_file():
        stats["conversion_skipped"] = json.loads(report.read_text()).get("skipped", {})
    return stats


def _stats(args: argparse.Namespace) -> None:
    """``cloc-data stats``: print the JSON; a path without shards or readable samples is an error."""
    if not list_shards(args.path):  # FileNotFoundError for a path that does not exist
        raise CLIError(
            args.path, "holds no .tar shards; give the --out folder of cloc-data convert", EXIT_USAGE
        )
    stats = shard_stats(args.path, decode_images=args.decode)
    print(json.dumps(stats, indent=2))
    if not stats["samples"]:
        raise CLIError(
            args.path, f"no readable samples in its shards (skipped: {stats['skipped']}); convert again"
        )


# --- argument parsing -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloc-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert a dataset into region-text shards")
    conv.add_argument("--format", required=True, choices=FORMATS)
    conv.add_argument("--input", required=True, nargs="+", help="annotation file(s) or folder (see docs)")
    conv.add_argument("--out", required=True, help="output folder for the shards")
    conv.add_argument("--images", help="image root folder; meta['image_path'] is looked up under it")
    conv.add_argument(
        "--split",
        help="refcoco (required): train | val | testA | testB | test | all; flickr30k: train | val | test | all",
    )
    conv.add_argument("--max-samples", type=int, help="stop after writing this many samples")
    conv.add_argument(
        "--annotations-only",
        action="store_true",
        help="write samples whose image is missing without an image",
    )
    conv.add_argument("--per", help="refcoco: ref (default) | image; flickr30k: image (default) | sentence")
    conv.add_argument("--instances", help="refcoco: instances.json when not beside the refs(*).p file")
    conv.add_argument("--image-data", help="vg: image_data.json (image sizes and folders)")
    conv.add_argument("--grit-phrases", default="noun_chunks", choices=("noun_chunks", "ref_exps", "both"))
    conv.add_argument("--min-score", type=float, default=0.0, help="grit: drop regions below this score")
    conv.add_argument("--flickr-boxes", default="union", choices=("union", "each"))
    conv.add_argument("--prefix", default="shard")
    conv.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    conv.add_argument(
        "--image-format",
        default="jpg",
        choices=("jpg", "png", "webp"),
        help="encoding for images that are not already JPEG/PNG/WebP",
    )
    conv.add_argument(
        "--log-skips", type=int, default=20, help="warnings logged per skip reason (rest counted)"
    )

    stats = sub.add_parser("stats", help="summarise shards: samples, regions per image, skip counts")
    stats.add_argument("path", help="shard folder, file or glob")
    stats.add_argument(
        "--decode", action="store_true", help="decode every image (slower; checks image sizes)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check; ``parser.error`` (exit 2) names the flag."""
    if args.split is not None and args.format not in _SPLITS:
        parser.error(f"--split is not used by --format {args.format} (only {', '.join(_SPLITS)})")
    if args.split is not None and args.split not in _SPLITS[args.format]:
        parser.error(
            f"--split {args.split!r} is not a {args.format} split; use one of {', '.join(_SPLITS[args.format])}"
        )
    if args.format == "refcoco" and args.split is None:
        parser.error(
            "--format refcoco needs --split: train for training shards; val, testA, testB or test for "
            "evaluation (REC is evaluated on those, so they must not reach training); all keeps every split"
        )
    if args.per is not None and args.per not in _PER_CHOICES.get(args.format, ()):
        allowed = _PER_CHOICES.get(args.format)
        parser.error(
            f"--per {args.per!r} is not valid for --format {args.format}"
            + (f"; use {allowed}" if allowed else "")
        )
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max-samples must be >= 1")
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    if not args.prefix or any(c in args.prefix for c in "./\\"):
        parser.error(f"--prefix {args.prefix!r} must be non-empty and contain no '.', '/' or '\\'")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cloc-data``; returns the exit status (0, or 1 / 2 after one ``cloc-data: error:`` line).

    argparse's own errors (unknown flag, missing required flag) exit with ``SystemExit(2)`` as usual.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = list(args.input) if args.command == "convert" else [args.path]
    try:
        if args.command == "convert":
            _check_args(parser, args)
            if args.split == "all" and args.format == "refcoco":
                print(ALL_SPLITS_WARNING, file=sys.stderr)
            check_convert_inputs(args)
            convert(args)
        else:
            _stats(args)
    except CLIError as err:
        print(err.line, file=sys.stderr)
        return err.code
    except known_errors() as err:
        error = error_from_exception(err, paths, args.format if args.command == "convert" else None)
        print(error.line, file=sys.stderr)
        return error.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
