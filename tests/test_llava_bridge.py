"""The CLOC tower for LLaVA code bases: contract, loading, region features, builder, NeXT's ``hf:`` path."""

import copy
import json
import re
import shutil
import sys
import types
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

import cloc_hf
from cloc_hf import CLOCImageProcessor, CLOCVisionModel
from llava_bridge import CLOCVisionTower, build_vision_tower, is_cloc_checkpoint, with_cloc

DOCS = Path(__file__).resolve().parent.parent / "docs" / "llava.md"
TINY = dict(vision_config=dict(patch_size=8))  # hidden 32, 2 layers, 32 px, a 4x4 grid


def _args(path, layer=-2, feature=None, **extra):
    args = types.SimpleNamespace(mm_vision_tower=str(path), mm_vision_select_layer=layer, **extra)
    if feature is not None:
        args.mm_vision_select_feature = feature
    return args


def _boxes():
    return [torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9]]), torch.zeros(0, 4), torch.tensor([[0, 0, 1.0, 1]])]


@pytest.fixture(scope="module")
def cloc_dir(tmp_path_factory):
    """A saved full CLOC checkpoint with its image processor, and the model it was saved from."""
    path = tmp_path_factory.mktemp("cloc") / "cloc-tiny"
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny", **TINY).eval()
    model.save_pretrained(path)
    CLOCImageProcessor(size=32).save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def vision_dir(cloc_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "vit-only"
    CLOCVisionModel.from_pretrained(cloc_dir[0]).save_pretrained(path)
    return path


def _count_passes(tower):
    calls = []
    tower.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    return calls


# -- the contract ----------------------------------------------------------------------------------------
def test_properties_and_image_processor(cloc_dir):
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    assert tower.is_loaded and isinstance(tower.vision_tower, CLOCVisionModel)
    assert (tower.hidden_size, tower.num_patches_per_side, tower.num_patches, tower.image_size) == (32, 4, 16, 32)
    assert tower.config is tower.vision_tower.config
    assert (tower.dtype, tower.device) == (torch.float32, torch.device("cpu"))
    assert tower.dummy_feature.shape == (1, 32) and not tower.dummy_feature.any()
    processor = tower.image_processor
    assert processor.crop_size == {"height": 32, "width": 32} and len(processor.image_mean) == 3
    pixels = processor.preprocess(PIL.Image.new("RGB", (50, 30)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0], feature="cls_patch")).num_patches == 17


def test_feature_select_layers_and_errors(cloc_dir):
    px = torch.randn(2, 3, 32, 32)
    hidden = cloc_dir[1].vision_model(px, output_hidden_states=True).hidden_states
    for layer in (-2, -1, 0):
        patch = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0], layer))
        cls_patch = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0], layer, "cls_patch"))
        with torch.no_grad():
            torch.testing.assert_close(patch(px), hidden[layer][:, 1:])
            torch.testing.assert_close(cls_patch(px), hidden[layer])
    with pytest.raises(ValueError, match="mm_vision_select_feature='cls'"):
        CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0], feature="cls"))
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    tower.select_feature = "slicefour_patch"
    with pytest.raises(ValueError, match="Unexpected select feature"):
        tower(px)


def test_llava_encode_images_sequence_casts_and_lists(cloc_dir):
    """LLaVA's ``encode_images``: tower(images) -> projector; lists one image at a time; dtypes restored."""
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    projector = torch.nn.Sequential(torch.nn.Linear(tower.hidden_size, 48), torch.nn.GELU(), torch.nn.Linear(48, 48))
    px = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        batch = tower(px)
        assert batch.shape == (3, tower.num_patches, 32) and batch.dtype == torch.float64
        assert projector(batch.float()).shape == (3, 16, 48)
        as_list = tower(list(px))
        assert [f.shape for f in as_list] == [(1, 16, 32)] * 3
        torch.testing.assert_close(torch.cat(as_list), batch)
        # text-only samples: LLaVA feeds a zero image of crop_size
        crop = tower.image_processor.crop_size
        assert tower(torch.zeros(1, 3, crop["height"], crop["width"])).shape == (1, 16, 32)
        tower.to(torch.bfloat16)
        low = tower(px.float())
        assert tower.dtype == torch.bfloat16 and low.dtype == torch.float32


