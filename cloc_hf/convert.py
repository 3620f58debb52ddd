"""Convert CLIP checkpoints into CLOC models: the CLIP towers are copied, the Prompter and box head
start freshly initialised (fine-tuning a CLIP checkpoint is the practical path for most users).

Sources
-------
* a Hugging Face ``CLIPModel`` (hub id or local directory), see :func:`convert_hf_clip`;
* an open_clip ViT CLIP state dict (``.safetensors``, or ``.bin``/``.pt`` read with
  ``torch.load(..., weights_only=True)``) plus its model config json, see :func:`convert_open_clip`.

Every conversion is checked numerically: :func:`check_parity` runs the source and the CLOC model on
the same deterministic random images and token sequences, and :func:`save_converted` refuses to write
anything unless the image and text embeddings agree to ``atol``. For open_clip the source is
:class:`OpenCLIPReference`, a plain-torch forward written directly over open_clip's state-dict layout
(open_clip itself cannot be imported beside the CPU torch build: it needs torchvision).

Command line (``pip install -e .`` provides ``cloc-convert``; ``python -m cloc_hf.convert`` also works)::

    cloc-convert --from-hf-clip openai/clip-vit-base-patch16 --out cloc-vit-b-16 [--atol 1e-5] [--pooling prompt|all]
    cloc-convert --from-open-clip ViT-B-16.safetensors --open-clip-config ViT-B-16.json --out cloc-vit-b-16

    other options: --resize-mode pad|center_crop (processor; default CLOC's pad), --tokenizer TOK (default:
    the source's tokenizer, the config's hf_tokenizer_name, else the offline OpenAI CLIP tokenizer),
    --no-processor, --overwrite (write into a non-empty --out)

The output holds ``config.json``, ``model.safetensors`` and a ``CLOCProcessor`` (image processor at the
ViT's size + tokenizer); ``import cloc_hf; AutoModel.from_pretrained("cloc-vit-b-16")`` loads it. The
converter reloads what it wrote and checks it is identical before reporting success.

open_clip variants that are supported: the ViT CLIPs of open_clip's ``CLIP`` class (OpenAI, LAION,
DataComp... ``ViT-*`` configs with or without ``quick_gelu``) and ``CustomTextCLIP`` whose text tower is
open_clip's own ``TextTransformer`` (keys under ``text.``). NOT supported, each with a clear error:
attentional pooling (``attentional_pool``, CoCa's ``visual.attn_pool``), average/no pooling
(``pool_type != "tok"``), Hugging Face or other custom text towers (``hf_model_name``), CoCa's text
decoder, timm and ModifiedResNet image towers, SigLIP (``logit_bias``), layer scale (``ls_init_value``),
``no_ln_pre``, ``embed_cls``, bidirectional text (``no_causal_mask``), text projections with a bias, and
the "custom" attention blocks (``qk_norm``, ``scaled_cosine_attn``, ``scale_*``).

Text pooling: open_clip pools the text tower at the *argmax* of the token ids (CLIP's end-of-text
token has the highest id of the vocabulary), Hugging Face CLIP at the *first* ``eos_token_id``. The
open_clip converter sets ``eos_token_id = vocab_size - 1`` (the end-of-text id in CLIP's vocabulary
layout), so the two agree whenever the end-of-text token is the largest id in the sequence, which
is true of every CLIP-tokenized text, padded with 0 (open_clip) or with end-of-text (Hugging Face).
Configs with ``pool_type="eos"`` (the multilingual "worldwide" models) get their ``eos_id`` instead;
``eos_id=2`` is refused because Hugging Face CLIP reads ``eos_token_id == 2`` as "pool at the argmax".

Converted open_clip models are float32 (half-precision weights are upcast exactly); Hugging Face
conversions keep the dtype the source was loaded in.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_cloc import CLOCConfig, CLOCPrompterConfig, CLOCTextConfig
from .modeling_cloc import CLOCModel

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-5
# Parameters a CLOC model has and a CLIP checkpoint cannot provide: freshly initialised.
NEW_PARAMETER_PREFIXES = ("prompter.", "box_head.")


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted exactly: unsupported variant, unmapped keys, or failed parity."""


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _tower_fields(config_cls) -> list[str]:
    """The tower's own fields (vocab_size, hidden_size, ...), without the generic PreTrainedConfig ones."""
    generic = {f.name for f in fields(PreTrainedConfig)}
    return [f.name for f in fields(config_cls) if f.name not in generic]


