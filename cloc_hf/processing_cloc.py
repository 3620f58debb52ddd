"""``CLOCProcessor``: the CLOC image processor and a CLIP tokenizer behind one call.

    processor = CLOCProcessor.offline()                      # no hub access needed
    inputs = processor(images=[img], text=["a red car"], boxes=[[[10, 20, 200, 180]]])
    # inputs: pixel_values (B,3,S,S), original_sizes (B,2), boxes [B x (n_i,4)], input_ids, attention_mask
    pixel_boxes = processor.post_process_boxes(predicted_boxes, inputs["original_sizes"])

``save_pretrained`` writes ``processor_config.json`` (with the image processor nested in it), the
tokenizer files and, once ``import cloc_hf`` has registered the classes, an ``auto_map`` and copies of
this module and the ones it imports. ``CLOCProcessor.from_pretrained(dir)`` reads them back without any
registration; ``AutoProcessor.from_pretrained(dir)`` works after ``import cloc_hf``, or with
``trust_remote_code=True`` where this package is not installed (the code then comes from ``dir``).
"""

from __future__ import annotations

from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_cloc import PREPROCESS_SETTINGS, CLOCImageProcessor
from .tokenization import build_clip_tokenizer


class CLOCProcessor(ProcessorMixin):
    r"""Wraps a :class:`CLOCImageProcessor` and a tokenizer (normally OpenAI's CLIP BPE).

    Args:
        image_processor (`CLOCImageProcessor`): images, boxes and points.
        tokenizer (`PreTrainedTokenizerBase`): captions and region phrases.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError(
                "CLOCProcessor needs an image_processor and a tokenizer; "
                "CLOCProcessor.offline() builds the default pair without hub access"
            )
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def offline(cls, size: int = 224, resize_mode: str = "pad", model_max_length: int = 77, **image_kwargs):
        """Default processor: :class:`CLOCImageProcessor` and the offline OpenAI CLIP tokenizer."""
        image_processor = CLOCImageProcessor(size=size, resize_mode=resize_mode, **image_kwargs)
        return cls(image_processor=image_processor, tokenizer=build_clip_tokenizer(model_max_length))

    def __call__(
        self,
        images=None,
        text=None,
        boxes=None,
        points=None,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=None,
        **kwargs,
    ) -> BatchFeature:
        """Process images (with optional boxes / points) and/or text.

        Args:
            images, boxes, points: see :meth:`CLOCImageProcessor.preprocess`; boxes and points are xyxy /
                xy in *original-image pixels* and come back normalised in the model frame.
            text (`str` or `list[str]`): captions or region phrases.
            return_tensors: ``"pt"`` (default) or ``"np"``.
            padding, truncation, max_length: passed to the tokenizer. By default a text batch is padded
                to its longest member and truncated to the tokenizer's ``model_max_length`` (77).
            **kwargs: image-processor overrides (``size``, ``resize_mode``, ``image_mean``, ``image_std``,
                ``do_normalize``, ``resample``, ``return_original_sizes``); anything else goes to the tokenizer.

        Returns:
            `BatchFeature` with ``pixel_values``, ``original_sizes`` (unless the image processor's
            ``return_original_sizes`` is `False`) (+ ``boxes``, ``points``) when images are given and
            ``input_ids``, ``attention_mask`` when text is given.
        """
        if images is None and text is None:
            raise ValueError("CLOCProcessor needs images, text or both")
        if images is None and (boxes is not None or points is not None):
            raise ValueError("boxes and points are given in image pixels: pass the images they belong to")
        image_kwargs = {k: kwargs.pop(k) for k in PREPROCESS_SETTINGS if k in kwargs}
        data = {}
        if images is not None:
            data.update(
                self.image_processor(
                    images, boxes=boxes, points=points, return_tensors=return_tensors, **image_kwargs
                )
            )
        if text is not None:
            data.update(
                self.tokenizer(
                    text,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    return_tensors=return_tensors,
                    **kwargs,
                )
            )
        return BatchFeature(data=data)

    def post_process_boxes(self, boxes, original_sizes):
        """Normalised model-frame boxes -> original-image pixels; see :meth:`CLOCImageProcessor.post_process_boxes`."""
        return self.image_processor.post_process_boxes(boxes, original_sizes)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a directory (or hub id) written by :meth:`save_pretrained`.

        Image-processor settings (``size``, ``resize_mode``...) given as keyword arguments override the
        saved ones; hub arguments (``cache_dir``, ``revision``, ``local_files_only``...) apply to both
        parts. The image processor is loaded by class rather than through ``AutoImageProcessor``, so this
        works before (and without) any auto-class registration; ``trust_remote_code`` (passed by
        ``AutoProcessor``) goes to ``AutoTokenizer``, which would otherwise ask about the ``auto_map``.
        """
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        image_kwargs = {k: kwargs.pop(k) for k in PREPROCESS_SETTINGS if k in kwargs}
        image_processor = CLOCImageProcessor.from_pretrained(
            pretrained_model_name_or_path, **kwargs, **image_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer)