def test_gradients_are_the_callers_choice(cloc_dir):
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    assert not any(p.requires_grad for p in tower.parameters())  # frozen at load, as LLaVA
    tower.requires_grad_(True)  # unfreezing works: forward is not wrapped in no_grad
    out = tower(torch.randn(2, 3, 32, 32))
    assert out.requires_grad
    out.square().mean().backward()
    assert tower.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not tower(torch.randn(1, 3, 32, 32)).requires_grad


def test_delay_load_and_second_load_is_noop(cloc_dir):
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]), delay_load=True)
    assert not tower.is_loaded and not hasattr(tower, "image_processor")
    assert (tower.hidden_size, tower.num_patches) == (32, 16)  # from the config only
    with pytest.raises(RuntimeError, match="call load_model"):
        _ = tower.dtype
    tower.load_model()
    vit = tower.vision_tower
    tower.load_model()
    assert tower.is_loaded and tower.vision_tower is vit
    eager = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0], unfreeze_mm_vision_tower=True), delay_load=True)
    assert eager.is_loaded  # LLaVA-NeXT: the MLLM's saved tower weights then overwrite these


def test_fine_tuned_tower_comes_back_from_the_mllm_weights(cloc_dir, tmp_path):
    """The MLLM's tower weights are used, and the original CLOC weights are never read."""
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "fine-tuning"
    mllm = {f"model.vision_tower.{k}": v.clone() for k, v in tower.state_dict().items()}
    mllm["model.embed_tokens.weight"] = torch.randn(10, 8)
    mllm["model.mm_projector.0.weight"] = torch.randn(8, 32)
    no_weights = tmp_path / "cloc-config-only"
    shutil.copytree(cloc_dir[0], no_weights)
    (no_weights / "model.safetensors").unlink()
    (tmp_path / "mllm").mkdir()
    save_file(mllm, tmp_path / "mllm" / "model.safetensors")
    px = torch.randn(2, 3, 32, 32)
    for source in (mllm, tmp_path / "mllm"):
        loaded = CLOCVisionTower.from_mllm_state_dict(source, _args(no_weights))
        loaded.load_model()  # what LLaVA's loader calls next: must not replace the fine-tuned weights
        assert loaded.is_loaded and not any(p.requires_grad for p in loaded.parameters())
        for key, value in tower.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
        with torch.no_grad():
            torch.testing.assert_close(loaded(px), tower(px))
            torch.testing.assert_close(
                loaded.region_features(px, boxes=_boxes()[:2]), tower.region_features(px, boxes=_boxes()[:2])
            )
    with pytest.raises(ValueError, match="no weight in the MLLM state dict starts with 'vision_tower.'"):
        CLOCVisionTower.from_mllm_state_dict(mllm, _args(no_weights), prefix="vision_tower.")


# -- loading only what the tower uses ----------------------------------------------------------------------
def _region_queries():
    return dict(boxes=_boxes()), dict(points=[torch.tensor([[0.5, 0.5]]), torch.zeros(0, 2), torch.tensor([[0.1, 0.9]])])


def _assert_same_as_auto_model(tower, path):
    """Image tokens of every layer and region features (boxes and points) equal ``AutoModel``'s, bit for bit."""
    reference = AutoModel.from_pretrained(path).eval()
    assert tower.dtype == reference.dtype
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outs = tower.vision_tower(px.to(tower.dtype), output_hidden_states=True)
        want = reference.vision_model(px.to(reference.dtype), output_hidden_states=True)
        for got_layer, want_layer in zip(outs.hidden_states, want.hidden_states, strict=True):
            assert torch.equal(got_layer, want_layer)
        for query in _region_queries():
            got = tower.region_features(outs, **query)
            expected = reference.get_region_features(px.to(reference.dtype), **query)
            assert all(torch.equal(g, w) for g, w in zip(got, expected, strict=True)), query


