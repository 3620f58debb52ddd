"""``cloc-finetune-mllm`` (training.mllm.finetune / dataset): answer-only labels, the two stages, LoRA
adapters + merged weights, resume after a kill, and 2 processes with DeepSpeed ZeRO-2 and ZeRO-3
(also when one rank's batch has region prompts and the other's has none).

Tiny everything: a cloc-tiny tower (ViT hidden 32, 2 layers, 32 px) with 8 px patches (16 image
tokens), a 2-layer Llama with hidden 32, a word-level tokenizer built offline from the records, and
instruction records made from a few synthetic scenes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import cloc_hf
from cloc_data.synthetic import SyntheticSceneConfig, generate_split
from llava_bridge import CLOCLlavaForConditionalGeneration
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN
from training.mllm import finetune
from training.mllm.dataset import (
    IGNORE_INDEX,
    InstructionCollator,
    InstructionDataset,
    check_record,
    render_prompt,
)
from training.mllm.instructions import InstructionBuilder, InstructionConfig, collect_phrases

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", IMAGE_TOKEN, REGION_TOKEN]


def _pieces(text: str) -> list[str]:
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return [p for p, _ in pre.pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``{data, cloc, lm, records}``: a data.json with images, a CLOC folder and a Llama folder with tokenizer."""
    root = tmp_path_factory.mktemp("mllm")
    samples = list(generate_split(SyntheticSceneConfig(seed=0), "train", 6))
    builder = InstructionBuilder(InstructionConfig(tasks=("rec", "ref_desc", "ref_cls"), max_regions_per_task=2),
                                 collect_phrases(samples))
    records = [r for s in samples for r in builder.records(s)]
    (root / "images").mkdir()
    for s in samples:
        s.image.save(root / "images" / f"{s.key}.png")
    (root / "data.json").write_text(json.dumps(records))

    text = " ".join(render_prompt(t["value"]) for r in records for t in r["conversations"])
    words = sorted(set(_pieces(text)) - set(SPECIALS))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                  bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, REGION_TOKEN]})
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    cloc = cloc_hf.create_model("cloc-tiny", vision_config={"patch_size": 8})
    cloc.save_pretrained(root / "cloc")
    cloc_hf.CLOCImageProcessor(size=32).save_pretrained(root / "cloc")
    return {"root": root, "data": root / "data.json", "cloc": root / "cloc", "lm": root / "lm", "records": records}


