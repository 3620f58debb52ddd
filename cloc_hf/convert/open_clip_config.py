"""open_clip model configs: which ones can be converted exactly, and the one reading of their values
(open_clip's defaults filled in) that both the converted :class:`CLOCConfig` and the parity
reference use.

Supported: the ViT CLIPs of open_clip's ``CLIP`` class (OpenAI, LAION, DataComp... ``ViT-*`` configs
with or without ``quick_gelu``) and ``CustomTextCLIP`` whose text tower is open_clip's own
``TextTransformer``. Refused, each by name: attentional pooling (``attentional_pool``), average/no
pooling (``pool_type != "tok"``), Hugging Face or other custom text towers (``hf_model_name``), CoCa's
text decoder, timm and ModifiedResNet image towers, SigLIP (``logit_bias``), layer scale
(``ls_init_value``), ``no_ln_pre``, ``embed_cls``, bidirectional text (``no_causal_mask``), text
projections with a bias, the "custom" attention blocks (``qk_norm``, ``scaled_cosine_attn``,
``scale_*``), and any setting this module does not know (refusing to guess what it changes).

Text pooling: open_clip pools the text tower at the *argmax* of the token ids (CLIP's end-of-text
token has the highest id of the vocabulary), Hugging Face CLIP at the *first* ``eos_token_id``. The
converted config sets ``eos_token_id = vocab_size - 1`` (the end-of-text id in CLIP's vocabulary
layout), so the two agree whenever the end-of-text token is the largest id in the sequence, which is
true of every CLIP-tokenized text, padded with 0 (open_clip) or with end-of-text (Hugging Face).
Configs with ``pool_type="eos"`` (the multilingual "worldwide" models) get their ``eos_id`` instead;
``eos_id=2`` is refused because Hugging Face CLIP reads ``eos_token_id == 2`` as "pool at the argmax".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..configuration_cloc import CLOCConfig
from .common import ConversionError, prompter_dict

# open_clip config keys: those we read, those that do not change the inference of a supported model,
# and switches of unsupported variants with the value that keeps the model supported.
_VISION_USED = {
    "image_size",
    "patch_size",
    "width",
    "layers",
    "head_width",
    "mlp_ratio",
    "norm_kwargs",
    "pos_embed_type",
}
_VISION_HARMLESS = {
    "patch_dropout", "output_tokens", "final_ln_after_pool", "attn_pooler_queries", "attn_pooler_heads",
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
}  # fmt: skip
_TEXT_USED = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "norm_kwargs",
    "pool_type",
    "eos_id",
}
_TEXT_HARMLESS = {
    "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "output_tokens", "final_ln_after_pool",
    "use_pad_mask", "correct_cls_mask", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
}  # fmt: skip
_BLOCK_SWITCHES = {
    "ls_init_value": None, "act_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}  # fmt: skip
_VISION_SWITCHES = {
    **_BLOCK_SWITCHES, "attentional_pool": False, "no_ln_pre": False, "pool_type": "tok", "timm_model_name": None,
}  # fmt: skip
_TEXT_SWITCHES = {
    **_BLOCK_SWITCHES, "hf_model_name": None, "embed_cls": False, "no_causal_mask": False, "proj_bias": False,
    "proj_type": "linear",
}  # fmt: skip
_TOP_USED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
_TOP_HARMLESS = {"custom_text", "cast_dtype", "init_logit_scale", "nonscalar_logit_scale", "output_dict"}
_TOP_SWITCHES = {"multimodal_cfg": None, "init_logit_bias": None}


def unwrap_model_cfg(config: Mapping) -> Mapping:
    """The model config inside an hf-hub ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg":
    ...}``), or ``config`` itself when it is already a model config (open_clip's ``model_configs/*.json``)."""
    return config.get("model_cfg", config)


def _is_default(value, default) -> bool:
    """Whether a switch is at the value that keeps the model supported; "off" (``None``/``False``)
    accepts every falsy spelling (``None``, ``False``, ``{}``, ``""``) and ``block_type="default"``."""
    if default is None or default is False:
        return not value or value == "default"
    return value == default


def _check_section(name: str, cfg: Mapping, used: set, harmless: set, switches: dict) -> list[str]:
    """Problems of one config section: switches away from their supported value, and unknown keys."""
    problems = []
    for key, value in cfg.items():
        if key in switches:
            if not _is_default(value, switches[key]):
                problems.append(f"{name}.{key}={value!r} (supported: {switches[key]!r})")
        elif key not in used and key not in harmless:
            problems.append(f"{name}.{key} (unknown setting; refusing to guess what it changes)")
    return problems


def check_open_clip_config(model_cfg: Mapping) -> None:
    """Raise :class:`ConversionError` naming every setting of ``model_cfg`` this converter cannot honour."""
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vision, Mapping) or not isinstance(text, Mapping) or "embed_dim" not in model_cfg:
        raise ConversionError("an open_clip model config needs `embed_dim`, `vision_cfg` and `text_cfg`")
    problems = _check_section("config", model_cfg, _TOP_USED, _TOP_HARMLESS, _TOP_SWITCHES)
    problems += _check_section("vision_cfg", vision, _VISION_USED, _VISION_HARMLESS, _VISION_SWITCHES)
    problems += _check_section("text_cfg", text, _TEXT_USED, _TEXT_HARMLESS, _TEXT_SWITCHES)
    if isinstance(vision.get("layers", 12), (list, tuple)):
        problems.append("vision_cfg.layers is a list: a ModifiedResNet image tower (only ViTs are supported)")
    for key in ("image_size", "patch_size"):
        value = vision.get(key, 0)
        if isinstance(value, (list, tuple)) and len(set(value)) != 1:
            problems.append(f"vision_cfg.{key}={value!r}: only square images and patches are supported")
    if vision.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        problems.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r}")
    for section, cfg in (("vision_cfg", vision), ("text_cfg", text)):
        extra = set(cfg.get("norm_kwargs") or {}) - {"eps"}
        if extra:
            problems.append(f"{section}.norm_kwargs {sorted(extra)} (only `eps` is supported)")
    pool = text.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        problems.append(f"text_cfg.pool_type={pool!r} (supported: 'argmax', 'eos')")
    elif pool == "eos" and text.get("eos_id", 2) == 2:
        problems.append(
            "text_cfg.pool_type='eos' with eos_id=2 (Hugging Face CLIP reads eos_token_id=2 as argmax)"
        )
    if problems:
        raise ConversionError("unsupported open_clip model: " + "; ".join(problems))