def _prompter_dict(prompter_config: CLOCPrompterConfig | Mapping | None) -> dict:
    if prompter_config is None:
        return {}
    if isinstance(prompter_config, CLOCPrompterConfig):
        return {name: getattr(prompter_config, name) for name in _tower_fields(CLOCPrompterConfig)}
    return dict(prompter_config)


def cloc_config_from_clip_config(clip_config, prompter_config=None) -> CLOCConfig:
    """A :class:`CLOCConfig` whose towers equal a ``CLIPConfig``'s field for field (plus a Prompter)."""
    return CLOCConfig(
        # CLIP's own fields copy 1:1; CLOC-only fields (e.g. conv_stem_channels) keep their CLIP-layout defaults
        text_config={name: getattr(clip_config.text_config, name) for name in _tower_fields(CLIPTextConfig)},
        vision_config={name: getattr(clip_config.vision_config, name) for name in _tower_fields(CLIPVisionConfig)},
        prompter_config=_prompter_dict(prompter_config),
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value,
    )


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _preview(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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
            parts.append(f"{len(unexpected)} CLIP keys have no place in the CLOC model: {_preview(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} CLOC keys are not provided by the CLIP weights: {_preview(missing)}")
        raise ConversionError("; ".join(parts))
    target = cloc_model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} -> {tuple(target[k].shape)}" for k, v in clip_state_dict.items() if v.shape != target[k].shape
    ]
    if mismatched:
        raise ConversionError(f"shape mismatch for {len(mismatched)} keys: {_preview(mismatched)}")
    cloc_model.load_state_dict(dict(clip_state_dict), strict=False)


# --------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------


def make_parity_inputs(config: CLOCConfig, num_images: int = 2, num_texts: int = 4, seed: int = 0) -> dict:
    """Deterministic random inputs for :func:`check_parity`.

    ``pixel_values (num_images, C, S, S)`` at the ViT's image size; ``input_ids (num_texts, L)`` of valid
    ids with exactly one end-of-text token per sequence, at different positions, padded after it with
    end-of-text tokens (as CLIP tokenizers pad) and masked out in ``attention_mask``.
    """
    vision, text = config.vision_config, config.text_config
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_images, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    # legacy configs (eos_token_id == 2) pool at the argmax of the ids: the highest id plays end-of-text
    eos = text.vocab_size - 1 if text.eos_token_id == 2 else text.eos_token_id
    if eos is None or not 0 <= eos < text.vocab_size:
        raise ConversionError(f"text eos_token_id={text.eos_token_id} is not an id of the {text.vocab_size}-token vocabulary")
    length = min(text.max_position_embeddings, 16)
    # every id but `eos` (the open_clip reference needs eos to be the largest id present: it is whenever
    # eos = vocab_size - 1, which is how open_clip conversions are configured)
    input_ids = torch.randint(0, text.vocab_size - 1, (num_texts, length), generator=gen)
    input_ids = input_ids + (input_ids >= eos).long()
    attention_mask = torch.ones_like(input_ids)
    for row in range(num_texts):
        end = length - 1 - (row * (length - 2)) // max(num_texts, 1)  # eos from the last slot down to 1
        input_ids[row, end:] = eos
        attention_mask[row, end + 1 :] = 0
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; inf for a shape mismatch, nan if anything is not finite."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    return float(diff.max()) if torch.isfinite(diff).all() else math.nan


@torch.no_grad()
def _features(model, inputs: dict) -> dict[str, torch.Tensor]:
    device, dtype = model.device, model.dtype
    image = model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype))
    text = model.get_text_features(
        input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
    )
    for output in (image, text):
        if not isinstance(output, BaseModelOutputWithPooling):  # transformers < 5 returned the tensor
            raise ConversionError(f"get_*_features of {type(model).__name__} returned {type(output).__name__}")
    return {
        "image_embeds": image.pooler_output,
        "image_tokens": image.last_hidden_state,
        "text_embeds": text.pooler_output,
        "logit_scale": model.logit_scale.reshape(()),
    }


