"""``cloc-eval``: evaluate a saved CLOC (or CLIP-as-CLOC) checkpoint on region and image tasks.

1 CPU, the synthetic demo data::

    cloc-eval --model runs/cloc-demo --data data/synthetic --out results/cloc.json --markdown results/cloc.md

1 GPU, only the CLIP baselines, first 500 test images::

    cloc-eval --model runs/clip-demo --data data/synthetic --methods clip-crop,clip-maskbg,clip-roi \\
        --device cuda --max-images 500 --out results/clip.json

COCO region recognition + RefCOCO (explicit paths)::

    cloc-eval --model ckpt --data coco --split val2017 --instances coco/annotations/instances_val2017.json \\
        --images coco/val2017 --tasks region,rec --refs refcoco/refs\\(unc\\).p \\
        --refs-instances refcoco/instances.json --refs-images coco/train2014 --out coco.json

The model is loaded with ``AutoModel.from_pretrained`` (``import cloc_hf`` registers the classes), the
processor with ``CLOCProcessor.from_pretrained``; a checkpoint saved without processor files gets
``CLOCProcessor.offline(size=<the model's image size>)`` and a warning. ``python -m eval.cli`` works too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from eval.baselines import EncodeOptions
from eval.report import write_markdown
from eval.results import METHODS, save_results
from eval.runner import TASKS, evaluate, resolve_data

logger = logging.getLogger("cloc-eval")


def _csv(allowed):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``cloc-eval`` argument parser (defaults: every task and method, CPU, batch 32, split ``test``)."""
    p = argparse.ArgumentParser(prog="cloc-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (save_pretrained) or hub id")
    p.add_argument(
        "--data", help="dataset folder: a synthetic dataset or a COCO/refs layout (see eval.runner)"
    )
    p.add_argument(
        "--tasks", type=_csv(TASKS), default=list(TASKS), help=f"comma-separated subset of {','.join(TASKS)}"
    )
    p.add_argument(
        "--methods",
        type=_csv(METHODS),
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--markdown", help="also write a markdown report here")
    p.add_argument("--title", help="markdown report title")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--max-images", type=int, help="only the first N images of each task's data")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per ViT forward (crops count as images)"
    )
    p.add_argument(
        "--crop-margin", type=float, default=0.15, help="clip-crop margin, fraction of the box side"
    )
    p.add_argument(
        "--template", action="append", dest="templates", help="zero-shot prompt template with {} (repeatable)"
    )
    g = p.add_argument_group("explicit data paths (override what --data provides)")
    g.add_argument("--instances", help="COCO/LVIS instances JSON for region recognition and zero-shot")
    g.add_argument("--images", help="image folder of --instances")
    g.add_argument("--shards", help="region-text shards (file, folder or glob) for the retrieval tasks")
    g.add_argument("--refs", help="refer-style refs(*).p or refs(*).json for REC")
    g.add_argument("--refs-instances", help="instances JSON the refs point to")
    g.add_argument("--refs-images", help="image folder of --refs-instances")
    return p


def load_model_and_processor(model_dir: str, device: str = "cpu"):
    """``(model, processor)`` of a checkpoint; the offline processor when the folder has none."""
    from transformers import AutoModel

    import cloc_hf  # noqa: F401  (registers CLOC with the Auto classes)
    from cloc_hf.processing_cloc import CLOCProcessor

    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    try:
        processor = CLOCProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        size = model.config.vision_config.image_size
        warnings.warn(
            f"{model_dir} has no processor files ({type(err).__name__}); using CLOCProcessor.offline(size={size}), "
            "pad mode and OpenAI CLIP mean/std. Save the training processor next to the model to be exact.",
            stacklevel=2,
        )
        processor = CLOCProcessor.offline(size=size)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    """Run ``cloc-eval`` with ``argv`` (default: ``sys.argv[1:]``); writes the results, returns 0."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.data is None and not (args.instances or args.shards or args.refs):
        build_parser().error("give --data or explicit data paths (--instances, --shards, --refs)")
    data = resolve_data(
        args.data,
        args.split,
        instances=args.instances,
        images=args.images,
        shards=args.shards,
        refs=args.refs,
        refs_instances=args.refs_instances,
        refs_images=args.refs_images,
    )
    model, processor = load_model_and_processor(args.model, args.device)
    results = evaluate(
        model,
        processor,
        data,
        tasks=args.tasks,
        methods=args.methods,
        max_images=args.max_images,
        split=args.split,
        options=EncodeOptions(batch_size=args.batch_size, crop_margin=args.crop_margin),
        zeroshot_templates=args.templates,
        model_name=Path(args.model).name or args.model,
    )
    save_results(results, args.out)
    logger.info("wrote %s", args.out)
    if args.markdown:
        write_markdown(results, args.markdown, args.title)
        logger.info("wrote %s", args.markdown)
    for source, counts in (results["meta"].get("data_skips") or {}).items():
        logger.info("dropped while reading %s: %s", source, counts)  # the readers' skip rules, counted
    for row in results["rows"]:
        logger.info(
            "%s", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
