"""Per-image prompt lists: the one form in which boxes, points and phrases enter the model.

A batch of ``B`` images carries, for each image ``i``, its own ``(n_i, ...)`` tensor of prompts:
``(n_i, 4)`` normalised xyxy boxes in the model input frame, ``(n_i, 2)`` points, or ``(n_i, L)``
phrase token ids. :class:`~cloc_hf.CLOCProcessor` returns boxes this way, the training collator
returns boxes and phrases this way, and every :class:`~cloc_hf.CLOCModel` entry point
(``forward``, ``get_region_features``, ``ground``) takes them this way. Lists of tensors survive
``DataLoader`` collation and device moves unchanged.

Inside the model the lists become flat rows (image 0's prompts, then image 1's, ...) plus the image
index of each row; this module holds that flattening, its inverse, and the conversion from the
older padded ``(B, M, ...)`` + mask layout (whose row-major masked order is the same flat order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class FlatPrompts(NamedTuple):
    """Per-image prompt lists as flat rows.

    ``values``: ``(R, ...)`` every image's prompts, image 0's first; ``image_index``: ``(R,)`` long,
    the image each row belongs to; ``counts``: ``n_i`` per image (``sum(counts) == R``).
    """

    values: torch.Tensor
    image_index: torch.Tensor
    counts: list[int]


def _same_layout(items) -> bool:
    """Every item a 2-D float tensor with one trailing size and device (the usual batch)."""
    first = items[0] if len(items) else None
    return first is not None and all(
        torch.is_tensor(t) and t.ndim == 2 and t.is_floating_point() and t.shape[1] == first.shape[1]
        and t.dtype == first.dtype and t.device == first.device for t in items
    )


def flatten_per_image(
    items: Sequence[torch.Tensor] | torch.Tensor,
    batch: int,
    name: str,
    validate: Callable[..., torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> FlatPrompts:
    """``B`` per-image tensors ``(n_i, ...)`` -> :class:`FlatPrompts`.

    Args:
        items: one tensor per image. A ``(B, n, k)`` tensor is read as ``B`` images of ``n`` prompts
            each (a convenience for batches without ragged counts; same code path as the list).
        batch: the number of images; a list of another length raises, since a prompt for the
            wrong image would otherwise silently attach to a neighbour.
        name: what the caller calls ``items``, used in errors (``boxes[1][0] ...``).
        validate: applied to each image's tensor as ``validate(t, name=f"{name}[i]")`` (e.g.
            :func:`~cloc_hf.box_ops.validate_boxes`); default none. Its result is what is flattened.
            It must act row by row (it is first tried once on all rows together, and per image only
            when that raises, so errors still name the image).
        device: where ``values`` and ``image_index`` go; default the first tensor's device.
    Raises:
        ValueError: naming ``name`` when it is not a list of tensors, has the wrong length, or its
            tensors disagree in their trailing shape.
    """
    if torch.is_tensor(items) and items.ndim >= 3:
        items = list(items.unbind(0))
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name} must be a list with one (n_i, k) tensor per image, got {type(items).__name__}")
    if len(items) != batch:
        raise ValueError(f"got {len(items)} {name} lists for a batch of {batch} images; need one list per image")
    if validate is not None and _same_layout(items):
        # one validation over all rows instead of one call per image (a training batch has hundreds of
        # images); on any problem the per-image pass below runs and raises with the image's name
        try:
            values = validate(torch.cat(list(items), dim=0), name=name)
        except ValueError:
            pass
        else:
            counts = [len(t) for t in items]
            device = items[0].device if device is None else device
            index = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts, dtype=torch.long))
            return FlatPrompts(values.to(device), index.to(device), counts)
    checked = []
    for i, item in enumerate(items):
        item = validate(item, name=f"{name}[{i}]") if validate is not None else torch.as_tensor(item)
        if item.ndim < 1 or (checked and item.shape[1:] != checked[0].shape[1:]):
            want = "(n_i, ...)" if not checked else f"(n_i, {', '.join(map(str, checked[0].shape[1:]))})"
            raise ValueError(
                f"{name}[{i}] has shape {tuple(item.shape)}, expected {want} like {name}[0]; "
                "tokenize all phrases of a batch together (padding=True) so they share one length"
            )
        checked.append(item)
    counts = [len(t) for t in checked]
    if device is None:
        device = checked[0].device if checked else None
    values = torch.cat([t.to(device) for t in checked], dim=0) if checked else torch.zeros(0)
    index = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts, dtype=torch.long))
    return FlatPrompts(values, index.to(device), counts)


def split_per_image(flat: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_per_image`: ``(R, ...)`` rows -> one ``(n_i, ...)`` tensor per image."""
    if sum(counts) != flat.shape[0]:
        raise ValueError(f"counts {list(counts)} sum to {sum(counts)}, but there are {flat.shape[0]} rows")
    return list(flat.split(list(counts)))


def padded_to_per_image(padded: torch.Tensor, mask: torch.Tensor, name: str = "padded") -> list[torch.Tensor]:
    """``(B, M, ...)`` padded tensor + ``(B, M)`` bool mask -> one ``(n_i, ...)`` tensor per image.

    Row ``b`` keeps ``padded[b][mask[b]]``; concatenated these equal ``padded[mask]`` (row-major), so
    a model fed the result computes exactly what it computed from the padded form.
    """
    mask = torch.as_tensor(mask).bool()
    if mask.ndim != 2 or padded.shape[:2] != mask.shape:
        raise ValueError(
            f"{name} of shape {tuple(padded.shape)} does not match its (B, M) mask of shape {tuple(mask.shape)}"
        )
    return [row[keep] for row, keep in zip(padded, mask.to(padded.device))]


def per_image_to_padded(
    items: Sequence[torch.Tensor], length: int | None = None, fill: float = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(n_i, ...)`` tensor per image -> ``(B, M, ...)`` padded tensor and ``(B, M)`` bool mask.

    ``length`` is ``M``, default the largest ``n_i``; ``fill`` is the value of padded slots (default 0).
    For consumers that want a dense layout (the model itself takes the lists).
    """
    if not items:
        raise ValueError("per_image_to_padded needs at least one image's tensor")
    longest = max(len(t) for t in items)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest list ({longest} items)")
    first = items[0]
    padded = torch.full((len(items), length, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(items), length, dtype=torch.bool, device=first.device)
    for b, item in enumerate(items):
        padded[b, : len(item)] = item
        mask[b, : len(item)] = True
    return padded, mask


def flatten_phrases(input_ids, attention_mask, batch: int, name: str, device):
    """Per-image phrase lists (``input_ids[i]`` a ``(t_i, L)`` tensor) -> flat ids, flat mask, image index,
    counts; the mask list, when given, must match the ids list image by image."""
    ids = flatten_per_image(input_ids, batch, name, device=device)
    mask = None
    if attention_mask is not None:
        mask = flatten_per_image(attention_mask, batch, name.replace("input_ids", "attention_mask"), device=device)
        if mask.values.shape != ids.values.shape:
            raise ValueError(
                f"{name} and its attention mask disagree: {[tuple(t.shape) for t in input_ids]} vs "
                f"{[tuple(t.shape) for t in attention_mask]}"
            )
    return ids.values, None if mask is None else mask.values, ids.image_index, ids.counts


__all__ = ["FlatPrompts", "flatten_per_image", "flatten_phrases", "padded_to_per_image", "per_image_to_padded", "split_per_image"]
