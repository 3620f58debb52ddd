"""What the CLOC image processor accepts, in canonical form: images as 8-bit RGB PIL images (also
used by evaluation), boxes and points as one float32 ``(n_i, 4)`` / ``(n_i, 2)`` tensor per image.

Images: PIL images of any mode, numpy arrays and torch tensors (recognised, converted and laid out
with ``transformers.image_utils`` / ``image_transforms``), file paths and raw file bytes. Arrays are
channels-last ``(H, W[, C])`` and tensors channels-first ``(C, H, W)``; the other layout is accepted
when it is unambiguously gray or RGB. Pixels become 8-bit RGB before resizing, as CLIP's do:

* ``uint8`` as is; ``uint16``, PIL ``"I;16*"`` and ``"I"`` are 16-bit data and scaled by 255/65535;
  other integer types must hold 0..255; ``bool`` is 0/255; floats (and PIL ``"F"``) must lie in [0, 1]
  and are rounded. (``transformers.image_transforms.to_pil_image`` would truncate floats and refuse
  16-bit data, so these rules are the project's own.)
* Every other mode goes through ``transformers.image_transforms.convert_to_rgb``: gray is replicated
  and transparency is composited onto white, so colours hidden under transparent pixels never show.

Files are decoded by PIL directly rather than ``transformers.image_utils.load_image``, which would drop
transparency, clip 16-bit data and turn the image by its EXIF tag (moving pixels away from boxes given
on the stored ones).

Boxes and points: a list with one ``(n_i, 4 | 2)`` array-like per image (``None`` or empty for none),
a ``(B, n, 4 | 2)`` array, or for a single image its ``(n, 4 | 2)`` rows directly.

Bad input raises ``ValueError`` naming the item (``images[3]``, ``boxes[1]``).
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import torch
from transformers.image_transforms import convert_to_rgb, to_channel_dimension_format
from transformers.image_utils import (
    ChannelDimension,
    infer_channel_dimension_format,
    is_pil_image,
    is_valid_image,
    to_numpy_array,
)

# float pixels a hair outside [0, 1] (rounding in the caller's maths) are clipped, not rejected
FLOAT_RANGE_TOLERANCE = 0.01
# PIL modes holding 16-bit data ("I" is 32-bit storage, used by PIL for 16-bit PNGs once converted)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_image_list(images) -> tuple[list, bool]:
    """``(list of images, whether a single image was passed)``; 4-D arrays/tensors are batches."""
    if images is None:
        raise ValueError("images must be given")
    if isinstance(images, (list, tuple)) or (is_valid_image(images) and getattr(images, "ndim", 0) == 4):
        if len(images) == 0:
            raise ValueError(f"images is empty ({type(images).__name__} of length 0)")
        return list(images), False
    return [images], True


def load_rgb_image(image, name: str = "image") -> PIL.Image.Image:
    """Any accepted image input -> 8-bit RGB PIL image (rules in the module docstring).

    ``name`` (default ``"image"``) is how errors refer to the image, e.g. ``images[3]``.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = _open_image_file(image, name)
    elif not is_valid_image(image):
        raise ValueError(
            f"{name} has unsupported type {type(image).__name__}; expected a PIL image, numpy array, "
            "torch tensor, file path or file bytes"
        )
    if is_pil_image(image) and (image.width < 1 or image.height < 1):
        raise ValueError(f"{name}: empty image of size {image.size}")
    if not is_pil_image(image) or image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = _array_to_pil(image, name)
    if image.mode == "RGB":
        return image
    if "a" in image.getbands():  # premultiplied alpha (RGBa, La): un-premultiply before compositing
        image = image.convert("RGBA")
    try:
        return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))
    except (ValueError, OSError) as err:
        raise ValueError(f"{name}: cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from err


def _open_image_file(source, name: str) -> PIL.Image.Image:
    """Decode a file path or the bytes of an image file with PIL."""
    is_bytes = isinstance(source, (bytes, bytearray))
    if not is_bytes and not os.path.isfile(source):
        raise ValueError(f"{name}: {str(source)[:200]!r} is not an image file (or an image object)")
    what = "bytes are not a readable image file" if is_bytes else f"cannot read image file {str(source)!r}"
    try:
        with PIL.Image.open(io.BytesIO(source) if is_bytes else source) as opened:
            opened.load()
            return opened
    except (OSError, PIL.Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: {what}: {err}") from err


def _array_to_pil(image, name: str) -> PIL.Image.Image:
    """numpy array, torch tensor or 16-bit/float PIL image -> PIL image of 8-bit gray, RGB or RGBA."""
    channels_first = isinstance(image, torch.Tensor)
    sixteen_bit = is_pil_image(image) and image.mode in SIXTEEN_BIT_MODES
    if channels_first and image.is_floating_point() and image.dtype != torch.float64:
        image = image.float()  # numpy has no bfloat16
    array = to_numpy_array(image)
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = to_channel_dimension_format(array, "channels_last", _layout(array, channels_first, name))
    else:
        hint = "; pass a 4-D batch as `images` itself, not inside a list" if array.ndim == 4 else ""
        raise ValueError(f"{name}: array of shape {shape} is not an image (need 2 or 3 dimensions){hint}")
    if 0 in array.shape:
        raise ValueError(f"{name}: empty image of shape {shape}")
    sixteen_bit = sixteen_bit or (array.dtype.kind == "u" and array.dtype.itemsize == 2)
    pixels = _to_uint8(array, name, sixteen_bit=sixteen_bit)
    return PIL.Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels))


def _layout(array: np.ndarray, channels_first: bool, name: str) -> ChannelDimension:
    """Channel layout of a 3-D array: the layout native to its type (tensors first, numpy last) may
    carry RGBA; the other one only gray or RGB, so a ``(4, H, W)`` array is rejected, not guessed."""
    if array.shape[0 if channels_first else -1] in (1, 3, 4):
        return ChannelDimension.FIRST if channels_first else ChannelDimension.LAST
    try:
        return infer_channel_dimension_format(array, num_channels=(1, 3))
    except ValueError:
        layout = "(C, H, W) or (H, W)" if channels_first else "(H, W, C) or (H, W)"
        raise ValueError(
            f"{name}: array of shape {tuple(array.shape)} is not an image; expected {layout} with C in "
            "(1, 3, 4) (4 = RGBA, only in that layout)"
        ) from None


def _to_uint8(array: np.ndarray, name: str, sixteen_bit: bool) -> np.ndarray:
    """Pixel values of any dtype -> uint8 (rules in the module docstring)."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "f":
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
    if kind not in "iu":
        raise ValueError(f"{name}: unsupported pixel dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    limit = 65535 if sixteen_bit else 255
    if low < 0 or high > limit:
        bits = "16-bit" if sixteen_bit else "8-bit (use uint16 for 16-bit data)"
        raise ValueError(f"{name}: {bits} integer pixels must lie in [0, {limit}], got [{low}, {high}]")
    if sixteen_bit:
        return np.round(array.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    return array.astype(np.uint8)


# --- boxes and points ----------------------------------------------------------------------------
def _numeric_or_none(values) -> np.ndarray | None:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        return None


def per_image(values, num_images: int, single: bool, name: str, width: int) -> list:
    """Split ``boxes`` / ``points`` (``name``) into one entry per image, checking the count.

    ``single``: one image was passed, which may take its ``(n, width)`` rows directly.
    """
    if single:
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


def as_rows(values, width: int, name: str) -> torch.Tensor:
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
