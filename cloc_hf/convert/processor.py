"""The :class:`~cloc_hf.processing_cloc.CLOCProcessor` saved beside a converted model: CLOC's image
processor at the ViT's size with the source's image statistics, and a tokenizer that fits the text
tower (checked, since a mismatched tokenizer gives silently wrong text features)."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, ImageProcessingMixin

from ..configuration_cloc import CLOCConfig, CLOCTextConfig
from ..image_processing_cloc import CLOCImageProcessor
from ..processing_cloc import CLOCProcessor
from .common import ConversionError

logger = logging.getLogger(__name__)


def source_image_stats(source: str | Path, **hub_kwargs) -> dict:
    """``image_mean`` / ``image_std`` of a source's image-processor config (``processor_config.json`` or
    ``preprocessor_config.json``, read by transformers); ``{}`` when it ships none or has no statistics.
    ``hub_kwargs`` (``revision``, ``token``...) go to transformers' file lookup."""
    try:
        data, _ = ImageProcessingMixin.get_image_processor_dict(str(source), **hub_kwargs)
    except (OSError, ValueError):  # no image-processor config in the source (or an unreachable hub)
        return {}
    if "image_mean" in data and "image_std" in data:
        return {"image_mean": data["image_mean"], "image_std": data["image_std"]}
    return {}


def _load_tokenizer(source: str | Path | None, tokenizer: str | Path | None, hub_kwargs: dict):
    """``tokenizer`` (must load), else ``source``'s own tokenizer if it has one, else ``None``."""
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer), **hub_kwargs)
    if source is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source), **hub_kwargs)
    except (OSError, ValueError) as err:
        logger.info("no tokenizer found with %s (%s); using the offline CLIP tokenizer", source, err)
        return None


def check_tokenizer(tok, text: CLOCTextConfig) -> None:
    """Raise :class:`ConversionError` unless ``tok`` fits the text tower: no id beyond its vocabulary, and
    texts end with the token it pools at (``eos_token_id``; the legacy ``2`` pools at the argmax)."""
    if len(tok) > text.vocab_size:
        raise ConversionError(
            f"the tokenizer has {len(tok)} tokens but the text tower only {text.vocab_size}: pass a matching "
            "tokenizer (--tokenizer) or skip the processor (--no-processor)"
        )
    if text.eos_token_id != 2 and tok.eos_token_id != text.eos_token_id:
        raise ConversionError(
            f"the tokenizer's eos_token_id={tok.eos_token_id} differs from the text tower's "
            f"eos_token_id={text.eos_token_id} (where text features are pooled): pass a matching tokenizer "
            "(--tokenizer) or skip the processor (--no-processor)"
        )


def build_processor(
    config: CLOCConfig,
    source: str | Path | None = None,
    tokenizer: str | Path | None = None,
    resize_mode: str = "pad",
    image_stats: dict | None = None,
    **hub_kwargs,
) -> CLOCProcessor:
    """The :class:`~cloc_hf.processing_cloc.CLOCProcessor` to save beside a converted model.

    The image side is a ``CLOCImageProcessor`` at the ViT's image size, with the source's mean and std
    when ``source`` ships a CLIP image-processor config (else ``image_stats``, else OpenAI's).
    ``resize_mode`` defaults to CLOC's ``"pad"``; CLIP's own preprocessing is ``"center_crop"``.
    The tokenizer is ``tokenizer`` (must load), else the source's own (when it has one), else the offline
    OpenAI CLIP tokenizer. It must fit the text tower's vocabulary and end texts with the token the text
    tower pools at (``eos_token_id``); :class:`ConversionError` otherwise. ``hub_kwargs`` (``revision``,
    ``token``...) go to every hub lookup.
    """
    text = config.text_config
    stats = dict(image_stats or {})
    if source is not None:
        stats = source_image_stats(source, **hub_kwargs) or stats
    tok = _load_tokenizer(source, tokenizer, hub_kwargs)
    size = config.vision_config.image_size
    if tok is None:
        processor = CLOCProcessor.offline(
            size=size, resize_mode=resize_mode, model_max_length=text.max_position_embeddings, **stats
        )
    else:
        image_processor = CLOCImageProcessor(size=size, resize_mode=resize_mode, **stats)
        processor = CLOCProcessor(image_processor=image_processor, tokenizer=tok)
    check_tokenizer(processor.tokenizer, text)
    return processor
