"""``CLOCLlavaForConditionalGeneration`` / ``CLOCLlavaProcessor``: ``<region>`` tokens take region features.

Tiny configs throughout (ViT hidden 32, 2 layers, 32 px, patch 8 -> 4 x 4 patches; a 2-layer Llama)
and a word-level tokenizer built offline.
"""

import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import cloc_hf
from cloc_hf import CLOCImageProcessor, CLOCVisionConfig
from cloc_hf.box_ops import roi_align_patch_tokens
from llava_bridge import (
    CLOCLlavaConfig,
    CLOCLlavaForConditionalGeneration,
    CLOCLlavaProcessor,
    box_to_text,
)
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", IMAGE_TOKEN, REGION_TOKEN, "user", "what", "is", "in", "and", "a", "cat", "[", "]", ","]
WORDS += [str(i) for i in range(10)] + ["."]
IMAGE_ID, REGION_ID = WORDS.index(IMAGE_TOKEN), WORDS.index(REGION_TOKEN)
GRID = 16  # image tokens per image ("default" strategy)


def _vision(kind="cloc"):
    cls = CLOCVisionConfig if kind == "cloc" else CLIPVisionConfig
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def _config(kind="cloc", prompter=True, **kwargs) -> CLOCLlavaConfig:
    text = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    extra = dict(prompter_config={"num_attention_heads": 2}, prompter_projection_dim=24) if prompter else {}
    return CLOCLlavaConfig(
        vision_config=_vision(kind), text_config=text, image_token_id=IMAGE_ID, region_token_id=REGION_ID,
        **{"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **extra, **kwargs},
    )


def _model(kind="cloc", prompter=True, seed=0, **kwargs) -> CLOCLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return CLOCLlavaForConditionalGeneration(_config(kind, prompter, **kwargs))


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, REGION_TOKEN]})
    assert tok.convert_tokens_to_ids([IMAGE_TOKEN, REGION_TOKEN]) == [IMAGE_ID, REGION_ID]
    return tok


def _processor(**kwargs) -> CLOCLlavaProcessor:
    return CLOCLlavaProcessor(
        image_processor=CLOCImageProcessor(size=32), tokenizer=_tokenizer(), patch_size=8,
        vision_feature_select_strategy="default", **kwargs,
    )


def _ids(regions_per_sample) -> torch.Tensor:
    """One row per sample: ``<s> user <image>*16 what is in`` then ``<region> and`` per region, same length."""
    longest = max(regions_per_sample)
    rows = []
    for n in regions_per_sample:
        tail = [REGION_ID, 10] * n + [11, 12] * (longest - n)
        rows.append([2, 6] + [IMAGE_ID] * GRID + [7, 8, 9] + tail)
    return torch.tensor(rows)


BOXES = [
    torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.9]]),
    torch.zeros(0, 4),
    torch.tensor([[0.0, 0.5, 0.5, 1.0]]),
]


class _Captured:
    """Records the language model's ``inputs_embeds`` and counts vision-tower passes."""

    def __init__(self, model):
        self.embeds, self.tower_passes = [], 0
        model.model.language_model.register_forward_pre_hook(self._lm, with_kwargs=True)
        model.model.vision_tower.register_forward_hook(self._tower)

    def _lm(self, module, args, kwargs):
        self.embeds.append(kwargs["inputs_embeds"].detach().clone())

    def _tower(self, module, args, output):
        self.tower_passes += 1


def test_forward_loss_backward_with_per_sample_region_counts():
    """Counts 2, 0, 1 in one batch: the k-th <region> of sample i holds region k of sample i, from one ViT pass."""
    model = _model()
    seen = _Captured(model)
    ids, px = _ids([2, 0, 1]), torch.randn(3, 3, 32, 32)
    out = model(input_ids=ids, pixel_values=px, region_boxes=BOXES, labels=ids)
    assert seen.tower_passes == 1
    out.loss.backward()
    for part in (model.model.region_encoder.prompter, model.model.region_encoder.projector, model.model.vision_tower):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())

    with torch.no_grad():
        outs = model.model.vision_tower(px, output_hidden_states=True)
        expected, counts = model.model.region_encoder(outs.hidden_states[-1], boxes=BOXES)
    assert counts == [2, 0, 1]
    embeds = seen.embeds[0]
    rows = [embeds[i][ids[i] == REGION_ID] for i in range(3)]
    torch.testing.assert_close(torch.cat(rows), expected, rtol=1e-5, atol=1e-5)
    # the other tokens keep their word embeddings
    words = model.get_input_embeddings()(ids)
    keep = (ids != REGION_ID) & (ids != IMAGE_ID)
    torch.testing.assert_close(embeds[keep], words[keep].detach())


