"""open_clip ViT CLIP checkpoints -> CLOC: reading the checkpoint file, renaming every key to
``CLIPModel``'s layout, and the conversion entry points (checked against
:class:`~cloc_hf.convert.open_clip_reference.OpenCLIPReference`). Which configs are supported is
decided in :mod:`cloc_hf.convert.open_clip_config`; weights of unsupported variants are refused here
by key. Converted models are float32 (half-precision weights are upcast exactly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..modeling_cloc import CLOCModel
from .common import DEFAULT_ATOL, ConversionError, cloc_model_with_clip_weights, preview
from .open_clip_config import cloc_config_from_open_clip, unwrap_model_cfg
from .open_clip_reference import OpenCLIPReference, text_tower_prefix
from .parity import check_parity

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
        raise ConversionError(
            f"unsupported checkpoint format {path.suffix!r}: use .safetensors (or .bin/.pt)"
        )
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


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
        return {
            f"{prefix}self_attn.{p}.{kind}": t.contiguous()
            for p, t in zip(("q_proj", "k_proj", "v_proj"), parts)
        }
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
    text_prefix = text_tower_prefix(state_dict)
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
        target = (
            None
            if name.startswith("visual.") and key.startswith(text_prefix or "\0")
            else _map_key(name, value)
        )
        if target is None or set(target) & set(mapped):
            leftover.append(key)
        else:
            mapped.update(target)
    if leftover:
        reasons = sorted({why for fragment, why in _UNSUPPORTED_KEYS for key in leftover if fragment in key})
        what = f"unsupported open_clip variant: {'; '.join(reasons)}. " if reasons else ""
        raise ConversionError(f"{what}{len(leftover)} open_clip keys cannot be mapped: {preview(leftover)}")
    return mapped


def open_clip_model_and_reference(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path, model_cfg: Mapping, prompter_config=None
) -> tuple[CLOCModel, OpenCLIPReference]:
    """The converted model (not yet parity-checked) and the reference to check it against; arguments
    as for :func:`convert_open_clip`."""
    model_cfg = unwrap_model_cfg(model_cfg)
    if isinstance(state_dict_or_path, Mapping):
        state_dict = dict(state_dict_or_path)
    else:
        state_dict = load_state_dict_file(state_dict_or_path)
    config = cloc_config_from_open_clip(model_cfg, prompter_config)
    cloc_model = cloc_model_with_clip_weights(config, map_open_clip_state_dict(state_dict))
    return cloc_model, OpenCLIPReference(state_dict, model_cfg)


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
        prompter_config (`dict` or `CLOCPrompterConfig`, *optional*): the new Prompter's settings;
            defaults to CLOC's.
        atol: tolerance of the parity check (default 1e-5).

    Raises:
        ConversionError: unsupported variant (see :mod:`cloc_hf.convert.open_clip_config`), unmapped
            keys, failed parity.
    """
    model, reference = open_clip_model_and_reference(state_dict_or_path, model_cfg, prompter_config)
    check_parity(reference, model, atol=atol)
    return model