def _args(setup, out, *extra, stage="instruct", start=None, steps=3):
    start = start or ["--cloc", str(setup["cloc"]), "--lm", str(setup["lm"])]
    return ["--stage", stage, *start, "--data", str(setup["data"]), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--logging-steps", "1", "--save-steps", "2", "--warmup", "0", *extra]


@pytest.fixture(scope="module")
def stage1(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    assert finetune.main(_args(setup, out, "--lr", "1e-2", stage="align")) == 0
    return out


def _start(setup, **kw):
    args = finetune.parse_args(_args(setup, "unused", **kw))
    torch.manual_seed(args.seed)
    from transformers import set_seed

    set_seed(args.seed)
    return finetune.build_start(args)


def test_labels_cover_only_the_answers(setup):
    model, processor, _ = _start(setup, stage="align")
    records = setup["records"]
    data = InstructionDataset(records, setup["root"], processor)
    with_region = next(i for i, r in enumerate(data.records) if r["regions"])
    for index in (0, with_region):
        example, record = data[index], data.records[index]
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == data.lengths[index]
        kept = labels[labels != IGNORE_INDEX].tolist()
        answer = record["conversations"][1]["value"]
        assert kept == processor.tokenizer.encode(" " + answer, add_special_tokens=False) + [processor.tokenizer.eos_token_id]
        assert (labels != IGNORE_INDEX).nonzero().min() > (ids == model.config.image_token_id).nonzero().max()
        assert int((ids == model.config.image_token_id).sum()) == 16  # 4 x 4 patches, no class token
        assert len(example["region_boxes"]) == len(record["regions"]) == int((ids == model.config.region_token_id).sum())
    batch = InstructionCollator(processor.tokenizer.pad_token_id)([data[0], data[with_region]])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_bad_records_name_the_record_and_missing_images_are_counted(setup):
    _, processor, _ = _start(setup, stage="align")
    record = next(r for r in setup["records"] if r["regions"])
    bad = {**record, "id": "bad-one", "regions": record["regions"] * 2}
    with pytest.raises(ValueError, match="record 'bad-one' has 1 <region> tokens .* but 2 boxes"):
        check_record(bad)
    with pytest.raises(ValueError, match="bad-one"):
        InstructionDataset([bad], setup["root"], processor)
    missing = {**record, "id": "gone", "image": "images/nope.png"}
    data = InstructionDataset([record, missing], setup["root"], processor)
    assert len(data) == 1 and data.skipped.as_dict() == {"missing_image": 1}


def test_stage1_trains_only_the_projectors(setup, stage1):
    start, _, _ = _start(setup, stage="align")
    trained = CLOCLlavaForConditionalGeneration.from_pretrained(stage1)
    before, after = start.state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(("model.multi_modal_projector.", "model.region_encoder.projector.")) for k in changed), changed
    assert any(k.startswith("model.region_encoder.projector.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)


def test_stage2_lora_saves_adapter_and_merged_model_that_reload_and_generate(setup, stage1, tmp_path):
    from peft import PeftModel

    out = tmp_path / "s2"
    assert finetune.main(_args(setup, out, "--lr", "1e-2", "--gradient-checkpointing", start=["--init", str(stage1)])) == 0
    assert (out / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = CLOCLlavaForConditionalGeneration.from_pretrained(out).eval()
    base = CLOCLlavaForConditionalGeneration.from_pretrained(stage1)
    adapted = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().eval()
    a, b = merged.state_dict(), adapted.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    start = load_file(str(stage1 / "model.safetensors"))  # `base` was merged in place
    assert not torch.equal(a["model.language_model.layers.0.self_attn.q_proj.weight"],
                           start["model.language_model.layers.0.self_attn.q_proj.weight"])

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    record = next(r for r in setup["records"] if r["regions"])
    from PIL import Image

    image = Image.open(setup["root"] / record["image"])
    inputs = processor(images=[image], text=[render_prompt(record["conversations"][0]["value"])],
                       boxes=[record["regions"]])
    generated = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    again = adapted.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1] and torch.equal(generated, again)


def test_resume_after_a_kill_reaches_the_uninterrupted_weights(setup, stage1, tmp_path, monkeypatch):
    from transformers import Trainer

    extra = ("--unfreeze-tower", "--tower-lr", "1e-3", "--lr", "5e-3")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert finetune.main(_args(setup, straight, *extra, start=["--init", str(stage1)], steps=4)) == 0

    original = Trainer.training_step

    def dies_at_step_3(self, *a, **kw):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(_args(setup, killed, *extra, start=["--init", str(stage1)], steps=4))
    monkeypatch.setattr(Trainer, "training_step", original)
    assert (killed / "checkpoint-2").is_dir() and not (killed / "model.safetensors").exists()
    assert finetune.main([*_args(setup, killed, *extra, start=["--init", str(stage1)], steps=4), "--resume"]) == 0
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    first = load_file(str(stage1 / "model.safetensors"))
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert tower in a and not torch.equal(a[tower], first[tower]), "--unfreeze-tower trained the tower"


def test_tower_learning_rate_gets_its_own_group(setup, stage1):
    args = finetune.parse_args(_args(setup, "x", "--no-lora", "--unfreeze-tower", "--tower-lr", "1e-6",
                                     start=["--init", str(stage1)]))
    model, _, _ = finetune.build_start(args)
    model = finetune.set_trainable(model, args)
    assert all(p.requires_grad for p in model.parameters())  # --no-lora trains the LM as well
    trainer_cls = finetune.make_trainer_class()
    trainer = trainer_cls(model=model, args=finetune.training_arguments(args, False))
    trainer.tower_lr = 1e-6
    optimizer = trainer.create_optimizer()
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert lrs[id(param)] == (1e-6 if finetune.is_tower_parameter(name) else args.lr), name


def test_bad_arguments_are_refused(setup):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--stage", "align", "--data", "d", "--out", "o", "--cloc", "c"])  # --lm missing
    with pytest.raises(SystemExit):
        finetune.parse_args(["--stage", "align", "--data", "d", "--out", "o", "--init", "i", "--unfreeze-tower"])


def _one_region_record_per_rank(setup, stage1, out, *extra) -> list[str]:
    """Arguments for 2 steps of 2 processes on two records, one with a region and one without, one per
    rank: at every step one rank runs the region encoder on its own (unless it runs everywhere)."""
    with_region = next(r for r in setup["records"] if r["regions"])
    without = next(r for r in setup["records"] if not r["regions"])
    data = setup["root"] / "mixed_regions.json"
    data.write_text(json.dumps([with_region, without]))
    args = _args({**setup, "data": data}, out, *extra, start=["--init", str(stage1)], steps=2)
    args[args.index("--batch-size") + 1] = "1"
    return args


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_with_deepspeed_zero2(setup, stage1, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "training.mllm.finetune",
           *_one_region_record_per_rank(setup, stage1, out,
                                        "--deepspeed", str(ROOT / "training/mllm/configs/ds_zero2.json"))]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = CLOCLlavaForConditionalGeneration.from_pretrained(out)
    start = load_file(str(stage1 / "model.safetensors"))
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[key], start[key])


def test_region_encoder_runs_on_batches_without_regions(setup, stage1):
    """DeepSpeed needs the same collective calls on every rank: the region encoder must run (to no
    effect) on a batch without <region>, else a rank without regions skips what a rank with them does."""
    from llava_bridge.modeling_llava import CLOCLlavaRegionEncoder

    args = finetune.parse_args(_args(setup, "unused", start=["--init", str(stage1)]))
    model, processor, _ = finetune.build_start(args)
    model = finetune.set_trainable(model, args)
    data = InstructionDataset(setup["records"], setup["root"], processor)
    batch = InstructionCollator(processor.tokenizer.pad_token_id)(
        [data[i] for i, r in enumerate(data.records) if not r["regions"]][:2])
    assert batch["region_boxes"] is None
    calls = []
    encoder = next(m for m in model.modules() if isinstance(m, CLOCLlavaRegionEncoder))
    encoder.register_forward_hook(lambda *_: calls.append(1))
    plain = model(**batch).loss
    assert not calls
    (model.get_base_model() if hasattr(model, "get_base_model") else model).model.region_encoder_every_step = True
    always = model(**batch).loss
    assert calls, "the region encoder did not run"
    torch.testing.assert_close(always, plain, rtol=0, atol=0)
    always.backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-lm"])
def test_torchrun_two_processes_with_deepspeed_zero3(setup, stage1, tmp_path, lora):
    """ZeRO-3 partitions the parameters over 2 CPU processes; each step one rank's record has a region
    and the other's has none, which stopped the run before the region encoder ran on every batch. The
    merged model is gathered to a normal checkpoint with stage 1's tensors."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds3"
    args = _one_region_record_per_rank(setup, stage1, out, *([] if lora else ["--no-lora"]),
                                       "--deepspeed", str(ROOT / "training/mllm/configs/ds_zero3.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           "-m", "training.mllm.finetune", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == lora
    assert (out / "checkpoint-2").is_dir()
    merged = CLOCLlavaForConditionalGeneration.from_pretrained(out).state_dict()
    start = load_file(str(stage1 / "model.safetensors"))
    assert merged.keys() == start.keys()
    assert all(merged[k].shape == start[k].shape for k in start)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], start[key])
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(merged[tower], start[tower])  # frozen without --unfreeze-tower