def test_full_checkpoint_builds_and_reads_only_the_vit_and_prompter(cloc_dir, monkeypatch):
    """No text tower, ``logit_scale``, projections or box head; identical to loading through ``AutoModel``."""
    from safetensors import safe_open

    opened = []

    class RecordingOpen:  # safetensors' safe_open, noting each tensor read
        def __init__(self, *args, **kwargs):
            self.handle = safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            opened.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr("safetensors.safe_open", RecordingOpen)
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    monkeypatch.undo()
    assert opened and all(key.startswith(("vision_model.", "prompter.")) for key in opened)
    assert {key.split(".")[0] for key in tower.state_dict()} == {"vision_tower", "region_model"}
    assert {key.split(".")[1] for key in tower.state_dict() if key.startswith("region_model.")} == {"prompter"}
    _assert_same_as_auto_model(tower, cloc_dir[0])


def _resharded(source: Path, dest: Path) -> Path:
    """``source``'s weights as a sharded checkpoint: ViT and Prompter in one shard, the rest in another."""
    from safetensors.torch import load_file

    shutil.copytree(source, dest)
    state = load_file(dest / "model.safetensors")
    (dest / "model.safetensors").unlink()
    names = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for key, value in state.items():
        tower_part = key.startswith(("vision_model.", "prompter."))
        names["model-00001-of-00002.safetensors" if tower_part else "model-00002-of-00002.safetensors"][key] = value
    weight_map = {}
    for name, tensors in names.items():
        save_file(tensors, dest / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def test_sharded_full_checkpoint_opens_only_the_shards_it_needs(cloc_dir, tmp_path):
    sharded = _resharded(cloc_dir[0], tmp_path / "sharded")
    _assert_same_as_auto_model(CLOCVisionTower(sharded, _args(sharded)), sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()  # the text tower's shard: never opened
    tower = CLOCVisionTower(sharded, _args(sharded))
    for key, value in CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0])).state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(OSError, match="model-00001-of-00002.safetensors"):
        CLOCVisionTower(sharded, _args(sharded))
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        CLOCVisionTower(sharded, _args(sharded))
    # an incomplete checkpoint: a clear error, and the tower is not marked loaded (a retry loads again)
    from safetensors.torch import load_file

    state = load_file(cloc_dir[0] / "model.safetensors")
    del state["prompter.projection.weight"]
    save_file(state, sharded / "model.safetensors")
    tower = CLOCVisionTower(sharded, _args(sharded), delay_load=True)
    with pytest.raises(RuntimeError, match="region_model.prompter.projection.weight"):
        tower.load_model()
    assert not tower.is_loaded


def test_checkpoint_dtype_and_vit_only_checkpoint_as_auto_model(cloc_dir, vision_dir, tmp_path):
    half = tmp_path / "bf16"
    copy.deepcopy(cloc_dir[1]).to(torch.bfloat16).save_pretrained(half)
    CLOCImageProcessor(size=32).save_pretrained(half)
    tower = CLOCVisionTower(half, _args(half))
    assert tower.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in tower.parameters())
    _assert_same_as_auto_model(tower, half)
    vit_only = CLOCVisionTower(vision_dir, _args(vision_dir))
    reference = AutoModel.from_pretrained(vision_dir)
    for key, value in reference.state_dict().items():
        assert torch.equal(vit_only.vision_tower.state_dict()[key], value), key


def test_device_map(cloc_dir):
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]), delay_load=True)
    tower.load_model(device_map={"": "cpu"})
    assert tower.device == torch.device("cpu")
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]), delay_load=True)
    with pytest.raises(ValueError, match="splits the tower over several devices"):
        tower.load_model(device_map={"vision_tower": "cpu", "region_model": "meta"})
    assert not tower.is_loaded


