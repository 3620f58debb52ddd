"""``cloc-eval-mllm``: evaluate a LLaVA-style MLLM checkpoint by generation (REC + referring tasks).

REC data (any of):

* ``--refs refs(unc).p --instances instances.json --image-dir train2014/``: the refer toolkit layout;
* ``--shards DIR|GLOB``: region-text shards the RefCOCO converter wrote (``cloc-data convert``), one
  region per expression, ``meta["split"]`` per sample;
* ``--rows val-00000-of-00004.parquet ...``: the lmms-lab ``RefCOCO*`` files lmms-eval itself reads.

Referring classification / description: ``--instructions data.json`` (``cloc-mllm-data`` output; the
images are looked up under ``--image-root``, default the file's folder).

Writes ``OUT/results.json`` (``{"rows": [...], "rec": ..., "referring": ..., "config": ...}``, rows in
the :mod:`eval.results` schema), ``OUT/results.md`` and ``OUT/predictions.jsonl`` (one line per
question: the answer, the parsed box, the truth). Examples::

    cloc-eval-mllm --model ckpt --refs refcoco/refs(unc).p --instances refcoco/instances.json \\
        --image-dir coco/train2014 --splits val testA testB --out runs/rec
    cloc-eval-mllm --model ckpt --shards shards/refcoco --prompt-style instruction --convention llava \\
        --frame pad --chat-format plain --instructions mllm_data/data.json --out runs/mllm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eval.mllm_rec import (
    MLLM_REC_THRESHOLDS,
    PROMPT_STYLES,
    evaluate_rec_generation,
    evaluate_referring,
    load_records,
    mllm_rows,
    prompt_style,
    rec_examples,
    rec_examples_from_refs,
    rec_examples_from_rows,
)
from eval.results import jsonable, markdown_table, save_results

MD_COLUMNS = ("name", "split", "rec_acc50", "rec_center_acc", "rec_miou", "parse_fail", "ref_cls_acc", "ref_desc_acc")
MD_TITLES = {"rec_acc50": "REC Acc@0.5"}  # the schema's title names the ranking protocol


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cloc-eval-mllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="saved cloc_llava / llava checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="row name (default: the model folder's name)")
    p.add_argument("--refs", help="refer-toolkit refs(*).p / refs(*).json")
    p.add_argument("--instances", help="COCO instances file of --refs")
    p.add_argument("--image-dir", help="folder of the images of --refs")
    p.add_argument("--shards", help="RefCOCO region-text shards (a folder, a glob or a .tar)")
    p.add_argument("--rows", nargs="+", help="lmms-lab RefCOCO* parquet / JSON-lines files (images embedded)")
    p.add_argument("--rows-split", default=None, help="split of --rows files whose name does not give it")
    p.add_argument("--splits", nargs="+", default=None, help="REC splits (default: all but train)")
    p.add_argument("--max-images", type=int, default=None, help="first images per split (--refs only)")
    p.add_argument("--max-examples", type=int, default=None, help="first expressions overall (quick runs)")
    p.add_argument("--prompt-style", default="lmms_eval", choices=PROMPT_STYLES)
    p.add_argument("--convention", default=None, help="box convention of the answers (default: the style's)")
    p.add_argument("--frame", default=None, choices=("original", "pad"), help="frame of the answers' numbers")
    p.add_argument("--template", default=None, help="REC question with {expr} (default: the style's)")
    p.add_argument("--instructions", help="instruction records (.json/.jsonl) for ref_cls / ref_desc")
    p.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--chat-format", default="auto", help="auto, tokenizer, llava, plain or a string with {image} {question}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _rec_data(args) -> list | None:
    if args.refs or args.instances or args.image_dir:
        if not (args.refs and args.instances and args.image_dir):
            raise ValueError("--refs, --instances and --image-dir go together")
        return rec_examples_from_refs(args.refs, args.instances, args.image_dir, splits=args.splits,
                                      max_images=args.max_images)
    if args.rows:
        return rec_examples_from_rows(args.rows, split=args.rows_split, splits=args.splits)
    if args.shards:
        from cloc_data.shards import iter_shard_samples, list_shards

        shards = list_shards(args.shards)
        if not shards:
            raise ValueError(f"{args.shards}: no .tar shards found")
        return rec_examples(iter_shard_samples(shards, decode_images=False), splits=args.splits)
    return None


def run(args, generator) -> dict[str, Any]:
    """Evaluate with ``generator`` (see :mod:`eval.mllm_generate`) and write the outputs; returns the results."""
    examples = _rec_data(args)
    if examples is None and not args.instructions:
        raise ValueError("nothing to evaluate: give REC data (--refs/--instances/--image-dir or --shards) and/or --instructions")
    if examples is not None and args.max_examples is not None:
        examples = examples[: args.max_examples]
    style = prompt_style(args.prompt_style, convention=args.convention, frame=args.frame, template=args.template)
    rec = evaluate_rec_generation(generator, examples, style, MLLM_REC_THRESHOLDS) if examples is not None else None
    referring = None
    if args.instructions:
        root = args.image_root or str(Path(args.instructions).parent)
        referring = evaluate_referring(generator, load_records(args.instructions), root)
    name = args.name or Path(args.model).name
    rows = mllm_rows(name, args.model, rec, referring)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = (rec or {}).pop("predictions", []) + (referring or {}).pop("predictions", [])
    config = dict(vars(args))
    results = {"rows": rows, "rec": rec, "referring": referring, "config": config}
    save_results(results, out / "results.json")
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps(jsonable(p)) + "\n" for p in predictions), encoding="utf-8"
    )
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """The summary table plus REC metrics per split at every threshold."""
    lines = ["# MLLM evaluation", "", markdown_table(results["rows"], MD_COLUMNS, MD_TITLES), ""]
    rec = results.get("rec")
    if rec:
        style = rec["style"]
        lines += [f"REC prompt style `{style['name']}`, answers read as `{style['convention']}` in the "
                  f"`{style['frame']}` frame; an answer without a box scores [0, 0, 0, 0].", ""]
        keys = [f"acc@{t:g}" for t in MLLM_REC_THRESHOLDS] + ["miou", "center_acc", "parse_fail", "num_expressions"]
        rows = [{"split": s, **m} for s, m in rec["splits"].items()]
        lines += [markdown_table(rows, ["split", *keys], {k: k for k in keys}), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from eval.mllm_generate import HFGenerator, load_mllm

        model, processor = load_mllm(args.model, device=args.device, dtype=args.dtype)
        generator = HFGenerator(model, processor, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                chat_format=args.chat_format, progress=not args.no_progress)
        results = run(args, generator)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"cloc-eval-mllm: error: {err}", file=sys.stderr)
        return 1
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
