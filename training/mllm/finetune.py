"""``cloc-finetune-mllm``: two-stage fine-tuning of a CLOC-LLaVA (:class:`~llava_bridge.CLOCLlavaForConditionalGeneration`).

Stage 1 (``--stage align``) trains the image projector and the region projector with the tower and the
language model frozen; stage 2 (``--stage instruct``) adds LoRA adapters to the language model (or
trains it whole with ``--no-lora``), keeps training both projectors and, with ``--unfreeze-tower``,
the tower and its Prompter at ``--tower-lr``. The loss is on the answer tokens only
(:mod:`training.mllm.dataset`); batches group records of similar length. Training runs in Hugging
Face's ``Trainer`` with a plain PyTorch AdamW, optionally under DeepSpeed (``training/mllm/configs``,
whose "auto" values the Trainer fills from these arguments; ZeRO-2 and ZeRO-3, on GPUs or CPU processes).
Under DeepSpeed the region encoder runs on every batch, to no effect on those without ``<region>``,
so that every rank makes the same collective calls (``CLOCLlavaModel.region_encoder_every_step``).

Starting model: ``--cloc DIR --lm DIR`` (a CLOC checkpoint's tower + Prompter and a causal language
model with its tokenizer; ``<image>``, ``<region>`` and a pad token are added to the tokenizer when
missing), ``--init DIR`` (a saved CLOC-LLaVA, e.g. stage 1's output) or, with ``--no-prompter``, a
CLIP-style tower whose region tokens are RoI-Align features (``--cloc`` may then be any CLOC or CLIP
checkpoint).

Output (``--out``): the trained model (LoRA merged) with its processor, as safetensors, loadable with
``CLOCLlavaForConditionalGeneration.from_pretrained(OUT)``; with LoRA also ``OUT/adapter`` (load with
``PeftModel.from_pretrained(base, OUT/adapter)``, ``base`` being the starting model: the ``--init``
folder, or ``OUT/base`` which is written when the start was built from ``--cloc``/``--lm``);
``OUT/checkpoint-N`` every ``--save-steps`` steps. ``--resume`` continues from the newest checkpoint,
so a run killed at any point ends with the same weights as an uninterrupted one.

Launch commands::

    # 1 CPU process: stage 1, then stage 2 from its output
    cloc-finetune-mllm --stage align --cloc runs/demo/cloc --lm my-llm --data mllm/data.json --out runs/s1
    cloc-finetune-mllm --stage instruct --init runs/s1 --data mllm/data.json --out runs/s2
    # 2 CPU processes (gloo); the same with --deepspeed training/mllm/configs/ds_zero2.json (or ds_zero3.json)
    torchrun --nproc_per_node 2 -m training.mllm.finetune --stage instruct --init runs/s1 \\
        --data mllm/data.json --out runs/s2
    # 8 GPUs, DeepSpeed ZeRO-2 (bf16 is used automatically on GPUs that have it)
    torchrun --nproc_per_node 8 -m training.mllm.finetune --stage instruct --init runs/s1 \\
        --data mllm/data.json --out runs/s2 --batch-size 16 --gradient-checkpointing \\
        --deepspeed training/mllm/configs/ds_zero2.json
    # 8 GPUs, DeepSpeed ZeRO-3 (parameters partitioned; the final weights are gathered to rank 0)
    torchrun --nproc_per_node 8 -m training.mllm.finetune --stage instruct --init runs/s1 --no-lora \\
        --unfreeze-tower --tower-lr 2e-6 --data mllm/data.json --out runs/s2 \\
        --deepspeed training/mllm/configs/ds_zero3.json
    # (``accelerate launch --num_processes 8 -m training.mllm.finetune ...`` works as well on GPUs)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import torch

logger = logging.getLogger("cloc.finetune_mllm")

LM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Default LoRA targets: the attention and MLP projections of Llama-style language models."""
PROJECTORS = ("multi_modal_projector", "region_encoder.projector")
"""Modules trained in both stages."""
TOWER = ("vision_tower", "region_encoder.prompter")
"""Modules ``--unfreeze-tower`` trains (at ``--tower-lr``): the ViT and the Prompter that reads it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cloc-finetune-mllm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--stage", required=True, choices=("align", "instruct"))
    p.add_argument("--data", required=True, help="instruction records: data.json / data.jsonl (cloc-mllm-data)")
    p.add_argument("--image-root", help="folder the records' image paths are relative to (default: --data's folder)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, final model, adapter)")
    start = p.add_argument_group("starting model (--init, or --cloc with --lm)")
    start.add_argument("--init", help="a saved CLOC-LLaVA folder (model + processor)")
    start.add_argument("--cloc", help="a CLOC checkpoint folder (tower + Prompter), or a CLIP one with --no-prompter")
    start.add_argument("--lm", help="a causal language model folder with its tokenizer")
    start.add_argument("--no-prompter", action="store_true", help="RoI-Align region features instead of the Prompter")
    start.add_argument("--vision-feature-layer", type=int, default=-2, help="tower layer the image tokens come from")
    lora = p.add_argument_group("stage 2")
    lora.add_argument("--no-lora", action="store_true", help="train the whole language model instead of LoRA adapters")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-targets", default=",".join(LM_LAYERS), help="LM module names that get adapters")
    lora.add_argument("--unfreeze-tower", action="store_true", help="also train the tower and its Prompter")
    lora.add_argument("--tower-lr", type=float, help="learning rate of the tower (default: --lr)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, help="default 1e-3 for align, 2e-4 for instruct (LLaVA's recipes)")
    opt.add_argument("--epochs", type=float, default=1.0)
    opt.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    opt.add_argument("--batch-size", type=int, default=8, help="per process")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--warmup", type=float, default=0.03, help="warm-up steps, or a fraction of them if < 1")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--max-length", type=int, default=2048, help="longer records are counted and skipped")
    opt.add_argument("--no-group-by-length", action="store_true", help="random batches instead of length groups")
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--deepspeed", help="DeepSpeed JSON (training/mllm/configs/ds_zero2.json or ds_zero3.json)")
    opt.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on GPUs with it")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--save-steps", type=int, default=500)
    opt.add_argument("--save-total-limit", type=int, default=2)
    opt.add_argument("--logging-steps", type=int, default=10)
    opt.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    opt.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-N")
    args = p.parse_args(argv)
    if bool(args.init) == bool(args.cloc or args.lm) or (args.cloc is None) != (args.lm is None):
        p.error("give either --init DIR, or --cloc DIR with --lm DIR")
    if args.stage == "align" and (args.unfreeze_tower or args.no_lora):
        p.error("--unfreeze-tower and --no-lora belong to --stage instruct (stage 1 trains the projectors only)")
    if args.tower_lr is not None and not args.unfreeze_tower:
        p.error("--tower-lr needs --unfreeze-tower")
    args.lr = args.lr if args.lr is not None else (1e-3 if args.stage == "align" else 2e-4)
    return args


# -- distributed set-up -----------------------------------------------------------------------------
def prepare_distributed(deepspeed: bool) -> bool:
    """On CPU-only machines, create accelerate's state with gloo before the Trainer does (it would ask
    for NCCL, or for DeepSpeed assume one process). Returns whether the Trainer must reuse that state."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available() or (world == 1 and not deepspeed):
        return False
    if deepspeed and world == 1:  # one process without a launcher: DeepSpeed would try MPI discovery
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29512"), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    if deepspeed:
        from training.pretrain import _skip_deepspeed_shm_build

        _skip_deepspeed_shm_build()
    from accelerate import PartialState

    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:  # PartialState initialises DeepSpeed's comm module (with gloo) only when it sees this
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if deepspeed and flag is None:  # the Trainer's own DeepSpeed plugin comes from its arguments
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    return True


