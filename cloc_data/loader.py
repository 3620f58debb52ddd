"""Batches for pretraining: images through the CLOC processor, captions and region phrases tokenized,
at most ``M`` regions sampled per image with their boxes mapped into the model frame.

The batch dict matches :meth:`cloc_hf.CLOCModel.forward`; regions come as per-image lists
(:mod:`cloc_hf.prompts`), the one form the model takes:

* ``pixel_values (B, 3, S, S)``, ``input_ids / attention_mask (B, L)``;
* ``region_boxes``: ``B`` tensors ``(n_i, 4)``, normalised xyxy in the model frame, ``n_i <= M``;
* ``region_input_ids / region_attention_mask``: ``B`` tensors ``(n_i, L_r)``, the boxes' phrases in the
  same order (all phrases of a batch are tokenized together, so ``L_r`` is shared).

Region sampling is deterministic in ``(seed, epoch, sample index)``, whatever the worker layout, so a
resumed run draws exactly the regions an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cloc_hf.prompts import split_per_image

from .format import MalformedSample, RegionSample
from .shards import SkipCounter, iter_shard_samples, list_shards

logger = logging.getLogger(__name__)

# Splits that evaluation runs on (RefCOCO's val/testA/testB/test, the synthetic scenes' val/test),
# compared lower-cased: a sample whose meta["split"] names one must not reach pretraining.
EVAL_SPLITS = frozenset({"val", "validation", "test", "testa", "testb"})


def eval_split_of(sample: RegionSample) -> str | None:
    """The evaluation split named by ``sample.meta["split"]`` (a name or a list of names), else ``None``."""
    split = sample.meta.get("split")
    names = split if isinstance(split, (list, tuple)) else [split]
    return next((str(s) for s in names if s is not None and str(s).lower() in EVAL_SPLITS), None)


def refuse_eval_split(sample: RegionSample, shard: str) -> None:
    """Raise ``ValueError`` naming ``shard`` and the split when ``sample`` is from an evaluation split."""
    split = eval_split_of(sample)
    if split is not None:
        raise ValueError(
            f"{shard}: sample {sample.key!r} ({sample.meta.get('dataset', 'unknown dataset')}) is from the "
            f"{split!r} split, which evaluation uses; training on it would leak the benchmark. Convert only "
            "the training split (cloc-data convert --split train), or set allow_eval_splits=True "
            "(PretrainConfig.allow_eval_splits) if this is intended"
        )


def _samples_by_shard(path, skipped: SkipCounter):
    """``(shard path, sample)`` over the shards at ``path``, in :func:`list_shards` order."""
    for shard in list_shards(path):
        for sample in iter_shard_samples([shard], decode_images=True, skipped=skipped):
            yield shard, sample


class RegionTextDataset(Dataset):
    """Map-style dataset over region-text samples held in memory (images kept encoded or as PIL).

    ``__getitem__`` returns ``(index, sample)`` so the collator can seed region sampling per sample.
    For corpora that do not fit in memory, stream shards with :func:`~cloc_data.hf_datasets.load_hf_dataset`.
    """

    def __init__(self, samples: Sequence[RegionSample]):
        self.samples = list(samples)

    @classmethod
    def from_shards(cls, path, max_samples: int | None = None, allow_eval_splits: bool = False) -> RegionTextDataset:
        """Load the shards at ``path``; a sample of an evaluation split (:data:`EVAL_SPLITS`) raises
        ``ValueError`` naming its shard unless ``allow_eval_splits`` (default off: no benchmark leak)."""
        skipped = SkipCounter()
        samples = []
        for shard, sample in _samples_by_shard(path, skipped):
            if not allow_eval_splits:
                refuse_eval_split(sample, shard)
            samples.append(sample)
            if max_samples is not None and len(samples) >= max_samples:
                break
        if skipped.total:
            logger.warning("skipped %d malformed samples while loading %s: %s", skipped.total, path, skipped.report())
        if not samples:
            raise ValueError(f"no usable samples found in {path}")
        return cls(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, RegionSample]:
        return index, self.samples[index]


class RegionTextCollator:
    """Turns ``[(index, RegionSample), ...]`` into a model batch.

    Args:
        processor: a :class:`cloc_hf.CLOCProcessor` (image processor + tokenizer).
        max_regions: ``M``, regions sampled per image per step (paper: 4). 0 disables regions (CLIP).
        caption_max_length, phrase_max_length: token limits (captions padded to the longest in the batch).
        seed: base seed of region sampling; call :meth:`set_epoch` at each epoch.
    """

    def __init__(
        self,
        processor,
        max_regions: int = 4,
        caption_max_length: int = 77,
        phrase_max_length: int = 32,
        seed: int = 0,
    ):
        if max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {max_regions}")
        self.processor = processor
        self.max_regions = max_regions
        self.caption_max_length = caption_max_length
        self.phrase_max_length = phrase_max_length
        self.seed = seed
        self.epoch = 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sample_regions(self, index: int, sample: RegionSample) -> list[int]:
        """Sorted indices of at most ``max_regions`` regions, drawn from ``(seed, epoch, index)``."""
        n = len(sample.regions)
        if n <= self.max_regions:
            return list(range(n))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return sorted(rng.choice(n, size=self.max_regions, replace=False).tolist())

    def _tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )

    def __call__(self, batch: list[tuple[int, RegionSample]]) -> dict[str, Any]:
        """The model batch (module docstring); a sample whose regions cannot be mapped keeps its image
        and caption with no regions, and is counted in ``skipped``."""
        images, captions, region_boxes, region_phrases = [], [], [], []
        for index, sample in batch:
            chosen = self._sample_regions(index, sample) if self.max_regions else []
            try:
                boxes = [sample.regions[i].box for i in chosen]
                frame = self.processor.image_processor.frame_transform(sample.width, sample.height)
                mapped = frame.to_model(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), name=f"{sample.key}.regions")
            except (ValueError, MalformedSample) as err:
                # a region the model cannot see (e.g. cropped away): keep the image, drop its regions
                self.skipped.skip("unusable regions", sample.key, str(err))
                chosen, mapped = [], torch.zeros(0, 4)
            images.append(sample.image)
            captions.append(sample.caption)
            region_boxes.append(mapped)
            region_phrases.append([sample.regions[i].phrase for i in chosen])

        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        text = self._tokenize(captions, self.caption_max_length)
        out = {
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
        if not self.max_regions:
            return out
        counts = [len(phrases) for phrases in region_phrases]
        flat_phrases = [p for phrases in region_phrases for p in phrases] or [""]
        tokens = self._tokenize(flat_phrases, self.phrase_max_length)
        if not sum(counts):  # the [""] above only fixes the token length; no image has a phrase
            tokens = {k: v[:0] for k, v in tokens.items()}
        out.update(
            region_boxes=region_boxes,
            region_input_ids=split_per_image(tokens["input_ids"], counts),
            region_attention_mask=split_per_image(tokens["attention_mask"], counts),
        )
        return out


class EpochBatchSampler:
    """Deterministic shuffled batches per epoch, sharded across ranks, resumable mid-epoch.

    Every rank draws the same permutation of ``(seed, epoch)`` and takes its strided share of each
    global batch, so ``world_size`` ranks with ``batch_size`` each see exactly the global batch a single
    process with ``world_size * batch_size`` would see. ``skip_batches`` resumes inside an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        global_batch = self.batch_size * self.world_size
        for step in range(self.skip_batches, len(self)):
            chunk = order[step * global_batch : (step + 1) * global_batch]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


