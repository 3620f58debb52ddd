"""``LlavaForConditionalGeneration`` with region tokens: each ``<region>`` in the text becomes a region feature.

:class:`CLOCLlavaForConditionalGeneration` takes, next to LLaVA's inputs, per-sample region prompts
(``region_boxes``: one ``(n_i, 4)`` tensor of normalised xyxy boxes in the tower's input frame per
sample, the form of :mod:`cloc_hf.prompts`; optionally ``region_points``). One tower pass per
image serves both the image tokens (``hidden_states[vision_feature_layer]``) and the region encoder
(``hidden_states[region_feature_layer]``): CLOC's Prompter, or RoI-Align over the patch tokens for
towers without one. The region features go through a region projector (an MLP, like the image
projector) into the language model's width and replace the ``<region>`` token embeddings in order:
the k-th ``<region>`` of sample ``i`` takes sample ``i``'s k-th prompt (its boxes first, then its
points). In ``generate`` the regions are injected in the prefill step only.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from cloc_hf.box_ops import grid_side, roi_align_patch_tokens, validate_boxes, validate_points
from cloc_hf.configuration_cloc import CLOCVisionConfig
from cloc_hf.modeling_prompter import CLOCPositionEncoding, CLOCPrompter
from cloc_hf.modeling_vision import CLOCVisionModel
from cloc_hf.prompts import flatten_per_image

from .configuration_llava import CLOCLlavaConfig
from .remote_code import SelfContainedCodeMixin

REGION_INPUTS = ("region_boxes", "region_points")
"""Forward arguments that carry region prompts; dropped after the prefill step of ``generate``."""


class CLOCLlavaRegionProjector(nn.Module):
    """MLP from region features to the language model's width (``depth`` linear layers, activation between)."""

    def __init__(self, in_features: int, config: CLOCLlavaConfig):
        super().__init__()
        out = config.text_config.hidden_size
        hidden = config.region_projector_hidden_size or out
        widths = [in_features] + [hidden] * (config.region_projector_depth - 1) + [out]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(ACT2FN[config.region_projector_hidden_act])
            layers.append(nn.Linear(a, b))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class CLOCLlavaRegionEncoder(nn.Module):
    """Region features from the tower's tokens, projected into the language model's width.

    With ``config.prompter_config``: CLOC's Prompter over the ``(B, 1 + N, d)`` tokens (class token
    first), output ``prompter_projection_dim`` wide. Without: the mean RoI-Align feature of each box
    over the patch grid (a point reads the patch cell around it), ``d`` wide.
    """

    def __init__(self, config: CLOCLlavaConfig):
        super().__init__()
        vision_hidden = config.vision_config.hidden_size
        self.roi_output_size = config.roi_output_size
        if config.prompter_config is not None:
            self.prompter = CLOCPrompter(config.prompter_config, vision_hidden, config.prompter_projection_dim)
            width = config.prompter_projection_dim
        else:
            self.prompter = None
            width = vision_hidden
        self.projector = CLOCLlavaRegionProjector(width, config)

    def _pool(self, tokens: torch.Tensor, image_index: torch.Tensor, boxes=None, points=None) -> torch.Tensor:
        """``(R, width)`` unprojected region features of one prompt kind."""
        if self.prompter is not None:
            return self.prompter(tokens, image_index, boxes=boxes, points=points)
        patches = tokens if math.isqrt(tokens.shape[1]) ** 2 == tokens.shape[1] else tokens[:, 1:]  # drop a class token
        if points is not None:
            half = 0.5 / grid_side(patches.shape[1])
            boxes = torch.cat([points - half, points + half], dim=-1).clamp(0, 1)
        return roi_align_patch_tokens(patches, boxes.to(patches.dtype), image_index, output_size=self.roi_output_size)

    def forward(self, tokens: torch.Tensor, boxes=None, points=None) -> tuple[torch.Tensor, list[int]]:
        """Projected region features ``(R, text_hidden)``, sample 0's first (each sample's boxes, then its
        points), and the number of prompts per sample."""
        batch = tokens.shape[0]
        per_kind = []
        for name, prompts, validate in (("region_boxes", boxes, validate_boxes), ("region_points", points, validate_points)):
            if prompts is None:
                continue
            flat = flatten_per_image(prompts, batch, name, validate, device=tokens.device)
            kind = {"boxes" if name == "region_boxes" else "points": flat.values.to(tokens.dtype)}
            per_kind.append((self._pool(tokens, flat.image_index, **kind), flat.counts))
        if not per_kind:
            raise ValueError("give region_boxes and/or region_points")
        if len(per_kind) == 1:
            features, counts = per_kind[0]
        else:  # interleave per sample: sample i's boxes, then its points
            (fb, cb), (fp, cp) = per_kind
            parts = [t for pair in zip(fb.split(cb), fp.split(cp)) for t in pair]
            features, counts = torch.cat(parts, dim=0), [a + b for a, b in zip(cb, cp)]
        return self.projector(features), counts


