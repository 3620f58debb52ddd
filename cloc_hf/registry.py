"""Named CLOC architectures: ``list_models()`` / ``create_model(name)`` / ``get_model_config(name)``.

Sizes map to hyper-parameters here and nowhere else (settings that are not about size keep their
:class:`~cloc_hf.CLOCConfig` defaults; pass them as overrides). The paper's sizes are ViT-B/16 @224, ViT-L/14
@224/336 and ViT-H/14 @336 with CLIP's text towers; the ``tiny`` entries are for tests and CPU demos.
"""

from __future__ import annotations

import copy
from typing import Any

from .configuration_cloc import CLOCConfig, check_config_overrides

_TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
_TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_TEXT_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)


def _vit(hidden, layers, heads, patch, image, mlp_ratio=4):
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=image,
    )


_MODELS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP shapes (quick_gelu, as the released checkpoints, so conversions are exact)
    "cloc-vit-b-16": dict(vision_config=_vit(768, 12, 12, 16, 224), text_config=_TEXT_B, projection_dim=512),
    "cloc-vit-l-14": dict(vision_config=_vit(1024, 24, 16, 14, 224), text_config=_TEXT_L, projection_dim=768),
    "cloc-vit-l-14-336": dict(vision_config=_vit(1024, 24, 16, 14, 336), text_config=_TEXT_L, projection_dim=768),
    # ViT-H/14 as in open_clip (GELU)
    "cloc-vit-h-14-336": dict(
        vision_config={**_vit(1280, 32, 16, 14, 336, mlp_ratio=4), "intermediate_size": 5120, "hidden_act": "gelu"},
        text_config={**_TEXT_H, "hidden_act": "gelu"},
        projection_dim=1024,
    ),
    # tests: hidden 32, 2 layers, image 32, patch 4 (an 8x8 grid)
    "cloc-tiny": dict(
        vision_config=_vit(32, 2, 2, 4, 32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32,
    ),
    # CPU demo (`make demo`): 96-d x 3 layers, 32 px, patch 4, a conv stem so 4x4 patches see edges;
    # the smallest ViT that learns the synthetic scenes' shapes within minutes on 2 CPU cores
    "cloc-tiny-demo": dict(
        vision_config={**_vit(96, 3, 4, 4, 32), "conv_stem_channels": 32},
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=128,
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def get_model_config(name: str, **overrides: Any) -> CLOCConfig:
    """The :class:`CLOCConfig` of a named architecture; keyword overrides are merged (sub-configs as dicts).

    An override that is not a ``CLOCConfig`` field (or a sub-config field) raises a ``ValueError``
    naming it, instead of being stored as an unused attribute.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown CLOC architecture {name!r}; available: {', '.join(list_models())}")
    check_config_overrides(overrides, where=f"get_model_config({name!r})")
    kwargs = copy.deepcopy(_MODELS[name])
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            kwargs[key].update(value)
        else:
            kwargs[key] = value
    return CLOCConfig(**kwargs)


def create_model(name: str, **overrides: Any):
    """A freshly initialised :class:`~cloc_hf.CLOCModel` of a named architecture."""
    from .modeling_cloc import CLOCModel

    return CLOCModel(get_model_config(name, **overrides))