class StreamingRegionTextDataset(torch.utils.data.IterableDataset):
    """Streams shards that do not fit in memory, through Hugging Face ``datasets`` (webdataset builder).

    Shards are split across ranks (shard ``i`` goes to rank ``i % world_size``) and, inside a rank,
    across DataLoader workers; a seeded shuffle buffer mixes samples. Malformed rows are skipped and
    counted. Yields ``(position, sample)`` where ``position`` is the sample's index in this rank's
    stream, so region sampling stays deterministic; ``set_epoch(epoch, skip=n)`` resumes after ``n``
    samples of an epoch. A sample of an evaluation split raises ``ValueError`` naming its shard unless
    ``allow_eval_splits`` (see :meth:`RegionTextDataset.from_shards`).
    """

    def __init__(self, path, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000, seed: int = 0,
                 allow_eval_splits: bool = False):  # fmt: skip
        from .hf_datasets import load_hf_dataset

        shards = list_shards(path)
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards cannot be split over {world_size} ranks; write smaller shards")
        self.shards = shards[rank::world_size]
        self._load = load_hf_dataset
        self.shuffle_buffer, self.seed, self.rank = shuffle_buffer, seed, rank
        self.epoch, self.skip = 0, 0
        self.skipped = SkipCounter()
        self.allow_eval_splits = allow_eval_splits

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        from .hf_datasets import hf_record_to_sample

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream = self._load(self.shards, streaming=True)
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed * 1009 + self.epoch * 31 + self.rank, buffer_size=self.shuffle_buffer)
        for position, record in enumerate(stream):
            if position < self.skip or position % workers != worker:
                continue
            try:
                sample = hf_record_to_sample(record)
            except MalformedSample as err:
                self.skipped.skip("malformed", str(record.get("__key__", "?")), str(err))
                continue
            if not self.allow_eval_splits:
                refuse_eval_split(sample, str(record.get("__url__") or self.shards))
            yield position, sample
