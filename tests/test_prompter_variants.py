"""Prompter variants: position codes and their wavelengths, the paper's literal Prompter, the box
prior on the attention, the pooled-state box head and grounding confidences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

import cloc_hf
from cloc_hf.configuration_cloc import PROMPTER_PRESETS, CLOCPrompterConfig
from cloc_hf.modeling_prompter import CLOCPositionEncoding
from tests.conftest import make_token_ids


def _codes(min_cycles=1.0, temperature=64.0, hidden=64):
    config = CLOCPrompterConfig(hidden_size=hidden, position_min_cycles=min_cycles, position_temperature=temperature)
    return CLOCPositionEncoding(config)


def _model(**prompter):
    torch.manual_seed(0)
    config = cloc_hf.get_model_config("cloc-tiny")
    config.prompter_config = CLOCPrompterConfig(**{**config.prompter_config.to_dict(), **prompter})
    config = cloc_hf.CLOCConfig(**config.to_dict())
    return cloc_hf.CLOCModel(config).eval()


def test_first_release_codes_are_unchanged_and_alias_zero_with_one():
    """min_cycles=1 keeps the saved models' codes (1..T cycles) and its lowest band cannot tell 0 from 1."""
    enc = _codes(1.0, 64.0)
    exponent = torch.arange(16, dtype=torch.float32) / 15
    assert torch.equal(enc.frequencies, 64.0**exponent)
    zero, one = enc(torch.tensor([0.0, 0.5])), enc(torch.tensor([1.0, 0.5]))
    lowest = [0, 32]  # sin and cos of the x coordinate's lowest band
    assert torch.allclose(zero[lowest], one[lowest], atol=1e-5)


def test_half_cycle_codes_separate_the_frame_edges_and_are_smooth():
    enc = _codes(0.5, 4.0)
    assert enc.frequencies[0] == 0.5 and enc.frequencies[-1] == pytest.approx(4.0)
    zero, one = enc(torch.tensor([0.0, 0.5])), enc(torch.tensor([1.0, 0.5]))
    assert not torch.allclose(zero[[0, 32]], one[[0, 32]], atol=0.5)
    def cos(a, b):
        return F.cosine_similarity(enc(torch.tensor(a)), enc(torch.tensor(b)), dim=0).item()
    near, far = cos([0.0, 0.0], [1 / 16, 1 / 16]), cos([0.0, 0.0], [0.9, 0.9])
    assert near > 0.6 > 0.3 > far, (near, far)  # half a patch apart (8x8 grid) vs across the frame
    # the fast codes of the first release do not have that property
    enc_old = _codes(1.0, 64.0)
    old_near = F.cosine_similarity(enc_old(torch.tensor([0.0, 0.0])), enc_old(torch.tensor([1 / 16, 1 / 16])), dim=0)
    assert old_near < 0.5


def test_temperature_none_is_half_the_patch_grid():
    model = _model(position_temperature=None, position_min_cycles=0.5)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert model.config.prompter_config.position_temperature == grid / 2


def test_invalid_variant_settings_name_the_field():
    invalid = (ValueError, StrictDataclassClassValidationError)  # strict HF configs wrap the ValueError
    with pytest.raises(invalid, match="position_min_cycles"):
        CLOCPrompterConfig(position_min_cycles=100.0, position_temperature=8.0)
    with pytest.raises(invalid, match="box_attention_bias"):
        CLOCPrompterConfig(box_attention_bias=-1.0)
    with pytest.raises(invalid, match="box_head_input"):
        CLOCPrompterConfig(box_head_input="corners")
    with pytest.raises(ValueError, match="unknown Prompter preset"):
        CLOCPrompterConfig.preset("fast")


def test_paper_preset_is_the_literal_prompter():
    config = CLOCPrompterConfig.preset("paper")
    assert (config.prompt_position, config.type_embeddings, config.image_position_encoding) == ("token", False, False)
    model = _model(**PROMPTER_PRESETS["paper"])
    image = torch.randn(1, 3, 32, 32)
    boxes = [torch.tensor([[0.1, 0.1, 0.6, 0.7]])]
    with torch.no_grad():
        before = model.get_region_features(image, boxes=boxes)[0]
        model.prompter.prompt_encoder.corner_embeddings.weight.add_(1.0)  # unused without type embeddings
        after = model.get_region_features(image, boxes=boxes)[0]
    assert torch.equal(before, after)


