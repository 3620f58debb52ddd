"""The pretraining configuration: one documented dataclass, loaded from JSON or TOML plus overrides.

Every field has the paper's recipe (DESIGN.md section 4) as its default where the paper gives one.
Ablation switches map to the rows of the paper's Table 2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

OBJECTIVES = ("cloc", "clip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class PretrainConfig:
    """Fields (type, default) — what each one does.

    Model
        arch (str, "cloc-tiny-demo"): a name from ``cloc_hf.list_models()``; ignored with ``init_from``.
        init_from (str | None): a CLOC checkpoint dir or hub id to continue from (e.g. the output of
            ``cloc-convert --from-hf-clip``); ``None`` trains from scratch (the paper's choice).
        model_overrides (dict): merged into the named config, e.g. ``{"prompter_config": {"pooling": "all"}}``.
        objective (str, "cloc"): ``"cloc"`` (CLIP + region losses) or ``"clip"`` (the baseline: same code,
            same data, no regions, Prompter untouched).
    Ablations (the paper's Table 2)
        prompter_type (str, "transformer"): ``"roi_align"`` replaces the Prompter with RoI-Align.
        text_filter (bool, True): false-negative filtering at ``text_filter_threshold`` (0.9).
        grounding_loss (bool, True): include ``L_grounding``.
        max_regions (int, 4): M, regions sampled per image per step.
    Data
        train_data (str): folder/glob of region-text shards (``cloc_data`` format).
        max_train_samples (int | None): use only the first N samples (in-memory mode).
        streaming (bool, False): stream shards through ``datasets`` instead of loading them into memory
            (for corpora larger than RAM; shards are split across ranks, a seeded buffer shuffles).
        allow_eval_splits (bool, False): accept samples whose ``meta["split"]`` is an evaluation split
            (val / test / testA / testB); off, loading one raises, so benchmark data cannot leak into
            training.
        resize_mode (str, "pad"): the processor's ``"pad"`` or ``"center_crop"``.
        num_workers (int, 0): DataLoader workers (0 on small CPUs: workers compete with the math).
    Optimisation
        batch_size (int, 128): per process; the global batch is ``batch_size * world_size``.
        steps (int, 700): optimiser steps.
        lr (float, 5e-4), beta1 (0.9), beta2 (0.98), eps (1e-6), weight_decay (0.2): AdamW; no decay on
            biases, norms, embeddings' position tables and the temperature (open_clip's rule).
        warmup_steps (int | None): linear warm-up; ``None`` uses ``warmup_frac * steps``.
        warmup_frac (float, 0.05), min_lr_ratio (float, 0.0): cosine decay to ``min_lr_ratio * lr``.
        grad_clip (float | None, 1.0): max gradient norm.
        precision (str, "auto"): ``"auto"`` = fp32 on CPU (bf16 autocast is ~16x slower there), bf16 on GPU.
        gradient_checkpointing (bool, False).
        deepspeed (str | None): a DeepSpeed JSON config (``training/configs/ds_zero{1,2,3}.json``); its
            batch/accumulation/precision/clipping entries are ``"auto"`` and filled from this config.
    Bookkeeping
        output_dir (str, "runs/pretrain"): final ``save_pretrained`` model + processor here,
            checkpoints in ``output_dir/checkpoints``, the log in ``output_dir/train_log.jsonl``.
        save_every (int, 100), keep_checkpoints (int, 2), log_every (int, 10).
        eval_every (int, 0): call the trainer's evaluation hook every N steps (learning curves).
        seed (int, 0).
        progress (bool, True): a progress bar on rank 0.
    """

    arch: str = "cloc-tiny-demo"
    init_from: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    objective: str = "cloc"
    prompter_type: str = "transformer"
    text_filter: bool = True
    grounding_loss: bool = True
    max_regions: int = 4
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

    def __post_init__(self):
        self.validate()

    def validate(self) -> PretrainConfig:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; expected one of {OBJECTIVES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; expected one of {PRECISIONS}")
        for name in ("batch_size", "steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {self.max_regions}")
        return self

    @property
    def num_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_frac * self.steps)

    @property
    def regions_per_image(self) -> int:
        return 0 if self.objective == "clip" else self.max_regions

    def model_config_overrides(self) -> dict[str, Any]:
        """Overrides for ``cloc_hf.get_model_config`` implied by the ablation switches."""
        overrides = json.loads(json.dumps(self.model_overrides))
        prompter = overrides.setdefault("prompter_config", {})
        prompter.setdefault("prompter_type", self.prompter_type)
        if not self.text_filter:
            overrides["text_filter_threshold"] = None
        if not self.grounding_loss:
            overrides["use_grounding_loss"] = False
        return overrides

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PretrainConfig:
        """Read a ``.json`` or ``.toml`` file, then apply ``key=value`` overrides (values parsed as JSON)."""
        data: dict[str, Any] = {}
        if path:
            path = Path(path)
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if isinstance(overrides, dict):
            data.update(overrides)
        else:
            for item in overrides or []:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"override {item!r} must look like key=value")
                try:
                    data[key] = json.loads(value)
                except json.JSONDecodeError:
                    data[key] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pretraining config fields {unknown}; known: {sorted(known)}")
        return cls(**data)
