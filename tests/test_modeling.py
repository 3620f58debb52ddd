import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_token_ids
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file

import cloc_hf
from cloc_hf import CLOCConfig, CLOCModel, CLOCVisionConfig, CLOCVisionModel
from cloc_hf.modeling_cloc import CLOCPrompterLayer


def _boxes(seed, n):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 0.6
    wh = torch.rand(n, 2, generator=gen) * 0.35 + 0.05
    return torch.cat([xy, xy + wh], dim=-1)


def _batch(model, counts=(3, 1, 0), seed=0):
    """A training batch in the per-image form: image ``i`` has ``counts[i]`` regions (the last none, so
    lambda is scaled by 2/3)."""
    gen = torch.Generator().manual_seed(seed)
    px = torch.randn(len(counts), 3, 32, 32, generator=gen)
    region_ids = make_token_ids(sum(counts), 6, seed=seed + 1)
    return dict(
        pixel_values=px,
        input_ids=make_token_ids(len(counts), 8, seed=seed),
        region_boxes=[_boxes(seed + i, n) for i, n in enumerate(counts)],
        region_input_ids=list(region_ids.split(list(counts))),
        region_attention_mask=list(torch.ones_like(region_ids).split(list(counts))),
    )


# -- configs and registry -------------------------------------------------------------------------


def test_registry_names_and_sizes():
    names = cloc_hf.list_models()
    for required in ("cloc-vit-b-16", "cloc-vit-l-14", "cloc-vit-l-14-336", "cloc-vit-h-14-336", "cloc-tiny"):
        assert required in names
    cfg = cloc_hf.get_model_config("cloc-vit-l-14-336")
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.vision_config.hidden_size) == (336, 14, 1024)
    assert cfg.prompter_config.hidden_size == 1024  # the paper: Prompter width = ViT width
    assert (cfg.prompter_config.num_hidden_layers, cfg.prompter_config.num_attention_heads) == (1, 1)
    with pytest.raises(ValueError, match="unknown CLOC architecture"):
        cloc_hf.get_model_config("cloc-vit-z")


def test_config_round_trip_and_validation(tmp_path):
    cfg = cloc_hf.get_model_config("cloc-tiny", prompter_config=dict(pooling="all"), text_filter_threshold=None)
    cfg.save_pretrained(tmp_path)
    again = CLOCConfig.from_pretrained(tmp_path)
    assert again.prompter_config.pooling == "all" and again.text_filter_threshold is None
    assert again.vision_config.to_dict() == cfg.vision_config.to_dict()
    # strict HF configs wrap the ValueError in StrictDataclassClassValidationError, as CLIPConfig does
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="pooling"):
        cloc_hf.get_model_config("cloc-tiny", prompter_config=dict(pooling="max"))


