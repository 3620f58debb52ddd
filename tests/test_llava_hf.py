"""Hugging Face ``LlavaForConditionalGeneration`` with a CLOC tower: train, generate, save/reload, token counts."""

import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import cloc_hf
from cloc_hf import CLOCImageProcessor, CLOCVisionConfig, CLOCVisionModel

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "user", "assistant", "a", "red", "square", "on", "the", "left"]
IMAGE_TOKEN_ID = WORDS.index("<image>")
GRID = 16  # 32 px / patch 8 -> 4 x 4 patches


def _vision_config() -> CLOCVisionConfig:
    return CLOCVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )


def _llava(strategy="default", layer=-2, seed=0, vision=None) -> LlavaForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision or _vision_config(), text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline (no hub access)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return tokenizer


def _processor(strategy: str, additional: int) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=CLOCImageProcessor(size=32), tokenizer=_tokenizer(), patch_size=8,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=additional, image_token="<image>",
    )


def _ids(num_image_tokens: int, batch: int = 1) -> torch.Tensor:
    row = [2, 5] + [IMAGE_TOKEN_ID] * num_image_tokens + [7, 8, 9]
    return torch.tensor([row] * batch)


@pytest.mark.parametrize(
    "strategy, layer, tokens, width",
    [("default", -2, GRID, 32), ("full", -2, GRID + 1, 32), ("default", [0, -1], GRID, 64), ("full", [-2, 0], GRID + 1, 64)],
)
def test_image_token_counts(strategy, layer, tokens, width):
    """Token count per strategy; a layer list widens the projector input, not the count (layer 0 included)."""
    llava = _llava(strategy, layer).eval()
    assert isinstance(llava.model.vision_tower, CLOCVisionModel)
    assert llava.model.multi_modal_projector.linear_1.in_features == width
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = llava.model.get_image_features(pixel_values=px).pooler_output
        assert [f.shape for f in features] == [(tokens, 32)] * 2
        hidden = llava.model.vision_tower(px, output_hidden_states=True).hidden_states
        layers = [layer] if isinstance(layer, int) else layer
        selected = torch.cat([hidden[i][:, 1:] if strategy == "default" else hidden[i] for i in layers], dim=-1)
        torch.testing.assert_close(torch.stack(features), llava.model.multi_modal_projector(selected))
        logits = llava(input_ids=_ids(tokens, 2), pixel_values=px).logits
    assert logits.shape == (2, tokens + 5, len(WORDS))
    with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        llava(input_ids=_ids(tokens - 1, 2), pixel_values=px)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_processor_counts_image_tokens(strategy):
    """A class-token tower needs ``num_additional_image_tokens=1``; with 0 the count is one short."""
    llava = _llava(strategy).eval()
    images = [PIL.Image.new("RGB", (40, 24), "red"), PIL.Image.new("RGB", (20, 50), "blue")]
    text = ["user <image> a red square", "user <image> the left square"]
    inputs = _processor(strategy, 1)(images=images, text=text, return_tensors="pt", padding=True)
    expected = GRID if strategy == "default" else GRID + 1
    assert ((inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1) == expected).all()
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        llava(**inputs)
    short = _processor(strategy, 0)(images=images, text=text, return_tensors="pt", padding=True)
    assert ((short["input_ids"] == IMAGE_TOKEN_ID).sum(-1) == expected - 1).all()
    with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        llava(**short)


@pytest.mark.slow  # the fresh interpreter's `import cloc_hf` (torch + transformers) alone costs ~6 s of CPU
def test_train_generate_save_and_reload_in_a_fresh_process(tmp_path):
    """The saved model reloads where only ``import cloc_hf`` has registered the tower, as a user's script."""
    llava = _llava()
    ids, px = _ids(GRID), torch.randn(1, 3, 32, 32)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN_ID] = -100
    optimizer = torch.optim.SGD(llava.parameters(), lr=0.1)
    tower_before = llava.model.vision_tower.embeddings.patch_embedding.weight.detach().clone()
    loss = llava(input_ids=ids, pixel_values=px, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and llava.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(tower_before, llava.model.vision_tower.embeddings.patch_embedding.weight)
    llava.eval()
    with torch.no_grad():
        generated = llava.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
        logits = llava(input_ids=ids, pixel_values=px).logits
    assert generated.shape == (1, ids.shape[1] + 3)
    llava.save_pretrained(tmp_path / "llava")
    torch.save({"ids": ids, "px": px, "logits": logits, "generated": generated}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import cloc_hf
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained({str(tmp_path / "llava")!r}).eval()
        assert type(model.model.vision_tower) is cloc_hf.CLOCVisionModel, type(model.model.vision_tower)
        e = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=e["ids"], pixel_values=e["px"]).logits, e["logits"])
            out = model.generate(input_ids=e["ids"], pixel_values=e["px"], max_new_tokens=3, do_sample=False)
        assert torch.equal(out, e["generated"]), (out, e["generated"])
        print("reloaded ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "reloaded ok" in result.stdout, result.stderr[-3000:]


def test_cloc_checkpoint_weights_into_hf_llava(tmp_path):
    """The documented way to put a saved CLOC ViT into an HF LLaVA model."""
    torch.manual_seed(1)
    cloc = cloc_hf.create_model("cloc-tiny", vision_config=dict(patch_size=8))
    cloc.save_pretrained(tmp_path / "cloc")
    vision = CLOCVisionConfig.from_pretrained(tmp_path / "cloc")
    assert (vision.hidden_size, vision.patch_size) == (32, 8)
    llava = _llava(vision=vision)
    assert isinstance(llava.model.vision_tower, CLOCVisionModel)
    llava.model.vision_tower.load_state_dict(CLOCVisionModel.from_pretrained(tmp_path / "cloc").state_dict())
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            llava.model.vision_tower(px).last_hidden_state, cloc.vision_model(px).last_hidden_state
        )
