"""The VESL pseudo-labelling pipeline: caption -> noun phrases -> OWLv2 boxes -> region-text shards.

Work is split into deterministic chunks (:mod:`training.vesl.sources`); chunk ``i`` becomes the
output shard ``{prefix}-{i:06d}.tar`` plus a small ``{prefix}-{i:06d}.stats.json`` that marks it
finished. Chunks are assigned round-robin to processes (accelerate's ``process_index`` /
``num_processes``; a plain single process without a launcher is rank 0 of 1), and each process puts
its models on its own device.

Resuming: a chunk whose ``.stats.json`` exists (and whose shard, if it has samples, exists) is skipped.
A chunk is written into ``.{prefix}-{i:06d}.tmp/`` and moved into place with ``os.replace`` (shard
first, then its stats file), so a crash leaves either a finished chunk or leftovers that the next run
deletes and redoes. ``vesl_manifest.json`` records the input listing and the labelling settings; a
re-run with a different input or different settings into the same folder is refused.

At the end the main process sums every finished chunk's statistics into ``vesl_stats.json`` (per-stage
images/s, phrases per caption, regions per image, skips) and the CLI prints them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from cloc_data.format import MalformedSample, Region, RegionSample
from cloc_data.json_io import write_json_atomic
from cloc_data.shards import ShardWriter, SkipCounter
from training.vesl.captioner import Captioner, HFCaptioner, KeepCaption
from training.vesl.grounder import DEFAULT_THRESHOLD, Grounder, Owlv2Grounder
from training.vesl.phrases import MAX_PHRASES, WEB_WORDS, PhraseExtractor
from training.vesl.sources import Chunk, assign_chunks, open_source
from training.vesl.stats import STAGES, ChunkStats, format_stats, summarize  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "vesl_manifest.json"
STATS_NAME = "vesl_stats.json"
DEFAULT_DETECTOR = "google/owlv2-large-patch14-ensemble"


@dataclass
class VeslConfig:
    """Settings of one VESL run (the CLI's flags map one-to-one onto these fields).

    Args:
        input: image folder, shard file/folder/glob.
        output: folder for the output shards, their stats files, the manifest and ``vesl_stats.json``.
        captioner: hub id or local path of the captioning model; ignored with ``keep_caption``.
        keep_caption: keep each input's existing caption instead of re-captioning.
        prompt, max_new_tokens, use_chat_template, generate_kwargs: captioning (see
            :class:`~training.vesl.captioner.HFCaptioner`).
        detector: hub id or local path of the OWLv2 checkpoint.
        threshold: keep boxes scoring > this (paper: 0.1).
        nms_iou: optional class-agnostic NMS IoU; ``None`` = off (the paper keeps all boxes).
        max_regions: optional cap on regions per image; ``None`` = no cap.
        max_phrases: noun phrases kept per caption (paper: 20).
        web_words: tokens dropped before tagging; ``None`` = :data:`~training.vesl.phrases.WEB_WORDS`.
        tagger: ``"auto"``, ``"nltk"`` or ``"lexicon"`` (see :func:`~training.vesl.phrases.resolve_tagger`).
        input_format: ``"auto"``, ``"images"`` or ``"shards"``.
        chunk_size: images per chunk (= per output shard) for folder input; shard input uses one
            chunk per input shard.
        caption_batch_size, detect_batch_size: batch sizes of the two model stages.
        dtype: model precision, ``"auto"`` = bf16 on CUDA, fp32 on CPU.
        detector_preprocess: ``"auto"``, ``"processor"`` or ``"torch"`` (see
            :class:`~training.vesl.grounder.Owlv2Grounder`).
        image_format: encoding for images that are not stored as their original bytes.
        prefix: output shard name prefix.
        keep_existing_regions: shard input only: keep the input's regions next to the new ones.
    """

    input: str
    output: str
    captioner: str | None = None
    keep_caption: bool = False
    prompt: str | None = None
    max_new_tokens: int = 128
    use_chat_template: bool | None = None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    detector: str = DEFAULT_DETECTOR
    threshold: float = DEFAULT_THRESHOLD
    nms_iou: float | None = None
    max_regions: int | None = None
    max_phrases: int = MAX_PHRASES
    web_words: list[str] | None = None
    tagger: str = "auto"
    input_format: str = "auto"
    chunk_size: int = 1000
    caption_batch_size: int = 16
    detect_batch_size: int = 8
    dtype: str = "auto"
    detector_preprocess: str = "auto"
    image_format: str = "jpg"
    prefix: str = "vesl"
    keep_existing_regions: bool = False

    def __post_init__(self):
        if not self.keep_caption and not self.captioner:
            raise ValueError(
                "give a captioning model (captioner=/--captioner) or keep_caption=True (--keep-caption)"
            )
        for name in (
            "chunk_size",
            "caption_batch_size",
            "detect_batch_size",
            "max_new_tokens",
            "max_phrases",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.prefix or any(c in self.prefix for c in "./\\"):
            raise ValueError(f"prefix {self.prefix!r} must be non-empty and contain no '.', '/' or '\\'")

    # the settings that change the labels: a resumed run must match them
    def label_settings(self, captioner_name: str, detector_name: str, tagger_name: str) -> dict[str, Any]:
        return {
            "captioner": captioner_name,
            "prompt": None if self.keep_caption else self.prompt,
            "max_new_tokens": None if self.keep_caption else self.max_new_tokens,
            "use_chat_template": None if self.keep_caption else self.use_chat_template,
            "generate_kwargs": None if self.keep_caption else dict(sorted(self.generate_kwargs.items())),
            "detector": detector_name,
            "threshold": self.threshold,
            "nms_iou": self.nms_iou,
            "max_regions": self.max_regions,
            "max_phrases": self.max_phrases,
            "tagger": tagger_name,
            "web_words": sorted(WEB_WORDS if self.web_words is None else {w.lower() for w in self.web_words}),
            "keep_existing_regions": self.keep_existing_regions,
        }


# --- per-chunk statistics -----------------------------------------------------------------------


# --- files --------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: Any) -> None:
    """Manifests and markers: sorted keys, synced to disk before the rename (a marker means "done")."""
    write_json_atomic(path, payload, indent=1, sort_keys=True)


def chunk_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


def read_finished_chunk(out_dir: Path, prefix: str, index: int) -> dict[str, Any] | None:
    """The chunk's stats when it is finished (stats file readable and its shard present), else ``None``."""
    stats_path = out_dir / f"{chunk_name(prefix, index)}.stats.json"
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or stats.get("chunk") != index:
        return None
    if stats.get("shard") is not None and not (out_dir / stats["shard"]).is_file():
        return None
    return stats


# recorded for reference only: moving the input folder does not invalidate finished chunks
_MANIFEST_INFO_ONLY = ("input",)


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        keys = (set(old) | set(manifest)) - set(_MANIFEST_INFO_ONLY)
        diff = sorted(k for k in keys if old.get(k) != manifest.get(k))
        if diff:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {manifest.get(k)!r}" for k in diff)
            raise ValueError(
                f"output folder {str(out_dir)!r} holds a VESL run with other inputs or settings ({details}). "
                "Resume with the same settings, or write to a new output folder."
            )
        return
    _write_json_atomic(path, manifest)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the pipeline -------------------------------------------------------------------------------


@dataclass
class VeslResult:
    """What one process did: ``processed``/``resumed`` chunk indices, and the summary (main process)."""

    process_index: int
    num_processes: int
    processed: list[int]
    resumed: list[int]
    stats: dict[str, Any] | None
    output: str


class VeslPipeline:
    """The three stages over one process's chunks; build with :func:`run_vesl` or directly.

    ``captioner``/``grounder``/``extractor`` may be injected (any :class:`Captioner`,
    :class:`Grounder`, ``caption -> phrases`` callable); by default they are built from ``config`` on
    ``device`` the first time a chunk needs them.
    """

    def __init__(
        self,
        config: VeslConfig,
        *,
        captioner: Captioner | None = None,
        grounder: Grounder | None = None,
        extractor: PhraseExtractor | None = None,
        device: Any = "cpu",
    ):
        self.config = config
        self.device = device
        self._captioner = KeepCaption() if config.keep_caption else captioner
        self._grounder = grounder
        self.extractor = extractor or PhraseExtractor(
            tagger=config.tagger,
            web_words=WEB_WORDS if config.web_words is None else config.web_words,
            max_phrases=config.max_phrases,
        )
        self.captioner_name = (
            KeepCaption.name
            if config.keep_caption
            else getattr(captioner, "name", None) or str(config.captioner)
        )
        self.detector_name = getattr(grounder, "name", None) or config.detector
        self.region_source = getattr(grounder, "source", None) or (
            "owlv2" if grounder is None else type(grounder).__name__.lower()
        )

    @property
    def captioner(self) -> Captioner:
        if self._captioner is None:
            cfg = self.config
            self._captioner = HFCaptioner(
                cfg.captioner,
                prompt=cfg.prompt,
                max_new_tokens=cfg.max_new_tokens,
                device=self.device,
                dtype=cfg.dtype,
                use_chat_template=cfg.use_chat_template,
                generate_kwargs=cfg.generate_kwargs,
            )
        return self._captioner

    @property
    def grounder(self) -> Grounder:
        if self._grounder is None:
            cfg = self.config
            self._grounder = Owlv2Grounder(
                cfg.detector,
                threshold=cfg.threshold,
                nms_iou=cfg.nms_iou,
                max_detections=cfg.max_regions,
                device=self.device,
                dtype=cfg.dtype,
                preprocess=cfg.detector_preprocess,
            )
        return self._grounder

    def meta(self, phrases: list[str]) -> dict[str, Any]:
        return {
            "captioner": self.captioner_name,
            "detector": self.detector_name,
            "tagger": self.extractor.tagger_name if hasattr(self.extractor, "tagger_name") else None,
            "threshold": self.config.threshold,
            "phrases": phrases,
        }

    # the three stages over one block of samples -----------------------------------------------
    def _caption(self, samples: list[RegionSample], images: list) -> list[str]:
        if self.config.keep_caption:
            return [s.caption for s in samples]
        captions: list[str] = []
        for batch in _batches(images, self.config.caption_batch_size):
            out = self.captioner(batch)
            if len(out) != len(batch):
                raise RuntimeError(
                    f"captioner {self.captioner_name!r} returned {len(out)} captions for {len(batch)} images"
                )
            captions.extend(out)
        return captions

    def _ground(self, images: list, phrases: list[list[str]]) -> list:
        size = self.config.detect_batch_size
        detections: list = []
        for lo in range(0, len(images), size):
            found = self.grounder(images[lo : lo + size], phrases[lo : lo + size])
            if len(found) != len(images[lo : lo + size]):
                raise RuntimeError(
                    f"grounder {self.detector_name!r} returned {len(found)} results for a batch of {size}"
                )
            detections.extend(found)
        return detections

    def _label_block(
        self, block, stats: ChunkStats, skipped: SkipCounter
    ) -> list[tuple[RegionSample, int, int]]:
        """``(output sample, number of phrases, number of new regions)`` for each usable input."""
        if self.config.keep_caption:
            for sample, _ in block:
                if not sample.caption.strip():
                    skipped.skip(
                        "missing_caption", sample.key, "keep_caption is set but the input has no caption"
                    )
            block = [(s, im) for s, im in block if s.caption.strip()]
        if not block:
            return []
        samples = [s for s, _ in block]
        images = [im for _, im in block]

        start = time.perf_counter()
        captions = self._caption(samples, images)
        stats.add_time("caption", start, len(images))
        start = time.perf_counter()
        phrases = [self.extractor(c) for c in captions]
        stats.add_time("phrases", start, len(images))
        start = time.perf_counter()
        detections = self._ground(images, phrases)
        stats.add_time("ground", start, len(images))

        return [
            (
                self._output_sample(sample, caption, image_phrases, image_detections),
                len(image_phrases),
                len(image_detections),
            )
            for sample, caption, image_phrases, image_detections in zip(
                samples, captions, phrases, detections
            )
        ]

    def _output_sample(self, sample, caption, phrases, detections) -> RegionSample:
        regions = [
            Region(box=d.box, phrase=d.phrase, score=d.score, source=self.region_source) for d in detections
        ]
        if self.config.keep_existing_regions:
            regions = list(sample.regions) + regions
        return RegionSample(
            key=sample.key,
            caption=caption,
            width=sample.width,
            height=sample.height,
            regions=regions,
            meta={**sample.meta, "vesl": self.meta(phrases)},
            image=sample.image,
        )

    def run_chunk(self, source, chunk: Chunk, out_dir: Path) -> ChunkStats:
        """Label one chunk and move its shard + stats file into ``out_dir`` atomically."""
        cfg = self.config
        name = chunk_name(cfg.prefix, chunk.index)
        tmp_dir = out_dir / f".{name}.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a crashed attempt
        (out_dir / f"{name}.tar.tmp").unlink(missing_ok=True)  # e.g. from a writer aimed at out_dir
        tmp_dir.mkdir(parents=True)
        stats = ChunkStats(chunk=chunk.index)
        skipped = SkipCounter("images", max_logged_per_reason=20)
        block_size = max(cfg.caption_batch_size, cfg.detect_batch_size)
        items = source.iter_chunk(chunk, skipped)
        with ShardWriter(
            tmp_dir, prefix=name, max_samples_per_shard=2**62, image_format=cfg.image_format
        ) as writer:
            while True:
                start = time.perf_counter()
                block = list(islice(items, block_size))
                stats.add_time("load", start, len(block))
                if not block:
                    break
                labelled = self._label_block(block, stats, skipped)
                start = time.perf_counter()
                for sample, num_phrases, num_regions in labelled:
                    try:
                        writer.write(sample)
                    except (MalformedSample, ValueError) as err:
                        skipped.skip("invalid_output", sample.key, str(err))
                        continue
                    stats.count_written(num_phrases, num_regions)
                stats.add_time("write", start, len(labelled))
            written = writer.close()
        if written:
            stats.shard = f"{name}.tar"
            os.replace(written[0], out_dir / stats.shard)
        stats.skipped = skipped.as_dict()
        _write_json_atomic(out_dir / f"{name}.stats.json", asdict(stats))  # commit marker: written last
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if skipped.total:
            logger.warning("chunk %d: %s", chunk.index, skipped.report())
        return stats


def _process_state(process_index: int | None, num_processes: int | None, device: Any):
    """``(rank, world, device, state)``; accelerate's state unless rank and world are given."""
    if process_index is not None or num_processes is not None:
        if process_index is None or num_processes is None:
            raise ValueError("give both process_index and num_processes, or neither")
        return process_index, num_processes, device or "cpu", None
    import torch
    from accelerate import PartialState

    # without an accelerator, accelerate only forms a (gloo) process group across launched CPU
    # processes when asked for the CPU explicitly; a single process is unaffected
    state = PartialState(cpu=not torch.accelerator.is_available())
    return state.process_index, state.num_processes, device or state.device, state


def run_vesl(
    config: VeslConfig,
    *,
    captioner: Captioner | None = None,
    grounder: Grounder | None = None,
    extractor: PhraseExtractor | None = None,
    process_index: int | None = None,
    num_processes: int | None = None,
    device: Any = None,
) -> VeslResult:
    """Run VESL over this process's share of the chunks; returns what it did and the summary.

    Rank, world size and device come from accelerate (works without a launcher: rank 0 of 1) unless
    ``process_index`` and ``num_processes`` are given (then no process group is touched: handy for
    tests and for schedulers that start independent jobs, one per rank).
    """
    if os.path.abspath(config.output) == os.path.abspath(config.input):
        raise ValueError(f"output folder {config.output!r} must differ from the input {config.input!r}")
    rank, world, device, state = _process_state(process_index, num_processes, device)
    source = open_source(config.input, config.input_format, config.chunk_size)
    chunks = source.chunks()
    out_dir = Path(config.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipeline = VeslPipeline(
        config, captioner=captioner, grounder=grounder, extractor=extractor, device=device
    )
    manifest = {
        "input": os.path.abspath(os.fspath(config.input)),
        "input_kind": source.kind,
        "input_fingerprint": source.fingerprint(),
        "num_inputs": source.num_items,
        "chunk_size": config.chunk_size if source.kind == "images" else None,
        "num_chunks": len(chunks),
        "prefix": config.prefix,
        **config.label_settings(
            pipeline.captioner_name, pipeline.detector_name, getattr(pipeline.extractor, "tagger_name", None)
        ),
    }
    _check_manifest(out_dir, manifest)

    processed, resumed = [], []
    for index in assign_chunks(len(chunks), rank, world):
        if read_finished_chunk(out_dir, config.prefix, index) is not None:
            resumed.append(index)
            continue
        stats = pipeline.run_chunk(source, chunks[index], out_dir)
        processed.append(index)
        logger.info(
            "rank %d/%d: chunk %d done (%d images, %d regions)",
            rank,
            world,
            index,
            stats.images,
            stats.regions,
        )
    if resumed:
        logger.info("rank %d/%d: %d finished chunks skipped (resumed run)", rank, world, len(resumed))

    if state is not None and world > 1:
        state.wait_for_everyone()
    summary = None
    if rank == 0:
        finished = [read_finished_chunk(out_dir, config.prefix, i) for i in range(len(chunks))]
        summary = summarize([s for s in finished if s is not None], len(chunks))
        summary.update({"captioner": pipeline.captioner_name, "detector": pipeline.detector_name})
        _write_json_atomic(out_dir / STATS_NAME, summary)
    return VeslResult(rank, world, processed, resumed, summary, str(out_dir))