# -- region features --------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["prompt", "all"])
def test_batched_equals_box_by_box(pooling):
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny", prompter_config=dict(pooling=pooling, region_chunk_size=2)).eval()
    px = torch.randn(3, 3, 32, 32)
    boxes = [_boxes(1, 5), _boxes(2, 0).reshape(0, 4), _boxes(3, 2)]
    with torch.no_grad():
        batched = model.get_region_features(px, boxes=boxes)
        assert [b.shape for b in batched] == [(5, 32), (0, 32), (2, 32)]
        for i, image_boxes in enumerate(boxes):
            for j in range(len(image_boxes)):
                single = model.get_region_features(px[i : i + 1], boxes=[image_boxes[j : j + 1]])[0]
                torch.testing.assert_close(batched[i][j : j + 1], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_position", ["token", "attention"])
def test_prompt_pool_equals_full_layer_reference(prompt_position):
    """The cheap 'prompt' mode must equal one full layer over [prompts; image tokens], prompt rows pooled
    (with the box prior's bias on the prompt rows' attention to the image tokens)."""
    torch.manual_seed(0)
    tiny_model = cloc_hf.create_model("cloc-tiny", prompter_config={"prompt_position": prompt_position}).eval()
    px = torch.randn(2, 3, 32, 32)
    boxes = [_boxes(4, 3), _boxes(5, 2)]
    prompter = tiny_model.prompter
    with torch.no_grad():
        got = torch.cat(tiny_model.get_region_features(px, boxes=boxes))
        tokens = tiny_model.vision_model(px).last_hidden_state
        pos_img = prompter.image_positions(tokens.shape[1], tokens.device, tokens.dtype)
        expected = []
        for i, image_boxes in enumerate(boxes):
            for box in image_boxes:
                prompts, prompt_pos = prompter.prompt_encoder.embed_boxes(box[None])  # (1, 2, d) each
                x = torch.cat([prompts, tokens[i : i + 1]], dim=1)
                pos = torch.cat([prompt_pos[0], pos_img])[None]
                layer: CLOCPrompterLayer = prompter.layers[0]
                bias = x.new_zeros(1, x.shape[1], x.shape[1])  # the box prior on the prompt rows (default on)
                bias[:, :2, 2:] = prompter.box_key_bias(box[None], tokens.shape[1], tokens.dtype)
                out = layer(x, pos, x, pos, bias)[:, :2].mean(1)
                expected.append(prompter.projection(prompter.post_layernorm(out)))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_vit_runs_once_for_many_boxes_and_vision_outputs_skip_it(tiny_model):
    calls = []
    hook = tiny_model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = tiny_model.get_region_features(px, boxes=[_boxes(0, 64), _boxes(1, 30)])
        assert len(calls) == 1
        vis = tiny_model.get_image_features(px)
        assert len(calls) == 2
        again = tiny_model.get_region_features(vision_outputs=vis, boxes=[_boxes(0, 64), _boxes(1, 30)])
        points = tiny_model.get_region_features(vision_outputs=vis, points=[torch.rand(3, 2), torch.rand(1, 2)])
        boxes_from_tensor = tiny_model.get_region_features(vision_outputs=vis.last_hidden_state, boxes=torch.stack(
            [_boxes(0, 4), _boxes(1, 4)]))
    hook.remove()
    assert len(calls) == 2
    for a, b in zip(feats, again):
        torch.testing.assert_close(a, b)
    assert [p.shape for p in points] == [(3, 32), (1, 32)]
    assert [b.shape for b in boxes_from_tensor] == [(4, 32), (4, 32)]


def test_ground_takes_phrases_per_image(tiny_model):
    px = torch.randn(2, 3, 32, 32)
    ids = make_token_ids(3, 6)
    with torch.no_grad():
        per_image = tiny_model.ground(px, [ids[:1], ids[1:]], [torch.ones(1, 6), torch.ones(2, 6)])
        one_each = tiny_model.ground(px, ids[:2])  # (B, L): one phrase per image
        with pytest.warns(FutureWarning, match="text_image_index"):
            flat = tiny_model.ground(px, ids, text_image_index=torch.tensor([0, 1, 1]))
    assert [b.shape for b in per_image] == [(1, 4), (2, 4)] and one_each.shape == (2, 4)
    boxes = torch.cat(per_image)
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    torch.testing.assert_close(flat, boxes)
    torch.testing.assert_close(one_each, torch.stack([boxes[0], boxes[1]]))
    with pytest.raises(ValueError, match="3 phrases for 2 images.*list"):
        tiny_model.ground(px, ids)
    with pytest.raises(ValueError, match=r"got 1 input_ids lists for a batch of 2"):
        tiny_model.ground(px, [ids])
    with pytest.raises(ValueError, match=r"input_ids\[1\] has shape \(2, 5\).*one length"):
        tiny_model.ground(px, [ids[:1], ids[1:, :5]])
    with pytest.raises(ValueError, match="text_image_index must hold one image index"), pytest.warns(FutureWarning):
        tiny_model.ground(px, ids, text_image_index=torch.tensor([0, 2, 1]))


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([torch.tensor([[0.5, 0.1, 0.4, 0.3]]), torch.zeros(0, 4)], r"boxes\[0\]\[0\].*flipped"),
        ([torch.tensor([[0.1, 0.1, 0.4, 0.3], [0.2, 0.2, 0.2, 0.5]]), torch.zeros(0, 4)], r"boxes\[0\]\[1\]"),
        ([torch.zeros(0, 4), torch.tensor([[0.1, float("nan"), 0.4, 0.3]])], r"boxes\[1\]\[0\].*NaN"),
        ([torch.zeros(0, 4), torch.tensor([[0.1, 0.1, 0.4, float("inf")]])], r"boxes\[1\]\[0\].*NaN or inf"),
        ([torch.tensor([[0.1, 0.1, 0.4]]), torch.zeros(0, 4)], r"boxes\[0\] must have shape \(n, 4\)"),
        ([torch.tensor([[10.0, 20.0, 100.0, 200.0]]), torch.zeros(0, 4)], r"boxes\[0\]\[0\].*far outside"),
        ([torch.tensor([[0.1, 0.1, 0.4, 0.3]])], r"got 1 boxes lists for a batch of 2"),
        (torch.tensor([0.1, 0.1, 0.4, 0.3]), r"one \(n_i, k\) tensor per image"),
    ],
)
def test_bad_boxes_raise_clear_errors(tiny_model, boxes, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.get_region_features(torch.randn(2, 3, 32, 32), boxes=boxes)


def test_slightly_outside_boxes_are_clipped(tiny_model):
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = tiny_model.get_region_features(px, boxes=[torch.tensor([[-0.02, 0.1, 1.03, 0.5]])])[0]
        b = tiny_model.get_region_features(px, boxes=[torch.tensor([[0.0, 0.1, 1.0, 0.5]])])[0]
    torch.testing.assert_close(a, b)


def test_bad_points_and_vision_outputs(tiny_model):
    px = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"points\[0\] must have shape \(n, 2\)"):
        tiny_model.get_region_features(px, points=[torch.rand(2, 3)])
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model.get_region_features(px, boxes=[_boxes(0, 1)], points=[torch.rand(1, 2)])
    with pytest.raises(ValueError, match=r"vision tokens must have shape"):
        tiny_model.get_region_features(vision_outputs=torch.randn(1, 65, 7), boxes=[_boxes(0, 1)])


