"""Conversion of CLIP checkpoints (Hugging Face CLIPModel, open_clip state dicts) into CLOC models."""

import argparse
import ast
import importlib
import importlib.util
import json
import runpy
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPConfig, CLIPModel, CLIPTokenizer

import cloc_hf
from cloc_hf import convert
from cloc_hf.convert import ConversionError
from cloc_hf.processing_cloc import CLOCProcessor
from cloc_hf.tokenization import byte_symbols

# A byte-level CLIP vocabulary without merges: 256 byte symbols, the same with "</w>", start, end.
VOCAB = 2 * 256 + 2
BOS, EOS = VOCAB - 2, VOCAB - 1  # as in CLIP's vocabulary, end-of-text is the largest id
CONTEXT = 16
IMAGE_MEAN, IMAGE_STD = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]


def tiny_clip(hidden_act: str = "quick_gelu", seed: int = 0, eos: int = EOS) -> CLIPModel:
    """hidden 32, 2 layers, image 32, patch 4; every tensor perturbed so that no two layer norms (or
    q/k/v projections) are alike and a swapped key cannot go unnoticed by the parity check."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act=hidden_act)
    text = dict(tower, vocab_size=VOCAB, max_position_embeddings=CONTEXT, bos_token_id=BOS, eos_token_id=eos, pad_token_id=eos)
    config = CLIPConfig(text_config=text, vision_config=dict(tower, image_size=32, patch_size=4), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model


def tiny_tokenizer() -> CLIPTokenizer:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=CONTEXT,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A local CLIP checkpoint as a hub repo looks: weights, tokenizer and a preprocessor config."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return path


@pytest.fixture(scope="module")
def clip_model(clip_dir):
    return CLIPModel.from_pretrained(clip_dir).eval()


def assert_files_are_safetensors_only(out):
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names, names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], names


# -- Hugging Face CLIPModel -------------------------------------------------------------------------


def test_hf_clip_converts_with_exact_parity(clip_dir, clip_model):
    cloc = convert.convert_hf_clip(clip_dir, prompter_config={"pooling": "all"})
    assert isinstance(cloc, cloc_hf.CLOCModel)
    diffs = convert.check_parity(clip_model, cloc)
    assert set(diffs) == {"image_embeds", "image_tokens", "text_embeds", "logit_scale"}
    assert max(diffs.values()) <= 1e-5, diffs
    # the towers' configs are CLIP's, field for field; the Prompter is new and has the ViT's width
    for tower in ("text_config", "vision_config"):
        ours, theirs = getattr(cloc.config, tower), getattr(clip_model.config, tower)
        for name in convert.common.tower_fields(type(theirs)):  # every CLIP field; CLOC-only extras keep defaults
            if name == "projection_dim":  # CLIPConfig leaves the towers' copy at its default; CLOC syncs it
                continue
            assert getattr(ours, name) == getattr(theirs, name), (tower, name)
    assert cloc.config.projection_dim == 16 and cloc.config.text_config.eos_token_id == EOS
    assert cloc.config.prompter_config.pooling == "all" and cloc.config.prompter_config.hidden_size == 32
    assert cloc.box_head is not None
    # every CLIP tensor landed, bit for bit
    ours = cloc.state_dict()
    for key, value in clip_model.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_parity_inputs_are_valid_and_deterministic(clip_model):
    a, b = convert.make_parity_inputs(clip_model.config), convert.make_parity_inputs(clip_model.config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["pixel_values"].shape == (2, 3, 32, 32)
    ids, mask = a["input_ids"], a["attention_mask"]
    assert ids.min() >= 0 and ids.max() == EOS
    first_eos = (ids == EOS).int().argmax(dim=-1)
    assert len(set(first_eos.tolist())) == len(first_eos)  # pooling positions differ
    assert torch.equal(first_eos, ids.argmax(dim=-1))  # argmax pooling (open_clip) agrees
    assert torch.equal(mask.sum(dim=-1), first_eos + 1)


def test_features_are_model_outputs_and_parity_failure_names_the_tensor(clip_model):
    cloc = convert.cloc_from_clip_model(clip_model)
    out = cloc.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    assert out.pooler_output.shape == (1, 16)  # transformers 5: a BaseModelOutputWithPooling
    with torch.no_grad():
        cloc.text_model.encoder.layers[1].mlp.fc2.bias[0] += 1e-3
    with pytest.raises(ConversionError, match=r"text_embeds max \|diff\| = [0-9.e-]+") as err:
        convert.check_parity(clip_model, cloc)
    assert "image_embeds" not in str(err.value)
    assert cloc.training is False  # eval mode is restored


def test_refuses_to_save_when_parity_fails(clip_model, tmp_path):
    cloc = convert.cloc_from_clip_model(clip_model)
    with torch.no_grad():
        cloc.vision_model.encoder.layers[0].self_attn.v_proj.weight[0, 0] += 1e-2
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="image_embeds"):
        convert.save_converted(cloc, out, processor=False, reference=clip_model)
    assert not out.exists()


def test_incomplete_hf_checkpoint_is_refused(clip_dir, tmp_path):
    weights = load_file(clip_dir / "model.safetensors")
    del weights["text_projection.weight"]
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="not a complete CLIPModel checkpoint.*text_projection"):
        convert.convert_hf_clip(tmp_path)


def test_weight_copy_is_strict(clip_model):
    cloc = convert.cloc_from_clip_model(clip_model)
    weights = clip_model.state_dict()
    with pytest.raises(ConversionError, match="no place in the CLOC model: vision_model.extra"):
        convert.load_clip_weights(cloc, {**weights, "vision_model.extra": torch.zeros(1)})
    with pytest.raises(ConversionError, match="not provided by the CLIP weights: logit_scale"):
        convert.load_clip_weights(cloc, {k: v for k, v in weights.items() if k != "logit_scale"})
    with pytest.raises(ConversionError, match=r"shape mismatch.*visual_projection.weight \(8, 32\) -> \(16, 32\)"):
        convert.load_clip_weights(cloc, {**weights, "visual_projection.weight": torch.zeros(8, 32)})


def test_cli_hf_end_to_end_and_reload_through_automodel(clip_dir, clip_model, tmp_path, capsys):
    out = tmp_path / "cloc"
    assert convert.main(["--from-hf-clip", str(clip_dir), "--out", str(out), "--pooling", "all"]) == 0
    assert "parity max |diff|" in capsys.readouterr().out
    assert_files_are_safetensors_only(out)

    model = AutoModel.from_pretrained(out).eval()
    assert isinstance(model, cloc_hf.CLOCModel) and model.config.prompter_config.pooling == "all"
    assert max(convert.check_parity(clip_model, model).values()) <= 1e-5

    # the source's tokenizer and image statistics were kept, at the ViT's image size
    processor = CLOCProcessor.from_pretrained(out)
    assert len(processor.tokenizer) == VOCAB and processor.tokenizer.eos_token_id == EOS
    assert processor.image_processor.size == 32 and processor.image_processor.resize_mode == "pad"
    assert processor.image_processor.image_mean == pytest.approx(IMAGE_MEAN)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=["a red car", "a cat"], boxes=[[[2, 3, 20, 30]]])
    with torch.no_grad():
        for method, keys in (("get_text_features", ("input_ids", "attention_mask")), ("get_image_features", ("pixel_values",))):
            kwargs = {k: inputs[k] for k in keys}
            expected = getattr(clip_model, method)(**kwargs).pooler_output
            torch.testing.assert_close(getattr(model, method)(**kwargs).pooler_output, expected, atol=1e-5, rtol=0)
        regions = model.get_region_features(inputs["pixel_values"], boxes=inputs["boxes"])
    assert regions[0].shape == (1, 16)


def test_cli_refuses_to_save_when_parity_fails(clip_dir, tmp_path, monkeypatch, capsys):
    real = convert.cloc_from_clip_model

    def corrupted(clip, prompter_config=None):
        model = real(clip, prompter_config)
        with torch.no_grad():
            model.text_projection.weight.mul_(1.01)
        return model

    monkeypatch.setattr(convert.hf_clip, "cloc_from_clip_model", corrupted)  # where the CLI's HF path looks it up
    out = tmp_path / "cloc"
    assert convert.main(["--from-hf-clip", str(clip_dir), "--out", str(out)]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_non_empty_output_and_bad_arguments(clip_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert convert.main(["--from-hf-clip", str(clip_dir), "--out", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").exists()
    with pytest.raises(SystemExit):
        convert.main(["--from-open-clip", "x.safetensors", "--out", str(tmp_path / "o")])  # no config
    with pytest.raises(SystemExit):
        convert.main(["--from-hf-clip", str(clip_dir), "--from-open-clip", "x", "--out", "o"])


def test_image_statistics_come_from_either_processor_config_layout(tmp_path):
    """transformers' own lookup reads a flat ``preprocessor_config.json`` or a nested ``processor_config.json``."""
    stats = {"image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    flat, nested, empty = tmp_path / "flat", tmp_path / "nested", tmp_path / "empty"
    for path in (flat, nested, empty):
        path.mkdir()
    (flat / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", **stats}))
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": stats}))
    assert convert.processor.source_image_stats(flat) == stats
    assert convert.processor.source_image_stats(nested) == stats
    assert convert.processor.source_image_stats(empty) == {}


def test_cli_entry_points_reach_main(tmp_path, monkeypatch, capsys):
    """``cloc-convert`` (pyproject) and ``python -m cloc_hf.convert`` both run the package's ``main``."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["cloc-convert"].partition(":")
    assert getattr(importlib.import_module(module), name) is convert.main
    monkeypatch.setattr("sys.argv", ["cloc-convert", "--from-open-clip", "x", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("cloc_hf.convert", run_name="__main__")
    assert exit_info.value.code == 2 and "--from-open-clip needs --open-clip-config" in capsys.readouterr().err


def test_model_modules_never_import_the_converter():
    """``save_pretrained`` copies the model's modules and their relative imports for ``trust_remote_code``
    users: none of them may pull the converter (and its open_clip and CLI code) in."""
    root = Path(cloc_hf.__file__).parent
    offenders = []
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.lstrip(".").split(".")[0] == "convert" or n.startswith("cloc_hf.convert") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_default_tokenizer_must_fit_the_text_vocabulary(clip_model):
    try:
        from cloc_hf.tokenization import find_bpe_file

        find_bpe_file()
    except FileNotFoundError:
        pytest.skip("open_clip_torch's BPE file is not installed")
    cloc = convert.cloc_from_clip_model(clip_model)
    with pytest.raises(ConversionError, match=f"49408 tokens but the text tower only {VOCAB}"):
        convert.build_processor(cloc.config)


# -- open_clip --------------------------------------------------------------------------------------


def hf_to_open_clip(hf: dict, text_prefix: str = "") -> dict:
    """The inverse mapping, written out independently: a CLIPModel state dict in open_clip's layout."""
    oc = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t(),
        text_prefix + "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        text_prefix + "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        text_prefix + "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        text_prefix + "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        text_prefix + "text_projection": hf["text_projection.weight"].t(),
        "logit_scale": hf["logit_scale"],
    }
    for tower, prefix in (("vision_model", "visual."), ("text_model", text_prefix)):
        layer = 0
        while f"{tower}.encoder.layers.{layer}.layer_norm1.weight" in hf:
            src, dst = f"{tower}.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
            for kind in ("weight", "bias"):
                oc[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                oc[f"{dst}attn.out_proj.{kind}"] = hf[f"{src}self_attn.out_proj.{kind}"]
                oc[f"{dst}ln_1.{kind}"] = hf[f"{src}layer_norm1.{kind}"]
                oc[f"{dst}ln_2.{kind}"] = hf[f"{src}layer_norm2.{kind}"]
                oc[f"{dst}mlp.c_fc.{kind}"] = hf[f"{src}mlp.fc1.{kind}"]
                oc[f"{dst}mlp.c_proj.{kind}"] = hf[f"{src}mlp.fc2.{kind}"]
            layer += 1
    return {k: v.clone().contiguous() for k, v in oc.items()}


def open_clip_cfg(quick_gelu: bool = True) -> dict:
    """open_clip's model-config layout for `tiny_clip` (heads = width / head_width)."""
    return {
        "embed_dim": 16,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 4},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
    }


@pytest.mark.parametrize("text_prefix", ["", "text."])
def test_open_clip_mapping_round_trips_every_key(clip_model, text_prefix):
    hf = clip_model.state_dict()
    mapped = convert.map_open_clip_state_dict(hf_to_open_clip(hf, text_prefix))
    assert set(mapped) == set(hf)
    for key, value in hf.items():
        assert torch.equal(mapped[key], value), key


@pytest.mark.parametrize("quick_gelu,text_prefix", [(True, ""), (False, "text.")])
def test_open_clip_parity_with_the_hf_model(quick_gelu, text_prefix):
    clip = tiny_clip("quick_gelu" if quick_gelu else "gelu", seed=3)
    state_dict = hf_to_open_clip(clip.state_dict(), text_prefix)
    cloc = convert.convert_open_clip(state_dict, open_clip_cfg(quick_gelu))
    assert max(convert.check_parity(clip, cloc).values()) <= 1e-5
    assert cloc.config.text_config.eos_token_id == EOS  # so first-eos pooling == open_clip's argmax pooling

    # the plain-torch open_clip reference agrees with Hugging Face's CLIP too, also on open_clip-style
    # token sequences padded with 0 after the end-of-text token
    reference = convert.OpenCLIPReference(state_dict, open_clip_cfg(quick_gelu))
    inputs = convert.make_parity_inputs(cloc.config, num_texts=3, seed=1)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 0)
    assert max(convert.check_parity(clip, reference, inputs=inputs).values()) <= 1e-5
    assert max(convert.check_parity(reference, cloc, inputs=inputs).values()) <= 1e-5


