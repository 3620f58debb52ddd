"""A hub user without this package: ``trust_remote_code=True`` gets the whole processor and the model.

The checkpoint is written as training and conversion write it (``model.save_pretrained`` then
``processor.save_pretrained`` into one folder) and read back in a fresh interpreter in which the
project's packages cannot be imported, so every class must come from the code copied into the folder.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

import cloc_hf
from cloc_hf import CLOCProcessor

REPO = Path(__file__).resolve().parents[1]
# the project's top-level packages: none may be importable in the "hub user" process
PROJECT_PACKAGES = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
SIZE = 32  # cloc-tiny's image size
TEXT = ["a red box", "a photo of a cat"]
BOXES = [[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 45.0, 30.0]]

# argv[4]: the project's packages, comma-separated; they are made unimportable before anything else runs
HIDE_PROJECT = textwrap.dedent(
    """
    import importlib.util, json, sys

    ckpt, image_path, out_dir, hidden = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")

    class NotInstalled:
        '''Makes the project's packages unimportable, as for a user who never installed them.'''

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    def is_editable_hook(entry):
        return (getattr(entry, "__module__", "") or type(entry).__module__).startswith("__editable__")

    sys.meta_path[:] = [NotInstalled] + [f for f in sys.meta_path if not is_editable_hook(f)]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    for name in hidden:
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"{name} is still importable")
    """
)

HUB_USER_SCRIPT = HIDE_PROJECT + textwrap.dedent(
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(ckpt, trust_remote_code=True)
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    text, boxes = json.loads(sys.argv[5]), json.loads(sys.argv[6])
    inputs = processor(images=[image_path], text=text, boxes=[boxes])
    with torch.no_grad():
        image_embeds = model.get_image_features(inputs["pixel_values"]).pooler_output
    tensors = {k: inputs[k] for k in ("pixel_values", "original_sizes", "input_ids", "attention_mask")}
    tensors["boxes"] = inputs["boxes"][0]
    tensors["image_processor_pixel_values"] = image_processor(image_path)["pixel_values"]
    tensors["image_embeds"] = image_embeds
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir + "/remote.safetensors")
    classes = {"processor": processor, "image_processor": processor.image_processor,
               "standalone_image_processor": image_processor, "tokenizer": processor.tokenizer, "model": model}
    print(json.dumps({
        "classes": {k: [type(v).__module__, type(v).__name__] for k, v in classes.items()},
        "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in hidden),
    }))
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A cloc-tiny checkpoint with its processor, as training and conversion save them."""
    folder = tmp_path_factory.mktemp("remote") / "ckpt"
    torch.manual_seed(0)
    model = cloc_hf.create_model("cloc-tiny").eval()
    processor = CLOCProcessor.offline(size=SIZE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor



def _run_as_hub_user(script, folder, image_path, tmp_path, text, boxes) -> dict:
    """Run ``script`` in a fresh interpreter that cannot import this project (as a hub user would) and
    return the JSON report it prints last."""
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    # -I: no PYTHONPATH, no user site, no script or working directory on sys.path
    argv = [sys.executable, "-I", "-c", script, str(folder), str(image_path), str(tmp_path)]
    argv += [",".join(PROJECT_PACKAGES), json.dumps(text), json.dumps(boxes)]
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr  # no interactive prompt
    return json.loads(result.stdout.strip().splitlines()[-1])

def test_save_pretrained_writes_auto_map_and_code(checkpoint):
    folder, _, _ = checkpoint
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_cloc.CLOCProcessor"
    assert (
        processor_config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "image_processing_cloc.CLOCImageProcessor"
    )
    model_auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert model_auto_map["AutoModel"] == "modeling_cloc.CLOCModel"
    for module in ("processing_cloc", "image_processing_cloc", "modeling_cloc", "configuration_cloc"):
        assert (folder / f"{module}.py").is_file(), module


def test_hub_user_without_the_package_gets_the_full_processor_and_model(checkpoint, tmp_path):
    folder, model, processor = checkpoint
    rng = np.random.default_rng(0)
    image_path = tmp_path / "image.png"
    PIL.Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(image_path)
    report = _run_as_hub_user(HUB_USER_SCRIPT, folder, image_path, tmp_path, TEXT, BOXES)
    assert report["project_modules"] == []
    classes = report["classes"]
    for key, name in (
        ("processor", "CLOCProcessor"),
        ("image_processor", "CLOCImageProcessor"),
        ("standalone_image_processor", "CLOCImageProcessor"),
        ("model", "CLOCModel"),
    ):
        module, class_name = classes[key]
        assert class_name == name and module.startswith("transformers_modules."), (key, classes[key])
    assert classes["tokenizer"][1] == "CLIPTokenizer"

    remote = load_file(str(tmp_path / "remote.safetensors"))
    expected = processor(images=[image_path], text=TEXT, boxes=[BOXES])
    for key in ("pixel_values", "original_sizes", "input_ids", "attention_mask"):
        assert torch.equal(remote[key], expected[key]), key
    assert torch.equal(remote["boxes"], expected["boxes"][0])
    assert torch.equal(remote["image_processor_pixel_values"], expected["pixel_values"][:1])
    with torch.no_grad():
        image_embeds = model.get_image_features(expected["pixel_values"]).pooler_output
    torch.testing.assert_close(remote["image_embeds"], image_embeds)


# --- a saved CLOC-LLaVA (llava_bridge on top of cloc_hf) -------------------------------------------------
LLAVA_WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "<region>", "user", "what", "is", "in", "a", "cat"]