def check_parity(reference, cloc_model: CLOCModel, atol: float = DEFAULT_ATOL, inputs: dict | None = None) -> dict:
    """Compare a source model with its CLOC conversion; raise :class:`ConversionError` above ``atol``.

    Args:
        reference: the source, with CLIPModel's ``get_image_features`` / ``get_text_features`` (returning
            ``BaseModelOutputWithPooling``), ``logit_scale``, ``device`` and ``dtype``: a ``CLIPModel`` or
            an :class:`OpenCLIPReference`.
        cloc_model: the converted model.
        atol: largest allowed absolute difference, per compared tensor.
        inputs: defaults to :func:`make_parity_inputs` of the CLOC config.

    Compares the projected image embeddings, the projected text embeddings and the logit scale to
    ``atol``, and the ViT's final tokens (what the Prompter reads) to ``atol * max(1, max |tokens|)``.
    Both models run in eval mode (restored afterwards).

    Returns:
        ``{name: max |difference|}``.
    """
    inputs = inputs if inputs is not None else make_parity_inputs(cloc_model.config)
    modes = [(m, m.training) for m in (reference, cloc_model) if hasattr(m, "train")]
    try:
        for m, _ in modes:
            m.eval()
        expected, actual = _features(reference, inputs), _features(cloc_model, inputs)
    finally:
        for m, was_training in modes:
            m.train(was_training)
    diffs = {name: _max_abs_diff(expected[name], actual[name]) for name in expected}
    # The ViT tokens are unnormalised (real CLIPs have outlier channels in the hundreds), so float32
    # rounding alone can exceed an absolute 1e-5 there: their tolerance scales with their magnitude.
    token_scale = max(1.0, float(expected["image_tokens"].detach().abs().max()))
    tolerance = {name: atol * (token_scale if name == "image_tokens" else 1.0) for name in diffs}
    failed = {name: d for name, d in diffs.items() if not d <= tolerance[name]}  # NaN fails too
    if failed:
        detail = ", ".join(f"{name} max |diff| = {d:.3e} (tolerance {tolerance[name]:.1e})" for name, d in failed.items())
        raise ConversionError(f"parity check failed (atol={atol:g}): {detail}")
    return diffs


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel
# --------------------------------------------------------------------------------------------------


def cloc_from_clip_model(clip_model: CLIPModel, prompter_config=None) -> CLOCModel:
    """A CLOC model with ``clip_model``'s towers, projections and logit scale (same dtype and device),
    and a freshly initialised Prompter and box head. No parity check: see :func:`convert_hf_clip`."""
    config = cloc_config_from_clip_config(clip_model.config, prompter_config)
    cloc_model = CLOCModel(config).to(device=clip_model.device, dtype=clip_model.dtype)
    load_clip_weights(cloc_model, clip_model.state_dict())
    return cloc_model.eval()


def load_hf_clip(src: str | Path, **from_pretrained_kwargs) -> CLIPModel:
    """``CLIPModel.from_pretrained(src)``, refusing checkpoints that do not fill the whole model."""
    clip_model, info = CLIPModel.from_pretrained(str(src), output_loading_info=True, **from_pretrained_kwargs)
    missing = [k for k in info.get("missing_keys", ()) if "position_ids" not in k]
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise ConversionError(
            f"{src} is not a complete CLIPModel checkpoint: missing {_preview(missing) or 'none'}; "
            f"mismatched {_preview(mismatched) or 'none'}"
        )
    if info.get("unexpected_keys"):
        logger.warning("ignoring weights of %s that CLIPModel does not use: %s", src, _preview(info["unexpected_keys"]))
    return clip_model.eval()


def convert_hf_clip(
    src: str | Path, prompter_config=None, atol: float = DEFAULT_ATOL, **from_pretrained_kwargs
) -> CLOCModel:
    """Convert a Hugging Face ``CLIPModel`` (hub id or local directory) into a :class:`CLOCModel`.

    Args:
        src: anything ``CLIPModel.from_pretrained`` accepts.
        prompter_config (`dict` or `CLOCPrompterConfig`, *optional*): the new Prompter's settings
            (e.g. ``{"pooling": "all"}``); defaults to CLOC's.
        atol: tolerance of the parity check run before returning.
        **from_pretrained_kwargs: passed to ``CLIPModel.from_pretrained`` (``revision``, ``dtype``...).

    Raises:
        ConversionError: incomplete source checkpoint, unmapped weights, or failed parity.
    """
    clip_model = load_hf_clip(src, **from_pretrained_kwargs)
    cloc_model = cloc_from_clip_model(clip_model, prompter_config)
    check_parity(clip_model, cloc_model, atol=atol)
    return cloc_model


# --------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------

