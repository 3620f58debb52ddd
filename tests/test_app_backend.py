"""The demo page's model logic (``cloc_demo.app_backend``): bad images, the per-image ViT cache, top-5
labels (equal to the evaluation code's embeddings), "not found", the MLLM's region prompt and box
parsing. Tiny random checkpoints; ``make_checkpoints`` is shared with ``test_app_browser.py``."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

import cloc_hf
from cloc_demo import app_backend as ab
from eval.baselines import encode_class_names, encode_regions
from llava_bridge import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", IMAGE_TOKEN, REGION_TOKEN, "USER", ":", "ASSISTANT", "what", "where",
         "is", "the", "a", "red", "circle", "?", "[", "]", ",", "."] + [str(i) for i in range(10)]
VOCAB = ["red circle", "blue square", "green ring", "cyan cross", "yellow triangle", "purple circle", "red square"]


# --- tiny checkpoints ----------------------------------------------------------------------------------
def _mllm_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, REGION_TOKEN]})
    return tok


def make_checkpoints(root: Path, mllm: bool = True, scenes: int = 3) -> dict:
    """Tiny random CLOC, CLIP-baseline and CLOC-LLaVA folders (+ synthetic test scenes) under ``root``."""
    from cloc_data.synthetic import SyntheticSceneConfig, write_synthetic_dataset

    paths = {k: root / k for k in ("cloc", "clip", "mllm", "data")}
    for name, seed in (("cloc", 0), ("clip", 1)):
        torch.manual_seed(seed)
        cloc_hf.create_model("cloc-tiny").save_pretrained(paths[name])
        cloc_hf.CLOCProcessor.offline(size=32).save_pretrained(paths[name])
    if mllm:
        torch.manual_seed(2)
        tok = _mllm_tokenizer()
        text = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                           bos_token_id=2, eos_token_id=3)
        model = CLOCLlavaForConditionalGeneration.from_cloc_and_llava(
            cloc_hf.CLOCModel.from_pretrained(paths["cloc"]), text, image_token_id=WORDS.index(IMAGE_TOKEN),
            region_token_id=WORDS.index(REGION_TOKEN), vision_feature_layer=-2, vision_feature_select_strategy="default")
        model.save_pretrained(paths["mllm"])
        CLOCLlavaProcessor(image_processor=cloc_hf.CLOCImageProcessor(size=32), tokenizer=tok, patch_size=4,
                           vision_feature_select_strategy="default").save_pretrained(paths["mllm"])
    if scenes:
        write_synthetic_dataset(SyntheticSceneConfig(), paths["data"], n_train=0, n_val=0, n_test=scenes)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return ab.AppBackend.from_paths(ckpt["cloc"], ckpt["clip"], None)


@pytest.fixture
def backend(loaded):
    """The module's backend (loaded once), without an MLLM for each test."""
    loaded.generator = None
    yield loaded
    loaded.generator = None


