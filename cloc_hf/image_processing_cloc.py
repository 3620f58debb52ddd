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

Input images are whatever :func:`cloc_hf.image_inputs.load_rgb_image` accepts (PIL, numpy, torch,
paths, file bytes); a 4-D array or tensor is a batch. Bad inputs raise ``ValueError`` naming
``images[i]``, ``boxes[i][j]`` or ``points[i][j]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import normalize, to_channel_dimension_format
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .box_ops import FrameTransform
from .image_inputs import as_image_list, as_rows, load_rgb_image, per_image  # load_rgb_image: re-exported

logger = logging.get_logger(__name__)
CHANNELS_LAST = ChannelDimension.LAST

RESIZE_MODES = ("pad", "center_crop")
# the settings a call to `preprocess` may override (CLOCProcessor routes these keyword arguments here)
PREPROCESS_SETTINGS = (
    "size", "resize_mode", "image_mean", "image_std", "do_normalize", "resample", "return_original_sizes"
)
# saved-config keys that are not settings (handled by transformers' mixin)
_BOOKKEEPING_KEYS = ("auto_map", "processor_class", "feature_extractor_type")


class CLOCImagesKwargs(ImagesKwargs, total=False):
    """``ImagesKwargs`` plus CLOC's own settings (lets ``from_pretrained(..., resize_mode=...)`` override them
    and routes them from a ``LlavaProcessor`` call to this image processor)."""

    resize_mode: str
    return_original_sizes: bool


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
        return_original_sizes (`bool`, defaults to `True`): add ``original_sizes`` to the outputs, the
            input :meth:`post_process_boxes` needs to map predictions back to pixels. Set `False` where
            the outputs go straight into a model that takes only ``pixel_values`` (a Hugging Face LLaVA,
            whose ``generate`` refuses unknown inputs); ``cloc-swap-tower`` writes it so. Saved in
            ``preprocessor_config.json``; configs saved without it read as `True`.

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
        return_original_sizes: bool = True,
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
        if not isinstance(return_original_sizes, (bool, np.bool_)):
            raise ValueError(f"return_original_sizes must be True or False, got {return_original_sizes!r}")
        self.return_original_sizes = bool(return_original_sizes)
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
                ``do_normalize``, ``resample``, ``return_original_sizes``.

        Returns:
            `BatchFeature` with
              - ``pixel_values``: ``(B, 3, size, size)`` float32.
              - ``original_sizes`` (unless ``return_original_sizes`` is `False`): ``(B, 2)`` int64
                original ``(height, width)`` (SAM's name; not ``image_sizes``, which HF LLaVA would take
                as the size of ``pixel_values`` and use to split the image features).
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
        image_list, single = as_image_list(images)
        rgb = [load_rgb_image(image, name=f"images[{i}]") for i, image in enumerate(image_list)]
        frames = [proc.frame_transform(*img.size) for img in rgb]

        data = {}
        for key, values, width, to_model in (
            ("boxes", boxes, 4, FrameTransform.to_model),
            ("points", points, 2, FrameTransform.points_to_model),
        ):
            if values is not None:
                rows = per_image(values, len(rgb), single, key, width)
                data[key] = [
                    to_model(frame, as_rows(v, width, f"{key}[{i}]"), name=f"{key}[{i}]")
                    for i, (frame, v) in enumerate(zip(frames, rows))
                ]
        out = {"pixel_values": np.stack([proc._pixels(img, frame) for img, frame in zip(rgb, frames)])}
        if proc.return_original_sizes:
            out["original_sizes"] = np.array([(img.height, img.width) for img in rgb], dtype=np.int64)
        if return_tensors == "pt":
            return BatchFeature({**{k: torch.from_numpy(v) for k, v in out.items()}, **data})
        data = {k: [t.numpy() for t in v] for k, v in data.items()}
        return BatchFeature({**out, **data})

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
            pixels = normalize(pixels, self.image_mean, self.image_std, input_data_format=CHANNELS_LAST)
        return np.ascontiguousarray(to_channel_dimension_format(pixels, "channels_first", CHANNELS_LAST))

    def _with_overrides(self, overrides: dict) -> CLOCImageProcessor:
        unknown = sorted(set(overrides) - set(PREPROCESS_SETTINGS))
        if unknown:
            raise TypeError(
                f"preprocess() got unexpected keyword arguments {unknown}; it accepts {PREPROCESS_SETTINGS}"
            )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self
        return type(self)(**{**{k: getattr(self, k) for k in PREPROCESS_SETTINGS}, **overrides})

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