# Per-block renames, open_clip ResidualAttentionBlock -> CLIPEncoderLayer (in_proj is split separately).
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Text keys are given relative to the text tower (CLIP: top level; CustomTextCLIP: under `text.`).
_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# open_clip stores projections as (width, embed_dim) matrices used as `x @ proj`; nn.Linear wants the transpose.
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
# Keys that carry no weights: OpenAI JIT metadata and causal-mask buffers of older open_clip versions.
_IGNORED_KEYS = re.compile(r"^(input_resolution|context_length|vocab_size|(text\.)?attn_mask)$")
# Key fragments of unsupported variants -> what to tell the user.
_UNSUPPORTED_KEYS = (
    ("visual.attn_pool", "attentional pooling in the image tower (CoCa / attentional_pool)"),
    ("text_decoder.", "CoCa's multimodal text decoder"),
    ("visual.trunk.", "a timm image tower"),
    ("visual.head.", "a timm image tower"),
    ("visual.layer1.", "a ModifiedResNet image tower"),
    ("visual.attnpool.", "a ModifiedResNet image tower"),
    ("text.transformer.embeddings.", "a Hugging Face text tower (hf_model_name)"),
    ("text.proj", "a Hugging Face text tower (hf_model_name)"),
    ("logit_bias", "a SigLIP model (logit_bias, sigmoid loss)"),
    ("cls_emb", "a text class token (embed_cls)"),
    (".ls_1.", "layer scale (ls_init_value)"),
    (".ls_2.", "layer scale (ls_init_value)"),
    (".ln_attn.", "custom attention blocks (scale_attn)"),
    (".ln_inner.", "custom attention blocks (scale_attn_inner)"),
    (".ln_q.", "custom attention blocks (qk_norm)"),
    (".head_scale", "custom attention blocks (scale_heads)"),
    ("text_projection.bias", "a text projection with a bias (proj_bias)"),
)

# open_clip config keys: those we read, those that do not change the inference of a supported model,
# and switches of unsupported variants with the value that keeps the model supported.
_VISION_USED = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "norm_kwargs", "pos_embed_type"}
_VISION_HARMLESS = {
    "patch_dropout", "output_tokens", "final_ln_after_pool", "attn_pooler_queries", "attn_pooler_heads",
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
}  # fmt: skip
_TEXT_USED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs", "pool_type", "eos_id"}
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


def _is_default(value, default) -> bool:
    if default is None or default is False:  # off: None, False, {}, "" (and block_type "default")
        return not value or value == "default"
    return value == default


def _check_section(name: str, cfg: Mapping, used: set, harmless: set, switches: dict) -> list[str]:
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
        problems.append("text_cfg.pool_type='eos' with eos_id=2 (Hugging Face CLIP reads eos_token_id=2 as argmax)")
    if problems:
        raise ConversionError("unsupported open_clip model: " + "; ".join(problems))