def test_regions_change_only_what_follows_them():
    model = _model().eval()
    ids, px = _ids([2, 0, 1]), torch.randn(3, 3, 32, 32)
    moved = [BOXES[0].clone(), BOXES[1], BOXES[2]]
    moved[0][1] = torch.tensor([0.0, 0.0, 0.3, 0.3])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=px, region_boxes=BOXES).logits
        b = model(input_ids=ids, pixel_values=px, region_boxes=moved).logits
    second = int((ids[0] == REGION_ID).nonzero()[1])
    torch.testing.assert_close(a[0, :second], b[0, :second])
    assert not torch.allclose(a[0, second:], b[0, second:])
    torch.testing.assert_close(a[1:], b[1:])


def test_points_follow_boxes_within_a_sample():
    model = _model().eval()
    ids, px = _ids([2, 1]), torch.randn(2, 3, 32, 32)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.zeros(0, 4)]
    points = [torch.tensor([[0.7, 0.2]]), torch.tensor([[0.3, 0.3]])]
    seen = _Captured(model)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=px, region_boxes=boxes, region_points=points)
        tokens = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-1]
        from_boxes, _ = model.model.region_encoder(tokens, boxes=boxes)
        from_points, _ = model.model.region_encoder(tokens, points=points)
    embeds = seen.embeds[0]
    torch.testing.assert_close(embeds[0][ids[0] == REGION_ID], torch.cat([from_boxes, from_points[:1]]))
    torch.testing.assert_close(embeds[1][ids[1] == REGION_ID], from_points[1:])


def test_generate_injects_regions_in_prefill_with_one_tower_pass():
    model = _model().eval()
    seen = _Captured(model)
    ids, px = _ids([2, 0, 1]), torch.randn(3, 3, 32, 32)
    gen = model.generate(
        input_ids=ids, pixel_values=px, region_boxes=BOXES, max_new_tokens=4, do_sample=False,
        output_scores=True, return_dict_in_generate=True,
    )
    assert seen.tower_passes == 1
    assert len(seen.embeds) == 4 and seen.embeds[1].shape[1] == 1  # prefill, then one token per step
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px, region_boxes=BOXES).logits[:, -1]
    torch.testing.assert_close(gen.scores[0], logits, rtol=1e-4, atol=1e-4)


def test_beam_search_expands_region_prompts_per_sample():
    """num_beams / num_return_sequences repeat each sample: its regions and tower states go with it."""
    model = _model().eval()
    ids, px = _ids([2, 0, 1]), torch.randn(3, 3, 32, 32)
    kwargs = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    seen = _Captured(model)
    batched = model.generate(input_ids=ids, pixel_values=px, region_boxes=BOXES, **kwargs)
    assert seen.tower_passes == 1 and batched.shape[0] == 6
    alone = model.generate(input_ids=ids[2:], pixel_values=px[2:], region_boxes=BOXES[2:], **kwargs)
    torch.testing.assert_close(batched[4:], alone)


@pytest.mark.parametrize("tokens, boxes, sample, found, given", [([2, 0, 1], [BOXES[0], BOXES[0], BOXES[2]], 1, 0, 2),
                                                                   ([2, 0, 1], [BOXES[0], BOXES[1], BOXES[1]], 2, 1, 0)])
def test_region_token_count_mismatch_names_the_sample(tokens, boxes, sample, found, given):
    model = _model()
    with pytest.raises(ValueError, match=f"sample {sample} has {found} <region> tokens .* but {given} region prompts"):
        model(input_ids=_ids(tokens), pixel_values=torch.randn(3, 3, 32, 32), region_boxes=boxes)


def test_region_tokens_without_prompts_raise():
    model = _model()
    with pytest.raises(ValueError, match="sample 0 has 2 <region> tokens .* but 0 region prompts"):
        model(input_ids=_ids([2, 0, 1]), pixel_values=torch.randn(3, 3, 32, 32))