LLAVA_HUB_USER_SCRIPT = HIDE_PROJECT + textwrap.dedent(
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def load(folder):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        return processor, model

    processor, model = load(ckpt)
    text, boxes = json.loads(sys.argv[5]), json.loads(sys.argv[6])
    inputs = processor(images=[image_path], text=text, boxes=[boxes])
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # a folder saved by the remote-code classes loads the same way
    model.save_pretrained(out_dir + "/resaved")
    processor.save_pretrained(out_dir + "/resaved")
    _, again = load(out_dir + "/resaved")
    with torch.no_grad():
        logits_again = again(**inputs).logits
    tensors = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
               "region_boxes": inputs["region_boxes"][0], "logits": logits, "generated": generated,
               "logits_again": logits_again}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir + "/remote.safetensors")
    classes = {"processor": processor, "image_processor": processor.image_processor, "model": model,
               "tower": model.model.vision_tower, "prompter": model.model.region_encoder.prompter}
    print(json.dumps({
        "classes": {k: [type(v).__module__, type(v).__name__] for k, v in classes.items()},
        "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in hidden),
    }))
    """
)


def _llava_checkpoint(folder):
    """A tiny CLOCLlava (CLOC tower with a Prompter, 2-layer Llama) and its processor, saved together."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from llava_bridge import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LLAVA_WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<region>"]})
    text = LlamaConfig(
        vocab_size=len(LLAVA_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=2, eos_token_id=3,
    )
    vision = cloc_hf.CLOCVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = CLOCLlavaConfig(
        vision_config=vision, text_config=text, image_token_id=LLAVA_WORDS.index("<image>"),
        region_token_id=LLAVA_WORDS.index("<region>"), prompter_config={"num_attention_heads": 2},
        prompter_projection_dim=24,
    )
    torch.manual_seed(0)
    model = CLOCLlavaForConditionalGeneration(config).eval()
    processor = CLOCLlavaProcessor(
        image_processor=cloc_hf.CLOCImageProcessor(size=32), tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default",
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_saved_llava_folder_carries_its_code(tmp_path):
    _llava_checkpoint(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_llava.CLOCLlavaForConditionalGeneration"
    for module in ("modeling_llava", "configuration_llava", "processing_llava", "modeling_vision",
                   "modeling_prompter", "configuration_cloc", "box_ops", "image_processing_cloc"):
        assert (tmp_path / f"{module}.py").is_file(), module
    assert _project_imports(tmp_path) == []  # the copies import each other, never the installed packages
    assert "from cloc_hf." in (REPO / "llava_bridge" / "modeling_llava.py").read_text()  # the package is unchanged


def _project_imports(folder) -> list[str]:
    """``file: line`` of every import of the project's packages in the code files of ``folder``."""
    found = []
    for path in sorted(Path(folder).glob("*.py")):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:from|import)\s+(\w+)", line)
            if match and match.group(1) in PROJECT_PACKAGES:
                found.append(f"{path.name}: {line.strip()}")
    return found


def test_hub_upload_gets_self_contained_code(tmp_path, monkeypatch):
    """``save_pretrained(push_to_hub=True)`` uploads before it returns: the code is finished before that."""
    from transformers.dynamic_module_utils import custom_object_save
    from transformers.utils.hub import PushToHubMixin

    model, _ = _llava_checkpoint(tmp_path / "saved")
    folder = tmp_path / "upload"
    folder.mkdir()
    custom_object_save(model, folder, config=model.config)  # the copies save_pretrained makes before uploading
    assert _project_imports(folder)  # transformers' copies alone import cloc_hf
    uploaded = {}
    def upload(self, working_dir, *args, **kwargs):
        uploaded["imports"] = _project_imports(working_dir)

    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    model._upload_modified_files(folder, "user/cloc-llava", {})
    assert uploaded["imports"] == []


def test_hub_user_without_the_package_loads_a_saved_llava(tmp_path):
    folder = tmp_path / "llava"
    model, processor = _llava_checkpoint(folder)
    rng = np.random.default_rng(1)
    image_path = tmp_path / "image.png"
    PIL.Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(image_path)
    text, boxes = ["user <image> what is in <region>"], [[4.0, 3.0, 30.0, 25.0]]
    report = _run_as_hub_user(LLAVA_HUB_USER_SCRIPT, folder, image_path, tmp_path, text, boxes)
    assert report["project_modules"] == []
    for key, name in (("processor", "CLOCLlavaProcessor"), ("image_processor", "CLOCImageProcessor"),
                      ("model", "CLOCLlavaForConditionalGeneration"), ("tower", "CLOCVisionModel"),
                      ("prompter", "CLOCPrompter")):
        module, class_name = report["classes"][key]
        assert class_name == name and module.startswith("transformers_modules."), (key, report["classes"][key])

    remote = load_file(str(tmp_path / "remote.safetensors"))
    expected = processor(images=[image_path], text=text, boxes=[boxes])
    for key in ("input_ids", "pixel_values"):
        assert torch.equal(remote[key], expected[key]), key
    assert torch.equal(remote["region_boxes"], expected["region_boxes"][0])
    with torch.no_grad():
        logits = model(**expected).logits
        generated = model.generate(**expected, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(remote["logits"], logits)
    torch.testing.assert_close(remote["logits_again"], logits)
    assert torch.equal(remote["generated"], generated)