def test_mllm_weights_saved_by_the_earlier_tower_layout_still_load(cloc_dir):
    """Earlier towers kept ``visual_projection``, ``logit_scale`` and the box head under ``region_model``:
    MLLM checkpoints holding them load (strictly) and the entries are skipped."""
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    mllm = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    old = cloc_dir[1].state_dict()
    for key in old:
        if key.startswith(("visual_projection.", "logit_scale", "box_head.")):
            mllm[f"model.vision_tower.region_model.{key}"] = old[key]
    assert any("box_head" in key for key in mllm) and "model.vision_tower.region_model.logit_scale" in mllm
    loaded = CLOCVisionTower.from_mllm_state_dict(mllm, _args(cloc_dir[0]))
    for key, value in tower.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# -- region features from the same ViT pass --------------------------------------------------------------
def test_one_vit_pass_serves_image_tokens_and_regions(cloc_dir):
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    calls = _count_passes(tower)
    px, boxes = torch.randn(3, 3, 32, 32), _boxes()
    with torch.no_grad():
        features, regions = tower.forward_with_regions(px, boxes=boxes)
        assert len(calls) == 1
        reference = cloc_dir[1].get_region_features(px, boxes=boxes)  # the CLOC model's own pass
        assert [r.shape for r in regions] == [(2, 32), (0, 32), (1, 32)]
        for got, want in zip(regions, reference):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(features, tower(px))
        assert len(calls) == 2
        # encode once, query many times: the ViT output of a pass already made costs no pass
        outs = tower.vision_tower(px, output_hidden_states=True)
        calls.clear()
        for tokens in (outs, outs.last_hidden_state):
            for got, want in zip(tower.region_features(tokens, boxes=boxes), reference):
                torch.testing.assert_close(got, want)
        points = [torch.tensor([[0.5, 0.5]]), torch.zeros(0, 2), torch.tensor([[0.1, 0.9]])]
        assert [r.shape for r in tower.region_features(outs, points=points)] == [(1, 32), (0, 32), (1, 32)]
        assert calls == []
        per_image, listed = tower.forward_with_regions(list(px), boxes=boxes)
        assert len(calls) == 3 and [f.shape for f in per_image] == [(1, 16, 32)] * 3
        for got, want in zip(listed, reference):
            torch.testing.assert_close(got, want)


def test_region_errors(cloc_dir, vision_dir):
    vit_only = CLOCVisionTower(vision_dir, _args(vision_dir))
    assert vit_only.region_model is None and vit_only(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="has no Prompter"):
        vit_only.region_features(torch.randn(1, 3, 32, 32), boxes=[torch.tensor([[0, 0, 0.5, 0.5]])])
    tower = CLOCVisionTower(cloc_dir[0], _args(cloc_dir[0]))
    with pytest.raises(ValueError, match=r"tower's tokens \(B, 1 \+ N, 32\)"):
        tower.region_features(torch.randn(2, 17, 31), boxes=_boxes()[:2])
    with pytest.raises(ValueError, match="prompts for 1 images and 3 images"):
        tower.forward_with_regions(list(torch.randn(3, 3, 32, 32)), boxes=_boxes()[:1])


