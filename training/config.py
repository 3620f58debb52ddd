"""The pretraining configuration: one documented dataclass, loaded from JSON or TOML plus overrides.

:class:`PretrainConfig` holds the settings of a *run* (data, steps, optimiser, objective,
checkpointing). Architecture and loss settings have their one home in ``cloc_hf.CLOCConfig`` and are
changed through ``model_overrides``; a run never carries a second copy of them (``docs/design.md``
section 10). Where the paper gives a value it is the default here.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from cloc_hf.configuration_cloc import LOSS_SETTINGS, CLOCConfig, check_config_overrides

OBJECTIVES = ("cloc", "clip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SUB_CONFIGS = ("text_config", "vision_config", "prompter_config")
# Fields of earlier versions, still read (with a FutureWarning) so old configs keep loading.
DEPRECATED_FIELDS = {
    "max_regions": "regions_per_image",
    "prompter_type": 'model_overrides={"prompter_config": {"prompter_type": ...}}',
    "text_filter": 'model_overrides={"text_filter_threshold": None} (to switch the filter off)',
    "grounding_loss": 'model_overrides={"use_grounding_loss": False} (to switch the loss off)',
}


@dataclass
class PretrainConfig:
    """Fields (type, default): meaning, and why the default.

    Model
        arch (str, "cloc-tiny-demo"): a name from ``cloc_hf.list_models()``; the CPU-sized demo model
            by default, so a bare run finishes on a laptop. With ``init_from`` the checkpoint defines
            the architecture, and another ``arch`` raises.
        init_from (str | None, None): a CLOC checkpoint dir or hub id to continue from (e.g. the output
            of ``cloc-convert --from-hf-clip``); ``None`` trains from scratch, as the paper does.
        model_overrides (dict, {}): ``CLOCConfig`` fields merged into the named config, e.g.
            ``{"prompter_config": {"pooling": "all"}, "text_filter_threshold": None}``; the only way a
            run changes the architecture or the loss (the paper's Table 2 ablations are such overrides).
            Unknown keys raise. With ``init_from``: loss settings (``cloc_hf.configuration_cloc.LOSS_SETTINGS``)
            are applied to the loaded config; ``prompter_config`` changes rebuild the Prompter and box
            head from the new settings with fresh weights (one logged notice; the towers keep the
            checkpoint's weights); anything else would change loaded weights' shapes and raises.
        objective (str, "cloc"): ``"cloc"`` (CLIP + region losses) or ``"clip"`` (the baseline: same
            code, same data, no regions, Prompter untouched).
        regions_per_image (int, 4): ``M``, regions sampled per image per step (the paper's M = 4);
            images with fewer regions use all of theirs. Ignored by the ``"clip"`` objective. Was
            ``max_regions``.
    Data
        train_data (str, ""): folder/glob of region-text shards (``cloc_data`` format); required.
        max_train_samples (int | None, None): use only the first N samples (in-memory mode); ``None``
            uses all.
        streaming (bool, False): stream shards through ``datasets`` instead of loading them into memory
            (for corpora larger than RAM; shards are split across ranks, a seeded buffer shuffles).
        allow_eval_splits (bool, False): accept samples whose ``meta["split"]`` is an evaluation split
            (val / test / testA / testB); off, loading one raises, so benchmark data cannot leak into
            training.
        resize_mode (str, "pad"): the processor's ``"pad"`` or ``"center_crop"``; padding keeps every
            box visible.
        num_workers (int, 0): DataLoader workers (0 on small CPUs: workers compete with the math).
    Optimisation
        batch_size (int, 128): per process; the global batch is ``batch_size * world_size``.
        steps (int, 700): optimiser steps.
        lr (float, 5e-4), beta1 (0.9), beta2 (0.98), eps (1e-6), weight_decay (0.2): AdamW with
            CLIP's betas and decay; no decay on biases, norms, embeddings' position tables and the
            temperature (open_clip's rule).
        warmup_steps (int | None, None): linear warm-up; ``None`` uses ``warmup_frac * steps``.
        warmup_frac (float, 0.05), min_lr_ratio (float, 0.0): cosine decay to ``min_lr_ratio * lr``.
        grad_clip (float | None, 1.0): max gradient norm; ``None`` or 0 disables clipping.
        precision (str, "auto"): ``"auto"`` = fp32 on CPU (bf16 autocast is slow there), bf16 on GPU.
        gradient_checkpointing (bool, False): trade compute for activation memory.
        deepspeed (str | None, None): a DeepSpeed JSON config (``training/configs/ds_zero{1,2,3}.json``);
            its batch/accumulation/precision/clipping entries are ``"auto"`` and filled from this config.
    Bookkeeping
        output_dir (str, "runs/pretrain"): final ``save_pretrained`` model + processor here,
            checkpoints in ``output_dir/checkpoints``, the log in ``output_dir/train_log.jsonl``.
        save_every (int, 100), keep_checkpoints (int, 2), log_every (int, 10): checkpoint and log
            cadence in steps.
        eval_every (int, 0): call the trainer's evaluation hook every N steps (learning curves); 0 = never.
        seed (int, 0).
        progress (bool, True): a progress bar on rank 0.

    The old fields ``max_regions``, ``prompter_type``, ``text_filter`` and ``grounding_loss`` are still
    accepted (keyword or file) with a ``FutureWarning`` and moved to their home
    (:data:`DEPRECATED_FIELDS`); one that contradicts the value already at its home raises a
    ``ValueError`` naming both.
    """

    arch: str = "cloc-tiny-demo"
    init_from: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    objective: str = "cloc"
    regions_per_image: int = 4
    train_data: str = ""
    max_train_samples: int | None = None
    streaming: bool = False
    allow_eval_splits: bool = False
    resize_mode: str = "pad"
    num_workers: int = 0
    batch_size: int = 128
    steps: int = 700
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    warmup_steps: int | None = None
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    output_dir: str = "runs/pretrain"
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    seed: int = 0
    progress: bool = True
    # deprecated names (see DEPRECATED_FIELDS): read once, moved to their home, not stored
    max_regions: InitVar[int | None] = None
    prompter_type: InitVar[str | None] = None
    text_filter: InitVar[bool | None] = None
    grounding_loss: InitVar[bool | None] = None

    def __post_init__(self, max_regions, prompter_type, text_filter, grounding_loss):
        self.model_overrides = json.loads(json.dumps(self.model_overrides))  # a private deep copy
        old = {"max_regions": max_regions, "prompter_type": prompter_type, "text_filter": text_filter,
               "grounding_loss": grounding_loss}
        for name, value in old.items():
            if value is not None:
                self._take_old_field(name, value)
        self.validate()

    def _take_old_field(self, name: str, value: Any) -> None:
        """Move a deprecated field's value to its home; raise if the home already says otherwise."""
        warnings.warn(f"PretrainConfig.{name} is deprecated; use {DEPRECATED_FIELDS[name]}", FutureWarning,
                      stacklevel=4)
        overrides = self.model_overrides
        if name == "max_regions":
            if self.regions_per_image not in (value, _default("regions_per_image")):
                raise ValueError(f"max_regions={value} (old name) conflicts with regions_per_image="
                                 f"{self.regions_per_image}; give only regions_per_image")
            self.regions_per_image = value
            return
        if name in ("text_filter", "grounding_loss") and not isinstance(value, bool):
            kind = " (the kind of box loss is model_overrides.grounding_loss_type)" if name == "grounding_loss" else ""
            raise ValueError(f"PretrainConfig.{name}={value!r} was an on/off switch{kind}")
        if name == "prompter_type":
            target, where, home, new = overrides.setdefault("prompter_config", {}), "model_overrides.prompter_config", \
                "prompter_type", value
        elif name == "text_filter":
            target, where, home, new = overrides, "model_overrides", "text_filter_threshold", None
            if value:  # "on" is any threshold, so it only conflicts with an explicit None
                if home in target and target[home] is None:
                    raise ValueError(f"PretrainConfig.text_filter=True (deprecated) conflicts with {where}.{home}=None; "
                                     f"give only {where}.{home}")
                return
        else:
            target, where, home, new = overrides, "model_overrides", "use_grounding_loss", value
        if home in target and target[home] != new:
            raise ValueError(f"PretrainConfig.{name}={value!r} (deprecated) conflicts with {where}.{home}="
                             f"{target[home]!r}; give only {where}.{home}")
        target[home] = new

    def validate(self) -> PretrainConfig:
        """Raise a ``ValueError`` naming the first bad field."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; expected one of {OBJECTIVES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; expected one of {PRECISIONS}")
        for name in ("batch_size", "steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.regions_per_image < 0:
            raise ValueError(f"regions_per_image must be >= 0, got {self.regions_per_image}")
        check_config_overrides(self.model_overrides, where="PretrainConfig.model_overrides")
        if self.init_from and self.arch != _default("arch"):
            raise ValueError(f"arch={self.arch!r} conflicts with init_from={self.init_from!r}: the checkpoint "
                             "defines the architecture; give only init_from")
        if self.init_from:
            changeable = set(LOSS_SETTINGS) | {"prompter_config", "grounding_loss"}
            fixed = sorted(set(self.model_overrides) - changeable)
            if fixed:
                raise ValueError(
                    f"model_overrides {fixed} would change weights loaded by init_from={self.init_from!r} "
                    f"(only the loss settings {list(LOSS_SETTINGS)} and prompter_config can change there)"
                )
        return self

    @property
    def num_warmup_steps(self) -> int:
        """Warm-up steps: ``warmup_steps`` if set, else ``warmup_frac * steps``."""
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_frac * self.steps)

    @property
    def collator_regions(self) -> int:
        """Regions the collator samples per image: ``regions_per_image``, or 0 for the CLIP objective."""
        return 0 if self.objective == "clip" else self.regions_per_image

    def model_config(self, base: CLOCConfig | None = None) -> CLOCConfig:
        """The run's ``CLOCConfig``: ``base`` (an ``init_from`` checkpoint's config) or the named ``arch``,
        with ``model_overrides`` merged (sub-configs key by key)."""
        import cloc_hf

        if base is None:
            return cloc_hf.get_model_config(self.arch, **self.model_overrides)
        merged = base.to_dict()
        for key, value in self.model_overrides.items():
            if key in SUB_CONFIGS and isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return type(base).from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Build from a dict (a loaded file); unknown keys raise a ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)} | set(DEPRECATED_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pretraining config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PretrainConfig:
        """Read a ``.json`` or ``.toml`` file, then apply ``key=value`` overrides (values parsed as JSON).

        A dotted key sets one entry of a dict field (``model_overrides.text_filter_threshold=null``), and
        a dict value is merged into the file's dict key by key, so an override never drops the file's
        other entries.
        """
        data: dict[str, Any] = {}
        if path:
            path = Path(path)
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if isinstance(overrides, dict):
            items = list(overrides.items())
        else:
            items = []
            for item in overrides or []:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"override {item!r} must look like key=value")
                try:
                    items.append((key, json.loads(value)))
                except json.JSONDecodeError:
                    items.append((key, value))
        for key, value in items:
            *parents, leaf = key.split(".")
            target = data
            for part in parents:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise ValueError(f"override {key!r}: {part!r} is not a dict field")
            _merge_into(target, leaf, value)
        return cls.from_dict(data)


def _merge_into(target: dict[str, Any], key: str, value: Any) -> None:
    """``target[key] = value``, merging dicts key by key."""
    if isinstance(value, dict) and isinstance(target.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge_into(target[key], sub_key, sub_value)
    else:
        target[key] = value


def _default(name: str) -> Any:
    return PretrainConfig.__dataclass_fields__[name].default