# -- the starting model -----------------------------------------------------------------------------
def build_start(args):
    """``(model, processor, base_dir)``: the starting CLOC-LLaVA; ``base_dir`` is its folder, ``None``
    when it was built from ``--cloc`` / ``--lm`` (it is then saved to ``OUT/base`` for LoRA)."""
    from llava_bridge import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor

    if args.init:
        from transformers import AutoProcessor

        model = CLOCLlavaForConditionalGeneration.from_pretrained(args.init)
        return model, AutoProcessor.from_pretrained(args.init), args.init
    from transformers import AutoModelForCausalLM

    from cloc_hf import CLOCImageProcessor

    tokenizer = load_tokenizer(args.lm)
    lm = AutoModelForCausalLM.from_pretrained(args.lm)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

    model = CLOCLlavaForConditionalGeneration.from_cloc_and_llava(
        args.cloc, text_config=lm.config, use_prompter=not args.no_prompter,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        region_token_id=tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        vision_feature_layer=args.vision_feature_layer, vision_feature_select_strategy="default",
    )
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    vision = model.config.vision_config
    try:
        image_processor = CLOCImageProcessor.from_pretrained(args.cloc)
    except OSError:  # a checkpoint saved without its processor: CLOC's defaults at the tower's size
        image_processor = CLOCImageProcessor(size=vision.image_size)
    processor = CLOCLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                                   vision_feature_select_strategy="default")
    return model, processor, None