def test_open_clip_eos_pooling_variant(tmp_path):
    """open_clip's multilingual "worldwide" configs pool at a tokenizer-specific eos (mT5: id 1)."""
    clip = tiny_clip(eos=1, seed=5)
    cfg = _with(open_clip_cfg(), "text_cfg", pool_type="eos", eos_id=1, hf_tokenizer_name="google/mt5-base")
    cloc = convert.convert_open_clip(hf_to_open_clip(clip.state_dict()), cfg)
    assert cloc.config.text_config.eos_token_id == 1
    assert max(convert.check_parity(clip, cloc).values()) <= 1e-5
    with pytest.raises(ConversionError, match="eos_id=2"):  # Hugging Face reads eos_token_id=2 as argmax
        convert.convert_open_clip(hf_to_open_clip(clip.state_dict()), _with(cfg, "text_cfg", eos_id=2))
    # the CLIP tokenizer ends texts with another token than the one this tower pools at
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="eos_token_id=513 differs from the text tower's eos_token_id=1"):
        convert.build_processor(cloc.config, tokenizer=tmp_path)


def test_open_clip_config_is_read_once_for_model_and_reference(clip_model):
    """The converted config and the parity reference take heads and layer-norm eps from one reading."""
    cfg = _with(open_clip_cfg(), "vision_cfg", norm_kwargs={"eps": 1e-6}, head_width=8)
    cfg = _with(cfg, "text_cfg", norm_kwargs={"eps": 2e-6})
    settings = convert.read_open_clip_config(cfg)
    config = convert.cloc_config_from_open_clip(cfg)
    reference = convert.OpenCLIPReference(hf_to_open_clip(clip_model.state_dict()), cfg)
    assert (settings.vision.heads, settings.vision.eps, settings.text.eps) == (4, 1e-6, 2e-6)
    assert (config.vision_config.num_attention_heads, config.vision_config.layer_norm_eps) == (4, 1e-6)
    assert config.text_config.layer_norm_eps == 2e-6
    assert (reference.vision, reference.text) == (settings.vision, settings.text)
    with pytest.raises(ConversionError, match="width=32 is not a multiple of head_width=12"):
        convert.OpenCLIPReference(hf_to_open_clip(clip_model.state_dict()), _with(cfg, "vision_cfg", head_width=12))