def test_boxes_outside_the_frame_raise_naming_the_box():
    model = _model()
    boxes = [BOXES[0], BOXES[1], torch.tensor([[0.2, 0.2, 1.5, 0.9]])]
    with pytest.raises(ValueError, match=r"region_boxes\[2\]\[0\] .* outside the frame"):
        model(input_ids=_ids([2, 0, 1]), pixel_values=torch.randn(3, 3, 32, 32), region_boxes=boxes)


def test_prompter_config_on_a_tower_without_prompter_raises():
    with pytest.raises(ValueError, match="'clip_vision_model', which has no Prompter"):
        _config("clip", prompter=True)


def test_clip_tower_pools_roi_align_features_of_the_selected_layer():
    """No Prompter: RoI-Align over the patch tokens the image projector reads, same code path."""
    model = _model("clip", prompter=False).eval()
    assert model.model.region_encoder.prompter is None
    seen = _Captured(model)
    ids, px = _ids([2, 0, 1]), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, region_boxes=BOXES, labels=ids)
        patches = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        index = torch.tensor([0, 0, 2])
        pooled = roi_align_patch_tokens(patches, torch.cat(BOXES), index)
        expected = model.model.region_encoder.projector(pooled)
    assert seen.tower_passes == 2 and torch.isfinite(out.loss)  # the model's pass + the reference pass above
    torch.testing.assert_close(seen.embeds[0][ids == REGION_ID], expected, rtol=1e-5, atol=1e-5)


def test_from_cloc_checkpoint_reads_the_prompter_on_the_final_tokens():
    """Region features = the CLOC model's own get_region_features, then the region projector."""
    cloc = cloc_hf.create_model("cloc-tiny").eval()
    text = _config().text_config
    model = CLOCLlavaForConditionalGeneration.from_cloc_and_llava(
        cloc, text, image_token_id=IMAGE_ID, region_token_id=REGION_ID
    ).eval()
    px = torch.randn(2, 3, 32, 32)
    boxes = [BOXES[0], BOXES[2]]
    with torch.no_grad():
        want = cloc.get_region_features(px, boxes=boxes)
        outs = model.model.get_image_features(px)
        got, counts = model.model.get_region_features(outs, region_boxes=boxes)
        expected = model.model.region_encoder.projector(torch.cat(want))
    assert counts == [2, 1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    vit_only = cloc_hf.CLOCVisionModel(cloc.config.vision_config)
    with pytest.raises(ValueError, match="has no Prompter"):
        CLOCLlavaForConditionalGeneration.from_cloc_and_llava(vit_only, text, use_prompter=True)
    roi = CLOCLlavaForConditionalGeneration.from_cloc_and_llava(vit_only, text, region_token_id=REGION_ID)
    assert roi.model.region_encoder.prompter is None
    with pytest.raises(ValueError, match="tower given has no Prompter"):
        model.load_cloc_weights(vit_only.state_dict(), None)


def _image(width, height):
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_processor_maps_boxes_writes_coordinates_and_counts_tokens():
    proc = _processor(box_convention="ferret")
    images = [_image(64, 32), _image(40, 40)]
    boxes = [[[8, 4, 40, 30], [0, 0, 64, 16]], []]
    texts = [f"user {IMAGE_TOKEN} what is in {REGION_TOKEN} and {REGION_TOKEN}", f"user {IMAGE_TOKEN} a cat"]
    inputs = proc(images=images, text=texts, boxes=boxes, padding=True)
    frame = proc.image_processor.frame_transform(64, 32)
    torch.testing.assert_close(inputs["region_boxes"][0], frame.to_model(torch.tensor(boxes[0], dtype=torch.float32)))
    assert inputs["region_boxes"][1].shape == (0, 4)
    assert (inputs["input_ids"] == IMAGE_ID).sum(1).tolist() == [GRID, GRID]  # class token counted and dropped
    assert (inputs["input_ids"] == REGION_ID).sum(1).tolist() == [2, 0]
    # the coordinates are written right before each <region>, in the chosen convention
    written = proc.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False).replace(" ", "")
    assert "[UNK]" not in written
    for box in boxes[0]:
        assert box_to_text(box, (64, 32), "ferret").replace(" ", "") + REGION_TOKEN in written
    model = _model().eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_processor_errors():
    proc = _processor()
    with pytest.raises(ValueError, match=f"sample 1 has 0 {REGION_TOKEN} tokens in its text but 1 region prompts"):
        proc(images=[_image(32, 32)] * 2, text=[f"{IMAGE_TOKEN} a", f"{IMAGE_TOKEN} a"], boxes=[[], [[1, 1, 9, 9]]])
    with pytest.raises(ValueError, match=r"boxes\[0\]\[0\].*outside"):
        proc(images=[_image(32, 32)], text=[f"{IMAGE_TOKEN} {REGION_TOKEN}"], boxes=[[[1, 1, 90, 9]]])
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    bare.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    with pytest.raises(ValueError, match="does not have '<region>' as one token"):
        CLOCLlavaProcessor(image_processor=CLOCImageProcessor(size=32), tokenizer=bare, patch_size=8)