def load_tokenizer(lm_dir: str):
    """The language model's tokenizer with ``<image>``, ``<region>`` (one token each) and a pad token."""
    from transformers import AutoTokenizer

    from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    missing = [t for t in (IMAGE_TOKEN, REGION_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# -- what trains ------------------------------------------------------------------------------------
def set_trainable(model, args):
    """Freeze per stage; for LoRA returns the ``PeftModel`` (adapters on the LM, trained modules saved with them)."""
    model.requires_grad_(False)
    trained = list(PROJECTORS) + (list(TOWER) if args.unfreeze_tower else [])
    if args.stage == "instruct" and not args.no_lora:
        from peft import LoraConfig, get_peft_model

        targets = "|".join(re.escape(t.strip()) for t in args.lora_targets.split(",") if t.strip())
        config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
            target_modules=rf".*language_model\..*\.({targets})",
            modules_to_save=[m for m in trained if _has_module(model, m)],
        )
        return get_peft_model(model, config)
    if args.stage == "instruct":
        trained.append("language_model")
        model.lm_head.requires_grad_(True)
    for name, module in model.named_modules():
        if any(name.endswith(m) for m in trained):
            module.requires_grad_(True)
    return model


def _has_module(model, suffix: str) -> bool:
    return any(name.endswith(suffix) for name, _ in model.named_modules())


def is_tower_parameter(name: str) -> bool:
    """Whether a parameter belongs to the tower (or its Prompter), trained at ``--tower-lr``."""
    return any(f"{m}." in name for m in TOWER)


def make_trainer_class():
    """transformers' ``Trainer`` with a tower learning rate and seeded length-grouped batches."""
    from transformers import Trainer

    from .dataset import EpochLengthGroupedSampler

    class MLLMTrainer(Trainer):
        tower_lr: float | None = None

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == "group_by_length":  # exact lengths, no image loaded
                batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
                return EpochLengthGroupedSampler(batch, dataset.lengths, seed=self.args.seed)
            return super()._get_train_sampler(train_dataset)

        def create_optimizer(self, model=None):
            if self.optimizer is None and self.tower_lr is not None:
                model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(model))
                groups = {}
                for name, param in model.named_parameters():
                    if param.requires_grad:
                        key = (is_tower_parameter(name), name in decay)
                        groups.setdefault(key, []).append(param)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = cls([
                    {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
                     **({"lr": self.tower_lr} if tower else {})}
                    for (tower, decayed), params in sorted(groups.items())
                ], **kwargs)
            return super().create_optimizer(model)

    return MLLMTrainer


