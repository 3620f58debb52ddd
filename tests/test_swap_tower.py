"""``cloc-swap-tower``: a tiny sharded LLaVA checkpoint gets a CLOC tower, shard by shard."""

import json
import subprocess
import sys

import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import cloc_hf
from llava_bridge import swap_llava_tower
from llava_bridge.swap_tower import SAFE_INDEX, SwapTowerError, main, read_cloc_tower

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "user", "assistant", "a", "red", "square", "on", "the", "left"]
IMAGE_TOKEN_ID = WORDS.index("<image>")


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline (no hub access)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def _llava_source(path, vision_hidden=32, layout="saved", strategy="default"):
    """A tiny CLIP-tower LLaVA (text hidden 32, 2 layers) saved in >= 3 shards with its tokenizer."""
    text = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    if layout == "saved":  # transformers' own save: vision_tower.*, language_model.model.*, ...
        model.save_pretrained(path, max_shard_size="40KB")
    else:  # the in-memory layout (model.vision_tower.*, model.language_model.*, lm_head.*), 3 shards by hand
        config.save_pretrained(path)
        names = sorted(model.state_dict())
        weight_map = {}
        for i in range(3):
            shard = f"model-{i + 1:05d}-of-00003.safetensors"
            part = {n: model.state_dict()[n].contiguous() for n in names[i::3]}
            save_file(part, str(path / shard), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, shard)
        (path / SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _tokenizer().save_pretrained(path)
    return path


def _cloc(path, full=True):
    torch.manual_seed(1)
    model = cloc_hf.create_model("cloc-tiny", vision_config=dict(patch_size=8))  # ViT width 32, 32 px
    (model if full else model.vision_model).save_pretrained(path)
    return path, model.vision_model


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out |= {k: handle.get_tensor(k) for k in handle.keys()}
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("layout, tower_prefix", [("saved", "vision_tower."), ("memory", "model.vision_tower.")])
def test_swap_keeps_lm_bytes_and_loads_the_cloc_tower(tmp_path, layout, tower_prefix):
    src = _llava_source(tmp_path / "src", layout=layout)
    assert len(list(src.glob("model-*.safetensors"))) >= 3
    cloc_dir, vit = _cloc(tmp_path / "cloc")
    dst = swap_llava_tower(src, cloc_dir, tmp_path / "dst")

    before, after = _tensors(src), _tensors(dst)
    kept = [k for k in before if not k.startswith(tower_prefix)]
    assert kept and all(_same_bytes(before[k], after[k]) for k in kept)  # LM and projector, byte for byte
    tower = {k.removeprefix(tower_prefix): v for k, v in after.items() if k.startswith(tower_prefix)}
    assert tower.keys() == vit.state_dict().keys()
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in tower.items())
    index = json.loads((dst / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(after) and all((dst / f).is_file() for f in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())

    model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    assert type(model.model.vision_tower) is cloc_hf.CLOCVisionModel
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[k], v, rtol=0, atol=0)
    reference = LlavaForConditionalGeneration.from_pretrained(src)
    for k, v in reference.model.multi_modal_projector.state_dict().items():  # kept: widths agree (32)
        assert torch.equal(model.model.multi_modal_projector.state_dict()[k], v)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert "re-align" in (dst / "README.md").read_text()


@pytest.mark.parametrize("strategy, tokens", [("default", 16), ("full", 17)])
def test_written_processor_counts_image_tokens_and_generates(tmp_path, strategy, tokens):
    src = _llava_source(tmp_path / "src", strategy=strategy)
    dst = swap_llava_tower(src, _cloc(tmp_path / "cloc", full=False)[0], tmp_path / "dst")
    processor = AutoProcessor.from_pretrained(dst)
    assert type(processor) is LlavaProcessor
    assert isinstance(processor.image_processor, cloc_hf.CLOCImageProcessor) and processor.image_processor.size == 32
    assert processor.image_processor.return_original_sizes is False  # its outputs are exactly the model's inputs
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == 8
    images = [PIL.Image.new("RGB", (40, 24), "red"), PIL.Image.new("RGB", (20, 50), "blue")]
    inputs = processor(images=images, text=["user <image> a red square", "user <image> the left"], return_tensors="pt", padding=True)
    assert ((inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1) == tokens).all()
    config = json.loads((dst / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "cloc_vision_model" and config["image_seq_length"] == tokens
    assert (config["vision_feature_select_strategy"], config["vision_feature_layer"]) == (strategy, -2)
    model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    with torch.no_grad():
        model(**inputs)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_projector_mismatch_refused_unless_reinit(tmp_path):
    src = _llava_source(tmp_path / "src", vision_hidden=48)  # CLIP width 48, CLOC width 32
    cloc_dir, vit = _cloc(tmp_path / "cloc")
    with pytest.raises(SwapTowerError, match=r"takes 48 features.*--projector reinit"):
        swap_llava_tower(src, cloc_dir, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    dst = swap_llava_tower(src, cloc_dir, tmp_path / "dst", projector="reinit")
    model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    projector = model.model.multi_modal_projector
    assert projector.linear_1.weight.shape == (32, 32)
    assert torch.all(projector.linear_1.bias == 0) and 0.01 < projector.linear_1.weight.std() < 0.03  # N(0, 0.02)
    before, after = _tensors(src), _tensors(dst)
    lm = [k for k in before if k.startswith("language_model.")]
    assert lm and all(_same_bytes(before[k], after[k]) for k in lm)
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([[2, 5] + [IMAGE_TOKEN_ID] * 16 + [7]]), pixel_values=torch.randn(1, 3, 32, 32),
                       max_new_tokens=2, do_sample=False)


def test_pickled_weights_refused_unless_allowed(tmp_path):
    src = _llava_source(tmp_path / "src")
    state = _tensors(src)
    for file in list(src.glob("model*.safetensors*")):
        file.unlink()
    torch.save(state, src / "pytorch_model.bin")
    cloc_dir, vit = _cloc(tmp_path / "cloc")
    with pytest.raises(SwapTowerError, match=r"pickled \(pytorch_model.bin\).*--allow-pickle"):
        swap_llava_tower(src, cloc_dir, tmp_path / "refused")
    dst = swap_llava_tower(src, cloc_dir, tmp_path / "dst", allow_pickle=True)
    assert not list(dst.glob("*.bin")) and (dst / "model.safetensors").is_file()
    after = _tensors(dst)
    assert all(_same_bytes(v, after[k]) for k, v in state.items() if not k.startswith("vision_tower."))
    assert torch.equal(after["vision_tower.post_layernorm.weight"], vit.post_layernorm.weight)
    LlavaForConditionalGeneration.from_pretrained(dst)


def test_cloc_tower_reader_takes_only_the_vit(tmp_path):
    cloc_dir, vit = _cloc(tmp_path / "cloc")
    config, tensors = read_cloc_tower(cloc_dir, dtype=torch.bfloat16)
    assert config.hidden_size == 32 and tensors.keys() == vit.state_dict().keys()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama"}')), "model_type 'llama'"),
        (lambda p: (_llava_source(p), sorted(p.glob("model-*"))[1].unlink()), "lists shard files that are missing: model-00002-of"),
        (lambda p: (_llava_source(p), (p / "model-00003-of-00006.safetensors").write_bytes(b"\x10")), "not a safetensors file"),
    ],
)
def test_bad_source_gives_one_error_line(tmp_path, capsys, make_bad, message):
    bad = tmp_path / "bad"
    make_bad(bad)
    cloc_dir, _ = _cloc(tmp_path / "cloc")
    capsys.readouterr()  # the fixtures' own progress bars
    assert main(["--llava", str(bad), "--cloc", str(cloc_dir), "--out", str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cloc-swap-tower: error: ") and message in err[0], err
    assert not (tmp_path / "dst").exists()


def test_output_folder_must_be_new_or_empty(tmp_path):
    src = _llava_source(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("user data")
    with pytest.raises(SwapTowerError, match="exists and is not an empty folder"):
        swap_llava_tower(src, _cloc(tmp_path / "cloc")[0], tmp_path / "dst")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]
    with pytest.raises(SwapTowerError, match="is the source folder"):
        swap_llava_tower(src, tmp_path / "cloc", src)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers
def test_cli_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from llava_bridge.swap_tower import main; sys.exit(main())", "--llava", str(tmp_path / "nope"), "--cloc", str(tmp_path),
         "--out", str(tmp_path / "dst")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"cloc-swap-tower: error: {tmp_path / 'nope'}: not a folder")
