"""``LlavaProcessor`` with region prompts: boxes in original-image pixels -> ``region_boxes`` for the model.

:class:`CLOCLlavaProcessor` maps each sample's boxes (and points) into the frame the tower sees with
the image processor's own :class:`~cloc_hf.box_ops.FrameTransform` (the one geometry the pixels go
through; ``CLOCImageProcessor(images, boxes=...)``), optionally writes each box's coordinates into the
prompt before its ``<region>`` token (Ferret's hybrid region representation) with a box convention of
:mod:`llava_bridge.box_text`, checks the ``<region>`` tokens against the prompts per sample, expands
``<image>`` to the tower's token count and tokenizes.
"""

from __future__ import annotations

from transformers import BatchFeature, LlavaProcessor

from cloc_hf.image_inputs import as_image_list, as_rows, per_image

from .box_text import box_to_text, resolve_frame
from .constants import IMAGE_TOKEN, REGION_TOKEN
from .remote_code import SelfContainedCodeMixin


class CLOCLlavaProcessor(SelfContainedCodeMixin, LlavaProcessor):
    """Image processor + tokenizer for :class:`~llava_bridge.CLOCLlavaForConditionalGeneration`.

    Args (beyond ``LlavaProcessor``'s):
        num_additional_image_tokens (`int`, defaults to 1): tokens the tower adds to the patches; 1 for
            CLOC and CLIP ViTs (the class token), which ``LlavaProcessor``'s default of 0 gets wrong.
        region_token (`str`, defaults to ``llava_bridge.constants.REGION_TOKEN``): the placeholder each
            region prompt replaces; must be one special token of the tokenizer.
        box_convention (`str`, *optional*): when set, each box's coordinates are written into the text
            before its ``<region>`` token in this convention (``llava_bridge.box_text.CONVENTIONS``);
            default `None`, the text is left as given. Per call: ``box_convention=`` of ``__call__``.
        box_frame (`str`, *optional*): the frame of the written coordinates, ``"original"`` or ``"pad"``;
            default the convention's own (see ``llava_bridge.box_text.resolve_frame``).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        region_token=REGION_TOKEN,
        box_convention=None,
        box_frame=None,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        self.region_token = region_token
        ids = tokenizer.encode(region_token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer does not have {region_token!r} as one token (it gives ids {ids}); add it first: "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}, {region_token!r}]}}) "
                "and resize the language model's embeddings"
            )
        self.region_token_id = ids[0]
        if box_convention is not None:
            resolve_frame(box_convention, box_frame)  # unknown conventions / frames raise here, not per call
        self.box_convention = box_convention
        self.box_frame = box_frame

    def __call__(
        self,
        images=None,
        text=None,
        boxes=None,
        points=None,
        box_convention: str | None = None,
        box_frame: str | None = None,
        return_tensors="pt",
        return_original_sizes: bool = False,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Model inputs for one image per sample with region prompts.

        Args:
            images: one image per sample (anything ``CLOCImageProcessor`` reads).
            text: one prompt per sample (a string for one sample); ``<image>`` is expanded to the
                tower's token count, each ``<region>`` takes that sample's next prompt (its boxes, then
                its points).
            boxes: per sample, ``(n_i, 4)`` xyxy boxes in original-image pixels (``None``/empty for none).
            points: per sample, ``(n_i, 2)`` xy pixel points.
            box_convention, box_frame: override the processor's for this call (see the class).
            return_original_sizes: also return the images' ``original_sizes`` (``(B, 2)`` height, width),
                e.g. to map boxes read from the answers back to pixels; default `False`, so the outputs
                go straight into ``model(**inputs)`` / ``model.generate(**inputs)``, which do not take them.
            **tokenizer_kwargs: passed to the tokenizer (``padding=True`` for batches of several lengths).
        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``pixel_values`` and, when given,
            ``region_boxes`` / ``region_points``: one normalised ``(n_i, 4)`` / ``(n_i, 2)`` tensor per
            sample in the tower's input frame (and ``original_sizes`` when asked).
        Raises:
            ValueError: naming the sample when its ``<region>`` tokens and prompts disagree in number, and
                naming the box when one lies outside its image.
        """
        if text is None:
            raise ValueError("CLOCLlavaProcessor needs text (the prompts with <image> and <region> tokens)")
        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        image_inputs = None
        if images is not None:
            image_list, single = as_image_list(images)
            num_images = len(image_list)
            if boxes is not None:  # one (n_i, 4) pixel tensor per image, read once for both uses below
                boxes = [as_rows(v, 4, f"boxes[{i}]") for i, v in enumerate(per_image(boxes, num_images, single, "boxes", 4))]
            # the sizes are needed here (box text) whatever the image processor's own setting
            image_inputs = self.image_processor(
                images, boxes=boxes, points=points, return_tensors="pt", return_original_sizes=True
            )
            if len(image_inputs["pixel_values"]) != len(texts):
                raise ValueError(
                    f"got {len(image_inputs['pixel_values'])} images for {len(texts)} prompts; give one image per prompt"
                )
            data["pixel_values"] = image_inputs["pixel_values"]
            if return_original_sizes:
                data["original_sizes"] = image_inputs["original_sizes"]
        elif boxes is not None or points is not None:
            raise ValueError("region boxes / points need the images they are drawn on")
        counts = self._prompt_counts(image_inputs, len(texts))
        for i, (sample, count) in enumerate(zip(texts, counts)):
            found = sample.count(self.region_token)
            if found != count:
                raise ValueError(
                    f"sample {i} has {found} {self.region_token} tokens in its text but {count} region prompts "
                    "(boxes + points); write one per prompt"
                )
        convention = box_convention or self.box_convention
        if convention is not None and boxes is not None:
            frame = box_frame or self.box_frame
            texts = [self._write_boxes(t, image_inputs, i, convention, frame, boxes) for i, t in enumerate(texts)]
        if image_inputs is not None:
            texts = [self._expand_image_tokens(t, image_inputs, i) for i, t in enumerate(texts)]
        data.update(self.tokenizer(texts, return_tensors=return_tensors, **tokenizer_kwargs))
        for key, name in (("boxes", "region_boxes"), ("points", "region_points")):
            if image_inputs is not None and key in image_inputs:
                data[name] = image_inputs[key]
        return BatchFeature(data)

    def _prompt_counts(self, image_inputs, batch: int) -> list[int]:
        """Region prompts (boxes + points) per sample; zeros without any."""
        counts = [0] * batch
        for key in ("boxes", "points"):
            if image_inputs is not None and key in image_inputs:
                counts = [c + len(t) for c, t in zip(counts, image_inputs[key])]
        return counts

    def _write_boxes(self, text: str, image_inputs, index: int, convention: str, frame, boxes) -> str:
        """Insert each box's coordinates (original pixels, written in ``convention``) before its ``<region>``."""
        height, width = (int(v) for v in image_inputs["original_sizes"][index])
        frame_of = image_inputs["boxes"][index]
        pixels = boxes[index]
        pieces = text.split(self.region_token)
        out = pieces[0]
        for k, rest in enumerate(pieces[1:]):
            if k < len(frame_of):  # boxes come first; points get no coordinates
                out += box_to_text(pixels[k].tolist(), (width, height), convention, frame=frame) + " "
            out += self.region_token + rest
        return out

    def _expand_image_tokens(self, text: str, image_inputs, index: int) -> str:
        """``<image>`` -> as many image tokens as the tower yields (``LlavaProcessor.replace_image_token``)."""
        if text.count(self.image_token) > 1:
            raise ValueError(f"sample {index} has {text.count(self.image_token)} {self.image_token} tokens; one per sample")
        return text.replace(self.image_token, self.replace_image_token(image_inputs, index))


def _register() -> None:
    """``AutoProcessor`` for ``model_type="cloc_llava"`` and ``auto_map`` in saved processor configs."""
    from transformers import AutoProcessor

    from .configuration_llava import CLOCLlavaConfig

    AutoProcessor.register(CLOCLlavaConfig, CLOCLlavaProcessor, exist_ok=True)
    CLOCLlavaProcessor.register_for_auto_class()


_register()

__all__ = ["CLOCLlavaProcessor"]