@pytest.mark.parametrize("pooling", ["prompt", "all"])
def test_box_prior_limits_attention_to_the_box(pooling):
    """With a strong prior the box's prompt tokens read only the patches inside it (and the class token)."""
    model = _model(box_attention_bias=1e4, pooling=pooling)
    side = 8  # cloc-tiny: 32 px, patch 4
    tokens = torch.randn(2, 1 + side * side, model.vision_embed_dim)
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])]
    changed = tokens.clone()
    grid = changed[0, 1:].view(side, side, -1)
    grid[side // 2 :, :] = torch.randn_like(grid[side // 2 :, :])  # rows outside image 0's box (its bottom half)
    with torch.no_grad():
        ref = model.get_region_features(vision_outputs=tokens, boxes=boxes)
        new = model.get_region_features(vision_outputs=changed, boxes=boxes)
    if pooling == "prompt":
        assert torch.allclose(ref[0], new[0], atol=1e-5), "outside patches leaked through the prior"
    torch.testing.assert_close(ref[1], new[1])  # image 1 untouched
    unbiased = _model(pooling=pooling)
    with torch.no_grad():
        a = unbiased.get_region_features(vision_outputs=tokens, boxes=boxes)[0]
        b = unbiased.get_region_features(vision_outputs=changed, boxes=boxes)[0]
    assert not torch.allclose(a, b, atol=1e-3), "without the prior the whole image is read"


def test_box_prior_leaves_text_and_point_prompts_alone():
    biased, plain = _model(box_attention_bias=4.0), _model()
    biased.load_state_dict(plain.state_dict())
    image = torch.randn(1, 3, 32, 32)
    ids = make_token_ids(1)
    with torch.no_grad():
        assert torch.equal(biased.ground(image, ids), plain.ground(image, ids))
        points = [torch.tensor([[0.3, 0.4]])]
        assert torch.equal(
            biased.get_region_features(image, points=points)[0], plain.get_region_features(image, points=points)[0]
        )


def test_pooled_box_head_keeps_gradients_outside_the_frame():
    model = _model(box_head_input="pooled").train()
    head = model.box_head
    assert head.norm is not None and head.fc1.in_features == model.config.prompter_config.hidden_size
    with torch.no_grad():  # push the predicted centre to the left edge: x1 = cx - w/2 < 0
        head.fc2.bias.copy_(torch.tensor([-8.0, 0.0, 2.0, 0.0]))
    states = torch.randn(3, head.fc1.in_features, requires_grad=True)
    boxes = head(states)
    assert (boxes[:, 0] < 0).all(), "training-mode boxes are not clipped"
    boxes[:, 0].sum().backward()
    assert states.grad.abs().sum() > 0
    head.eval()
    assert (head(states)[:, 0] >= 0).all(), "eval-mode boxes are clipped to the frame"


def test_ground_scores_are_the_similarity_at_the_predicted_box():
    model = _model(box_head_input="pooled")
    image = torch.randn(2, 3, 32, 32)
    ids = make_token_ids(2)
    with torch.no_grad():
        out = model.ground(image, ids, return_scores=True)
        assert out.pred_boxes.shape == (2, 4) and out.scores.shape == (2,)
        assert torch.equal(out.pred_boxes, model.ground(image, ids))
        regions = torch.cat(model.get_region_features(image, boxes=list(out.pred_boxes[:, None])))
        text = model.get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(out.scores, F.cosine_similarity(regions, text, dim=-1))
        listed = model.ground(image, [ids[:1], ids], return_scores=True)
    assert [s.shape for s in listed.scores] == [(1,), (2,)]
    assert [b.shape for b in listed.pred_boxes] == [(1, 4), (2, 4)]


def _train_step(model) -> None:
    """One forward with region losses and a backward pass on two images (1 and 2 boxes)."""
    out = model(
        input_ids=make_token_ids(2),
        pixel_values=torch.randn(2, 3, 32, 32),
        region_boxes=[torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([[0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 0.4, 0.4]])],
        region_input_ids=[make_token_ids(1, seed=1), make_token_ids(2, seed=2)],
        return_loss=True,
    )
    assert out.loss_grounding > 0
    out.loss.backward()


def test_local_preset_trains_one_step():
    model = _model(**PROMPTER_PRESETS["local"]).train()
    _train_step(model)
    assert model.box_head.norm.weight.grad is not None
    assert model.prompter.layers[0].q_proj.weight.grad.abs().sum() > 0


def test_joint_text_pass_matches_separate_passes():
    """Captions and phrases in one text-tower call give the same loss and gradients as two calls."""
    separate = _model()
    config = cloc_hf.CLOCConfig(**{**separate.config.to_dict(), "joint_text_pass": True})
    joint = cloc_hf.CLOCModel(config).eval()
    joint.load_state_dict(separate.state_dict())
    inputs = dict(
        input_ids=make_token_ids(2, length=12),
        pixel_values=torch.randn(2, 3, 32, 32),
        region_boxes=[torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([[0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 0.4, 0.4]])],
        region_input_ids=[make_token_ids(1, length=6, seed=1), make_token_ids(2, length=6, seed=2)],
        return_loss=True,
    )
    calls = []
    joint.text_model.register_forward_hook(lambda *a: calls.append(1))
    out_sep, out_joint = separate(**inputs), joint(**inputs)
    assert len(calls) == 1
    for key in ("loss", "loss_clip", "loss_region", "loss_grounding"):
        torch.testing.assert_close(out_joint[key], out_sep[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_joint.text_model_output.pooler_output, out_sep.text_model_output.pooler_output)
    out_sep.loss.backward()
    out_joint.loss.backward()
    torch.testing.assert_close(
        joint.text_model.embeddings.token_embedding.weight.grad,
        separate.text_model.embeddings.token_embedding.weight.grad, rtol=1e-4, atol=1e-6,
    )


def test_text_value_positions_change_only_text_prompts():
    """Position codes on the values reach the pooled state of text prompts, not box prompts."""
    plain, with_pos = _model(), _model(text_value_positions=True)
    with_pos.load_state_dict(plain.state_dict())
    image, ids = torch.randn(1, 3, 32, 32), make_token_ids(1)
    boxes = [torch.tensor([[0.1, 0.2, 0.6, 0.7]])]
    with torch.no_grad():
        assert torch.equal(plain.get_region_features(image, boxes=boxes)[0], with_pos.get_region_features(image, boxes=boxes)[0])
        assert not torch.allclose(plain.ground(image, ids), with_pos.ground(image, ids))


def _peaked_head(hidden=16):
    """An attention box head whose map is set by hand through the keys: query . key is large on the
    patches we mark and 0 elsewhere; the refinement MLP is zeroed so the box is the map's moments."""
    from cloc_hf.modeling_prompter import CLOCAttentionBoxHead

    head = CLOCAttentionBoxHead(hidden, 8).eval()
    with torch.no_grad():
        for lin, scale in ((head.q_proj, 10.0), (head.k_proj, 1.0)):  # a sharp map
            lin.weight.copy_(scale * torch.eye(hidden))
            lin.bias.zero_()
        head.fc2.weight.zero_()
        head.fc2.bias.zero_()
    return head


@pytest.mark.parametrize("cells", [(2, 4, 1, 3), (0, 8, 0, 8), (5, 6, 6, 8)])
def test_attention_box_head_reads_the_box_off_its_map(cells):
    """A map spread evenly over a block of patches gives exactly that block's box (x1, x2, y1, y2 in cells)."""
    hidden, side = 16, 8
    head = _peaked_head(hidden)
    x1, x2, y1, y2 = cells
    inside = torch.zeros(side, side, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    direction = torch.zeros(hidden)
    direction[0] = 1.0
    # key_norm maps tokens to zero mean / unit variance: build tokens whose normalised form is +-v on dim 0
    tokens = torch.zeros(1, 1 + side * side, hidden)
    tokens[0, 1:, 1] = 1.0
    tokens[0, 1:, 0] = torch.where(inside.flatten(), 50.0, -50.0)
    query = direction[None] * 40.0
    pos = torch.zeros(1 + side * side, hidden)
    with torch.no_grad():
        attn = head.attention_map(query, tokens, pos, torch.tensor([0]))
        box = head(query, tokens, pos, torch.tensor([0]))[0]
    assert attn[0, inside.flatten()].sum() > 0.999
    expected = torch.tensor([x1, y1, x2, y2], dtype=torch.float32) / side
    torch.testing.assert_close(box, expected, atol=2e-3, rtol=0)


def test_attention_box_head_trains_and_grounds():
    model = _model(box_head_input="attention").train()
    assert type(model.box_head).__name__ == "CLOCAttentionBoxHead"
    _train_step(model)
    for param in (model.box_head.k_proj.weight, model.box_head.q_proj.weight, model.box_head.fc2.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert model.prompter.layers[0].q_proj.weight.grad.abs().sum() > 0  # through the pooled query
    model.eval()
    with torch.no_grad():
        found = model.ground(torch.randn(2, 3, 32, 32), make_token_ids(2), return_scores=True)
    assert found.pred_boxes.shape == (2, 4) and ((found.pred_boxes >= 0) & (found.pred_boxes <= 1)).all()
    assert (found.pred_boxes[:, 2:] >= found.pred_boxes[:, :2]).all()


def test_configs_saved_before_the_new_defaults_keep_their_prompter(tmp_path):
    """A saved config without box_attention_bias / box_head_input (written before they existed) loads
    with the first release's values; new configs get the new defaults and keep them through a save."""
    import json

    from cloc_hf.configuration_cloc import LEGACY_PROMPTER_DEFAULTS

    config = cloc_hf.get_model_config("cloc-tiny")
    assert config.prompter_config.box_attention_bias == 4.0 and config.prompter_config.box_head_input == "attention"
    config.save_pretrained(tmp_path / "new")
    again = cloc_hf.CLOCConfig.from_pretrained(tmp_path / "new")
    assert again.prompter_config.box_attention_bias == 4.0 and again.prompter_config.box_head_input == "attention"

    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    for key in LEGACY_PROMPTER_DEFAULTS:
        del saved["prompter_config"][key]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    old = cloc_hf.CLOCConfig.from_pretrained(tmp_path / "old")
    assert old.prompter_config.box_attention_bias == 0.0 and old.prompter_config.box_head_input == "region_embedding"
    assert type(cloc_hf.CLOCModel(old).box_head).__name__ == "CLOCBoxHead"
    # built by hand (no saved transformers_version): the new defaults, even from a partial dict
    by_hand = cloc_hf.CLOCConfig(prompter_config={"num_hidden_layers": 1})
    assert by_hand.prompter_config.box_head_input == "attention"


def test_attention_box_head_padding_per_image_equals_per_query_maps():
    """Queries padded per image (keys once per image) give each query exactly its own image's map,
    with images holding 0, 1 or several queries."""
    from cloc_hf.modeling_prompter import CLOCAttentionBoxHead

    torch.manual_seed(0)
    head = CLOCAttentionBoxHead(16, 8).eval()
    tokens, pos, queries = torch.randn(4, 1 + 64, 16), torch.randn(65, 16), torch.randn(6, 16)
    index = torch.tensor([2, 0, 2, 1, 2, 0])  # image 3 has none
    with torch.no_grad():
        got = head.attention_map(queries, tokens, pos, index)
        for row, image in enumerate(index.tolist()):
            alone = head.attention_map(queries[row : row + 1], tokens[image : image + 1], pos, torch.tensor([0]))
            torch.testing.assert_close(got[row], alone[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("text_value_positions", [False, True])
def test_shared_image_memory_equals_separate_passes(text_value_positions):
    """Box, point and text prompt passes sharing one ``encode_image`` give the outputs and gradients of
    passes that each encode the image side themselves (values with or without position codes)."""
    model = _model(text_value_positions=text_value_positions).train()
    prompter = model.prompter
    tokens = torch.randn(3, 65, model.vision_embed_dim)
    index = torch.tensor([0, 0, 2, 1, 2])
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.5, 0.9], [0.2, 0.1, 0.4, 0.3],
                          [0.5, 0.5, 0.9, 0.8]])
    texts = torch.randn(5, model.config.projection_dim)

    def run(shared: bool):
        prompter.zero_grad()
        leaf = tokens.clone().requires_grad_(True)
        memory = prompter.encode_image(leaf) if shared else None
        outs = [prompter(leaf, index, boxes=boxes, memory=memory),
                prompter(leaf, index, points=boxes[:, :2], memory=memory),
                prompter(leaf, index, text_embeds=texts, memory=memory)]
        sum(o.square().sum() for o in outs).backward()
        grads = [p.grad.clone() for p in prompter.parameters() if p.grad is not None]
        return outs, leaf.grad, grads

    shared, separate = run(True), run(False)
    for a, b in zip(shared[0], separate[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared[1], separate[1], rtol=1e-5, atol=1e-6)
    assert len(shared[2]) == len(separate[2]) > 0
    for a, b in zip(shared[2], separate[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other image tokens"):
        prompter(tokens.clone(), index, boxes=boxes, memory=prompter.encode_image(tokens))
