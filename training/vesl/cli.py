"""``cloc-vesl``: pseudo-label images with region-text pairs (VESL, docs/design.md section 6).

One CPU / one GPU (no launcher needed; the device is accelerate's default)::

    cloc-vesl --input images/ --output vesl_shards/ \\
        --captioner Salesforce/blip-image-captioning-large \\
        --detector google/owlv2-large-patch14-ensemble

N GPUs on one machine (chunks are split round-robin over the processes; ``torchrun
--nproc_per_node N -m training.vesl.cli ...`` works too, and is how to run N CPU processes)::

    accelerate launch --num_processes 8 -m training.vesl.cli --input shards/ --output vesl_shards/ \\
        --captioner llava-hf/llava-1.5-7b-hf --prompt "Describe this image in detail." \\
        --caption-batch-size 32 --detect-batch-size 16

Keep existing captions (shard input, or ``IMAGE.txt`` beside each image) and only ground them::

    cloc-vesl --input shards/ --output vesl_shards/ --keep-caption

Re-running the same command resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from training.vesl.phrases import TAGGER_NAMES, WEB_WORDS, resolve_tagger
from training.vesl.pipeline import DEFAULT_DETECTOR, STATS_NAME, VeslConfig, format_stats, run_vesl
from training.vesl.sources import INPUT_FORMATS


def _optional_bool(text: str) -> bool | None:
    lowered = text.lower()
    if lowered in ("auto", "none"):
        return None
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto/true/false, got {text!r}")


def _web_words(args: argparse.Namespace) -> list[str] | None:
    words = None
    if args.web_words_file:
        with open(args.web_words_file, encoding="utf-8") as f:
            words = [w for line in f for w in line.split() if not line.lstrip().startswith("#")]
    if args.extra_web_words:
        words = sorted(
            set(words if words is not None else WEB_WORDS) | set(args.extra_web_words.split(",")) - {""}
        )
    return words


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloc-vesl",
        description="VESL pseudo-labelling: caption -> noun phrases -> OWLv2 boxes -> region-text shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input / output")
    io.add_argument(
        "--input", required=True, help="image folder (recursive jpg/png/webp), shard file, folder or glob"
    )
    io.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    io.add_argument("--output", required=True, help="output folder for the shards and statistics")
    io.add_argument(
        "--chunk-size", type=int, default=1000, help="images per chunk / output shard (folder input)"
    )
    io.add_argument("--prefix", default="vesl", help="output shard name prefix")
    io.add_argument(
        "--image-format", default="jpg", help="encoding for images not stored as their original bytes"
    )
    io.add_argument(
        "--keep-existing-regions", action="store_true", help="shard input: keep the input's regions too"
    )

    cap = p.add_argument_group("stage 1: captioning")
    cap.add_argument("--captioner", help="hub id or local path of an image-text-to-text model")
    cap.add_argument(
        "--keep-caption", action="store_true", help="keep existing captions instead of captioning"
    )
    cap.add_argument("--prompt", default=None, help="captioning prompt / task token / instruction")
    cap.add_argument("--max-new-tokens", type=int, default=128)
    cap.add_argument(
        "--chat-template",
        type=_optional_bool,
        default=None,
        metavar="auto|true|false",
        help="wrap the prompt with the processor's chat template (auto: when it has one)",
    )
    cap.add_argument("--num-beams", type=int, default=1)
    cap.add_argument("--caption-batch-size", type=int, default=16)

    np_ = p.add_argument_group("stage 2: noun phrases")
    np_.add_argument(
        "--tagger",
        choices=TAGGER_NAMES,
        default="auto",
        help="POS tagger: NLTK's (needs its data), the approximate built-in lexicon, or auto",
    )
    np_.add_argument("--max-phrases", type=int, default=20)
    np_.add_argument(
        "--web-words-file",
        help="file of web words to drop (whitespace separated, # comments); replaces the built-in list",
    )
    np_.add_argument("--extra-web-words", help="comma-separated words added to the web-word list")

    det = p.add_argument_group("stage 3: grounding")
    det.add_argument(
        "--detector", default=DEFAULT_DETECTOR, help="hub id or local path of an OWLv2 checkpoint"
    )
    det.add_argument("--threshold", type=float, default=0.1, help="keep boxes scoring above this")
    det.add_argument("--nms-iou", type=float, default=None, help="class-agnostic NMS IoU (default: no NMS)")
    det.add_argument("--max-regions", type=int, default=None, help="cap on regions per image")
    det.add_argument("--detect-batch-size", type=int, default=8)
    det.add_argument("--detector-preprocess", choices=("auto", "processor", "torch"), default="auto")

    run = p.add_argument_group("runtime")
    run.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16"
    )
    run.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> VeslConfig:
    return VeslConfig(
        input=args.input,
        output=args.output,
        captioner=args.captioner,
        keep_caption=args.keep_caption,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        use_chat_template=args.chat_template,
        generate_kwargs={"num_beams": args.num_beams} if args.num_beams != 1 else {},
        detector=args.detector,
        threshold=args.threshold,
        nms_iou=args.nms_iou,
        max_regions=args.max_regions,
        max_phrases=args.max_phrases,
        web_words=_web_words(args),
        tagger=args.tagger,
        input_format=args.input_format,
        chunk_size=args.chunk_size,
        caption_batch_size=args.caption_batch_size,
        detect_batch_size=args.detect_batch_size,
        dtype=args.dtype,
        detector_preprocess=args.detector_preprocess,
        image_format=args.image_format,
        prefix=args.prefix,
        keep_existing_regions=args.keep_existing_regions,
    )


EXIT_USAGE = 2  # argparse's status for a command line that cannot work (as cloc-data's)


def main(argv: list[str] | None = None) -> int:
    """Run ``cloc-vesl``; returns 0, or 2 after one ``cloc-vesl: error:`` line for an unusable setting."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if config.tagger == "nltk":  # before any model loads; "auto" falls back to the lexicon instead
        try:
            resolve_tagger("nltk")
        except LookupError as err:  # NLTK or its tagger data missing: the message names the install command
            print(f"cloc-vesl: error: --tagger nltk: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_USAGE
    result = run_vesl(config)
    if result.stats is not None:
        print(format_stats(result.stats))
        print(f"statistics: {result.output}/{STATS_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
