"""The numerical check every conversion must pass: the source and the CLOC model run on the same
deterministic random images and token sequences, and their embeddings must agree to a tolerance."""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..configuration_cloc import CLOCConfig
from ..modeling_cloc import CLOCModel
from .common import DEFAULT_ATOL, ConversionError


def make_parity_inputs(config: CLOCConfig, num_images: int = 2, num_texts: int = 4, seed: int = 0) -> dict:
    """Deterministic random inputs for :func:`check_parity` (defaults: 2 images, 4 texts, seed 0).

    ``pixel_values (num_images, C, S, S)`` at the ViT's image size; ``input_ids (num_texts, L)`` of valid
    ids with exactly one end-of-text token per sequence, at different positions (so a pooling at the
    wrong position shows), padded after it with end-of-text tokens (as CLIP tokenizers pad) and masked
    out in ``attention_mask``.
    """
    vision, text = config.vision_config, config.text_config
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(
        num_images, vision.num_channels, vision.image_size, vision.image_size, generator=gen
    )
    # legacy configs (eos_token_id == 2) pool at the argmax of the ids: the highest id plays end-of-text
    eos = text.vocab_size - 1 if text.eos_token_id == 2 else text.eos_token_id
    if eos is None or not 0 <= eos < text.vocab_size:
        raise ConversionError(
            f"text eos_token_id={text.eos_token_id} is not an id of the {text.vocab_size}-token vocabulary"
        )
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
    """max |a - b| in float64 (so the comparison adds no rounding); inf for a shape mismatch, nan if
    anything is not finite (so that it fails every tolerance)."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    return float(diff.max()) if torch.isfinite(diff).all() else math.nan


@torch.no_grad()
def _features(model, inputs: dict) -> dict[str, torch.Tensor]:
    """The tensors :func:`check_parity` compares, from ``model``'s CLIPModel-style feature methods."""
    device, dtype = model.device, model.dtype
    image = model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype))
    text = model.get_text_features(
        input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
    )
    for output in (image, text):
        if not isinstance(output, BaseModelOutputWithPooling):  # transformers < 5 returned the tensor
            raise ConversionError(
                f"get_*_features of {type(model).__name__} returned {type(output).__name__}"
            )
    return {
        "image_embeds": image.pooler_output,
        "image_tokens": image.last_hidden_state,
        "text_embeds": text.pooler_output,
        "logit_scale": model.logit_scale.reshape(()),
    }


def check_parity(
    reference, cloc_model: CLOCModel, atol: float = DEFAULT_ATOL, inputs: dict | None = None
) -> dict:
    """Compare a source model with its CLOC conversion; raise :class:`ConversionError` above ``atol``.

    Args:
        reference: the source, with CLIPModel's ``get_image_features`` / ``get_text_features`` (returning
            ``BaseModelOutputWithPooling``), ``logit_scale``, ``device`` and ``dtype``: a ``CLIPModel`` or
            an :class:`~cloc_hf.convert.open_clip_reference.OpenCLIPReference`.
        cloc_model: the converted model.
        atol: largest allowed absolute difference, per compared tensor (default ``DEFAULT_ATOL``, 1e-5).
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
        detail = ", ".join(
            f"{name} max |diff| = {d:.3e} (tolerance {tolerance[name]:.1e})" for name, d in failed.items()
        )
        raise ConversionError(f"parity check failed (atol={atol:g}): {detail}")
    return diffs