# -- training forward, losses, gradients ---------------------------------------------------------------


def test_forward_losses_and_weighting(tiny_model):
    out = tiny_model(**_batch(tiny_model), return_loss=True)
    assert out.region_embeds.shape == (4, 32) and out.pred_boxes.shape == (4, 4)
    assert out.region_image_index.tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(out.region_weight, torch.tensor(2 / 3))
    expected = out.loss_clip + out.region_weight * (out.loss_region + out.loss_grounding)
    torch.testing.assert_close(out.loss, expected)
    # without regions the loss is the CLIP loss alone
    plain = tiny_model(pixel_values=_batch(tiny_model)["pixel_values"], input_ids=make_token_ids(3), return_loss=True)
    assert plain.loss_region is None
    torch.testing.assert_close(plain.loss, plain.loss_clip)


def test_grounding_loss_weight_scales_only_the_grounding_term(tiny_model):
    batch = _batch(tiny_model)
    base = tiny_model(**batch, return_loss=True)
    tiny_model.config.grounding_loss_weight = 7.5
    try:
        heavy = tiny_model(**batch, return_loss=True)
    finally:
        tiny_model.config.grounding_loss_weight = 1.0
    torch.testing.assert_close(heavy.loss_grounding, base.loss_grounding)  # reported unweighted
    assert base.loss_grounding.item() > 0
    expected = heavy.loss_clip + heavy.region_weight * (heavy.loss_region + 7.5 * heavy.loss_grounding)
    torch.testing.assert_close(heavy.loss, expected)
    assert heavy.loss.item() > base.loss.item()
    with pytest.raises(StrictDataclassClassValidationError, match="grounding_loss_weight=-1"):
        CLOCConfig(grounding_loss_weight=-1.0)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny", point_prompt_loss=True, prompter_config=dict(text_adapter="mlp"))
    model.train()
    out = model(**_batch(model), return_loss=True)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    # the text tower's position rows past the sequence length are never used by construction
    missing = [n for n in missing if "position_embedding" not in n and "token_embedding" not in n]
    assert missing == []


