"""``cloc-pretrain``: CLOC (or the CLIP baseline) pretraining with accelerate, optionally DeepSpeed.

Launch commands (``CONFIG`` is a JSON/TOML :class:`~training.config.PretrainConfig`; any field can be
overridden with ``--set key=value``)::

    # 1 CPU process
    cloc-pretrain --config CONFIG
    # 2 CPU processes (gloo). `accelerate launch --cpu` starts only one process on a CPU-only machine,
    # so use torchrun (accelerate picks up its environment):
    torchrun --nproc_per_node 2 -m training.pretrain --config CONFIG
    # 1 GPU (bf16 automatically)
    accelerate launch --num_processes 1 -m training.pretrain --config CONFIG
    # N GPUs on one node, DeepSpeed ZeRO-2
    accelerate launch --num_processes N -m training.pretrain --config CONFIG \\
        --set deepspeed=training/configs/ds_zero2.json
    # N nodes x G GPUs (run on every node, NODE_RANK = 0..N-1)
    accelerate launch --num_machines N --num_processes $((N*G)) --machine_rank $NODE_RANK \\
        --main_process_ip HOST --main_process_port 29500 -m training.pretrain --config CONFIG

``--resume`` continues from the newest complete checkpoint in ``output_dir/checkpoints``; a run killed
at any moment (even SIGKILL) and resumed ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cloc_data.loader import (
    EpochBatchSampler,
    RegionTextCollator,
    RegionTextDataset,
    StreamingRegionTextDataset,
)
from cloc_hf import CLOCModel, CLOCProcessor
from cloc_hf.configuration_cloc import LOSS_SETTINGS

from .checkpoints import (
    CHECKPOINT_PREFIX,
    list_checkpoints,
    optimizer_from_files,
    optimizer_to_files,
    rng_state,
    set_rng_state,
    write_json,
)
from .config import PretrainConfig
from .distributed import make_communicator

logger = logging.getLogger("cloc.pretrain")

# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


def build_model(config: PretrainConfig) -> CLOCModel:
    """The run's model: the named ``arch`` with ``model_overrides`` (fresh weights), or the ``init_from``
    checkpoint with them applied (:func:`load_with_overrides`)."""
    if config.init_from:
        return load_with_overrides(config)
    return CLOCModel(config.model_config())


# The modules a prompter_config change rebuilds; every other weight of a checkpoint is kept.
PROMPTER_MODULES = ("prompter.", "box_head.")


def load_with_overrides(config: PretrainConfig) -> CLOCModel:
    """Load ``config.init_from`` and apply ``model_overrides``; nothing is dropped.

    Loss settings are set on the loaded config. A ``prompter_config`` that differs from the
    checkpoint's rebuilds the Prompter and box head from the new settings with fresh weights (their
    trained weights belong to the old design) and says so once in the log; the towers, projections
    and temperature keep the checkpoint's weights. Other overrides were refused by
    :meth:`PretrainConfig.validate`.
    """
    model = CLOCModel.from_pretrained(config.init_from)
    if not config.model_overrides:
        return model
    wanted = config.model_config(base=model.config)
    if wanted.prompter_config.to_dict() == model.config.prompter_config.to_dict():
        for key in LOSS_SETTINGS:
            setattr(model.config, key, getattr(wanted, key))
        return model
    rebuilt = CLOCModel(wanted)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(PROMPTER_MODULES)}
    missing, unexpected = rebuilt.load_state_dict(kept, strict=False)
    stray = [k for k in missing if not k.startswith(PROMPTER_MODULES)] + list(unexpected)
    if stray:
        raise RuntimeError(f"init_from={config.init_from!r}: weights {stray[:5]} do not fit the overridden model")
    logger.warning(
        "init_from=%s with prompter_config overrides %s: the Prompter and box head are rebuilt with fresh "
        "weights; all other weights come from the checkpoint",
        config.init_from, config.model_overrides["prompter_config"],
    )
    return rebuilt


def build_processor(config: PretrainConfig, model: CLOCModel) -> CLOCProcessor:
    if config.init_from and Path(config.init_from, "preprocessor_config.json").exists():
        return CLOCProcessor.from_pretrained(config.init_from, resize_mode=config.resize_mode)
    return CLOCProcessor.offline(size=model.config.vision_config.image_size, resize_mode=config.resize_mode)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, 1-D parameters, position tables and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "norm" in name or "position_embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _fill_deepspeed_autos(ds_config: dict[str, Any], config: PretrainConfig, world_size: int, bf16: bool) -> dict:
    """One source of truth: the repo's DeepSpeed JSONs say "auto", this config decides."""
    values = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.batch_size * world_size,
        "gradient_clipping": config.grad_clip or 0.0,
    }
    for key, value in values.items():
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        if ds_config.get(section, {}).get("enabled") == "auto":
            ds_config[section]["enabled"] = enabled
    return ds_config