def _square(value) -> int:
    """A side length given as ``n`` or ``[n, n]`` (non-square values are refused by the check)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


@dataclass(frozen=True)
class OpenCLIPTower:
    """One transformer tower of an open_clip config, with open_clip's defaults filled in."""

    width: int
    layers: int
    heads: int
    intermediate_size: int  # open_clip's int(width * mlp_ratio)
    eps: float  # layer-norm epsilon (norm_kwargs["eps"], default 1e-5)


@dataclass(frozen=True)
class OpenCLIPSettings:
    """The values of a supported open_clip ViT CLIP config that inference depends on; built by
    :func:`read_open_clip_config`, the only place that knows open_clip's defaults."""

    vision: OpenCLIPTower
    text: OpenCLIPTower
    image_size: int
    patch_size: int
    vocab_size: int
    context_length: int
    pad_id: int
    pool_eos: int | None  # the id text features are pooled at; None: the argmax of the ids (CLIP)
    quick_gelu: bool  # False: open_clip's nn.GELU, the exact erf form
    embed_dim: int
    init_logit_scale: float


def _tower(cfg: Mapping, default_width: int, heads: int) -> OpenCLIPTower:
    """An :class:`OpenCLIPTower` of one config section (``heads`` already derived by the caller)."""
    width = int(cfg.get("width", default_width))
    return OpenCLIPTower(
        width=width,
        layers=int(cfg.get("layers", 12)),
        heads=heads,
        intermediate_size=int(width * float(cfg.get("mlp_ratio", 4.0))),
        eps=float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
    )


def read_open_clip_config(model_cfg: Mapping) -> OpenCLIPSettings:
    """Check ``model_cfg`` (:func:`check_open_clip_config`) and read it with open_clip's defaults."""
    check_open_clip_config(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    v_width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    if v_width % head_width:
        raise ConversionError(f"vision_cfg.width={v_width} is not a multiple of head_width={head_width}")
    return OpenCLIPSettings(
        vision=_tower(vision, 768, v_width // head_width),
        text=_tower(text, 512, int(text.get("heads", 8))),
        image_size=_square(vision.get("image_size", 224)),
        patch_size=_square(vision.get("patch_size", 16)),
        vocab_size=int(text.get("vocab_size", 49408)),
        context_length=int(text.get("context_length", 77)),
        pad_id=int(text.get("pad_id", 0)),
        pool_eos=int(text["eos_id"]) if text.get("pool_type", "argmax") == "eos" else None,
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        embed_dim=int(model_cfg["embed_dim"]),
        init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
    )


def _tower_config(tower: OpenCLIPTower, act: str) -> dict:
    """The CLIP-layout tower fields shared by the vision and text configs."""
    return dict(
        hidden_size=tower.width,
        intermediate_size=tower.intermediate_size,
        num_hidden_layers=tower.layers,
        num_attention_heads=tower.heads,
        hidden_act=act,
        layer_norm_eps=tower.eps,
    )


def cloc_config_from_open_clip(model_cfg: Mapping, prompter_config=None) -> CLOCConfig:
    """The :class:`CLOCConfig` of an open_clip ViT CLIP model config (open_clip's defaults filled in),
    with a Prompter of ``prompter_config`` (default ``None``: CLOC's own settings)."""
    s = read_open_clip_config(model_cfg)
    act = "quick_gelu" if s.quick_gelu else "gelu"
    return CLOCConfig(
        vision_config=dict(_tower_config(s.vision, act), image_size=s.image_size, patch_size=s.patch_size),
        text_config=dict(
            _tower_config(s.text, act),
            vocab_size=s.vocab_size,
            max_position_embeddings=s.context_length,
            # see the module docstring: vocab_size - 1 agrees with open_clip's argmax pooling
            eos_token_id=s.vocab_size - 1 if s.pool_eos is None else s.pool_eos,
            bos_token_id=s.vocab_size
            - 2,  # CLIP's layout (start-of-text just before end-of-text); unused by the model
            pad_token_id=s.pad_id,
        ),
        prompter_config=prompter_dict(prompter_config),
        projection_dim=s.embed_dim,
        logit_scale_init_value=s.init_logit_scale,
    )
