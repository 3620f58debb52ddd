"""Batches for pretraining: images through the CLOC processor, captions and region phrases tokenized,
at most ``M`` regions sampled per image with their boxes mapped into the model frame, padded + masked.

The batch dict matches :meth:`cloc_hf.CLOCModel.forward`:

* ``pixel_values (B, 3, S, S)``, ``input_ids / attention_mask (B, L)``;
* ``region_boxes (B, M, 4)`` normalised xyxy in the model frame, ``region_mask (B, M)`` bool;
* ``region_input_ids / region_attention_mask (B, M, L_r)``.

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

from .format import MalformedSample, RegionSample
from .shards import SkipCounter, iter_shard_samples, list_shards

logger = logging.getLogger(__name__)


class RegionTextDataset(Dataset):
    """Map-style dataset over region-text samples held in memory (images kept encoded or as PIL).

    ``__getitem__`` returns ``(index, sample)`` so the collator can seed region sampling per sample.
    For corpora that do not fit in memory, stream shards with :func:`~cloc_data.shards.load_hf_dataset`.
    """

    def __init__(self, samples: Sequence[RegionSample]):
        self.samples = list(samples)

    @classmethod
    def from_shards(cls, path, max_samples: int | None = None) -> RegionTextDataset:
        skipped = SkipCounter()
        samples = []
        for sample in iter_shard_samples(list_shards(path), decode_images=True, skipped=skipped):
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
        batch_size, m = len(batch), self.max_regions
        boxes = torch.zeros(batch_size, m, 4)
        boxes[..., 2:] = 1.0  # padding boxes are valid (whole frame) so nothing downstream sees NaN
        mask = torch.zeros(batch_size, m, dtype=torch.bool)
        flat_phrases = [p for phrases in region_phrases for p in phrases] or [""]
        tokens = self._tokenize(flat_phrases, self.phrase_max_length)
        length = tokens["input_ids"].shape[1]
        ids = torch.zeros(batch_size, m, length, dtype=torch.long)
        attn = torch.zeros(batch_size, m, length, dtype=torch.long)
        cursor = 0
        for b, (mapped, phrases) in enumerate(zip(region_boxes, region_phrases)):
            n = len(phrases)
            boxes[b, :n] = mapped
            mask[b, :n] = True
            ids[b, :n] = tokens["input_ids"][cursor : cursor + n]
            attn[b, :n] = tokens["attention_mask"][cursor : cursor + n]
            cursor += n
        out.update(region_boxes=boxes, region_mask=mask, region_input_ids=ids, region_attention_mask=attn)
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
    samples of an epoch.
    """

    def __init__(self, path, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000, seed: int = 0):
        from .shards import load_hf_dataset

        shards = list_shards(path)
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards cannot be split over {world_size} ranks; write smaller shards")
        self.shards = shards[rank::world_size]
        self._load = load_hf_dataset
        self.shuffle_buffer, self.seed, self.rank = shuffle_buffer, seed, rank
        self.epoch, self.skip = 0, 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        from .shards import hf_record_to_sample

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream = self._load(self.shards, streaming=True)
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed * 1009 + self.epoch * 31 + self.rank, buffer_size=self.shuffle_buffer)
        for position, record in enumerate(stream):
            if position < self.skip or position % workers != worker:
                continue
            try:
                yield position, hf_record_to_sample(record)
            except MalformedSample as err:
                self.skipped.skip("malformed", str(record.get("__key__", "?")), str(err))