def _square(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def cloc_config_from_open_clip(model_cfg: Mapping, prompter_config=None) -> CLOCConfig:
    """The :class:`CLOCConfig` of an open_clip ViT CLIP model config (open_clip's defaults filled in)."""
    check_open_clip_config(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"  # open_clip: nn.GELU, exact erf form
    v_width, t_width = int(vision.get("width", 768)), int(text.get("width", 512))
    head_width = int(vision.get("head_width", 64))
    if v_width % head_width:
        raise ConversionError(f"vision_cfg.width={v_width} is not a multiple of head_width={head_width}")
    vocab_size = int(text.get("vocab_size", 49408))
    eos = int(text["eos_id"]) if text.get("pool_type", "argmax") == "eos" else vocab_size - 1
    return CLOCConfig(
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=int(v_width * float(vision.get("mlp_ratio", 4.0))),  # open_clip's int(d * ratio)
            num_hidden_layers=int(vision.get("layers", 12)),
            num_attention_heads=v_width // head_width,
            image_size=_square(vision.get("image_size", 224)),
            patch_size=_square(vision.get("patch_size", 16)),
            hidden_act=act,
            layer_norm_eps=float((vision.get("norm_kwargs") or {}).get("eps", 1e-5)),
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=t_width,
            intermediate_size=int(t_width * float(text.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(text.get("layers", 12)),
            num_attention_heads=int(text.get("heads", 8)),
            max_position_embeddings=int(text.get("context_length", 77)),
            hidden_act=act,
            layer_norm_eps=float((text.get("norm_kwargs") or {}).get("eps", 1e-5)),
            eos_token_id=eos,  # see the module docstring: agrees with open_clip's argmax pooling
            bos_token_id=vocab_size - 2,  # CLIP's layout (start-of-text just before end-of-text); unused by the model
            pad_token_id=int(text.get("pad_id", 0)),
        ),
        prompter_config=_prompter_dict(prompter_config),
        projection_dim=int(model_cfg["embed_dim"]),
        logit_scale_init_value=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: ``.safetensors``, or ``.bin``/``.pt``/``.pth`` with
    ``torch.load(weights_only=True)`` (never full unpickling). open_clip training checkpoints
    (``{"state_dict": ...}``, ``module.`` prefixes from DDP) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types; none of them is recoverable here
            raise ConversionError(
                f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {err}). "
                "TorchScript archives (OpenAI's original .pt files) and pickled models are not accepted: "
                "save the model's state_dict() to .safetensors first"
            ) from err
    else:
        raise ConversionError(f"unsupported checkpoint format {path.suffix!r}: use .safetensors (or .bin/.pt)")
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _text_prefix(state_dict: Mapping) -> str:
    return "text." if "text.token_embedding.weight" in state_dict else ""


def _map_key(name: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """CLOC tensors for one open_clip key (text keys relative to the text tower), or None if unknown."""
    if name in _RENAMES:
        return {_RENAMES[name]: value}
    if name in _PROJECTIONS:
        return {_PROJECTIONS[name]: value.t().contiguous()} if value.ndim == 2 else None
    if name == "logit_scale":
        return {"logit_scale": value.reshape(())} if value.numel() == 1 else None
    match = _BLOCK_KEY.match(name)
    if match is None:
        return None
    visual, layer, rest = match.groups()
    prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        parts = value.chunk(3, dim=0)  # rows [q; k; v], as nn.MultiheadAttention packs them
        return {f"{prefix}self_attn.{p}.{kind}": t.contiguous() for p, t in zip(("q_proj", "k_proj", "v_proj"), parts)}
    module, _, kind = rest.rpartition(".")
    if module in _BLOCK_RENAMES and kind in ("weight", "bias"):
        return {f"{prefix}{_BLOCK_RENAMES[module]}.{kind}": value}
    return None


def map_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViT CLIP keys -> ``CLIPModel`` (and so CLOC) keys; every key must be accounted for.

    ``attn.in_proj_weight/bias`` become ``q_proj``/``k_proj``/``v_proj``; ``visual.proj`` and
    ``text_projection`` are transposed; ``logit_scale`` becomes a scalar. The text tower may sit at the
    top level (``CLIP``) or under ``text.`` (``CustomTextCLIP`` with open_clip's own text transformer).
    Raises :class:`ConversionError` naming unsupported variants, or listing any key left over.
    """
    text_prefix = _text_prefix(state_dict)
    mapped: dict[str, torch.Tensor] = {}
    leftover = []
    for key, value in state_dict.items():
        if _IGNORED_KEYS.match(key):
            continue
        name = key
        if text_prefix:
            # CustomTextCLIP: the text tower lives under `text.`; nothing else may claim a text key
            if key.startswith(text_prefix):
                name = key[len(text_prefix) :]
            elif not key.startswith("visual.") and key != "logit_scale":
                name = "<outside the text tower>"
        target = None if name.startswith("visual.") and key.startswith(text_prefix or "\0") else _map_key(name, value)
        if target is None or set(target) & set(mapped):
            leftover.append(key)
        else:
            mapped.update(target)
    if leftover:
        reasons = sorted({why for fragment, why in _UNSUPPORTED_KEYS for key in leftover if fragment in key})
        what = f"unsupported open_clip variant: {'; '.join(reasons)}. " if reasons else ""
        raise ConversionError(f"{what}{len(leftover)} open_clip keys cannot be mapped: {_preview(leftover)}")
    return mapped


class OpenCLIPReference:
    """open_clip's ViT CLIP forward, written directly over its state-dict layout (no open_clip import).

    The independent side of the open_clip parity check: fused ``in_proj`` attention, ``x @ proj``
    projections, a causal text mask, and pooling at the argmax of the token ids, as open_clip computes
    them. ``get_image_features`` / ``get_text_features`` mirror ``CLIPModel``'s (``last_hidden_state``
    of the image output is the ViT's tokens before ``ln_post``, as Hugging Face returns them).
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping, dtype=torch.float32):
        check_open_clip_config(model_cfg)
        self.sd = {k: v.to(dtype) for k, v in state_dict.items() if v.is_floating_point()}
        self.text_prefix = _text_prefix(state_dict)
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        self.vision_heads = int(vision.get("width", 768)) // int(vision.get("head_width", 64))
        self.text_heads = int(text.get("heads", 8))
        self.patch_size = _square(vision.get("patch_size", 16))
        self.vision_eps = float((vision.get("norm_kwargs") or {}).get("eps", 1e-5))
        self.text_eps = float((text.get("norm_kwargs") or {}).get("eps", 1e-5))
        self.pool_eos = int(text["eos_id"]) if text.get("pool_type", "argmax") == "eos" else None
        self.quick_gelu = bool(model_cfg.get("quick_gelu", False))
        self.dtype, self.device = dtype, torch.device("cpu")
        self.logit_scale = self.sd["logit_scale"]

    def _layer_norm(self, x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], self.sd[prefix + ".weight"], self.sd[prefix + ".bias"], eps)

    def _block(self, x, prefix, heads, eps, causal):
        sd = self.sd
        batch, length, width = x.shape
        h = self._layer_norm(x, prefix + "ln_1", eps)
        qkv = F.linear(h, sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"])
        q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in qkv.split(width, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(attn, sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"])
        h = F.linear(self._layer_norm(x, prefix + "ln_2", eps), sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return x + F.linear(h, sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])

    def _blocks(self, x, tower_prefix, heads, eps, causal):
        layer = 0
        while f"{tower_prefix}transformer.resblocks.{layer}.ln_1.weight" in self.sd:
            x = self._block(x, f"{tower_prefix}transformer.resblocks.{layer}.", heads, eps, causal)
            layer += 1
        return x

    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        sd = self.sd
        patches = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=self.patch_size)  # (B, d, g, g)
        x = patches.flatten(2).transpose(1, 2)
        cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
        x = self._layer_norm(x, "visual.ln_pre", self.vision_eps)
        x = self._blocks(x, "visual.", self.vision_heads, self.vision_eps, causal=False)
        pooled = self._layer_norm(x[:, 0], "visual.ln_post", self.vision_eps) @ sd["visual.proj"]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> BaseModelOutputWithPooling:
        # open_clip applies no padding mask: the causal mask keeps tokens after end-of-text out of its output
        p = self.text_prefix
        x = F.embedding(input_ids, self.sd[p + "token_embedding.weight"])
        x = x + self.sd[p + "positional_embedding"][: input_ids.shape[1]]
        x = self._blocks(x, p, self.text_heads, self.text_eps, causal=True)
        x = self._layer_norm(x, p + "ln_final", self.text_eps)
        if self.pool_eos is None:
            index = input_ids.argmax(dim=-1)
        else:
            index = (input_ids == self.pool_eos).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0]), index] @ self.sd[p + "text_projection"]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


def convert_open_clip(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path,
    model_cfg: Mapping,
    prompter_config=None,
    atol: float = DEFAULT_ATOL,
) -> CLOCModel:
    """Convert an open_clip ViT CLIP into a float32 :class:`CLOCModel`, checked against
    :class:`OpenCLIPReference` before returning.

    Args:
        state_dict_or_path: the state dict, or a ``.safetensors`` (preferred) / ``.bin`` / ``.pt`` file.
        model_cfg: open_clip's model config json as a dict (``embed_dim``, ``vision_cfg``, ``text_cfg``,
            ``quick_gelu``; open_clip's defaults fill in missing fields). An hf-hub
            ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) is accepted too.
        prompter_config (`dict` or `CLOCPrompterConfig`, *optional*): the new Prompter's settings.
        atol: tolerance of the parity check.

    Raises:
        ConversionError: unsupported variant (see the module docstring), unmapped keys, failed parity.
    """
    model, reference = open_clip_model_and_reference(state_dict_or_path, model_cfg, prompter_config)
    check_parity(reference, model, atol=atol)
    return model


def open_clip_model_and_reference(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path, model_cfg: Mapping, prompter_config=None
) -> tuple[CLOCModel, OpenCLIPReference]:
    """The converted model (not yet parity-checked) and the reference to check it against."""
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    if isinstance(state_dict_or_path, Mapping):
        state_dict = dict(state_dict_or_path)
    else:
        state_dict = load_state_dict_file(state_dict_or_path)
    cloc_model = CLOCModel(cloc_config_from_open_clip(model_cfg, prompter_config))
    load_clip_weights(cloc_model, map_open_clip_state_dict(state_dict))
    return cloc_model.eval(), OpenCLIPReference(state_dict, model_cfg)


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------


def _source_json(source: str, filename: str, hub_kwargs: dict) -> dict | None:
    from transformers.utils import cached_file

    try:
        path = cached_file(
            source, filename, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )  # fmt: skip
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def _source_image_stats(source: str, hub_kwargs: dict) -> dict:
    """``image_mean`` / ``image_std`` of a source's CLIP image processor, if it ships one."""
    for filename, nested in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        data = _source_json(source, filename, hub_kwargs)
        if data and nested:
            data = data.get(nested)
        if data and "image_mean" in data and "image_std" in data:
            return {"image_mean": data["image_mean"], "image_std": data["image_std"]}
    return {}


def build_processor(
    config: CLOCConfig,
    source: str | Path | None = None,
    tokenizer: str | Path | None = None,
    resize_mode: str = "pad",
    image_stats: dict | None = None,
    **hub_kwargs,
):
    """The :class:`~cloc_hf.processing_cloc.CLOCProcessor` to save beside a converted model.

    The image side is a ``CLOCImageProcessor`` at the ViT's image size, with the source's mean and std
    when ``source`` ships a CLIP image-processor config (else ``image_stats``, else OpenAI's).
    ``resize_mode`` defaults to CLOC's ``"pad"``; CLIP's own preprocessing is ``"center_crop"``.
    The tokenizer is ``tokenizer`` (must load), else the source's own (when it has one), else the offline
    OpenAI CLIP tokenizer. It must fit the text tower's vocabulary and end texts with the token the text
    tower pools at (``eos_token_id``); :class:`ConversionError` otherwise.
    """
    from transformers import AutoTokenizer

    from .image_processing_cloc import CLOCImageProcessor
    from .processing_cloc import CLOCProcessor

    text = config.text_config
    stats = dict(image_stats or {})
    if source is not None:
        stats = _source_image_stats(str(source), hub_kwargs) or stats
    tok = None
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer), **hub_kwargs)
    elif source is not None:
        try:
            tok = AutoTokenizer.from_pretrained(str(source), **hub_kwargs)
        except (OSError, ValueError) as err:
            logger.info("no tokenizer found with %s (%s); using the offline CLIP tokenizer", source, err)
    size = config.vision_config.image_size
    if tok is None:
        processor = CLOCProcessor.offline(
            size=size, resize_mode=resize_mode, model_max_length=text.max_position_embeddings, **stats
        )
    else:
        image_processor = CLOCImageProcessor(size=size, resize_mode=resize_mode, **stats)
        processor = CLOCProcessor(image_processor=image_processor, tokenizer=tok)
    _check_tokenizer(processor.tokenizer, text)
    return processor