class CLOCLlavaPreTrainedModel(SelfContainedCodeMixin, LlavaPreTrainedModel):
    """LLaVA's init, plus the Prompter's position-code buffers (lost when a model is built on the meta device)."""

    config: CLOCLlavaConfig
    config_class = CLOCLlavaConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLOCPositionEncoding):
            if module.kind == "sinusoidal":
                init.copy_(module.frequencies, module.sinusoidal_frequencies())
            else:
                init.normal_(module.frequencies, std=module.temperature**0.5)


def _build_tower(vision_config) -> nn.Module:
    """``AutoModel.from_config(vision_config)``, except that a CLOC tower is built by its class: in a folder
    loaded with ``trust_remote_code`` the CLOC classes are copies that transformers' registry does not know."""
    if getattr(vision_config, "model_type", None) == CLOCVisionConfig.model_type:
        return CLOCVisionModel._from_config(vision_config)
    return AutoModel.from_config(vision_config)


class CLOCLlavaModel(CLOCLlavaPreTrainedModel, LlavaModel):
    """``LlavaModel`` + :class:`CLOCLlavaRegionEncoder` (``region_encoder``)."""

    region_encoder_every_step = False
    """Run the region encoder in every forward pass with an image, also without region prompts (then on a
    whole-image box of the first image, its features added times zero: output unchanged, zero gradients).
    Default off (no wasted work); distributed training turns it on so that every rank runs the same
    modules at every step: DeepSpeed ZeRO-3 gathers a module's partitioned weights when it runs and ZeRO-2
    reduces gradients in buckets, so a rank without regions would skip collective calls another makes."""

    def __init__(self, config: CLOCLlavaConfig):
        CLOCLlavaPreTrainedModel.__init__(self, config)  # LlavaModel.__init__'s body, plus the region encoder
        self.vision_tower = _build_tower(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.region_encoder = CLOCLlavaRegionEncoder(config)
        self.post_init()

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        """``LlavaModel.get_image_features`` with every hidden state kept, so the region encoder reads its
        layer from the same tower pass (``image_outputs.hidden_states``)."""
        kwargs["output_hidden_states"] = True
        return super().get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    def get_region_features(self, image_outputs, region_boxes=None, region_points=None) -> tuple[torch.Tensor, list[int]]:
        """Projected region features ``(R, text_hidden)`` and per-sample counts, from a tower pass's outputs
        (what :meth:`get_image_features` returns); no tower pass of its own."""
        hidden_states = getattr(image_outputs, "hidden_states", None)
        layer = self.config.resolved_region_feature_layer
        tokens = hidden_states[layer] if hidden_states is not None else None
        if tokens is None:
            raise ValueError(
                f"the tower outputs hold no hidden_states[{layer}] for the region encoder; encode images with "
                "CLOCLlavaModel.get_image_features (it keeps all hidden states)"
            )
        return self.region_encoder(tokens, boxes=region_boxes, points=region_points)

    def _region_mask(self, input_ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``(B, L)`` bool mask of ``<region>`` tokens, after checking their number per sample against the prompts."""
        if self.config.region_token_id is None:
            raise ValueError("region prompts were given but config.region_token_id is not set")
        mask = input_ids == self.config.region_token_id
        found = mask.sum(dim=1).tolist()
        for i, (n_tokens, n_prompts) in enumerate(zip(found, counts)):
            if n_tokens != n_prompts:
                raise ValueError(
                    f"sample {i} has {n_tokens} <region> tokens in input_ids but {n_prompts} region prompts "
                    "(boxes + points); each <region> token takes one prompt, in order"
                )
        return mask

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        mm_encoder_outputs=None,
        region_boxes=None,
        region_points=None,
        **kwargs,
    ) -> tuple | LlavaModelOutputWithPast:
        """``LlavaModel.forward`` plus ``region_boxes`` / ``region_points`` (see the module docstring)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        encoded = dict(mm_encoder_outputs or {})
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **kwargs,
            )
        image_outputs = encoded.get("image")
        if image_outputs is not None:
            image_features = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
        inputs_embeds = self._insert_regions(input_ids, inputs_embeds, image_outputs, region_boxes, region_points)
        outputs = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs
        )
        return LlavaModelOutputWithPast(**outputs, image_outputs=image_outputs)

    def _insert_regions(self, input_ids, inputs_embeds, image_outputs, region_boxes, region_points) -> torch.Tensor:
        """Replace the ``<region>`` embeddings by the projected region features (prefill / training only)."""
        if region_boxes is None and region_points is None:
            if image_outputs is not None and input_ids is not None and self.config.region_token_id is not None:
                self._region_mask(input_ids, [0] * input_ids.shape[0])  # <region> tokens without prompts raise
            if self.region_encoder_every_step and image_outputs is not None:
                images, device = image_outputs.hidden_states[0].shape[0], inputs_embeds.device
                boxes = [torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)]
                boxes += [torch.zeros(0, 4, device=device)] * (images - 1)
                features, _ = self.get_region_features(image_outputs, region_boxes=boxes)
                inputs_embeds = inputs_embeds + features.sum().to(inputs_embeds.dtype) * 0
            return inputs_embeds
        if image_outputs is None:
            raise ValueError("region prompts need the image: pass pixel_values (or mm_encoder_outputs) with them")
        if input_ids is None:
            raise ValueError("region prompts need input_ids, which mark where the <region> tokens are")
        features, counts = self.get_region_features(image_outputs, region_boxes, region_points)
        mask = self._region_mask(input_ids, counts)
        return inputs_embeds.masked_scatter(mask[..., None], features.to(inputs_embeds.device, inputs_embeds.dtype))


