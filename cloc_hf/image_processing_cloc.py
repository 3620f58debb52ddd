"""Image processor for CLOC: images -> ``pixel_values``, original-pixel boxes/points -> model frame.

The geometry is :class:`cloc_hf.box_ops.FrameTransform` and nothing else: the processor asks it where
to pad or crop, executes exactly that on the pixels, and maps boxes and points with the same object,
so a box always covers the pixels it was drawn on.

Resize modes
------------
``"pad"`` (default, the paper's and LLaVA's ``expand2square``): pad to a centred square of side
``max(w, h)`` filled with the image mean (``tuple(int(m * 255) for m in image_mean)``, as LLaVA), then
resize to ``size``. Nothing is cut off. ``"center_crop"``: CLIP's preprocessing, shortest edge to
``size`` then a centre crop; boxes entirely outside the crop raise.

Input images
------------
PIL images of any mode, numpy arrays (channels-last ``(H, W)``, ``(H, W, C)``; a clearly
channels-first ``(1|3, H, W)`` is accepted too), torch tensors (channels-first ``(C, H, W)``, ``(H, W)``;
a clearly channels-last ``(H, W, 1|3)`` is accepted too), file paths and raw file bytes. A 4-D array
or tensor is a batch. Pixel values are reduced to 8-bit RGB before resizing, as CLIP does:

* ``uint8`` as is; ``uint16``, PIL ``"I;16*"`` and ``"I"`` are 16-bit data and scaled by 255/65535;
  other integer types must hold 0..255; ``bool`` is 0/255; floats (and PIL ``"F"``) must lie in [0, 1].
* Grayscale is replicated to 3 channels; palette, CMYK, YCbCr... go through PIL's conversion.
* Transparency (RGBA, LA, palette or grayscale with a transparent colour) is composited onto white,
  the same choice as transformers' ``convert_rgb``; dropping alpha would expose whatever colour the
  encoder left under transparent pixels (often black).

Anything else raises ``ValueError`` naming the offending ``images[i]``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .box_ops import FrameTransform

logger = logging.get_logger(__name__)

RESIZE_MODES = ("pad", "center_crop")
ALPHA_BACKGROUND = (255, 255, 255)
# float pixels a hair outside [0, 1] (rounding in the caller's maths) are clipped, not rejected
FLOAT_RANGE_TOLERANCE = 0.01
# the settings a call to `preprocess` may override
_SETTINGS = ("size", "resize_mode", "image_mean", "image_std", "do_normalize", "resample")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# saved-config keys that are not settings (handled by transformers' mixin)
_BOOKKEEPING_KEYS = ("auto_map", "processor_class", "feature_extractor_type")


class CLOCImagesKwargs(ImagesKwargs, total=False):
    """``ImagesKwargs`` plus CLOC's resize mode (lets ``from_pretrained(..., resize_mode=...)`` override it)."""

    resize_mode: str