def _png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` but holds no pixel data (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _scene(width=40, height=20, seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# --- bad and odd images --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"this is not an image", "not an image file"),
        (_png_header(20000, 20000), "too large"),
        (_png_header(7000, 7000), "7000 x 7000 pixels"),
        (_png(_scene(1, 1)), "1 x 1 pixels"),
        (_png(_scene(64, 64))[:80], "damaged"),
        ("/no/such/file.png", "no such file"),
        (np.zeros((4, 5, 7), dtype=np.uint8), "not an image"),
    ],
)
def test_bad_images_raise_a_clear_input_error(source, message):
    with pytest.raises(ab.InputError, match=message):
        ab.read_image(source)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ab.InputError, match="notes.txt.*not an image file|not an image file"):
        ab.read_image(str(path), name="notes.txt")


@pytest.mark.parametrize(("mode", "note"), [("L", "L image"), ("RGBA", "transparency"), ("I;16", "I;16 image")])
def test_odd_modes_become_rgb_with_a_note(mode, note):
    rgb = _scene(10, 8)
    image = rgb.convert("RGBA") if mode == "RGBA" else rgb.convert("L")
    if mode == "I;16":
        image = PIL.Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257), mode="I;16")
    out, notes = ab.read_image(_png(image))
    assert out.mode == "RGB" and out.size == (10, 8)
    assert any(note in n for n in notes), notes


def test_animation_uses_the_first_frame():
    frames = [PIL.Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out, notes = ab.read_image(buf.getvalue())
    assert out.getpixel((0, 0))[0] > 200 and "first of 2 frames" in notes[0]


# --- user text -----------------------------------------------------------------------------------------
def test_vocabulary_and_box_parsing():
    assert ab.parse_vocabulary("red circle\n blue square, red circle\n\n") == ["red circle", "blue square"]
    with pytest.raises(ab.InputError, match="empty"):
        ab.parse_vocabulary(" \n, ")
    assert ab.parse_box("1, 2.5, 30, 20", 40, 20) == [1.0, 2.5, 30.0, 20.0]
    for bad in ("1, 2, 3", "30, 2, 10, 20", "0, 0, 41, 20", "a, b, c, d"):
        with pytest.raises(ab.InputError):
            ab.parse_box(bad, 40, 20)
    assert ab.corners_to_box([30, 15], [10, 5], 40, 20) == [10.0, 5.0, 30.0, 15.0]
    assert ab.corners_to_box([39.9, 5], [39.9, 5], 40, 20) == [39.0, 5.0, 40.0, 6.0]  # a click pair -> 1 px box


def test_best_clip_method_from_a_report(tmp_path):
    rows = [{"name": "clip-crop", "region_macc": 20.0}, {"name": "clip-roi", "region_macc": 25.0},
            {"name": "cloc", "region_macc": 80.0}, {"name": "clip-maskbg", "region_macc": None}]
    (tmp_path / "report.json").write_text(json.dumps({"rows": rows}))
    assert ab.best_clip_method(tmp_path / "report.json") == "clip-roi"
    assert ab.best_clip_method(tmp_path / "missing.json") == ab.FALLBACK_CLIP_METHOD


def test_scenes_and_default_vocabulary(ckpt):
    scenes = ab.load_scenes(ckpt["data"])
    assert len(scenes) == 3 and all(Path(s["path"]).is_file() for s in scenes)
    assert all(len(s["boxes"]) == len(s["labels"]) >= 1 for s in scenes)
    vocab = ab.default_vocabulary(ckpt["data"])
    assert "red circle" in vocab and len(vocab) == 30
    assert ab.default_vocabulary(None) == vocab
    assert ab.load_scenes("/no/such/folder") == []


def test_unreadable_category_file_falls_back_with_a_warning(tmp_path, caplog):
    (tmp_path / "instances_test.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="cloc_demo.app_backend"):
        vocab = ab.default_vocabulary(tmp_path)
    assert vocab == ab.default_vocabulary(None) and "no readable category names" in caplog.text


# --- caching and labels --------------------------------------------------------------------------------
def test_vit_runs_once_per_image_however_many_prompts(backend):
    calls, start = [], backend.vit_passes
    original = backend.cloc.vision_model.forward
    backend.cloc.vision_model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        first, _ = backend.add_image(_png(_scene(seed=10)))
        for box in ([0, 0, 20, 10], [5, 5, 40, 20], [10, 0, 30, 20]):
            backend.classify(first, VOCAB, box=box)
        backend.classify(first, VOCAB, point=[12, 7])
        backend.ground(first, "a red circle", candidates=[[0, 0, 20, 10], [20, 10, 40, 20]])
        assert len(calls) == backend.vit_passes - start == 1
        again, _ = backend.add_image(_scene(seed=10))  # the same picture as a PIL image: same cache entry
        assert again == first
        backend.classify(again, VOCAB, box=[1, 1, 9, 9])
        assert len(calls) == backend.vit_passes - start == 1
        second, _ = backend.add_image(_scene(seed=11))
        backend.classify(second, VOCAB, box=[1, 1, 9, 9])
        assert len(calls) == backend.vit_passes - start == 2
    finally:
        del backend.cloc.vision_model.forward


def test_top5_equals_the_evaluation_embeddings(backend):
    image = _scene()
    image_id, _ = backend.add_image(image)
    box = [4.0, 2.0, 30.0, 18.0]
    out = backend.classify(image_id, VOCAB, box=box)
    assert [len(out["cloc"]), len(out["clip"])] == [5, 5]
    for key, model, method in (("cloc", backend.cloc, "cloc"), ("clip", backend.clip, backend.clip_method)):
        region = encode_regions(model, backend.cloc_processor, [image], [torch.tensor([box])], method)[0][0]
        cosine = encode_class_names(model, backend.cloc_processor, VOCAB) @ region
        expected = [VOCAB[i] for i in torch.argsort(cosine, descending=True)[:5].tolist()]
        assert [r.label for r in out[key]] == expected
        assert [r.cosine for r in out[key]] == pytest.approx(sorted(cosine.tolist(), reverse=True)[:5], abs=1e-5)
        probs = [r.probability for r in out[key]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(backend.classify(image_id, VOCAB[:3], box=box)["cloc"]) == 3
    point = backend.classify(image_id, VOCAB, point=[20, 10])
    assert point["clip_box"] == [17.5, 7.5, 22.5, 12.5]  # CLIP reads a box around the point
    with pytest.raises(ab.InputError, match="draw a box"):
        backend.classify(image_id, VOCAB)
    with pytest.raises(ab.InputError):
        backend.classify(image_id, VOCAB, box=[0, 0, 400, 400])  # far outside the image


def test_grounding_not_found_below_threshold_and_ranking(backend):
    image_id, _ = backend.add_image(_scene())
    candidates = [[0, 0, 20, 10], [20, 10, 40, 20], [0, 0, 40, 20]]
    result = backend.ground(image_id, "a red circle", candidates)
    assert -1 <= result.score <= 1 and len(result.box) == 4
    assert 0 <= result.box[0] < result.box[2] <= 40 and 0 <= result.box[1] < result.box[3] <= 20
    assert result.found == (result.score >= ab.DEFAULT_GROUND_THRESHOLD)
    assert not backend.ground(image_id, "a red circle", threshold=result.score + 1e-3).found
    assert backend.ground(image_id, "a red circle", threshold=result.score - 1e-3).found
    sims = [r[2] for r in result.ranking]
    assert sorted(r[0] for r in result.ranking) == [0, 1, 2] and sims == sorted(sims, reverse=True)
    with pytest.raises(ab.InputError, match="phrase"):
        backend.ground(image_id, "  ")


# --- the MLLM path -------------------------------------------------------------------------------------
class StubGenerator:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, questions, images, boxes=None):
        self.calls.append((questions, images, boxes))
        return [self.answer]


def test_ask_writes_the_region_and_parses_the_answer_box(backend):
    image_id, _ = backend.add_image(_scene(40, 20))
    backend.box_convention, backend.box_frame = "llava", "original"
    backend.generator = StubGenerator("It is at [0.25, 0.50, 0.75, 1.00].")
    answer = backend.ask(image_id, "What is <region>?", box=[10, 10, 30, 20])
    assert answer.prompt == "What is [0.25, 0.50, 0.75, 1.00] <region>?"
    assert backend.generator.calls[0][2] == [[[10, 10, 30, 20]]]
    assert answer.box == pytest.approx([10, 10, 30, 20])
    backend.generator = StubGenerator("a red circle")
    answer = backend.ask(image_id, "Where is the red circle?")
    assert answer.box is None and answer.text == "a red circle" and backend.generator.calls[0][2] is None
    with pytest.raises(ab.InputError, match="draw a box"):
        backend.ask(image_id, "What is <region>?")
    backend.box_convention = "ferret"  # the demo MLLM's: integers 0..999 of the original image
    backend.generator = StubGenerator("[250, 500, 750, 999]")
    assert backend.ask(image_id, "Where is the red circle?").box == pytest.approx([10, 10, 30, 19.98])
    backend.generator = None
    with pytest.raises(ab.InputError, match="no CLOC-LLaVA"):
        backend.ask(image_id, "Where is the red circle?")


def test_real_tiny_mllm_answers(ckpt):
    backend = ab.AppBackend.from_paths(ckpt["cloc"], ckpt["clip"], ckpt["mllm"], max_new_tokens=4)
    assert backend.generator is not None and backend.box_convention == ab.demo_mllm_convention()
    image_id, _ = backend.add_image(_scene(40, 20))
    answer = backend.ask(image_id, "What is <region>?", box=[10, 10, 30, 20])
    assert isinstance(answer.text, str) and "<region>" in answer.prompt
    assert answer.box is None or len(answer.box) == 4


def test_render_scales_and_draws(backend):
    picture, scale = ab.render(_scene(40, 20), [([10, 5, 30, 15], (255, 0, 0), "x")], side=400)
    assert scale == 10 and picture.size == (400, 200)
    assert picture.getpixel((100, 50)) == (255, 0, 0)  # the box's top-left corner
    big, scale = ab.render(_scene(1000, 500), side=400)
    assert big.size == (400, 200) and scale == pytest.approx(0.4)


def test_page_handlers_turn_failures_into_messages(backend, ckpt):
    pytest.importorskip("gradio", reason="Gradio is not installed (the `app` extra)")
    from types import SimpleNamespace

    from cloc_demo.app import Page, new_state

    page = Page(backend, ab.load_scenes(ckpt["data"]))
    state, picture, status = page.pick_scene(new_state(), "0")
    assert picture is not None and "test-00000000" in status
    out = page.click(new_state(), "box: click two corners", "red circle", SimpleNamespace(index=[1, 1]))
    assert out[2].startswith("⚠️") and "pick a test scene" in out[2]
    assert "not an image file" in page.upload(new_state(), __file__)[2]
    assert page.pick_scene(new_state(), "99")[2].startswith("⚠️ internal error (IndexError)")
    gone = dict(state, image="0" * 16)  # an image evicted from the server's cache
    assert "no longer in the server's cache" in page.clear(gone)[2]
    assert "vocabulary is empty" in page.typed_box(state, "1, 1, 9, 9", " ")[2]