class CLOCLlavaForConditionalGeneration(CLOCLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose ``<region>`` tokens take region features.

    Example::

        model = CLOCLlavaForConditionalGeneration.from_cloc_and_llava(cloc_dir, text_config=llm_config,
                                                                      image_token_id=..., region_token_id=...)
        inputs = processor(images=[image], text=["<image> what is in <region>?"], boxes=[[[10, 20, 200, 240]]])
        out = model.generate(**inputs, max_new_tokens=20)
    """

    def __init__(self, config: CLOCLlavaConfig):
        CLOCLlavaPreTrainedModel.__init__(self, config)  # LlavaForConditionalGeneration.__init__'s body
        self.model = CLOCLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        mm_encoder_outputs=None,
        region_boxes=None,
        region_points=None,
        **kwargs,
    ) -> tuple | LlavaCausalLMOutputWithPast:
        """``LlavaForConditionalGeneration.forward`` plus ``region_boxes`` / ``region_points``: one
        ``(n_i, 4)`` normalised xyxy (``(n_i, 2)`` xy) tensor per sample in the tower's input frame
        (``CLOCLlavaProcessor`` returns ``region_boxes``); ``None`` or empty tensors for no regions."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            region_boxes=region_boxes,
            region_points=region_points,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs[0], logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return LlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        """The generic preparation; region prompts are passed in the prefill step only (like pixels)."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in REGION_INPUTS:
                inputs.pop(key, None)
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """The generic expansion (beams, ``num_return_sequences``) plus the region prompt lists and the tower's
        hidden states the region encoder reads (the generic one expands tensors and image features only)."""
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1:
            for key in REGION_INPUTS:
                prompts = model_kwargs.get(key)
                if prompts is not None and not torch.is_tensor(prompts):  # a (B, n, k) tensor is expanded already
                    model_kwargs[key] = [t for t in prompts for _ in range(expand_size)]
            image = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
            if image is not None and getattr(image, "hidden_states", None) is not None:
                image.hidden_states = tuple(
                    None if h is None else h.repeat_interleave(expand_size, dim=0) for h in image.hidden_states
                )
        return input_ids, model_kwargs

    # -- building from a CLOC checkpoint -------------------------------------------------------------
    def load_cloc_weights(self, vision_state_dict: dict, prompter_state_dict: dict | None = None) -> None:
        """Copy a CLOC ViT's (``CLOCModel.vision_model``) and Prompter's (``CLOCModel.prompter``) state
        dicts into the tower and the region encoder (strict: every key must match)."""
        self.model.vision_tower.load_state_dict(vision_state_dict)
        prompter = self.model.region_encoder.prompter
        if prompter is None and prompter_state_dict is not None:
            raise ValueError("got Prompter weights, but this model's config has no prompter_config (RoI-Align regions)")
        if prompter is not None:
            if prompter_state_dict is None:
                raise ValueError(
                    "this model's config asks for Prompter region features, but the CLOC tower given has no Prompter "
                    "(a ViT-only checkpoint); use a full CLOC checkpoint or prompter_config=None"
                )
            prompter.load_state_dict(prompter_state_dict)

    @classmethod
    def from_cloc_and_llava(cls, cloc, text_config, *, use_prompter: bool | None = None, **config_kwargs):
        """A new model whose tower (and Prompter) carry a CLOC checkpoint's weights.

        Args:
            cloc: a ``CLOCModel`` (ViT + Prompter), a ``CLOCVisionModel`` (ViT only), or a folder of either.
            text_config: the language model's config (its weights are the caller's to load, e.g.
                ``model.model.language_model.load_state_dict(llm.model.state_dict())``).
            use_prompter: region features from CLOC's Prompter; default: whenever ``cloc`` has one.
                ``True`` with a ViT-only checkpoint raises; ``False`` gives RoI-Align region features.
            **config_kwargs: further :class:`CLOCLlavaConfig` fields (``image_token_id``,
                ``region_token_id``, ``vision_feature_layer``, ...).
        """
        if isinstance(cloc, (str, os.PathLike)):  # importing cloc_hf (above) registered its classes
            cloc = AutoModel.from_pretrained(cloc)
        vision = getattr(cloc, "vision_model", None)
        vision = vision if isinstance(vision, nn.Module) else cloc
        prompter = getattr(cloc, "prompter", None)
        use_prompter = prompter is not None if use_prompter is None else use_prompter
        if use_prompter and prompter is None:
            raise ValueError(
                f"use_prompter=True, but the CLOC checkpoint given ({type(cloc).__name__}) has no Prompter; "
                "pass a full CLOCModel or use_prompter=False for RoI-Align region features"
            )
        if use_prompter:
            config_kwargs.setdefault("prompter_config", cloc.config.prompter_config.to_dict())
            config_kwargs.setdefault("prompter_projection_dim", cloc.config.projection_dim)
        config = CLOCLlavaConfig(vision_config=vision.config.to_dict(), text_config=text_config, **config_kwargs)
        model = cls(config)
        model.load_cloc_weights(vision.state_dict(), prompter.state_dict() if use_prompter else None)
        return model


def _register() -> None:
    """Make ``model_type="cloc_llava"`` loadable through the Auto classes (as transformers maps ``"llava"``:
    ``AutoModel`` -> the base model, ``AutoModelForImageTextToText`` / ``AutoModelForPreTraining`` -> the
    generation model) and write ``auto_map`` into saved configs."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForPreTraining

    AutoConfig.register(CLOCLlavaConfig.model_type, CLOCLlavaConfig, exist_ok=True)
    AutoModel.register(CLOCLlavaConfig, CLOCLlavaModel, exist_ok=True)
    for auto in (AutoModelForImageTextToText, AutoModelForPreTraining):
        auto.register(CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, exist_ok=True)
    CLOCLlavaConfig.register_for_auto_class()
    CLOCLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


_register()

__all__ = [
    "CLOCLlavaForConditionalGeneration",
    "CLOCLlavaModel",
    "CLOCLlavaPreTrainedModel",
    "CLOCLlavaRegionEncoder",
    "CLOCLlavaRegionProjector",
]