def test_open_clip_file_formats(clip_model, tmp_path):
    state_dict = hf_to_open_clip(clip_model.state_dict())
    save_file(state_dict, tmp_path / "oc.safetensors")
    # an open_clip training checkpoint: wrapped, DDP-prefixed, with a legacy attn_mask buffer
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in {**state_dict, "attn_mask": torch.ones(2)}.items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    for name in ("oc.safetensors", "epoch_3.pt"):
        cloc = convert.convert_open_clip(tmp_path / name, open_clip_cfg())
        assert max(convert.check_parity(clip_model, cloc).values()) <= 1e-5
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert.convert_open_clip(tmp_path / "pickled.pt", open_clip_cfg())
    (tmp_path / "model.pkl").write_bytes(b"")
    with pytest.raises(ConversionError, match="unsupported checkpoint format"):
        convert.convert_open_clip(tmp_path / "model.pkl", open_clip_cfg())


def _with(cfg, section, **changes):
    cfg = json.loads(json.dumps(cfg))
    (cfg if section is None else cfg[section]).update(changes)
    return cfg


@pytest.mark.parametrize(
    "cfg_change,message",
    [
        (("vision_cfg", {"attentional_pool": True}), "vision_cfg.attentional_pool=True"),
        (("vision_cfg", {"pool_type": "avg"}), "vision_cfg.pool_type='avg'"),
        (("vision_cfg", {"layers": [3, 4, 6, 3]}), "ModifiedResNet"),
        (("vision_cfg", {"timm_model_name": "vit_base_patch16_224"}), "timm_model_name"),
        (("vision_cfg", {"ls_init_value": 1e-5}), "ls_init_value"),
        (("vision_cfg", {"qk_norm": True}), "qk_norm"),
        (("text_cfg", {"hf_model_name": "roberta-base"}), "text_cfg.hf_model_name='roberta-base'"),
        (("text_cfg", {"embed_cls": True}), "embed_cls"),
        (("text_cfg", {"pool_type": "last"}), "pool_type='last'"),
        (("text_cfg", {"proj_bias": True}), "proj_bias"),
        (("text_cfg", {"some_new_switch": 1}), "text_cfg.some_new_switch \\(unknown setting"),
        ((None, {"init_logit_bias": -10.0}), "init_logit_bias"),
        ((None, {"multimodal_cfg": {"width": 32}}), "multimodal_cfg"),
    ],
)
def test_open_clip_unsupported_configs_raise_clear_errors(clip_model, cfg_change, message):
    cfg = _with(open_clip_cfg(), cfg_change[0], **cfg_change[1])
    with pytest.raises(ConversionError, match=f"unsupported open_clip model: .*{message}"):
        convert.convert_open_clip(hf_to_open_clip(clip_model.state_dict()), cfg)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"visual.attn_pool.query": torch.zeros(4, 16)}, "attentional pooling in the image tower"),
        ({"logit_bias": torch.zeros(())}, "SigLIP"),
        ({"text_decoder.ln_final.weight": torch.zeros(32)}, "CoCa"),
        ({"visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(32)}, "layer scale"),
        ({"visual.something_new": torch.zeros(1)}, "1 open_clip keys cannot be mapped: visual.something_new"),
    ],
)
def test_open_clip_unsupported_weights_raise_clear_errors(clip_model, extra, message):
    state_dict = {**hf_to_open_clip(clip_model.state_dict()), **extra}
    with pytest.raises(ConversionError, match=message):
        convert.convert_open_clip(state_dict, open_clip_cfg())