def _check_tokenizer(tok, text: CLOCTextConfig) -> None:
    if len(tok) > text.vocab_size:
        raise ConversionError(
            f"the tokenizer has {len(tok)} tokens but the text tower only {text.vocab_size}: pass a matching "
            "tokenizer (--tokenizer) or skip the processor (--no-processor)"
        )
    if text.eos_token_id != 2 and tok.eos_token_id != text.eos_token_id:  # 2: legacy argmax pooling
        raise ConversionError(
            f"the tokenizer's eos_token_id={tok.eos_token_id} differs from the text tower's "
            f"eos_token_id={text.eos_token_id} (where text features are pooled): pass a matching tokenizer "
            "(--tokenizer) or skip the processor (--no-processor)"
        )


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_converted(
    model: CLOCModel,
    out_dir: str | Path,
    processor=None,
    *,
    reference,
    atol: float = DEFAULT_ATOL,
    overwrite: bool = False,
) -> dict:
    """Check parity against ``reference``, then write ``model`` (safetensors) and a processor.

    Nothing is written unless :func:`check_parity` passes. After writing, the directory is reloaded
    with ``CLOCModel.from_pretrained`` and compared tensor for tensor with ``model``.

    Args:
        model: the converted model.
        out_dir: target directory; must be empty or absent unless ``overwrite``.
        processor: saved beside the model; ``None`` builds the default with :func:`build_processor`,
            ``False`` saves no processor.
        reference: the source model (``CLIPModel`` or :class:`OpenCLIPReference`).
        atol: parity tolerance.

    Returns:
        the parity check's ``{name: max |difference|}``.
    """
    diffs = check_parity(reference, model, atol=atol)
    out_dir = _check_out_dir(out_dir, overwrite)
    if processor is None:
        processor = build_processor(model.config)
    model.save_pretrained(out_dir)
    if processor is not False:
        processor.save_pretrained(out_dir)
    _verify_saved(model, out_dir)
    return diffs