def make_accelerator(config: PretrainConfig):
    """An ``Accelerator`` that also works on CPU-only machines (gloo instead of NCCL)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.deepspeed and world == 1:
        # a single process without a launcher: DeepSpeed would otherwise try MPI discovery
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511"), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    if not cuda and (world > 1 or config.deepspeed):
        # CPU-only: NCCL is unavailable, and accelerate+DeepSpeed would otherwise assume world size 1
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    plugin = None
    if config.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if not cuda:
            _skip_deepspeed_shm_build()
        ds_config = json.loads(Path(config.deepspeed).read_text())
        plugin = DeepSpeedPlugin(hf_ds_config=_fill_deepspeed_autos(ds_config, config, world, mixed == "bf16"))
    return Accelerator(mixed_precision=mixed, kwargs_handlers=handlers, deepspeed_plugin=plugin, cpu=not cuda)


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op at every CPU init (40-50 s); with gloo it is unused."""
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# --------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model, data, optimiser and bookkeeping of one pretraining run.

    ``eval_hook(step, model, processor) -> dict`` (optional) is called on rank 0 every
    ``config.eval_every`` steps and at the end; its results go to ``output_dir/eval_log.jsonl``.
    """

    def __init__(self, config: PretrainConfig, eval_hook: Callable | None = None):
        self.config = config
        self.eval_hook = eval_hook
        self.accelerator = make_accelerator(config)
        acc = self.accelerator
        self.output_dir = Path(config.output_dir)
        if acc.is_main_process:
            (self.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)

        self.model = build_model(config)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.processor = build_processor(config, self.model)
        if not config.train_data:
            raise ValueError("train_data is empty: point it at a folder of region-text shards")
        self.collator = RegionTextCollator(self.processor, max_regions=config.collator_regions, seed=config.seed)
        if config.streaming:
            self.dataset = StreamingRegionTextDataset(
                config.train_data, rank=acc.process_index, world_size=acc.num_processes, seed=config.seed,
                allow_eval_splits=config.allow_eval_splits,
            )
            self.sampler = None
        else:
            self.dataset = RegionTextDataset.from_shards(
                config.train_data, max_samples=config.max_train_samples,
                allow_eval_splits=config.allow_eval_splits,
            )
            self.sampler = EpochBatchSampler(
                len(self.dataset), config.batch_size, seed=config.seed, rank=acc.process_index,
                world_size=acc.num_processes,
            )
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.weight_decay),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(config.num_warmup_steps, config.steps, config.min_lr_ratio)
        )
        # The scheduler stays ours: accelerate would step it once per process (it assumes a prepared,
        # batch-multiplied dataloader, which the rank-aware sampler here replaces).
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.scheduler = scheduler
        self.comm = make_communicator()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.elapsed = 0.0  # training seconds (excludes evaluation and checkpointing)

    @property
    def unwrapped(self) -> CLOCModel:
        return self.accelerator.unwrap_model(self.model)

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.config.deepspeed:
            acc.save_state(str(tmp / "deepspeed"))  # DeepSpeed engine files (partitioned optimizer state)
        elif acc.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in self.unwrapped.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            opt_tensors, opt_meta = optimizer_to_files(self.optimizer.optimizer if hasattr(
                self.optimizer, "optimizer") else self.optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            write_json(tmp / "optimizer.json", opt_meta)
            write_json(tmp / "scheduler.json", self.scheduler.state_dict())
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / f"rng_{acc.process_index}.safetensors"))
        write_json(tmp / f"rng_{acc.process_index}.json", rng_meta)
        if acc.is_main_process:
            write_json(
                tmp / "trainer_state.json",
                {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "elapsed": self.elapsed, "config": self.config.to_dict()},
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.replace(tmp, final)  # the checkpoint exists only once complete
            for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if self.config.deepspeed:
            acc.load_state(str(path / "deepspeed"))
        else:
            self.unwrapped.load_state_dict(load_file(str(path / "model.safetensors")))
            inner = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            inner.load_state_dict(
                optimizer_from_files(load_file(str(path / "optimizer.safetensors")),
                                      json.loads((path / "optimizer.json").read_text()))
            )
            self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rng_file = path / f"rng_{acc.process_index}.safetensors"
        if rng_file.exists():
            set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_{acc.process_index}.json").read_text()))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.elapsed = state.get("elapsed", 0.0)
        logger.info("resumed from %s at step %d", path, self.step)

    def resume(self) -> bool:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            logger.info("no checkpoint in %s: starting from scratch", self.output_dir)
            return False
        self.load_checkpoint(checkpoints[-1])
        return True

    # -- one step -----------------------------------------------------------------------------------
    def _batches(self):
        while True:
            self.collator.set_epoch(self.epoch)
            if self.sampler is None:  # streaming: skip what this epoch already consumed
                self.dataset.set_epoch(self.epoch, skip=self.batch_in_epoch * self.config.batch_size)
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_size=self.config.batch_size, collate_fn=self.collator,
                    num_workers=self.config.num_workers, drop_last=True,
                )
            else:
                self.sampler.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.sampler, collate_fn=self.collator,
                    num_workers=self.config.num_workers,
                )
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        from accelerate.utils import send_to_device

        acc = self.accelerator
        batch = send_to_device(batch, acc.device)  # tensors and the per-image region lists
        self.model.train()
        with acc.autocast():
            outputs = self.model(**batch, return_loss=False)
            losses = self.unwrapped.compute_loss(outputs, comm=self.comm)
        acc.backward(losses["loss"])
        if self.config.grad_clip and not self.config.deepspeed:
            acc.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP's clamp of the temperature at 100
            self.unwrapped.logit_scale.clamp_(0, math.log(100))
        record = {k: float(v.detach()) for k, v in losses.items() if v is not None}
        if self.comm is not None:  # logged values are global means
            record = {k: float(self.comm.sum(torch.tensor(v)) / self.comm.world_size) for k, v in record.items()}
        return record

    # -- the loop -----------------------------------------------------------------------------------
    def _log(self, name: str, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate(self) -> None:
        if self.eval_hook is None:
            return
        if self.accelerator.is_main_process:
            self.unwrapped.eval()
            with torch.no_grad():
                results = self.eval_hook(self.step, self.unwrapped, self.processor)
            self._log("eval_log.jsonl", {"step": self.step, "elapsed": self.elapsed, **results})
        self.accelerator.wait_for_everyone()

    def train(self) -> CLOCModel:
        config, acc = self.config, self.accelerator
        progress = None
        if config.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=config.steps, initial=self.step, desc=f"{config.objective} pretraining")
        if self.step == 0 and config.eval_every:
            self._evaluate()
        batches = self._batches()
        while self.step < config.steps:
            start = time.perf_counter()
            record = self.train_step(next(batches))
            self.elapsed += time.perf_counter() - start
            self.step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            if self.step % config.log_every == 0 or self.step == config.steps:
                self._log("train_log.jsonl", {"step": self.step, "epoch": self.epoch, "elapsed": round(self.elapsed, 3),
                                              "lr": self.scheduler.get_last_lr()[0], **record})
            if config.eval_every and self.step % config.eval_every == 0 and self.step != config.steps:
                self._evaluate()
            if self.step % config.save_every == 0 and self.step != config.steps:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        if config.eval_every:
            self._evaluate()
        self.save_final()
        return self.unwrapped

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.config.deepspeed:
            state = acc.get_state_dict(self.model)  # gathers ZeRO-3 partitions (16-bit save enabled in the JSON)
        else:
            state = self.unwrapped.state_dict()
        if acc.is_main_process:
            self.unwrapped.save_pretrained(self.output_dir, state_dict=state, safe_serialization=True)
            self.processor.save_pretrained(self.output_dir)
            write_json(self.output_dir / "pretrain_config.json", self.config.to_dict())
        acc.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloc-pretrain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", help="JSON or TOML PretrainConfig")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = PretrainConfig.load(args.config, args.set)
    trainer = Trainer(config)
    if args.resume:
        trainer.resume()
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