def training_arguments(args, gloo_state: bool):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    extra = {"accelerator_config": {"use_configured_state": True}, "ddp_backend": "gloo"} if gloo_state else {}
    return TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps, warmup_steps=args.warmup,
        lr_scheduler_type="cosine", weight_decay=args.weight_decay, optim="adamw_torch", bf16=bf16,
        logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, data_seed=args.seed, report_to="none",
        remove_unused_columns=False, dataloader_num_workers=args.num_workers, deepspeed=args.deepspeed,
        train_sampling_strategy="random" if args.no_group_by_length else "group_by_length",
        activation_checkpointing=args.gradient_checkpointing,  # transformers' newer name for it
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        ddp_find_unused_parameters=True,  # batches without <region> leave the region encoder unused
        use_cpu=not cuda, disable_tqdm=True, **extra,
    )


# -- saving -----------------------------------------------------------------------------------------
def save_final(trainer, processor, out: Path, base_dir: str | None) -> None:
    """Write the trained model (LoRA merged) + processor to ``out`` and, with LoRA, the adapter to
    ``out/adapter``; under ZeRO-3 the partitioned weights are gathered first (every rank must call)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = trainer.model
    if is_deepspeed_zero3_enabled():
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: 16-bit gather
        if trainer.accelerator.is_main_process:
            model = _rebuilt(model, state)
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        model.peft_config["default"].base_model_name_or_path = str(base_dir)
        model.save_pretrained(out / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    logger.info("saved the fine-tuned model to %s%s", out, " (adapter in adapter/)" if (out / "adapter").is_dir() else "")


def _rebuilt(model, state: dict):
    """A plain (unpartitioned) copy of ``model`` holding the gathered ``state``."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from llava_bridge import CLOCLlavaForConditionalGeneration

    unset_hf_deepspeed_config()  # build outside zero.Init: this copy is for saving on one rank
    if hasattr(model, "merge_and_unload"):
        from peft import get_peft_model

        base = CLOCLlavaForConditionalGeneration(model.get_base_model().config)
        fresh = get_peft_model(base, model.peft_config["default"])
    else:
        fresh = CLOCLlavaForConditionalGeneration(model.config)
    fresh.load_state_dict(state)
    return fresh


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .dataset import InstructionCollator, InstructionDataset, load_records

    gloo_state = prepare_distributed(bool(args.deepspeed))
    set_seed(args.seed)
    out = Path(args.out)
    model, processor, base_dir = build_start(args)
    dataset = InstructionDataset(load_records(args.data), args.image_root or Path(args.data).parent, processor,
                                 max_length=args.max_length)
    training_args = training_arguments(args, gloo_state)
    if base_dir is None and args.stage == "instruct" and not args.no_lora and training_args.process_index == 0:
        model.save_pretrained(out / "base", safe_serialization=True)  # what the adapter applies to
        processor.save_pretrained(out / "base")
        base_dir = str(out / "base")
    model = set_trainable(model, args)
    if args.deepspeed:  # every rank must run the same modules at every step
        (model.get_base_model() if hasattr(model, "get_base_model") else model).model.region_encoder_every_step = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("stage %s: %d trainable parameters of %d", args.stage, trainable, sum(p.numel() for p in model.parameters()))
    trainer = make_trainer_class()(model=model, args=training_args, train_dataset=dataset,
                                   data_collator=InstructionCollator(processor.tokenizer.pad_token_id))
    trainer.tower_lr = args.tower_lr
    checkpoint = get_last_checkpoint(args.out) if args.resume and out.is_dir() else None
    if args.resume:
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
        else:
            logger.info("no checkpoint in %s: starting from scratch", out)
    trainer.train(resume_from_checkpoint=checkpoint)
    save_final(trainer, processor, out, base_dir or (str(out / "base") if (out / "base").is_dir() else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
