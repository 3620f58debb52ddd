"""Embeddings for evaluation: images, texts, and regions by the CLOC Prompter or a CLIP baseline.

Every function takes a :class:`~cloc_hf.CLOCModel` (or anything with its ``get_image_features`` /
``get_text_features`` / ``get_region_features`` methods) and a :class:`~cloc_hf.CLOCProcessor`,
and returns **L2-normalised** float32 embeddings on the CPU.

Region methods (:data:`REGION_METHODS`), all given boxes as xyxy in *original-image pixels*:

* ``"cloc"``: the Prompter. One ViT pass per image; all boxes of a chunk of images go through one
  ``get_region_features`` call.
* ``"clip-crop"``: crop-and-encode. Each box is grown by ``crop_margin`` (15%) of its own width on
  the left and right and of its height at the top and bottom, clipped to the image, cut out of the
  *original* image and processed as an image of its own; the region embedding is the image embedding.
* ``"clip-maskbg"``: background masking. The full image with every pixel outside the box set to the
  processor's pad colour (the image mean, the same colour that pads images to a square); the object
  keeps its scale and position. Region embedding = image embedding.
* ``"clip-roi"``: RoI-Align over the ViT patch grid (``last_hidden_state[:, 1:]``), mean of the bins,
  then the ViT's ``post_layernorm`` and ``visual_projection``, i.e. CLIP's pooling path applied to
  the pooled patches instead of the class token.

The three CLIP baselines use only the CLIP towers, so they run on any CLOC checkpoint, including one
trained without region labels (a CLIP baseline packaged as a CLOCModel).

Box pixels: a box covers the pixels ``floor(x1) .. ceil(x2) - 1`` (x2/y2 are pixel *edges*, as in
COCO and the synthetic scenes), so crops and masks never cut into the object.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F

from cloc_hf.box_ops import roi_align_patch_tokens, validate_boxes
from cloc_hf.image_processing_cloc import load_rgb_image
from cloc_hf.prompts import flatten_per_image, split_per_image

CROP_MARGIN = 0.15


@dataclass(frozen=True)
class EncodeOptions:
    """How embeddings are batched and how the baselines cut regions.

    Attributes:
        batch_size: images per ViT forward (crops/masked images count as images).
        text_batch_size: texts per text-tower forward.
        crop_margin: ``"clip-crop"`` margin, a fraction of the box side added on each side.
        roi_output_size: ``"clip-roi"`` RoI-Align bins per side (averaged afterwards).
    """

    batch_size: int = 32
    text_batch_size: int = 256
    crop_margin: float = CROP_MARGIN
    roi_output_size: int = 2

    def __post_init__(self):
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if not 0 <= self.crop_margin <= 10:
            raise ValueError(f"crop_margin must be a fraction in [0, 10], got {self.crop_margin}")
        if self.roi_output_size < 1:
            raise ValueError("roi_output_size must be >= 1")


# --- plumbing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluation_mode(model):
    """``model.eval()`` + ``torch.inference_mode()`` for the block; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of ``size`` (the last may be shorter): one forward pass each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first parameter, where its inputs must be placed."""
    param = next(model.parameters())
    return param.device, param.dtype


def _pixels(model, processor, images: Sequence) -> torch.Tensor:
    device, dtype = model_device_dtype(model)
    return processor(images=list(images), return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1).cpu()


def _pixel_boxes(boxes) -> torch.Tensor:
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    return boxes.reshape(0, 4) if boxes.numel() == 0 else boxes


# --- images and texts ------------------------------------------------------------------------------
def encode_images(model, processor, images: Sequence, options: EncodeOptions | None = None) -> torch.Tensor:
    """``(N, D)`` image embeddings of ``images`` (paths, bytes, PIL images, arrays)."""
    options = options or EncodeOptions()
    out = []
    with evaluation_mode(model):
        for batch in chunks(images, options.batch_size):
            pil = [load_rgb_image(img, name="image") for img in batch]
            out.append(
                _normalised(
                    model.get_image_features(pixel_values=_pixels(model, processor, pil)).pooler_output
                )
            )
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def encode_texts(
    model, processor, texts: Sequence[str], options: EncodeOptions | None = None
) -> torch.Tensor:
    """``(T, D)`` text embeddings (the tokenizer pads each batch to its longest text, truncates at 77)."""
    options = options or EncodeOptions()
    device, _ = model_device_dtype(model)
    out = []
    with evaluation_mode(model):
        for batch in chunks(list(texts), options.text_batch_size):
            tokens = processor(text=list(batch), return_tensors="pt")
            features = model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
            out.append(_normalised(features.pooler_output))
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def encode_class_names(
    model,
    processor,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    options: EncodeOptions | None = None,
) -> torch.Tensor:
    """``(C, D)`` class embeddings: the plain names, or CLIP's template ensemble (each template holds
    ``{}``; the normalised embeddings of one class are averaged and normalised again)."""
    if not templates:
        return encode_texts(model, processor, class_names, options)
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    prompts = [t.format(name) for name in class_names for t in templates]
    embeds = encode_texts(model, processor, prompts, options).reshape(len(class_names), len(templates), -1)
    return F.normalize(embeds.mean(dim=1), dim=-1)


# --- cutting regions out of images (the two pixel baselines) -------------------------------------------
def box_pixel_bounds(box, width: int, height: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """Integer ``(left, top, right, bottom)`` (right/bottom exclusive) of a pixel xyxy box grown by
    ``margin`` times its width (left and right) and height (top and bottom), clipped to the image.
    At least one pixel wide and high."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left = min(max(int(math.floor(x1 - dx)), 0), width - 1)
    top = min(max(int(math.floor(y1 - dy)), 0), height - 1)
    right = max(min(int(math.ceil(x2 + dx)), width), left + 1)
    bottom = max(min(int(math.ceil(y2 + dy)), height), top + 1)
    return left, top, right, bottom