def test_region_box_jitter_loosens_prompter_boxes_in_training_only():
    """``region_box_jitter``: in training the Prompter sees moved boxes (valid, inside the frame) and the
    grounding targets stay the given ones; in eval mode the model is the unjittered one."""
    from cloc_hf.box_ops import jitter_boxes

    torch.manual_seed(0)
    plain = cloc_hf.create_model("cloc-tiny")
    jittered = cloc_hf.create_model("cloc-tiny", region_box_jitter=0.3)
    jittered.load_state_dict(plain.state_dict())
    batch = _batch(plain)
    given = torch.cat(batch["region_boxes"])
    for model in (plain, jittered):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(jittered(**batch).region_embeds, plain(**batch).region_embeds)
        jittered.train()
        out = jittered(**batch, return_loss=True)
        plain.train()
        reference = plain(**batch, return_loss=True)
    torch.testing.assert_close(out.region_target_boxes, given)
    assert not torch.allclose(out.region_embeds, reference.region_embeds)
    moved = jitter_boxes(given, 0.3, generator=torch.Generator().manual_seed(0))
    assert (moved[:, 2:] > moved[:, :2]).all() and moved.min() >= 0 and moved.max() <= 1
    assert not torch.allclose(moved, given)
    with pytest.raises(StrictDataclassClassValidationError, match="region_box_jitter=-0.1"):
        CLOCConfig(region_box_jitter=-0.1)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny")
    batch = _batch(model)
    model.train()
    model(**batch, return_loss=True).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.vision_model.encoder.layers[0].gradient_checkpointing
    assert model.prompter.layers[0].gradient_checkpointing
    model(**batch, return_loss=True).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_region_lists_must_agree(tiny_model):
    batch = _batch(tiny_model)
    batch["region_boxes"][0] = batch["region_boxes"][0][:2]
    with pytest.raises(ValueError, match=r"region tensors disagree: region_input_ids\[0\] holds 3 phrases for the 2"):
        tiny_model(**batch, return_loss=True)
    batch = _batch(tiny_model)
    with pytest.raises(ValueError, match=r"got 2 region_boxes lists for a batch of 3"):
        tiny_model(**dict(batch, region_boxes=batch["region_boxes"][:2]), return_loss=True)
    batch["region_boxes"][1] = torch.tensor([[0.5, 0.5, 0.4, 0.9]])
    with pytest.raises(ValueError, match=r"region_boxes\[1\]\[0\].*flipped"):
        tiny_model(**batch, return_loss=True)


def test_three_entry_points_take_the_same_per_image_lists(tiny_model):
    """The processor's per-image box list goes unchanged into forward, get_region_features and ground."""
    batch = _batch(tiny_model)
    with torch.no_grad():
        out = tiny_model(**batch, return_loss=True)
        regions = tiny_model.get_region_features(batch["pixel_values"], boxes=batch["region_boxes"])
        grounded = tiny_model.ground(
            batch["pixel_values"], batch["region_input_ids"], batch["region_attention_mask"]
        )
    assert [r.shape[0] for r in regions] == [g.shape[0] for g in grounded] == [3, 1, 0]
    torch.testing.assert_close(out.region_embeds, torch.nn.functional.normalize(torch.cat(regions), dim=-1))
    torch.testing.assert_close(out.pred_boxes, torch.cat(grounded))
    torch.testing.assert_close(out.region_target_boxes, torch.cat(batch["region_boxes"]))
    assert out.images_with_regions.tolist() == [True, True, False]