# -- the builder and the documented change in a fork --------------------------------------------------
def _fork_with_documented_change(tmp_path):
    """A stand-in for a LLaVA fork: its builder sends existing paths and CLIP-like names to its CLIP tower
    (LLaVA's and LLaVA-NeXT's rules); the two documented lines are appended."""
    block = re.search(r"<!-- fork-builder-change -->\s*```python\n(.*?)```", DOCS.read_text(), re.S)
    assert block, "docs/llava.md lost the fork builder change block"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 2
    package = tmp_path / "fakefork"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "builder.py").write_text(
        "import os\n\n"
        "class CLIPVisionTower:\n"
        "    def __init__(self, vision_tower, args, delay_load=False):\n"
        "        self.name, self.delay_load = vision_tower, delay_load\n\n"
        "def build_vision_tower(vision_tower_cfg, **kwargs):\n"
        "    vision_tower = getattr(vision_tower_cfg, 'mm_vision_tower', getattr(vision_tower_cfg, 'vision_tower', None))\n"
        "    if os.path.exists(vision_tower) or 'clip' in vision_tower or vision_tower.startswith('openai'):\n"
        "        return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)\n"
        "    raise ValueError(f'Unknown vision tower: {vision_tower}')\n\n" + "\n".join(lines) + "\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        sys.modules.pop("fakefork.builder", None)
        import fakefork.builder as builder
    finally:
        sys.path.remove(str(tmp_path))
    return builder


def test_fork_builder_with_the_documented_two_lines(cloc_dir, tmp_path):
    builder = _fork_with_documented_change(tmp_path)
    # a CLOC checkpoint in a folder whose name the fork would send to its CLIP tower
    disguised = tmp_path / "clip-vit-finetuned"
    shutil.copytree(cloc_dir[0], disguised)
    tower = builder.build_vision_tower(_args(disguised), delay_load=True)
    assert isinstance(tower, CLOCVisionTower) and not tower.is_loaded
    # a CLIP checkpoint in a folder named like CLOC goes to the fork's own tower
    clip_named_cloc = tmp_path / "cloc-but-clip"
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        clip_named_cloc
    )
    assert not is_cloc_checkpoint(clip_named_cloc) and is_cloc_checkpoint(disguised)
    other = builder.build_vision_tower(types.SimpleNamespace(vision_tower=str(clip_named_cloc)))
    assert type(other).__name__ == "CLIPVisionTower"
    hub = builder.build_vision_tower(_args("openai/clip-vit-large-patch14-336"), delay_load=True)
    assert type(hub).__name__ == "CLIPVisionTower" and hub.delay_load
    with pytest.raises(ValueError, match="Unknown vision tower: imagebind_huge"):
        builder.build_vision_tower(_args("imagebind_huge"))


def test_builder_without_fallback(cloc_dir, tmp_path):
    assert isinstance(build_vision_tower(_args(cloc_dir[0])), CLOCVisionTower)
    with pytest.raises(ValueError, match="not a CLOC checkpoint, and no fallback"):
        build_vision_tower(_args(tmp_path))
    with pytest.raises(ValueError, match="names no vision tower"):
        build_vision_tower(types.SimpleNamespace())
    assert with_cloc(build_vision_tower).__name__ == "build_vision_tower"