def crop_region(image: PIL.Image.Image, box, margin: float = CROP_MARGIN) -> PIL.Image.Image:
    """The box of a pixel xyxy ``box`` plus ``margin``, cut from the original ``image``."""
    return image.crop(box_pixel_bounds(box, image.width, image.height, margin))


def mask_background(image: PIL.Image.Image, box, fill: tuple[int, int, int]) -> PIL.Image.Image:
    """A copy of ``image`` with every pixel outside the pixel xyxy ``box`` set to ``fill`` (8-bit RGB)."""
    bounds = box_pixel_bounds(box, image.width, image.height)
    out = PIL.Image.new("RGB", image.size, tuple(int(c) for c in fill))
    out.paste(image.crop(bounds), bounds[:2])
    return out


# --- region encoders: one chunk of images in, one (n_i, D) tensor per image out ------------------------
RegionEncoder = Callable[..., list[torch.Tensor]]


def _split_counts(embeds: torch.Tensor, boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(embeds.split([len(b) for b in boxes]))


def _prompter_regions(model, processor, images, boxes, options) -> list[torch.Tensor]:
    inputs = processor(images=list(images), boxes=list(boxes), return_tensors="pt")
    device, dtype = model_device_dtype(model)
    model_boxes = [b.to(device=device, dtype=dtype) for b in inputs["boxes"]]
    return model.get_region_features(inputs["pixel_values"].to(device=device, dtype=dtype), boxes=model_boxes)


def _roi_regions(model, processor, images, boxes, options) -> list[torch.Tensor]:
    inputs = processor(images=list(images), boxes=list(boxes), return_tensors="pt")
    device, dtype = model_device_dtype(model)
    pixel_values = inputs["pixel_values"].to(device=device, dtype=dtype)
    patches = model.get_image_features(pixel_values=pixel_values).last_hidden_state[:, 1:]
    flat = flatten_per_image(list(inputs["boxes"]), patches.shape[0], "boxes", device=device)
    pooled = roi_align_patch_tokens(
        patches, flat.values.to(dtype), flat.image_index, output_size=options.roi_output_size
    )
    embeds = model.visual_projection(model.vision_model.post_layernorm(pooled))
    return split_per_image(embeds, flat.counts)


def _derived_image_regions(make_image) -> RegionEncoder:
    """A baseline that turns each (image, box) into an image of its own and encodes those in chunks of
    ``options.batch_size``; derived images are made one chunk at a time (masked copies are full-size)."""

    def encode(model, processor, images, boxes, options) -> list[torch.Tensor]:
        pairs = ((img, box) for img, bxs in zip(images, boxes) for box in bxs.tolist())
        out = []
        while chunk := [
            make_image(img, box, processor, options)
            for img, box in itertools.islice(pairs, options.batch_size)
        ]:
            out.append(model.get_image_features(pixel_values=_pixels(model, processor, chunk)).pooler_output)
        return _split_counts(torch.cat(out), boxes)

    return encode


def _crop_for(image, box, processor, options) -> PIL.Image.Image:
    return crop_region(image, box, options.crop_margin)


def _mask_for(image, box, processor, options) -> PIL.Image.Image:
    return mask_background(image, box, processor.image_processor.pad_color)


REGION_METHODS: dict[str, RegionEncoder] = {
    "cloc": _prompter_regions,
    "clip-crop": _derived_image_regions(_crop_for),
    "clip-maskbg": _derived_image_regions(_mask_for),
    "clip-roi": _roi_regions,
}


def check_method(method: str) -> str:
    """``method`` when it is one of :data:`REGION_METHODS`; otherwise ``ValueError`` listing them."""
    if method not in REGION_METHODS:
        raise ValueError(f"unknown region method {method!r}; expected one of {sorted(REGION_METHODS)}")
    return method


def encode_regions(
    model,
    processor,
    images: Sequence,
    boxes: Sequence,
    method: str = "cloc",
    options: EncodeOptions | None = None,
) -> list[torch.Tensor]:
    """Region embeddings of pixel boxes on images, by ``method`` (see the module docstring).

    Args:
        images: ``N`` images (paths, encoded bytes, PIL images, arrays), loaded one chunk at a time.
        boxes: ``N`` ``(n_i, 4)`` xyxy boxes in original-image pixels.
    Returns:
        ``N`` normalised ``(n_i, D)`` float32 CPU tensors (``(0, D)`` for an image without boxes).
    """
    encoder = REGION_METHODS[check_method(method)]
    options = options or EncodeOptions()
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
    out: list[torch.Tensor] = []
    with evaluation_mode(model):
        for start in range(0, len(images), options.batch_size):
            pil = [
                load_rgb_image(img, name=f"images[{start + i}]")
                for i, img in enumerate(images[start : start + options.batch_size])
            ]
            bxs = [
                validate_boxes(_pixel_boxes(b), name=f"boxes[{start + i}]", width=im.width, height=im.height)
                for i, (im, b) in enumerate(zip(pil, boxes[start : start + options.batch_size]))
            ]
            if sum(len(b) for b in bxs) == 0:
                out.extend(torch.zeros(0, model.config.projection_dim) for _ in bxs)
                continue
            out.extend(_normalised(e) for e in encoder(model, processor, pil, bxs, options))
    return out
