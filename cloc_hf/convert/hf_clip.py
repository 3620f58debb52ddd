"""Hugging Face ``CLIPModel`` -> CLOC: the CLIP config is copied field for field and the weights keep
their names (CLOC's towers are transformers' CLIP towers), so the copy is exact in the source's dtype."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import CLIPModel, CLIPTextConfig, CLIPVisionConfig

from ..configuration_cloc import CLOCConfig
from ..modeling_cloc import CLOCModel
from .common import (
    DEFAULT_ATOL,
    ConversionError,
    cloc_model_with_clip_weights,
    preview,
    prompter_dict,
    tower_fields,
)
from .parity import check_parity

logger = logging.getLogger(__name__)


def cloc_config_from_clip_config(clip_config, prompter_config=None) -> CLOCConfig:
    """A :class:`CLOCConfig` whose towers equal a ``CLIPConfig``'s field for field, plus a Prompter
    (``prompter_config``; default ``None``: CLOC's own settings)."""
    return CLOCConfig(
        # CLIP's own fields copy 1:1; CLOC-only fields (e.g. conv_stem_channels) keep their CLIP-layout defaults
        text_config={name: getattr(clip_config.text_config, name) for name in tower_fields(CLIPTextConfig)},
        vision_config={
            name: getattr(clip_config.vision_config, name) for name in tower_fields(CLIPVisionConfig)
        },
        prompter_config=prompter_dict(prompter_config),
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value,
    )


def cloc_from_clip_model(clip_model: CLIPModel, prompter_config=None) -> CLOCModel:
    """A CLOC model with ``clip_model``'s towers, projections and logit scale (same dtype and device),
    and a freshly initialised Prompter and box head. No parity check: see :func:`convert_hf_clip`."""
    config = cloc_config_from_clip_config(clip_model.config, prompter_config)
    return cloc_model_with_clip_weights(
        config, clip_model.state_dict(), device=clip_model.device, dtype=clip_model.dtype
    )


def load_hf_clip(src: str | Path, **from_pretrained_kwargs) -> CLIPModel:
    """``CLIPModel.from_pretrained(src)`` in eval mode, refusing checkpoints that do not fill the whole
    model (transformers would initialise the gaps randomly, and the conversion would copy noise)."""
    clip_model, info = CLIPModel.from_pretrained(str(src), output_loading_info=True, **from_pretrained_kwargs)
    missing = [k for k in info.get("missing_keys", ()) if "position_ids" not in k]
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise ConversionError(
            f"{src} is not a complete CLIPModel checkpoint: missing {preview(missing) or 'none'}; "
            f"mismatched {preview(mismatched) or 'none'}"
        )
    if info.get("unexpected_keys"):
        logger.warning(
            "ignoring weights of %s that CLIPModel does not use: %s", src, preview(info["unexpected_keys"])
        )
    return clip_model.eval()


def hf_clip_model_and_reference(
    src: str | Path, prompter_config=None, **from_pretrained_kwargs
) -> tuple[CLOCModel, CLIPModel]:
    """The converted model (not yet parity-checked) and the loaded ``CLIPModel`` to check it against."""
    clip_model = load_hf_clip(src, **from_pretrained_kwargs)
    return cloc_from_clip_model(clip_model, prompter_config), clip_model


def convert_hf_clip(
    src: str | Path, prompter_config=None, atol: float = DEFAULT_ATOL, **from_pretrained_kwargs
) -> CLOCModel:
    """Convert a Hugging Face ``CLIPModel`` (hub id or local directory) into a :class:`CLOCModel`.

    Args:
        src: anything ``CLIPModel.from_pretrained`` accepts.
        prompter_config (`dict` or `CLOCPrompterConfig`, *optional*): the new Prompter's settings
            (e.g. ``{"pooling": "all"}``); defaults to CLOC's.
        atol: tolerance of the parity check run before returning (default 1e-5).
        **from_pretrained_kwargs: passed to ``CLIPModel.from_pretrained`` (``revision``, ``dtype``...).

    Raises:
        ConversionError: incomplete source checkpoint, unmapped weights, or failed parity.
    """
    cloc_model, clip_model = hf_clip_model_and_reference(src, prompter_config, **from_pretrained_kwargs)
    check_parity(clip_model, cloc_model, atol=atol)
    return cloc_model