class CLOCImageProcessor(BaseImageProcessor):
    r"""Square-input image processor for CLOC that also maps boxes and points into the model frame.

    Args:
        size (`int`, defaults to 224): side of the square model input. A transformers size dict
            (``{"shortest_edge": n}`` or ``{"height": n, "width": n}``) is accepted and reduced to ``n``.
        resize_mode (`str`, defaults to ``"pad"``): ``"pad"`` (pad to square with the mean colour, then
            resize; the paper's default) or ``"center_crop"`` (CLIP: shortest edge, then centre crop).
        image_mean (`list[float]`, defaults to OpenAI CLIP's): per-channel mean, also the pad colour.
        image_std (`list[float]`, defaults to OpenAI CLIP's): per-channel standard deviation.
        do_normalize (`bool`, defaults to `True`): subtract the mean and divide by the std; when
            `False`, ``pixel_values`` are in ``[0, 1]``.
        resample (`int`, defaults to ``PIL.Image.BICUBIC`` = 3): PIL resampling filter.
        crop_size (`dict`, *optional*): accepted for compatibility with saved CLIP-style configs; it
            must equal ``size``. Read it back as the ``crop_size`` property.

    LLaVA-style towers read ``image_processor.crop_size["height"]`` and ``image_processor.image_mean``
    and call ``preprocess(image, return_tensors="pt")["pixel_values"]``; all three work.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = CLOCImagesKwargs

    def __init__(
        self,
        size: int | dict[str, int] = 224,
        resize_mode: str = "pad",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_normalize: bool = True,
        resample: int = PIL.Image.Resampling.BICUBIC,
        crop_size: int | dict[str, int] | None = None,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)  # written by to_dict, carries no setting
        ignored = sorted(k for k in kwargs if k not in _BOOKKEEPING_KEYS)
        if ignored:
            logger.warning(f"CLOCImageProcessor ignores the settings {ignored}")
        super().__init__(**kwargs)
        self.size = _square_side(size, "size")
        if crop_size is not None and _square_side(crop_size, "crop_size") != self.size:
            raise ValueError(f"crop_size {crop_size} differs from size {self.size}: CLOC inputs are square")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
        self.resize_mode = resize_mode
        self.image_mean = _channel_stats(OPENAI_CLIP_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _channel_stats(OPENAI_CLIP_STD if image_std is None else image_std, "image_std")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        self.do_normalize = bool(do_normalize)
        try:
            self.resample = int(PIL.Image.Resampling(int(resample)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"resample must be a PIL resampling filter, got {resample!r}") from err

    # --- properties read by LLaVA-style code -----------------------------------------------------
    @property
    def crop_size(self) -> dict[str, int]:
        return {"height": self.size, "width": self.size}

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """8-bit RGB fill of ``"pad"`` mode: the image mean, truncated as LLaVA's ``expand2square``."""
        return tuple(int(m * 255) for m in self.image_mean)

    def frame_transform(self, width: int, height: int) -> FrameTransform:
        """The preprocessing geometry of one ``width x height`` image."""
        return FrameTransform(int(width), int(height), self.size, self.resize_mode)

    # --- preprocessing ---------------------------------------------------------------------------
    def __call__(self, images, boxes=None, points=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Same as :meth:`preprocess`."""
        return self.preprocess(images, boxes=boxes, points=points, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images, boxes=None, points=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Turn images (and optional boxes / points on them) into model inputs.

        Args:
            images: one image or a list of them (see the module docstring for accepted kinds).
            boxes: per image, an ``(n_i, 4)`` array of xyxy boxes in *original-image pixels*, as a list
                with one entry per image (``None`` or empty for no boxes) or a ``(B, n, 4)`` array.
                With a single image an ``(n, 4)`` array may be passed directly.
            points: the same with ``(n_i, 2)`` xy pixel points.
            return_tensors: ``"pt"`` (torch) or ``"np"`` / ``None`` (numpy).
            **kwargs: per-call overrides of ``size``, ``resize_mode``, ``image_mean``, ``image_std``,
                ``do_normalize``, ``resample``.

        Returns:
            `BatchFeature` with
              - ``pixel_values``: ``(B, 3, size, size)`` float32.
              - ``original_sizes``: ``(B, 2)`` int64 original ``(height, width)`` (SAM's name; not
                ``image_sizes``, which HF LLaVA would take as the size of ``pixel_values`` and use to
                split the image features).
              - ``boxes`` (when given): list of ``B`` float32 ``(n_i, 4)`` normalised xyxy boxes in the
                model input frame.
              - ``points`` (when given): list of ``B`` float32 ``(n_i, 2)`` normalised xy points.

        Raises:
            ValueError: unreadable images (naming ``images[i]``), box/point lists that do not match the
                images, and invalid boxes or points (naming e.g. ``boxes[1][3]``).
        """
        proc = self._with_overrides(kwargs)
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        image_list, single = _as_image_list(images)
        rgb = [load_rgb_image(image, name=f"images[{i}]") for i, image in enumerate(image_list)]
        frames = [proc.frame_transform(*img.size) for img in rgb]

        data = {}
        if boxes is not None:
            data["boxes"] = [
                frame.to_model(_as_rows(v, 4, f"boxes[{i}]"), name=f"boxes[{i}]")
                for i, (frame, v) in enumerate(zip(frames, _per_image(boxes, len(rgb), single, "boxes", 4)))
            ]
        if points is not None:
            data["points"] = [
                frame.points_to_model(_as_rows(v, 2, f"points[{i}]"), name=f"points[{i}]")
                for i, (frame, v) in enumerate(zip(frames, _per_image(points, len(rgb), single, "points", 2)))
            ]
        pixels = np.stack([proc._pixels(img, frame) for img, frame in zip(rgb, frames)])
        sizes = np.array([(img.height, img.width) for img in rgb], dtype=np.int64)

        if return_tensors == "pt":
            data = {
                "pixel_values": torch.from_numpy(pixels),
                "original_sizes": torch.from_numpy(sizes),
                **data,
            }
        else:
            data = {
                "pixel_values": pixels,
                "original_sizes": sizes,
                **{k: [t.numpy() for t in v] for k, v in data.items()},
            }
        return BatchFeature(data=data)

    def _pixels(self, image: PIL.Image.Image, frame: FrameTransform) -> np.ndarray:
        """``(3, size, size)`` float32 pixels of one RGB image, laid out by ``frame``."""
        resample = PIL.Image.Resampling(self.resample)
        size = frame.size
        if frame.mode == "pad":
            side = frame.pad_side
            if image.size != (side, side):
                canvas = PIL.Image.new("RGB", (side, side), self.pad_color)
                canvas.paste(image, frame.pad_offset)
                image = canvas
            image = image.resize((size, size), resample)
        else:
            image = image.resize(frame.resized_size, resample)
            left, top = frame.crop_offset
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(
                self.image_std, np.float32
            )
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _with_overrides(self, overrides: dict) -> CLOCImageProcessor:
        unknown = sorted(set(overrides) - set(_SETTINGS))
        if unknown:
            raise TypeError(
                f"preprocess() got unexpected keyword arguments {unknown}; it accepts {_SETTINGS}"
            )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self
        return type(self)(**{**{k: getattr(self, k) for k in _SETTINGS}, **overrides})

    # --- post-processing -------------------------------------------------------------------------
    def post_process_boxes(self, boxes, original_sizes) -> list[torch.Tensor]:
        """Map predicted normalised model-frame xyxy boxes back to original-image pixels.

        Args:
            boxes: list of ``B`` ``(n_i, 4)`` tensors, or a ``(B, n, 4)`` tensor, in the model frame.
            original_sizes: ``(B, 2)`` original ``(height, width)``, as returned by :meth:`preprocess`.

        Returns:
            list of ``B`` float32 ``(n_i, 4)`` xyxy pixel boxes, clipped to the image.
        """
        sizes = torch.as_tensor(np.asarray(original_sizes, dtype=np.int64)).reshape(-1, 2)
        if len(boxes) != len(sizes):
            raise ValueError(f"got boxes for {len(boxes)} images but {len(sizes)} image sizes")
        out = []
        for i, ((height, width), b) in enumerate(zip(sizes.tolist(), boxes)):
            b = torch.as_tensor(b, dtype=torch.float32)
            if b.ndim != 2 or b.shape[-1] != 4:
                raise ValueError(f"boxes[{i}] must have shape (n, 4), got {tuple(b.shape)}")
            out.append(self.frame_transform(width, height).to_original(b))
        return out


# --- settings ------------------------------------------------------------------------------------
def _square_side(size, name: str) -> int:
    if isinstance(size, dict):
        if "shortest_edge" in size and len(size) == 1:
            size = size["shortest_edge"]
        elif set(size) == {"height", "width"} and size["height"] == size["width"]:
            size = size["height"]
        else:
            raise ValueError(f"{name} must be an int or a square size dict, got {size}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
    return int(size)


def _channel_stats(values, name: str) -> list[float]:
    values = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if len(values) != 3:
        raise ValueError(f"{name} needs one value per RGB channel, got {values}")
    return values


# --- images --------------------------------------------------------------------------------------
def _as_image_list(images) -> tuple[list, bool]:
    """``(list of images, whether a single image was passed)``; 4-D arrays/tensors are batches."""
    if images is None:
        raise ValueError("images must be given")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list")
        return list(images), False
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if len(images) == 0:
            raise ValueError(f"images is an empty batch of shape {tuple(images.shape)}")
        return list(images), False
    return [images], True


def load_rgb_image(image, name: str = "image") -> PIL.Image.Image:
    """Any accepted image input -> 8-bit RGB PIL image (rules in the module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"{name}: {str(image)[:200]!r} is not an image file (or an image object)")
        try:
            with PIL.Image.open(image) as opened:
                opened.load()
                return _pil_to_rgb(opened, name)
        except (OSError, PIL.Image.DecompressionBombError) as err:
            raise ValueError(f"{name}: cannot read image file {str(image)!r}: {err}") from err
    if isinstance(image, (bytes, bytearray)):
        try:
            with PIL.Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return _pil_to_rgb(opened, name)
        except OSError as err:
            raise ValueError(f"{name}: bytes are not a readable image file: {err}") from err
    if isinstance(image, PIL.Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{name}: empty image of size {image.size}")
        return _pil_to_rgb(image, name)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()  # numpy has no bfloat16
        return _array_to_rgb(tensor.numpy(), channels_first=True, name=name)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, channels_first=False, name=name)
    raise ValueError(
        f"{name} has unsupported type {type(image).__name__}; expected a PIL image, numpy array, "
        "torch tensor, file path or file bytes"
    )


def _pil_to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        gray = _to_uint8(np.asarray(image), name, sixteen_bit=mode != "F")
        return PIL.Image.fromarray(gray).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"{name}: cannot convert a PIL image of mode {mode!r} to RGB: {err}") from err


def _array_to_rgb(array: np.ndarray, channels_first: bool, name: str) -> PIL.Image.Image:
    """numpy/torch pixels -> RGB PIL image. ``channels_first`` is the layout preferred when ambiguous."""
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        # the layout native to the array type may carry RGBA; the other one only gray or RGB, so that a
        # (4, H, W) numpy array or an (H, W, 4) tensor is rejected rather than guessed
        first_fits = shape[0] in ((1, 3, 4) if channels_first else (1, 3))
        last_fits = shape[-1] in ((1, 3) if channels_first else (1, 3, 4))
        if first_fits if channels_first else first_fits and not last_fits:
            array = array.transpose(1, 2, 0)
        elif not last_fits:
            layout = "(C, H, W) or (H, W)" if channels_first else "(H, W, C) or (H, W)"
            raise ValueError(
                f"{name}: array of shape {shape} is not an image; expected {layout} with C in (1, 3, 4) "
                "(4 = RGBA, only in that layout)"
            )
    else:
        hint = "; pass a 4-D batch as `images` itself, not inside a list" if array.ndim == 4 else ""
        raise ValueError(f"{name}: array of shape {shape} is not an image (need 2 or 3 dimensions){hint}")
    if 0 in array.shape:
        raise ValueError(f"{name}: empty image of shape {shape}")
    sixteen_bit = array.dtype.kind == "u" and array.dtype.itemsize == 2
    pixels = _to_uint8(array, name, sixteen_bit=sixteen_bit)
    channels = pixels.shape[-1]
    if channels == 1:
        return PIL.Image.fromarray(np.ascontiguousarray(pixels[:, :, 0])).convert("RGB")
    if channels == 3:
        return PIL.Image.fromarray(np.ascontiguousarray(pixels))
    return _pil_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(pixels)), name)


def _to_uint8(array: np.ndarray, name: str, sixteen_bit: bool) -> np.ndarray:
    """Pixel values of any dtype -> uint8 (rules in the module docstring)."""
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: float image contains NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"{name}: float pixels must lie in [0, 1], got range [{low:.4g}, {high:.4g}]; "
                "pass uint8 for 0..255 data, and never already-normalised pixels"
            )
        return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        limit = 65535 if sixteen_bit else 255
        if low < 0 or high > limit:
            kind = "16-bit" if sixteen_bit else "8-bit (use uint16 for 16-bit data)"
            raise ValueError(f"{name}: {kind} integer pixels must lie in [0, {limit}], got [{low}, {high}]")
        if sixteen_bit:
            return np.round(array.astype(np.float64) * (255 / 65535)).astype(np.uint8)
        return array.astype(np.uint8)
    raise ValueError(f"{name}: unsupported pixel dtype {dtype}")


# --- boxes and points ----------------------------------------------------------------------------
def _numeric_or_none(values) -> np.ndarray | None:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        return None


def _per_image(values, num_images: int, single: bool, name: str, width: int) -> list:
    """Split ``boxes`` / ``points`` into one entry per image, checking the count."""
    if single:
        # a single image may take its (n, width) rows directly
        array = _numeric_or_none(values)
        if array is not None and (
            (array.ndim == 2 and array.shape[1] == width) or (array.ndim == 1 and array.size == 0)
        ):
            return [values]
    if isinstance(values, (np.ndarray, torch.Tensor)):
        if values.ndim != 3:
            raise ValueError(
                f"{name}: a {name} array must have shape (B, n, {width}), got {tuple(values.shape)}; "
                f"or pass a list with one (n_i, {width}) array per image"
            )
        values = list(values)
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"{name} must be a list with one (n_i, {width}) array per image, got {type(values).__name__}"
        )
    if len(values) != num_images:
        raise ValueError(
            f"got {len(values)} {name} entries for {num_images} images; pass one (n_i, {width}) array per "
            "image (None or empty for an image without any)"
        )
    return list(values)


def _as_rows(values, width: int, name: str) -> torch.Tensor:
    """One image's boxes/points -> float32 ``(n, width)`` tensor (``None``/empty -> ``(0, width)``)."""
    if values is None:
        return torch.zeros(0, width)
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu().float()
    else:
        array = _numeric_or_none(values)
        if array is None:
            raise ValueError(f"{name} is not numeric: {str(values)[:100]}")
        tensor = torch.from_numpy(array.astype(np.float32))
    if tensor.numel() == 0:
        return tensor.reshape(0, width)
    return tensor