# -- LLaVA-NeXT's `hf:` tower ----------------------------------------------------------------------------
def _next_hf_tower(vision_tower):
    """What LLaVA-NeXT's ``HFVisionTower`` does with ``hf:<path>`` (its load_model and properties)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    name = vision_tower.replace("hf:", "", 1)
    cfg_only = AutoConfig.from_pretrained(name)  # the delay_load branch
    processor = AutoImageProcessor.from_pretrained(name)
    model = AutoModel.from_pretrained(name, dtype=torch.bfloat16, trust_remote_code=True)
    config = model.config
    if hasattr(model, "vision_model"):
        model = model.vision_model
    model.requires_grad_(False)
    try:  # its hidden_size property
        hidden = config.hidden_size
    except AttributeError:
        hidden = config.vision_config.hidden_size
    return cfg_only, processor, model, hidden


def test_llava_next_hf_tower_call_sequence(cloc_dir, vision_dir, tmp_path):
    vit_with_processor = tmp_path / "vit"
    shutil.copytree(vision_dir, vit_with_processor)
    CLOCImageProcessor(size=32).save_pretrained(vit_with_processor)
    reference = copy.deepcopy(cloc_dir[1].vision_model).to(torch.bfloat16)
    for path, model_type in ((cloc_dir[0], "cloc"), (vit_with_processor, "cloc_vision_model")):
        cfg_only, processor, model, hidden = _next_hf_tower(f"hf:{path}")
        assert isinstance(model, CLOCVisionModel) and cfg_only.model_type == model_type and hidden == 32
        pixels = processor.preprocess(PIL.Image.new("RGB", (40, 24)), return_tensors="pt")["pixel_values"]
        outs = model(pixels.to(device=model.device, dtype=model.dtype), output_hidden_states=True)
        features = outs.hidden_states[-2][:, 1:].to(pixels.dtype)  # 'patch' drops token 0
        assert features.shape == (1, 16, hidden) and features.dtype == torch.float32
        expected = reference(pixels.to(torch.bfloat16), output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(features, expected.float())
    # its num_patches reads image_size / patch_size from the top-level config: a ViT-only checkpoint has them
    assert cfg_only.image_size // cfg_only.patch_size == 4


# -- DeepSpeed ZeRO-3: partitioned loading, two CPU processes ---------------------------------------------
_ZERO3_SCRIPT = r'''
import importlib, sys, types
import torch
importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a CPU-only comm op gloo never uses
import deepspeed
from transformers.integrations import HfDeepSpeedConfig

deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "zero_optimization": {"stage": 3}}
keep_alive = HfDeepSpeedConfig(config)  # while it lives, transformers builds and loads models partitioned
import cloc_hf
from llava_bridge import CLOCVisionTower

expected = torch.load(sys.argv[1], weights_only=True)
px = expected["px"]
for case in expected["cases"]:  # a ViT-only and a full CLOC checkpoint
    args = types.SimpleNamespace(mm_vision_tower=case["cloc_dir"], mm_vision_select_layer=-2)
    for name, tower in (("original", CLOCVisionTower(case["cloc_dir"], args)),
                        ("fine_tuned", CLOCVisionTower.from_mllm_state_dict(case["mllm_dir"], args))):
        label = (case["cloc_dir"], name)
        params = list(tower.parameters())
        assert params and all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), label  # partitioned
        with deepspeed.zero.GatheredParameters(params):
            state = tower.state_dict()
            assert state.keys() == case[name + "_state"].keys(), label
            for key, value in state.items():
                torch.testing.assert_close(value, case[name + "_state"][key], msg=key)
        engine = deepspeed.initialize(model=tower, config=config)[0]
        with torch.no_grad():
            torch.testing.assert_close(engine(px), case[name], msg=str(label))
            if case["boxes"] is not None:  # the Prompter, partitioned too, on the same pass's tokens
                features, regions = engine.module.forward_with_regions(px, boxes=case["boxes"])
                torch.testing.assert_close(features, case[name], msg=str(label))
                for got, want in zip(regions, case[name + "_regions"], strict=True):
                    torch.testing.assert_close(got, want, msg=str(label))
print("zero3 ok", torch.distributed.get_rank())
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_partitioned_loading_two_processes(cloc_dir, vision_dir, tmp_path):
    """Under ZeRO-3 the tower loads partitioned, from a full CLOC checkpoint (ViT and Prompter; the text
    tower and the 0-dimensional ``logit_scale`` are never built) or a ViT-only one, or from MLLM weights;
    image tokens and region features equal those of the tower loaded without DeepSpeed."""
    import os
    import subprocess

    pytest.importorskip("deepspeed")
    px, boxes = torch.randn(2, 3, 32, 32), _boxes()[:2]
    cases = []
    for checkpoint in (vision_dir, cloc_dir[0]):
        tower = CLOCVisionTower(checkpoint, _args(checkpoint))
        fine_tuned = CLOCVisionTower(checkpoint, _args(checkpoint))
        with torch.no_grad():
            for p in fine_tuned.parameters():
                p.add_(0.01 * torch.randn_like(p))
        mllm = tmp_path / f"mllm-{checkpoint.name}"
        mllm.mkdir()
        save_file({f"model.vision_tower.{k}": v.contiguous() for k, v in fine_tuned.state_dict().items()},
                  mllm / "model.safetensors")
        case = {"cloc_dir": str(checkpoint), "mllm_dir": str(mllm), "boxes": None}
        with torch.no_grad():
            for name, model in (("original", tower), ("fine_tuned", fine_tuned)):
                case[name], case[name + "_state"] = model(px), model.state_dict()
                if model.region_model is not None:
                    case["boxes"] = boxes
                    case[name + "_regions"] = model.forward_with_regions(px, boxes=boxes)[1]
        cases.append(case)
    assert cases[-1]["boxes"] is not None  # the full checkpoint's Prompter is checked
    torch.save({"px": px, "cases": cases}, tmp_path / "expected.pt")
    (tmp_path / "check.py").write_text(_ZERO3_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
           str(tmp_path / "check.py"), str(tmp_path / "expected.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and log.count("zero3 ok") == 2, log[-4000:]
