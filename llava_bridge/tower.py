"""``CLOCVisionTower``: a CLOC ViT behind the vision-tower interface of LLaVA code bases.

LLaVA (``haotian-liu/LLaVA``) and LLaVA-NeXT call their tower through a small, fixed interface: the
constructor ``(vision_tower, args, delay_load=False)``, ``load_model(device_map=None)``,
``is_loaded``, ``feature_select``, ``forward(images)``, ``image_processor`` and a few size
properties. :class:`CLOCVisionTower` offers exactly that interface, so a fork only has to route CLOC
checkpoints to it (:mod:`llava_bridge.builder`), and adds what a region-aware tower needs:

* region embeddings from the Prompter computed on the *same* ViT pass as the image tokens
  (:meth:`CLOCVisionTower.forward_with_regions`, :meth:`CLOCVisionTower.region_features`);
* loading a tower that was fine-tuned inside an MLLM from that MLLM's weights
  (:meth:`CLOCVisionTower.from_mllm_state_dict`), instead of silently re-reading the original CLOC
  checkpoint, which is what LLaVA's delayed loading does to its CLIP tower.

Differences from LLaVA's ``CLIPVisionTower``, each on purpose: ``forward`` is not wrapped in
``torch.no_grad()`` (whether the tower gets gradients is the caller's choice, through
``requires_grad``; it is frozen at load as in LLaVA), and ``num_patches`` counts the class token
under ``'cls_patch'`` (LLaVA-NeXT's definition: the number of feature rows ``forward`` returns).
See ``docs/llava.md`` for the user guide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from cloc_hf import CLOCConfig, CLOCImageProcessor, CLOCModel, CLOCPrompter, CLOCVisionConfig, CLOCVisionModel

logger = logging.getLogger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")
# where a LLaVA model keeps its tower: `model.vision_tower` inside `LlavaLlamaForCausalLM`
DEFAULT_MLLM_PREFIX = "model.vision_tower."
# where a full CLOC checkpoint keeps the two parts a tower builds (nothing else of it is read)
_VIT_PREFIX, _PROMPTER_PREFIX = "vision_model.", "prompter."
# MLLM weights saved with earlier versions of this tower, which kept the whole CLOC model minus its
# text tower as `region_model`: these entries are not used by region features and are skipped on load
_OLD_REGION_ENTRIES = ("region_model.visual_projection.", "region_model.logit_scale", "region_model.box_head.")
# `load_model(device_map=...)` strings that mean "wherever there is room": a tower goes whole onto one device
_AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class CLOCRegionEncoder(nn.Module):
    """The part of a full CLOC model a tower needs for region embeddings: the Prompter alone.

    The text tower, the projections, ``logit_scale`` and the box head are never built (a 0-dimensional
    parameter such as ``logit_scale`` cannot be partitioned by DeepSpeed ZeRO-3). Region features run
    ``CLOCModel``'s own code, so they equal the full model's. The ViT pass is the tower's: queries
    always pass its tokens as ``vision_outputs``.
    """

    def __init__(self, config: CLOCConfig):
        super().__init__()
        self.config = config
        self.vision_embed_dim = config.vision_config.hidden_size
        self.vision_model = None  # the tower runs the ViT; see the class docstring
        self.prompter = CLOCPrompter(config.prompter_config, self.vision_embed_dim, config.projection_dim)

    _encode_for_regions = CLOCModel._encode_for_regions
    get_region_features = CLOCModel.get_region_features


class CLOCVisionTower(nn.Module):
    """A CLOC ViT as a LLaVA vision tower.

    Args:
        vision_tower: a saved CLOC checkpoint folder (or hub id): a full ``CLOCModel`` (its
            ``vision_model`` becomes the tower and its Prompter serves region embeddings) or a
            ``CLOCVisionModel`` (image tokens only).
        args: LLaVA's model/config arguments. Read: ``mm_vision_select_layer`` (required: which
            ``hidden_states`` entry gives the image tokens, LLaVA-1.5 uses ``-2``),
            ``mm_vision_select_feature`` (default ``'patch'``: drop the class token; ``'cls_patch'``
            keeps it) and ``unfreeze_mm_vision_tower`` (default ``False``; when true a delayed tower
            loads at once, so the MLLM's own saved tower weights can overwrite it, as in LLaVA-NeXT).
        delay_load: default ``False``; when ``True`` only the config is read and :meth:`load_model`
            loads the weights later (LLaVA builds towers this way when it loads an MLLM).

    Attributes set by :meth:`load_model`: ``vision_tower`` (the ``CLOCVisionModel``),
    ``region_model`` (a :class:`CLOCRegionEncoder` for a full CLOC checkpoint, else ``None``) and
    ``image_processor`` (a :class:`~cloc_hf.CLOCImageProcessor`).
    """

    def __init__(self, vision_tower: str | os.PathLike, args, delay_load: bool = False):
        super().__init__()
        self._read_args(vision_tower, args)
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = _vision_config(_read_config(self.vision_tower_name))

    def _read_args(self, vision_tower, args) -> None:
        self.is_loaded = False
        self.vision_tower_name = str(vision_tower)
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r} is not supported by the CLOC tower; "
                f"expected one of {SELECT_FEATURES}"
            )
        self.region_model = None

    # -- loading -------------------------------------------------------------------------------------
    def load_model(self, device_map=None) -> None:
        """Load the processor and the weights of ``vision_tower`` and freeze them; later calls do nothing.

        Only the ViT and, for a full CLOC checkpoint, the Prompter are built, and only their tensors
        are read from the checkpoint's safetensors (and only the shards holding them), so the text
        tower costs nothing and ZeRO-3 can partition everything that is built. Parameters get the
        checkpoint's dtype (``config.dtype``, else its weights'), as ``from_pretrained`` gives them.
        ``device_map``: where the tower goes, whole (default ``None``: the CPU); a device, ``{"": device}``,
        or ``"auto"`` (the accelerator if there is one). Not allowed under ZeRO-3, as in transformers.
        """
        if self.is_loaded:
            logger.info("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        device = _single_device(device_map)
        config = _read_config(self.vision_tower_name)
        tensors = _read_tower_tensors(self.vision_tower_name, full=isinstance(config, CLOCConfig))
        self._install(config, dtype=_checkpoint_dtype(config, tensors), initialise=False)
        with _gathered_for_writing(self):
            self.load_state_dict(tensors, strict=True)
        if device is not None:
            self.to(device)
        self.is_loaded = True

    def _install(self, config: CLOCConfig | CLOCVisionConfig, dtype: torch.dtype | None, initialise: bool) -> None:
        """Build the ViT (and the Prompter, for a full CLOC config), frozen, with the image processor.

        Under ZeRO-3 both are built partitioned. The caller writes the weights and then marks the tower
        loaded; ``initialise=False`` skips the random init (for a strict load, which overwrites everything).
        """
        dtype = dtype or torch.get_default_dtype()
        with contextlib.nullcontext() if initialise else no_init_weights():
            self.vision_tower = CLOCVisionModel._from_config(_vision_config(config), dtype=dtype)
            self.region_model = None
            if isinstance(config, CLOCConfig):
                with _default_dtype(dtype), _zero3_init():
                    self.region_model = CLOCRegionEncoder(config)
                _register_direct_reads(self.region_model.prompter)
        self.requires_grad_(False)  # as LLaVA: training the tower is opted into with requires_grad_(True)
        self.image_processor = _load_image_processor(self.vision_tower_name, self.vision_tower.config)

    @classmethod
    def from_mllm_state_dict(
        cls, state_dict, args, vision_tower: str | os.PathLike | None = None, prefix: str = DEFAULT_MLLM_PREFIX
    ) -> CLOCVisionTower:
        """A tower whose weights come from an MLLM checkpoint (e.g. one where the tower was fine-tuned).

        Args:
            state_dict: the MLLM's state dict (a mapping), or a saved MLLM folder / ``.safetensors``
                file (only the tower's tensors are read, shard by shard).
            args: as for the constructor; ``vision_tower`` defaults to ``args.mm_vision_tower``.
            vision_tower: the CLOC checkpoint the tower was built from; only its config and image
                processor are read, never its weights.
            prefix: where the tower sits in the MLLM (default ``"model.vision_tower."``, LLaVA's layout).
        """
        if vision_tower is None:  # LLaVA's lookup order
            vision_tower = getattr(args, "mm_vision_tower", getattr(args, "vision_tower", None))
        if vision_tower is None:
            raise ValueError("pass vision_tower= or set args.mm_vision_tower: the CLOC checkpoint's config is needed")
        tower = cls.__new__(cls)  # the constructor could load the original weights; this path never does
        nn.Module.__init__(tower)
        tower._read_args(vision_tower, args)
        tower.cfg_only = _vision_config(_read_config(tower.vision_tower_name))
        tower.load_mllm_state_dict(state_dict, prefix=prefix)
        return tower

    def load_mllm_state_dict(self, state_dict, prefix: str = DEFAULT_MLLM_PREFIX, strict: bool = True) -> None:
        """Load this tower's weights out of an MLLM state dict (see :meth:`from_mllm_state_dict`).

        A tower that is not loaded yet is built from its config without reading the CLOC weights, and
        counts as loaded afterwards, so a later :meth:`load_model` cannot overwrite the fine-tuned
        weights. ``strict`` (default ``True``) raises on missing or unexpected tower keys.
        """
        tensors = _tower_tensors(state_dict, prefix)
        if not tensors:
            raise ValueError(
                f"no weight in the MLLM state dict starts with {prefix!r}: it holds no vision tower weights "
                "(pass the prefix under which the MLLM keeps its tower)"
            )
        old = [key for key in tensors if key.startswith(_OLD_REGION_ENTRIES)]
        if old:
            logger.info("skipping %d tower entries an earlier version saved and regions never use: %s", len(old), old)
            tensors = {key: value for key, value in tensors.items() if key not in old}
        if not self.is_loaded:
            config = _read_config(self.vision_tower_name)
            self._install(config, dtype=_config_dtype(config), initialise=not strict)
        with _gathered_for_writing(self):
            result = self.load_state_dict(tensors, strict=strict)
        self.is_loaded = True
        if not strict and (result.missing_keys or result.unexpected_keys):
            logger.warning("tower keys missing: %s; unexpected: %s", result.missing_keys, result.unexpected_keys)

    # -- features ------------------------------------------------------------------------------------
    def feature_select(self, image_forward_outs) -> torch.Tensor:
        """``hidden_states[select_layer]``; ``'patch'`` drops the class token (index 0), ``'cls_patch'`` keeps it."""
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            return image_features[:, 1:]
        if self.select_feature == "cls_patch":
            return image_features
        raise ValueError(f"Unexpected select feature: {self.select_feature}")

    def _encode(self, images: torch.Tensor):
        """One ViT pass with every hidden state, inputs moved to the tower's device and dtype."""
        return self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)

    def forward(self, images):
        """Image tokens: ``(B, N, C)`` for a ``(B, 3, H, W)`` tensor, or a list of ``(1, N, C)`` for a list
        of ``(3, H, W)`` images (encoded one at a time, as LLaVA does); in the input's dtype."""
        if type(images) is list:
            return [self.feature_select(self._encode(image.unsqueeze(0))).to(image.dtype) for image in images]
        return self.feature_select(self._encode(images)).to(images.dtype)

    def forward_with_regions(self, images, boxes=None, points=None):
        """Image tokens and region embeddings from one ViT pass: ``(features, regions)``.

        ``features`` is what :meth:`forward` returns; ``regions`` is a list with one
        ``(n_i, projection_dim)`` tensor per image. ``boxes``/``points``: one ``(n_i, 4)`` normalised
        xyxy (``(n_i, 2)`` xy) tensor per image, in the frame the tower sees (after the image
        processor's padding or cropping; ``CLOCImageProcessor`` maps pixel boxes there).
        """
        if type(images) is list:
            prompts = _per_image(boxes if boxes is not None else points, len(images))
            features, regions = [], []
            for image, prompt in zip(images, prompts):
                feats, [region] = self.forward_with_regions(
                    image.unsqueeze(0), *(([prompt], None) if boxes is not None else (None, [prompt]))
                )
                features.append(feats)
                regions.append(region)
            return features, regions
        outs = self._encode(images)
        features = self.feature_select(outs).to(images.dtype)
        regions = self._regions(outs.last_hidden_state, boxes, points)
        return features, [r.to(images.dtype) for r in regions]

    def region_features(self, images_or_tokens, boxes=None, points=None) -> list[torch.Tensor]:
        """Region embeddings, one ``(n_i, projection_dim)`` tensor per image.

        ``images_or_tokens``: images (a ``(B, 3, H, W)`` tensor or a list of ``(3, H, W)``), which costs
        one ViT pass, or the output of a pass already made (the tower's ``vision_tower`` output, or its
        ``last_hidden_state`` ``(B, 1 + N, hidden_size)``), which costs none. Boxes/points as in
        :meth:`forward_with_regions`. The Prompter always reads the final layer's tokens, the ones it
        was trained on, whatever ``mm_vision_select_layer`` is.
        """
        if type(images_or_tokens) is list or (torch.is_tensor(images_or_tokens) and images_or_tokens.ndim == 4):
            return self.forward_with_regions(images_or_tokens, boxes, points)[1]
        tokens = getattr(images_or_tokens, "last_hidden_state", images_or_tokens)
        if not torch.is_tensor(tokens) or tokens.ndim != 3 or tokens.shape[-1] != self.hidden_size:
            raise ValueError(
                "region_features needs images (B, 3, H, W) / a list of (3, H, W), or the tower's tokens "
                f"(B, 1 + N, {self.hidden_size}); got {getattr(tokens, 'shape', type(tokens).__name__)}"
            )
        return self._regions(tokens, boxes, points)

    def _regions(self, tokens: torch.Tensor, boxes, points) -> list[torch.Tensor]:
        if self.region_model is None:
            raise ValueError(
                f"the tower {self.vision_tower_name} has no Prompter (a CLOCVisionModel checkpoint); region "
                "features need a full CLOC checkpoint"
            )
        return self.region_model.get_region_features(boxes=boxes, points=points, vision_outputs=tokens)

    # -- properties LLaVA reads -----------------------------------------------------------------------
    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded_tower().dtype

    @property
    def device(self) -> torch.device:
        return self._loaded_tower().device

    @property
    def config(self) -> CLOCVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        """Feature rows per image: the patches, plus the class token under ``'cls_patch'``."""
        return self.num_patches_per_side**2 + (self.select_feature == "cls_patch")

    def _loaded_tower(self) -> CLOCVisionModel:
        if not self.is_loaded:
            raise RuntimeError(f"the tower {self.vision_tower_name} is not loaded yet: call load_model() first")
        return self.vision_tower


# -- helpers -------------------------------------------------------------------------------------------
def _read_config(name: str) -> CLOCConfig | CLOCVisionConfig:
    config = AutoConfig.from_pretrained(name)
    if not isinstance(config, (CLOCConfig, CLOCVisionConfig)):
        raise ValueError(f"{name} is a {config.model_type!r} checkpoint, not a CLOC one")
    return config


def _vision_config(config: CLOCConfig | CLOCVisionConfig) -> CLOCVisionConfig:
    return config.vision_config if isinstance(config, CLOCConfig) else config


def _load_image_processor(name: str, vision_config: CLOCVisionConfig) -> CLOCImageProcessor:
    """The checkpoint's saved processor; without one, the default CLOC processor at the tower's size."""
    try:
        return CLOCImageProcessor.from_pretrained(name)
    except OSError:
        logger.warning("%s has no image processor config; using CLOCImageProcessor(size=%d)", name, vision_config.image_size)
        return CLOCImageProcessor(size=vision_config.image_size)


def _single_device(device_map) -> torch.device | None:
    """The one device ``load_model(device_map=...)`` puts the tower on (``None``: leave it on the CPU)."""
    if device_map is None:
        return None
    if is_deepspeed_zero3_enabled():
        raise ValueError("DeepSpeed ZeRO-3 places the tower itself: call load_model() without a device_map")
    if isinstance(device_map, Mapping):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map={device_map!r} splits the tower over several devices; it loads whole onto one: "
                "pass a device or {'': device}"
            )
        device_map = devices.pop()
    if device_map in _AUTO_DEVICE_MAPS:
        return torch.accelerator.current_accelerator()  # None (stay on the CPU) without an accelerator
    return torch.device(device_map)