def test_auto_classes_and_save_reload_in_a_fresh_process(tmp_path):
    assert isinstance(AutoConfig.for_model("cloc_llava"), CLOCLlavaConfig)
    model = _model().eval()
    proc = _processor(box_convention="shikra")
    inputs = proc(images=[_image(48, 32)], text=[f"{IMAGE_TOKEN} what is in {REGION_TOKEN}"], boxes=[[[4, 4, 30, 28]]])
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    torch.save({"inputs": dict(inputs), "logits": logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        import llava_bridge
        path = {str(tmp_path)!r}
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        proc = AutoProcessor.from_pretrained(path)
        assert type(model).__name__ == "CLOCLlavaForConditionalGeneration", type(model)
        assert type(model.model.vision_tower).__name__ == "CLOCVisionModel"
        assert type(proc).__name__ == "CLOCLlavaProcessor" and proc.box_convention == "shikra", proc
        assert proc.num_additional_image_tokens == 1
        saved = torch.load(path + "/expected.pt", weights_only=True)
        with torch.no_grad():
            logits = model(**saved["inputs"]).logits
        torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLOCLlavaForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), CLOCLlavaProcessor)


@pytest.mark.parametrize("strategy, tokens", [("default", GRID), ("full", GRID + 1)])
def test_processor_image_token_count_matches_the_model(strategy, tokens):
    """The class token is counted by default (num_additional_image_tokens=1), for both strategies."""
    proc = CLOCLlavaProcessor(
        image_processor=CLOCImageProcessor(size=32), tokenizer=_tokenizer(), patch_size=8,
        vision_feature_select_strategy=strategy,
    )
    image = _image(40, 24)
    inputs = proc(images=[image], text=[f"{IMAGE_TOKEN} {REGION_TOKEN} and {REGION_TOKEN}"],
                  boxes=[[[2, 2, 20, 20]]], points=[[[30, 10]]])
    assert (inputs["input_ids"] == IMAGE_ID).sum().item() == tokens
    frame = proc.image_processor.frame_transform(40, 24)
    torch.testing.assert_close(inputs["region_points"][0], frame.points_to_model(torch.tensor([[30.0, 10.0]])))
    model = _model(vision_feature_select_strategy=strategy).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_processor_outputs_go_straight_into_generate():
    """No ``original_sizes`` (which ``generate`` refuses) unless asked, whatever the image processor's setting."""
    model, proc = _model().eval(), _processor(box_convention="ferret")
    assert proc.image_processor.return_original_sizes  # CLOC's default: kept for post_process_boxes
    texts = [f"user {IMAGE_TOKEN} what is in {REGION_TOKEN}", f"user {IMAGE_TOKEN} a cat"]
    images, boxes = [_image(48, 32), _image(20, 40)], [[[4, 4, 30, 28]], []]
    inputs = proc(images=images, text=texts, boxes=boxes, padding=True)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "region_boxes"}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
    asked = proc(images=images, text=texts, boxes=boxes, padding=True, return_original_sizes=True)
    assert asked["original_sizes"].tolist() == [[32, 48], [40, 20]]
    assert torch.equal(asked["input_ids"], inputs["input_ids"])
    # the box text needs the sizes, whatever the image processor's own setting
    bare = CLOCLlavaProcessor(
        image_processor=CLOCImageProcessor(size=32, return_original_sizes=False), tokenizer=_tokenizer(),
        patch_size=8, vision_feature_select_strategy="default", box_convention="ferret",
    )
    assert torch.equal(bare(images=images, text=texts, boxes=boxes, padding=True)["input_ids"], inputs["input_ids"])