def test_open_clip_missing_or_misshapen_weights(clip_model):
    state_dict = hf_to_open_clip(clip_model.state_dict())
    del state_dict["visual.ln_pre.bias"]
    with pytest.raises(ConversionError, match="not provided by the CLIP weights: vision_model.pre_layrnorm.bias"):
        convert.convert_open_clip(state_dict, open_clip_cfg())
    cfg = _with(open_clip_cfg(), "vision_cfg", image_size=64)  # positional embedding for a 16x16 grid
    with pytest.raises(ConversionError, match="shape mismatch.*position_embedding"):
        convert.convert_open_clip(hf_to_open_clip(clip_model.state_dict()), cfg)


def test_cli_open_clip_end_to_end(clip_model, tmp_path):
    save_file(hf_to_open_clip(clip_model.state_dict()), tmp_path / "oc.safetensors")
    # the hf-hub layout of open_clip configs: model config + preprocessing
    hub_cfg = {"model_cfg": open_clip_cfg(), "preprocess_cfg": {"image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub_cfg))
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "cloc"
    argv = ["--from-open-clip", str(tmp_path / "oc.safetensors"), "--open-clip-config", str(tmp_path / "open_clip_config.json")]
    argv += ["--out", str(out), "--tokenizer", str(tmp_path / "tok"), "--resize-mode", "center_crop"]
    assert convert.main(argv) == 0
    assert_files_are_safetensors_only(out)
    model = AutoModel.from_pretrained(out).eval()
    assert isinstance(model, cloc_hf.CLOCModel)
    assert max(convert.check_parity(clip_model, model).values()) <= 1e-5
    processor = CLOCProcessor.from_pretrained(out)
    assert processor.image_processor.resize_mode == "center_crop"
    assert processor.image_processor.image_std == pytest.approx(IMAGE_STD)


def test_real_open_clip_model_configs():
    """open_clip's own config files (read from its wheel, never imported): ViT CLIPs map to the
    registry's shapes, other families are refused by name."""
    spec = importlib.util.find_spec("open_clip")  # locating a package does not run it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    root = Path(spec.submodule_search_locations[0]) / "model_configs"

    def load(name):
        return json.loads((root / f"{name}.json").read_text())

    for open_clip_name, cloc_name in (("ViT-B-16-quickgelu", "cloc-vit-b-16"), ("ViT-H-14", "cloc-vit-h-14-336")):
        ours, registry = convert.cloc_config_from_open_clip(load(open_clip_name)), cloc_hf.get_model_config(cloc_name)
        assert ours.projection_dim == registry.projection_dim
        for tower, names in (
            ("vision_config", ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "hidden_act")),
            ("text_config", ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings", "eos_token_id", "hidden_act")),
        ):
            for name in names:
                assert getattr(getattr(ours, tower), name) == getattr(getattr(registry, tower), name), (open_clip_name, tower, name)
    for name, message in (
        ("RN50", "ModifiedResNet"),
        ("coca_ViT-B-32", "multimodal_cfg"),
        ("ViT-B-16-SigLIP", "init_logit_bias"),
        ("xlm-roberta-base-ViT-B-32", "hf_model_name"),
    ):
        with pytest.raises(ConversionError, match=message):
            convert.cloc_config_from_open_clip(load(name))