def _read_tower_tensors(name: str, full: bool) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``name`` the tower uses, under the tower's own key names.

    A full CLOC checkpoint gives its ``vision_model.*`` (as ``vision_tower.*``) and ``prompter.*`` (as
    ``region_model.prompter.*``) entries; a ``CLOCVisionModel`` checkpoint gives all its entries (an
    older ``vision_model.`` key prefix is accepted). Nothing else is read, and of a sharded
    checkpoint only the shards that hold these entries are opened (or downloaded).
    """
    from safetensors import safe_open

    def tower_key(key: str) -> str | None:
        if not full:
            return "vision_tower." + key.removeprefix(_VIT_PREFIX)
        if key.startswith(_VIT_PREFIX):
            return "vision_tower." + key[len(_VIT_PREFIX):]
        return "region_model." + key if key.startswith(_PROMPTER_PREFIX) else None

    tensors = {}
    for file in _safetensors_files(name, lambda key: tower_key(key) is not None):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if (target := tower_key(key)) is not None:
                    tensors[target] = handle.get_tensor(key)
    return tensors


def _safetensors_files(name: str, wanted) -> list[str]:
    """Local paths of checkpoint ``name``'s ``model.safetensors``, or of those shards of its index that
    hold a key for which ``wanted(key)`` is true."""
    lookup = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    single = cached_file(name, SAFE_WEIGHTS_NAME, **lookup)
    if single is not None:
        return [single]
    index = cached_file(name, SAFE_WEIGHTS_INDEX_NAME, **lookup)
    if index is None:
        raise ValueError(
            f"{name} holds neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}: the CLOC tower reads "
            "safetensors weights (re-save the checkpoint with save_pretrained)"
        )
    with open(index, encoding="utf-8") as handle:
        weight_map = json.load(handle).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} is not a weight index: it has no 'weight_map' mapping")
    shards = sorted({shard for key, shard in weight_map.items() if wanted(key)})
    return [cached_file(name, shard) for shard in shards]


def _config_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _checkpoint_dtype(config, tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype ``from_pretrained``'s default ``dtype="auto"`` picks: ``config.dtype``, else the first
    floating-point tensor's, else ``None`` (torch's default)."""
    return _config_dtype(config) or next((t.dtype for t in tensors.values() if t.is_floating_point()), None)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build modules in ``dtype`` (as ``from_pretrained`` does), restoring torch's default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _zero3_init():
    """Under ZeRO-3 (transformers' ``HfDeepSpeedConfig`` alive), modules built inside are partitioned as
    they are created, as ``from_pretrained`` builds models; otherwise nothing to do."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config())


def _register_direct_reads(prompter: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when its forward runs; the Prompter reads the weights of its
    prompt-type embedding tables directly (their forward never runs), so under ZeRO-3 they are
    registered with the Prompter's forward. Without ZeRO-3, nothing to do."""
    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    for module in prompter.modules():
        if isinstance(module, nn.Embedding):
            deepspeed.zero.register_external_parameter(prompter, module.weight)


def _gathered_for_writing(module: nn.Module):
    """Under DeepSpeed ZeRO-3 each rank holds a slice of every parameter (marked by ``ds_id``); writing
    weights needs them whole, with rank 0's values kept on every rank. Without ZeRO-3, nothing to do."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _per_image(prompts, num_images: int) -> list:
    if prompts is None:
        raise ValueError("give boxes or points: one (n_i, 4) / (n_i, 2) tensor per image")
    if len(prompts) != num_images:
        raise ValueError(f"got prompts for {len(prompts)} images and {num_images} images; need one entry per image")
    return list(prompts)


def _tower_tensors(source, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (prefix removed) of a state dict, a safetensors file or a folder of them."""
    if isinstance(source, Mapping):
        return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" or not f.is_file() for f in files):
        raise ValueError(f"{source} is neither a state dict nor a .safetensors file or a folder holding them")
    from safetensors import safe_open

    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    tensors[key[len(prefix):]] = handle.get_tensor(key)
    return tensors