def _check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    return out_dir


def _verify_saved(model: CLOCModel, out_dir: Path) -> None:
    if list(out_dir.glob("*.bin")) or not list(out_dir.glob("*.safetensors")):
        raise ConversionError(f"{out_dir} should hold safetensors weights only")
    reloaded = CLOCModel.from_pretrained(out_dir, dtype=model.dtype).to(model.device)
    expected, actual = model.state_dict(), reloaded.state_dict()
    wrong = [k for k in expected if k not in actual or not torch.equal(expected[k], actual[k])]
    if wrong or set(actual) - set(expected):
        raise ConversionError(f"the model saved to {out_dir} does not reload identically: {_preview(wrong)}")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloc-convert",
        description="Convert a CLIP checkpoint into a CLOC model (CLIP towers copied, Prompter and box head "
        "freshly initialised). Nothing is saved unless the converted model reproduces the source's image "
        "and text embeddings to --atol.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf-clip", metavar="SRC", help="Hugging Face CLIPModel: hub id or local directory")
    source.add_argument("--from-open-clip", metavar="STATE_DICT", help="open_clip state dict (.safetensors, .bin, .pt)")
    parser.add_argument(
        "--open-clip-config",
        metavar="CFG.json",
        help="open_clip model config json (e.g. open_clip/model_configs/ViT-B-16.json, or an hf-hub "
        "open_clip_config.json); required with --from-open-clip",
    )
    parser.add_argument("--out", required=True, metavar="DST", help="output directory (empty or absent)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="parity tolerance (default: %(default)g)")
    parser.add_argument("--pooling", choices=("prompt", "all"), default=None, help="Prompter pooling (default: CLOC's)")
    parser.add_argument(
        "--resize-mode",
        choices=("pad", "center_crop"),
        default="pad",
        help="processor resize mode: CLOC's pad-to-square (default) or CLIP's center crop",
    )
    parser.add_argument("--tokenizer", metavar="TOK", help="tokenizer to save (default: the source's, else OpenAI CLIP's)")
    parser.add_argument("--no-processor", action="store_true", help="save the model only")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return parser


def _convert_for_cli(args) -> tuple[CLOCModel, Any, Any]:
    """(model, reference, processor) for the parsed arguments."""
    prompter_config = {"pooling": args.pooling} if args.pooling else None
    tokenizer = args.tokenizer
    if args.from_hf_clip:
        reference = load_hf_clip(args.from_hf_clip)
        model = cloc_from_clip_model(reference, prompter_config)
        source, stats = args.from_hf_clip, None
    else:
        model_cfg = json.loads(Path(args.open_clip_config).read_text())
        preprocess = model_cfg.get("preprocess_cfg", {})
        model, reference = open_clip_model_and_reference(args.from_open_clip, model_cfg, prompter_config)
        # non-CLIP tokenizers are named in the config (loaded from the hub unless --tokenizer is given)
        tokenizer = tokenizer or model_cfg.get("model_cfg", model_cfg)["text_cfg"].get("hf_tokenizer_name")
        source = None
        stats = {k: preprocess[k] for k in ("image_mean", "image_std") if k in preprocess} or None
    processor = False
    if not args.no_processor:
        processor = build_processor(
            model.config, source=source, tokenizer=tokenizer, resize_mode=args.resize_mode, image_stats=stats
        )
    return model, reference, processor


def main(argv: list[str] | None = None) -> int:
    """``cloc-convert``: see the module docstring. Returns the exit status (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_open_clip and not args.open_clip_config:
        parser.error("--from-open-clip needs --open-clip-config")
    if args.from_hf_clip and args.open_clip_config:
        parser.error("--open-clip-config only applies to --from-open-clip")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_out_dir(args.out, args.overwrite)  # fail before a long conversion, not after
        model, reference, processor = _convert_for_cli(args)
        diffs = save_converted(model, args.out, processor, reference=reference, atol=args.atol, overwrite=args.overwrite)
    except (ConversionError, OSError) as err:  # OSError: missing files, unreachable hub, non-empty --out
        print(f"cloc-convert: error: {err}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{name} {d:.1e}" for name, d in diffs.items())
    print(f"saved {args.out} (parity max |diff|: {summary}; atol {args.atol:g})")
    return 0


__all__ = [
    "ConversionError",
    "OpenCLIPReference",
    "build_processor",
    "check_open_clip_config",
    "check_parity",
    "cloc_config_from_clip_config",
    "cloc_config_from_open_clip",
    "cloc_from_clip_model",
    "convert_hf_clip",
    "convert_open_clip",
    "load_clip_weights",
    "load_hf_clip",
    "load_state_dict_file",
    "make_parity_inputs",
    "map_open_clip_state_dict",
    "open_clip_model_and_reference",
    "save_converted",
]


if __name__ == "__main__":
    sys.exit(main())

