"""Instruction records -> tokenized MLLM training examples (labels on the answers only) and their batches.

The records are LLaVA's JSON layout as :mod:`training.mllm.instructions` writes it: ``id``, ``image``
(relative to an image root), ``conversations`` (alternating ``human`` / ``gpt`` turns, ``<image>``
in the first human turn) and ``regions``, the original-pixel xyxy box of each ``<region>`` token of
the human turns, in order. Each example is rendered with a plain chat format::

    <bos>USER: <image>\\nWhere is the red circle? ASSISTANT: [0.12, 0.30, 0.41, 0.77]<eos>USER: ...

``<image>`` is expanded to the tower's token count by the :class:`~llava_bridge.CLOCLlavaProcessor`,
whose image processor also maps the region boxes into the tower's frame (``region_boxes``). Labels
are ``-100`` everywhere except the answer tokens and the ``<eos>`` closing each answer, so the loss
is on what the model must say, never on the prompt or the image. Evaluation builds its prompts with
:func:`render_prompt`, the same format without an answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.trainer_pt_utils import LengthGroupedSampler

from cloc_data.shards import SkipCounter
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

IGNORE_INDEX = -100
"""Label of every token the loss skips (PyTorch's cross-entropy default)."""

USER, ASSISTANT = "USER:", "ASSISTANT:"
"""Role tags of the chat format (Vicuna-style, as LLaVA-1.5 without a system line)."""

logger = logging.getLogger("cloc.finetune_mllm")


def render_prompt(question: str) -> str:
    """One human turn as the model sees it before answering: ``"USER: {question} ASSISTANT:"``."""
    return f"{USER} {question} {ASSISTANT}"


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``data.json`` (one JSON list) or ``data.jsonl`` (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {path} does not exist (write it with `cloc-mllm-data`)")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def check_record(record: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the record when its turns or regions are malformed."""
    rid = record.get("id", "<no id>")
    turns = record.get("conversations")
    if not turns or len(turns) % 2:
        raise ValueError(f"record {rid!r}: conversations must be non-empty human/gpt pairs, got {len(turns or [])} turns")
    for k, turn in enumerate(turns):
        expected = "human" if k % 2 == 0 else "gpt"
        if turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise ValueError(f"record {rid!r}: turn {k} must be a {expected!r} turn with a text 'value', got {turn!r}")
    human = " ".join(t["value"] for t in turns[0::2])
    found, regions = human.count(REGION_TOKEN), record.get("regions") or []
    if found != len(regions):
        raise ValueError(
            f"record {rid!r} has {found} {REGION_TOKEN} tokens in its human turns but {len(regions)} boxes in "
            "'regions'; each <region> takes one box, in order"
        )
    if human.count(IMAGE_TOKEN) != 1 or IMAGE_TOKEN not in turns[0]["value"]:
        raise ValueError(f"record {rid!r}: the first human turn must hold the one {IMAGE_TOKEN} of the record")


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenized examples of instruction records for :class:`~llava_bridge.CLOCLlavaForConditionalGeneration`.

    Args:
        records: the records (see the module docstring); each is checked at construction
            (:func:`check_record`), and a malformed one raises naming its ``id``.
        image_root: folder the ``image`` paths are relative to (``cloc-mllm-data``'s output folder).
        processor: a :class:`~llava_bridge.CLOCLlavaProcessor` (its tokenizer must have ``<image>``
            and ``<region>`` as single tokens).
        max_length: records whose token count exceeds it are counted (``too_long``) and skipped, since
            cutting one would cut an answer, image tokens or a ``<region>``; default 2048.

    Records whose image file is missing are counted (``missing_image``) and skipped; ``skipped``
    holds the counts and the log names the first few. ``lengths`` are the exact token counts (for
    length-grouped batching without loading any image).
    """

    def __init__(self, records: Sequence[dict[str, Any]], image_root: str | Path, processor, max_length: int = 2048):
        self.processor, self.image_root = processor, Path(image_root)
        self.tokenizer = processor.tokenizer
        self.skipped = SkipCounter("training records", max_logged_per_reason=5)
        self.image_tokens = len(self.tokenizer.encode(self._image_placeholder(), add_special_tokens=False))
        self.records, self.lengths = [], []
        for record in records:
            check_record(record)
            if not (self.image_root / record["image"]).is_file():
                self.skipped.skip("missing_image", record.get("id"), str(self.image_root / record["image"]))
                continue
            length = len(self._token_ids(record, self.image_tokens)[0])
            if length > max_length:
                self.skipped.skip("too_long", record.get("id"), f"{length} tokens > max_length={max_length}")
                continue
            self.records.append(record)
            self.lengths.append(length)
        if self.skipped.total:
            logger.warning("%s", self.skipped.report())
        if not self.records:
            raise ValueError(f"no usable training records under {self.image_root} ({self.skipped.report()})")

    def _image_placeholder(self) -> str:
        """The expanded ``<image>`` text for the image processor's output size (the same for every image)."""
        pixels = self.processor.image_processor(Image.new("RGB", (8, 8)), return_tensors="pt")
        return self.processor.replace_image_token(pixels, 0)

    def _token_ids(self, record, image_text: str | int) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``; ``image_text`` is the expanded ``<image>`` (or, for lengths, its token count)."""
        tok = self.tokenizer
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        labels = [IGNORE_INDEX] * len(ids)
        turns = record["conversations"]
        for k in range(0, len(turns), 2):
            prompt = render_prompt(turns[k]["value"])
            if isinstance(image_text, str):
                prompt_ids = tok.encode(prompt.replace(IMAGE_TOKEN, image_text), add_special_tokens=False)
            else:  # length only: the placeholder is one token, expanded to image_text tokens
                prompt_ids = tok.encode(prompt, add_special_tokens=False)
                prompt_ids = prompt_ids + [0] * ((image_text - 1) * prompt.count(IMAGE_TOKEN))
            answer_ids = tok.encode(" " + turns[k + 1]["value"], add_special_tokens=False)
            if tok.eos_token_id is not None:
                answer_ids.append(tok.eos_token_id)
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        return ids, labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        with Image.open(self.image_root / record["image"]) as img:
            image = img.convert("RGB")
        regions = record.get("regions") or []
        inputs = self.processor.image_processor(image, boxes=[regions] if regions else None, return_tensors="pt")
        ids, labels = self._token_ids(record, self.processor.replace_image_token(inputs, 0))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": inputs["pixel_values"][0],
            "region_boxes": inputs["boxes"][0] if regions else torch.zeros(0, 4),
        }


@dataclass
class InstructionCollator:
    """Right-pads a list of examples into one batch (``pad_token_id``, labels ``-100``).

    ``region_boxes`` stays a list of per-sample ``(n_i, 4)`` tensors (the model's form), or ``None``
    when no sample of the batch has a region.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
        boxes = [e["region_boxes"] for e in examples]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "region_boxes": boxes if any(len(b) for b in boxes) else None,
        }


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' ``LengthGroupedSampler`` (batches of similar length, so little padding) drawn from
    ``seed + epoch``: every rank draws the same order, and a resumed run redraws the same order for
    the epoch it resumes in (the global RNG it would otherwise use is restored to mid-epoch)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


__all__ = [
    "ASSISTANT",
    "IGNORE_INDEX",
    "USER",
    "EpochLengthGroupedSampler",
    "InstructionCollator",
    "InstructionDataset",
    "check_record",
    "load_records",
    "render_prompt",
]