def test_padded_form_gives_identical_loss_through_the_conversion_helper(tiny_model):
    """The deprecated padded (B, M, ...) + region_mask form is converted once and computes bit for bit
    what the per-image lists compute, also with holes in the mask (row-major order)."""
    from cloc_hf.prompts import per_image_to_padded

    batch = _batch(tiny_model, counts=(3, 1, 0, 2))
    boxes, mask = per_image_to_padded(batch["region_boxes"], length=4, fill=0.5)
    ids, _ = per_image_to_padded(batch["region_input_ids"], length=4)
    attn, _ = per_image_to_padded(batch["region_attention_mask"], length=4)
    # move image 1's region to slot 2: a mask with a hole keeps the same row-major order
    for t in (boxes, ids, attn, mask):
        t[1, 2] = t[1, 0]
    mask[1, 0] = False
    padded = dict(batch, region_boxes=boxes, region_mask=mask, region_input_ids=ids, region_attention_mask=attn)
    torch.manual_seed(0)
    lists = tiny_model.train()(**batch, return_loss=True)
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="region_mask"):
        old = tiny_model(**padded, return_loss=True)
    tiny_model.eval()
    for key in ("loss", "loss_clip", "loss_region", "loss_grounding", "region_weight"):
        assert torch.equal(lists[key], old[key]), key
    assert torch.equal(lists.region_embeds, old.region_embeds) and torch.equal(lists.pred_boxes, old.pred_boxes)
    assert old.region_image_index.tolist() == [0, 0, 0, 1, 3, 3]


@pytest.mark.parametrize("variant", [dict(prompter_config=dict(prompter_type="roi_align")), dict(
    prompter_config=dict(pooling="all", position_encoding="random_fourier")), dict(
    prompter_config=dict(box_encoding="corners_center", num_hidden_layers=2))])
