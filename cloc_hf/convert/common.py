"""What every conversion path shares: the error type, the default parity tolerance, config-field
helpers and the strict copy of CLIP weights into a new CLOC model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields

import torch
from transformers import PreTrainedConfig

from ..configuration_cloc import CLOCConfig, CLOCPrompterConfig
from ..modeling_cloc import CLOCModel

# Largest allowed max |difference| per compared tensor: float32 rounding of an exact copy stays far below.
DEFAULT_ATOL = 1e-5
# Parameters a CLOC model has and a CLIP checkpoint cannot provide: freshly initialised.
NEW_PARAMETER_PREFIXES = ("prompter.", "box_head.")


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted exactly: unsupported variant, unmapped keys, or failed parity."""


def preview(items: Iterable[str], limit: int = 8) -> str:
    """The first ``limit`` (default 8) of ``items``, sorted and comma-separated, with a count of the rest;
    error messages name offending keys without printing hundreds of them."""
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def tower_fields(config_cls) -> list[str]:
    """The tower's own fields (vocab_size, hidden_size, ...), without the generic PreTrainedConfig ones,
    so that a CLIP tower config can be copied field for field."""
    generic = {f.name for f in fields(PreTrainedConfig)}
    return [f.name for f in fields(config_cls) if f.name not in generic]


def prompter_dict(prompter_config: CLOCPrompterConfig | Mapping | None) -> dict:
    """``prompter_config`` as the plain dict ``CLOCConfig`` takes; ``None`` (the default) gives ``{}``,
    i.e. CLOC's own Prompter settings."""
    if prompter_config is None:
        return {}
    if isinstance(prompter_config, CLOCPrompterConfig):
        return {name: getattr(prompter_config, name) for name in tower_fields(CLOCPrompterConfig)}
    return dict(prompter_config)


def load_clip_weights(cloc_model: CLOCModel, clip_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy CLIP weights (``CLIPModel`` names) into ``cloc_model``, strictly.

    Every CLIP key must land on a CLOC parameter of the same shape, and every CLOC parameter outside
    the Prompter and box head must be provided. Raises :class:`ConversionError` listing the offenders.
    """
    expected = set(cloc_model.state_dict())
    given = set(clip_state_dict)
    unexpected = given - expected
    missing = {k for k in expected - given if not k.startswith(NEW_PARAMETER_PREFIXES)}
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(
                f"{len(unexpected)} CLIP keys have no place in the CLOC model: {preview(unexpected)}"
            )
        if missing:
            parts.append(f"{len(missing)} CLOC keys are not provided by the CLIP weights: {preview(missing)}")
        raise ConversionError("; ".join(parts))
    target = cloc_model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} -> {tuple(target[k].shape)}"
        for k, v in clip_state_dict.items()
        if v.shape != target[k].shape
    ]
    if mismatched:
        raise ConversionError(f"shape mismatch for {len(mismatched)} keys: {preview(mismatched)}")
    cloc_model.load_state_dict(dict(clip_state_dict), strict=False)


def cloc_model_with_clip_weights(
    config: CLOCConfig, clip_state_dict: Mapping[str, torch.Tensor], device=None, dtype=None
) -> CLOCModel:
    """A new :class:`CLOCModel` of ``config`` (on ``device`` / in ``dtype``; defaults: CPU, float32) holding
    ``clip_state_dict`` (``CLIPModel`` names, copied by :func:`load_clip_weights`), in eval mode.
    The Prompter and box head keep their fresh initialisation. No parity check: callers run one."""
    cloc_model = CLOCModel(config)
    if device is not None or dtype is not None:
        cloc_model = cloc_model.to(device=device, dtype=dtype)
    load_clip_weights(cloc_model, clip_state_dict)
    return cloc_model.eval()