def test_variants_train(variant):
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny", **variant)
    out = model(**_batch(model), return_loss=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    if variant["prompter_config"].get("prompter_type") == "roi_align":
        assert model.box_head is None and out.pred_boxes is None
        with pytest.raises(ValueError, match="no box head"):
            model.ground(torch.randn(1, 3, 32, 32), make_token_ids(1))


# -- save / load ---------------------------------------------------------------------------------------


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, json, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    ckpt, mode = sys.argv[1], sys.argv[2]
    if mode == "package":
        import cloc_hf  # registers the Auto classes
        model = AutoModel.from_pretrained(ckpt)
    else:  # a user without the package: code comes from the checkpoint
        assert "cloc_hf" not in sys.modules
        model = AutoModel.from_pretrained(ckpt, trust_remote_code=True)
        assert "cloc_hf" not in sys.modules, "remote code must not import the installed package"
    inputs = load_file(ckpt + "/inputs.safetensors")
    with torch.no_grad():
        regions = model.get_region_features(inputs["pixel_values"], boxes=[inputs["boxes"]])[0]
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
    save_file({"regions": regions, "image": image}, sys.argv[3])
    print(json.dumps({"class": type(model).__name__}))
    """
)


@pytest.mark.parametrize("mode", ["package", "remote_code"])
def test_save_load_round_trip_in_fresh_process(tiny_model, tmp_path, mode):
    ckpt = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt)
    files = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.loads((ckpt / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_cloc.CLOCModel"
    px, boxes = torch.randn(1, 3, 32, 32), _boxes(7, 3)
    save_file({"pixel_values": px, "boxes": boxes}, str(ckpt / "inputs.safetensors"))
    with torch.no_grad():
        expected_regions = tiny_model.get_region_features(px, boxes=[boxes])[0]
        expected_image = tiny_model.get_image_features(px).pooler_output
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(ckpt), mode, str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["class"] == "CLOCModel"
    out = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(out["regions"], expected_regions)
    torch.testing.assert_close(out["image"], expected_image)


def test_vision_model_loads_from_full_checkpoint(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    vision = CLOCVisionModel.from_pretrained(tmp_path)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            vision(px).last_hidden_state, tiny_model.vision_model(px).last_hidden_state
        )


# -- CLIPVisionModel compatibility and the LLaVA contract -----------------------------------------------


def test_vision_model_hidden_state_selection():
    torch.manual_seed(0)
    model = CLOCVisionModel(cloc_hf.get_model_config("cloc-tiny").vision_config).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(px, output_hidden_states=True)
        assert len(full.hidden_states) == 3 and full.last_hidden_state.shape == (2, 65, 32)
        for layer in (0, -2, [-2, -1]):
            out = model(px, output_hidden_states=layer)
            for index in [layer] if isinstance(layer, int) else layer:
                torch.testing.assert_close(out.hidden_states[index], full.hidden_states[index])


def test_llava_builds_and_runs_cloc_tower():
    from transformers import AutoModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLOCVisionConfig(**cloc_hf.get_model_config("cloc-tiny").vision_config.to_dict())
    text = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    for layer, strategy, tokens in ((-2, "default", 64), (0, "full", 65)):
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=299, vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
        )
        torch.manual_seed(0)
        llava = LlavaForConditionalGeneration(config).eval()
        assert isinstance(llava.model.vision_tower, CLOCVisionModel)
        assert isinstance(AutoModel.from_config(vision), CLOCVisionModel)
        px = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            feats = llava.model.get_image_features(pixel_values=px).pooler_output
            expected = llava.model.vision_tower(px, output_hidden_states=True).hidden_states[layer]
            if strategy == "default":
                expected = expected[:, 1:]
            torch.testing.assert_close(feats[0], llava.model.multi_modal_projector(expected)[0])
        assert feats[0].shape == (tokens, 32)
        ids = torch.tensor([[1] + [299] * tokens + [5, 6]])
        with torch.no_grad():
            logits = llava(input_ids=ids, pixel_values=px).logits
        assert logits.shape == (1, tokens + 3, 300)


def test_models_are_auto_registered():
    from transformers import AutoConfig, AutoModel

    assert isinstance(AutoModel.from_config(cloc_hf.get_model_config("cloc-tiny")), CLOCModel)
    assert AutoConfig.for_model("cloc_vision_model").__class__ is CLOCVisionConfig


# -- losses ----------------------------------------------------------------------------------------------


def test_region_loss_false_negative_filter_matches_hand_computation():
    from cloc_hf.loss import region_text_contrastive_loss

    torch.manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts[3] = texts[1]  # two regions with the same caption: each is a false negative of the other
    scale = torch.tensor(10.0)
    filtered = region_text_contrastive_loss(regions, texts, scale, 0.9)
    unfiltered = region_text_contrastive_loss(regions, texts, scale, None)
    logits = scale * regions @ texts.t()
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1, 3] = keep[3, 1] = False

    def ce(lg, mask):
        return torch.stack([-(lg[i, i] - lg[i][mask[i]].logsumexp(0)) for i in range(4)]).mean()

    expected = 0.5 * (ce(logits, keep) + ce(scale * texts @ regions.t(), keep))
    torch.testing.assert_close(filtered, expected)
    assert not torch.allclose(filtered, unfiltered)


def test_grounding_losses():
    from cloc_hf.loss import grounding_loss

    pred = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    target = torch.tensor([[0.1, 0.1, 0.5, 0.7]])
    torch.testing.assert_close(grounding_loss(pred, target, "l2"), torch.tensor(0.04 / 4))
    # L1 = 0.05, GIoU = IoU = 0.4 * 0.4 / (0.4 * 0.6) = 2/3
    torch.testing.assert_close(grounding_loss(pred, target, "l1_giou"), torch.tensor(0.05 + 1 / 3))
    assert grounding_loss(pred[:0], target[:0]).item() == 0.0


def test_conv_stem_variant_round_trips(tmp_path):
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny", vision_config=dict(conv_stem_channels=8)).eval()
    stem = model.vision_model.embeddings.patch_embedding
    assert stem.stem.out_channels == 8 and stem.weight is stem.patchify.weight
    model.save_pretrained(tmp_path)
    again = CLOCModel.from_pretrained(tmp_path).eval()
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.get_image_features(px).pooler_output, model.get_image_features(px).pooler_output)
    assert cloc_hf.get_model_config("cloc-vit-b-16").vision_config.conv_stem_channels == 0  # CLIP layout by default


def test_conv_stem_gets_he_init_and_patchify_keeps_clip_init():
    """The 3x3 stem is He-initialised (std sqrt(2/27) for RGB) in the full model and in the tower alone;
    the patchify conv keeps CLIP's normal(0, initializer_range). 0.02 on the stem slowed shape learning."""
    torch.manual_seed(0)
    he_std = (2.0 / (3 * 9)) ** 0.5
    full = cloc_hf.create_model("cloc-tiny", vision_config=dict(conv_stem_channels=32))
    tower = cloc_hf.CLOCVisionModel(full.config.vision_config)
    for vit in (full.vision_model, tower):
        emb = vit.embeddings.patch_embedding
        assert abs(emb.stem.weight.std().item() - he_std) < 0.15 * he_std
        assert emb.stem.bias.abs().max().item() == 0.0
        assert abs(emb.patchify.weight.std().item() - 0.02) < 0.002


def test_prompter_and_box_head_use_their_initializer_range():
    """Regression: transformers never visits parameter-less containers, so the Prompter's layers once kept
    the base init (std 1.0), which saturated its attention and stalled region learning."""
    model = cloc_hf.create_model("cloc-tiny-demo", prompter_config=dict(initializer_range=0.05))
    for name, param in model.named_parameters():
        if name.startswith(("prompter.", "box_head.")) and param.ndim == 2:
            assert 0.035 < float(param.std()) < 0.065, (name, float(param.std()))
    assert float(model.prompter.layers[0].layer_norm1.weight.min()) == 1.0


def test_clip_loss_matches_transformers(tiny_model):
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    out = tiny_model(pixel_values=torch.randn(4, 3, 32, 32), input_ids=make_token_ids(4), return_loss=True)
    torch.testing.assert_close(out.loss_clip, image_text_contrastive_loss(out.logits_per_text))


def test_prompt_position_attention_keeps_geometry_out_of_the_content():
    """prompt_position="attention": a box's tokens carry only their type embedding as content; the
    position code goes to the attention inputs (and differs between boxes)."""
    model = cloc_hf.create_model("cloc-tiny", prompter_config={"prompt_position": "attention"}).eval()
    encoder = model.prompter.prompt_encoder
    content, pos = encoder.embed_boxes(torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]]))
    torch.testing.assert_close(content[0], content[1])
    torch.testing.assert_close(content[0], encoder.corner_embeddings.weight)
    assert not torch.allclose(pos[0], pos[1])
    token_model = cloc_hf.create_model("cloc-tiny", prompter_config={"prompt_position": "token"})
    token_content, token_pos = token_model.prompter.prompt_encoder.embed_boxes(
        torch.tensor([[0.1, 0.1, 0.4, 0.5]])
    )
    assert torch.count_nonzero(token_pos) == 0 and torch.count_nonzero(token_content) > 0
    with pytest.raises(StrictDataclassClassValidationError, match="prompt_position"):
        cloc_hf.create_model("cloc-tiny", prompter_config={"prompt_position": "keys"})
