"""CLOC image processor, offline CLIP tokenizer and CLOCProcessor."""

import importlib.metadata
import importlib.util
import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor, CLIPImageProcessorPil, PreTrainedConfig
from transformers.models.auto.processing_auto import processor_class_from_name

from cloc_hf.image_inputs import load_rgb_image
from cloc_hf.image_processing_cloc import CLOCImageProcessor
from cloc_hf.processing_cloc import CLOCProcessor
from cloc_hf.tokenization import VOCAB_SIZE, build_clip_tokenizer, find_bpe_file, load_clip_vocab

S = 48  # model input side used throughout: small keeps the tests fast
RED = (255, 0, 0)
GRAY = (90, 90, 90)


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return CLOCProcessor(CLOCImageProcessor(size=S), tokenizer)


def rectangle_image(width, height, box, color=RED, background=GRAY):
    """``width x height`` image of ``background`` with ``color`` filling pixel box ``(x1, y1, x2, y2)``."""
    image = PIL.Image.new("RGB", (width, height), background)
    image.paste(PIL.Image.new("RGB", (box[2] - box[0], box[3] - box[1]), color), box[:2])
    return image


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_uint8(pixel_values, image_processor):
    """Undo normalisation: ``(3, S, S)`` model input -> ``(S, S, 3)`` float in 0..255."""
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0)


# --- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_matches_openai_clip_ids(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    # ids from OpenAI's CLIP README example
    assert tokenizer(["a diagram", "a dog"])["input_ids"] == [
        [49406, 320, 22697, 49407],
        [49406, 320, 1929, 49407],
    ]
    # CLIP lower-cases and collapses whitespace
    assert tokenizer("A   PHOTO of a\tCat")["input_ids"] == tokenizer("a photo of a cat")["input_ids"]
    vocab, merges = load_clip_vocab()
    assert vocab["".join(merges[-1])] == 49405 and vocab["<|startoftext|>"] == 49406


def test_tokenizer_pads_with_eos_and_truncates_to_77(tokenizer):
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 49407
    batch = tokenizer(["a cat", "a photo of a cat"], padding=True)
    assert batch["input_ids"][0] == [49406, 320, 2368, 49407, 49407, 49407, 49407]
    assert batch["attention_mask"][0] == [1, 1, 1, 1, 0, 0, 0]
    long = tokenizer("cat " * 200, truncation=True)["input_ids"]
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_tokenizer_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        build_clip_tokenizer(bpe_path=tmp_path / "missing.txt.gz")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        find_bpe_file()


# --- geometry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pad", "center_crop"])
@pytest.mark.parametrize("size", [(120, 80), (70, 130)])
def test_box_covers_exactly_the_pixels_it_was_drawn_on(mode, size):
    width, height = size
    box = [30, 25, 60, 50]
    image_processor = CLOCImageProcessor(size=S, resize_mode=mode)
    out = image_processor(rectangle_image(width, height, box), boxes=[[box]])
    model_box = out["boxes"][0][0] * S
    pixels = to_uint8(out["pixel_values"][0], image_processor)
    red = (pixels[..., 0] > 170) & (pixels[..., 1] < 80)
    ys, xs = torch.nonzero(red, as_tuple=True)
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    # bicubic blurs edges by under a pixel; a wrong offset or scale would be off by several
    assert torch.allclose(found, model_box, atol=1.0), (found, model_box)
    inner = model_box.round().int()
    assert red[inner[1] + 1 : inner[3] - 1, inner[0] + 1 : inner[2] - 1].all()


def test_pad_geometry_and_colour_are_the_image_mean():
    image_processor = CLOCImageProcessor(size=S)
    assert image_processor.pad_color == (122, 116, 104)  # LLaVA: tuple(int(x * 255) for x in image_mean)
    out = image_processor(PIL.Image.new("RGB", (100, 20), (255, 255, 255)), boxes=[[[0, 0, 100, 20]]])
    # the 100x20 image is centred in a 100x100 square: rows 40..60 of 100
    assert torch.allclose(out["boxes"][0], torch.tensor([[0.0, 0.4, 1.0, 0.6]]))
    pad = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(image_processor.image_mean)) / torch.tensor(
        image_processor.image_std
    )
    assert torch.allclose(out["pixel_values"][0, :, 0, :], pad[:, None].expand(3, S), atol=1e-6)
    assert torch.allclose(out["pixel_values"][0, :, -1, :], pad[:, None].expand(3, S), atol=1e-6)


@pytest.mark.parametrize("mode", ["pad", "center_crop"])
def test_pixels_match_transformers_clip_preprocessing(mode):
    """``center_crop`` is CLIPImageProcessor; ``pad`` is LLaVA's expand2square followed by it."""
    image = random_image(53, 37)
    clip = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    if mode == "pad":
        square = PIL.Image.new("RGB", (53, 53), (122, 116, 104))
        square.paste(image, (0, (53 - 37) // 2))
        image_for_clip = square
    else:
        image_for_clip = image
    expected = clip(image_for_clip, return_tensors="pt")["pixel_values"]
    actual = CLOCImageProcessor(size=S, resize_mode=mode)(image)["pixel_values"]
    assert torch.allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["pad", "center_crop"])
def test_post_process_boxes_inverts_the_mapping(mode):
    image_processor = CLOCImageProcessor(size=S, resize_mode=mode)
    sizes = [(90, 150), (200, 60)]  # (w, h)
    # boxes inside the centre crop of both images, so nothing is clipped
    boxes = [
        torch.tensor([[40.0, 35.0, 80.5, 110.25], [50.0, 40.0, 52.0, 43.0]]),
        torch.tensor([[71.0, 5.0, 120.0, 55.0]]),
    ]
    images = [PIL.Image.new("RGB", size) for size in sizes]
    out = image_processor(images, boxes=boxes)
    assert out["original_sizes"].tolist() == [[150, 90], [60, 200]]
    back = image_processor.post_process_boxes(out["boxes"], out["original_sizes"])
    for original, recovered in zip(boxes, back):
        assert torch.allclose(original, recovered, atol=1e-3)
    # (B, n, 4) tensors and lists of (h, w) work too
    stacked = image_processor.post_process_boxes(
        torch.stack([out["boxes"][0][:1], out["boxes"][1]]), [(150, 90), (60, 200)]
    )
    assert torch.allclose(stacked[1], boxes[1], atol=1e-3)
    with pytest.raises(ValueError, match="2 image sizes"):
        image_processor.post_process_boxes(out["boxes"][:1], out["original_sizes"])


def test_points_map_like_box_corners():
    image_processor = CLOCImageProcessor(size=S)
    out = image_processor(
        PIL.Image.new("RGB", (100, 50)), points=[[[50, 25], [0, 0]]], boxes=[[[0, 0, 50, 25]]]
    )
    assert torch.allclose(out["points"][0], torch.tensor([[0.5, 0.5], [0.0, 0.25]]))
    assert torch.allclose(out["points"][0][1], out["boxes"][0][0, :2])


# --- image kinds ---------------------------------------------------------------------------------
def test_all_image_kinds_give_the_same_pixels(tmp_path):
    image = random_image(31, 23)
    array = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    path = tmp_path / "image.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    kinds = {
        "numpy hwc uint8": array,
        "numpy hwc float": array.astype(np.float32) / 255,
        "numpy chw uint8": array.transpose(2, 0, 1),
        "torch chw uint8": torch.from_numpy(array).permute(2, 0, 1),
        "torch chw float": torch.from_numpy(array).permute(2, 0, 1).double() / 255,
        "torch hwc uint8": torch.from_numpy(array),
        "path": path,
        "str path": str(path),
        "bytes": buffer.getvalue(),
        "numpy uint16": array.astype(np.uint16) * 257,
        "int64 0..255": array.astype(np.int64),
        "rgba opaque": np.concatenate([array, np.full((23, 31, 1), 255, np.uint8)], -1),
    }
    image_processor = CLOCImageProcessor(size=S)
    expected = image_processor(image)["pixel_values"]
    for name, kind in kinds.items():
        assert torch.equal(image_processor(kind)["pixel_values"], expected), name


def test_grayscale_palette_cmyk_and_one_bit_become_rgb():
    gray = PIL.Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    rgb = np.repeat(np.asarray(gray)[..., None], 3, -1)
    for kind in (
        gray,
        np.asarray(gray),
        np.asarray(gray)[..., None],
        torch.from_numpy(np.array(gray))[None],
    ):
        assert np.array_equal(np.asarray(load_rgb_image(kind)), rgb)
    palette = PIL.Image.fromarray(np.asarray(random_image(5, 4))).convert("P")
    assert np.array_equal(np.asarray(load_rgb_image(palette)), np.asarray(palette.convert("RGB")))
    cmyk = PIL.Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert np.asarray(load_rgb_image(cmyk)).tolist() == [[[255, 255, 255]] * 2] * 2
    assert load_rgb_image(PIL.Image.new("1", (3, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_transparency_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black -> white
    rgba[0, 1] = (10, 200, 30, 255)  # opaque -> unchanged
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white
    out = np.asarray(load_rgb_image(PIL.Image.fromarray(rgba))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 200, 30]
    assert np.abs(out[0, 2] - 127).max() <= 1
    assert np.array_equal(np.asarray(load_rgb_image(rgba)), out)  # numpy RGBA, channels-last
    la = PIL.Image.fromarray(rgba[..., [0, 3]].copy(), "LA")
    assert np.asarray(load_rgb_image(la))[0, 0].tolist() == [255, 255, 255]
    palette = PIL.Image.new("P", (2, 1), 0)
    palette.info["transparency"] = 0
    assert np.asarray(load_rgb_image(palette)).tolist() == [[[255, 255, 255]] * 2]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    expected = [0, 1, 128, 255]
    i16 = PIL.Image.fromarray(values)
    assert i16.mode == "I;16"
    for kind in (i16, i16.convert("I"), values, torch.from_numpy(values.astype(np.int32)).to(torch.uint16)):
        assert np.asarray(load_rgb_image(kind))[0, :, 0].tolist() == expected, kind
    path = tmp_path / "sixteen.png"
    i16.save(path)
    assert np.asarray(load_rgb_image(path))[0, :, 1].tolist() == expected
    assert np.asarray(load_rgb_image(PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))))[
        0, :, 2
    ].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["pad", "center_crop"])
def test_tiny_and_huge_images(mode):
    image_processor = CLOCImageProcessor(size=S, resize_mode=mode)
    out = image_processor(PIL.Image.new("RGB", (1, 1), RED), boxes=[[[0, 0, 1, 1]]])
    assert out["pixel_values"].shape == (1, 3, S, S)
    assert torch.allclose(out["boxes"][0], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert torch.allclose(
        out["pixel_values"][0, :, S // 2, S // 2],
        image_processor(np.full((3, 3, 3), RED, np.uint8))["pixel_values"][0, :, 0, 0],
        atol=1e-5,
    )
    if mode == "pad":  # one large image is enough to show it works (~0.3 s)
        huge = np.zeros((3000, 4000, 3), np.uint8)
        out = image_processor(huge, boxes=[[[0, 0, 4000, 3000]]])
        assert out["pixel_values"].shape == (1, 3, S, S)
        assert torch.allclose(out["boxes"][0], torch.tensor([[0.0, 0.125, 1.0, 0.875]]))


BAD_IMAGES = {
    "missing file": "no/such/image.png",
    "dict": {"pixel_values": 1},
    "none": None,
    "1-d array": np.zeros(12, np.uint8),
    "numpy 4 channels first": np.zeros((4, 8, 9), np.uint8),
    "torch 4 channels last": torch.zeros(8, 9, 4, dtype=torch.uint8),
    "2 channels": np.zeros((8, 9, 2), np.uint8),
    "5-d array": np.zeros((1, 2, 8, 9, 3), np.uint8),
    "batch inside a list": np.zeros((2, 8, 9, 3), np.uint8),
    "empty": np.zeros((0, 9, 3), np.uint8),
    "float 0..255": np.full((8, 9, 3), 200.0),
    "normalised float": np.full((8, 9, 3), -1.5, np.float32),
    "nan": np.full((8, 9, 3), np.nan, np.float32),
    "int above 255": np.full((8, 9, 3), 300, np.int32),
    "negative int": np.full((8, 9, 3), -1, np.int16),
    "complex": np.zeros((8, 9, 3), np.complex64),
    "garbage bytes": b"not an image",
    "nested list": [PIL.Image.new("RGB", (4, 4))],
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_images_raise_naming_the_index(name):
    with pytest.raises(ValueError, match=r"images\[1\]"):
        CLOCImageProcessor(size=S)([PIL.Image.new("RGB", (4, 4)), BAD_IMAGES[name]])


def test_no_images_raise():
    for images in (None, [], np.zeros((0, 4, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            CLOCImageProcessor(size=S)(images)


# --- boxes and points inputs ---------------------------------------------------------------------
def test_box_and_point_counts_must_match_images():
    image_processor = CLOCImageProcessor(size=S)
    images = [PIL.Image.new("RGB", (20, 10)), PIL.Image.new("RGB", (10, 20))]
    with pytest.raises(ValueError, match="1 boxes entries for 2 images"):
        image_processor(images, boxes=[[[0, 0, 5, 5]]])
    with pytest.raises(ValueError, match="3 points entries for 2 images"):
        image_processor(images, points=[[], [], []])
    with pytest.raises(ValueError, match=r"\(B, n, 4\)"):
        image_processor(images, boxes=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="boxes must be a list"):
        image_processor(images, boxes="0 0 5 5")


def test_invalid_boxes_and_points_are_named():
    image_processor = CLOCImageProcessor(size=S)
    images = [PIL.Image.new("RGB", (20, 10)), PIL.Image.new("RGB", (10, 20))]
    good = [0, 0, 5, 5]
    with pytest.raises(ValueError, match=r"boxes\[1\]\[3\].*flipped"):
        image_processor(images, boxes=[[good], [good, good, good, [9, 9, 1, 1]]])
    with pytest.raises(ValueError, match=r"boxes\[0\]\[1\].*outside"):
        image_processor(images, boxes=[[good, [0, 0, 50, 5]], []])
    with pytest.raises(ValueError, match=r"boxes\[1\].*shape"):
        image_processor(images, boxes=[[good], [[1, 2, 3]]])
    with pytest.raises(ValueError, match=r"boxes\[0\] is not numeric"):
        image_processor(images, boxes=[["a", "b"], []])
    with pytest.raises(ValueError, match=r"points\[1\]\[0\]"):
        image_processor(images, points=[[], [[100, 5]]])
    with pytest.raises(ValueError, match=r"boxes\[0\]\[0\].*centre crop"):
        CLOCImageProcessor(size=S, resize_mode="center_crop")(images, boxes=[[[0, 0, 2, 10]], []])


def test_zero_boxes_and_single_image_shortcuts():
    image_processor = CLOCImageProcessor(size=S)
    images = [PIL.Image.new("RGB", (20, 10))] * 3
    out = image_processor(images, boxes=[[], None, np.zeros((0, 4))], points=[None, [], torch.zeros(0, 2)])
    assert [tuple(b.shape) for b in out["boxes"]] == [(0, 4)] * 3
    assert [tuple(p.shape) for p in out["points"]] == [(0, 2)] * 3
    single = PIL.Image.new("RGB", (20, 10))
    for boxes in (
        [[0, 0, 5, 5], [1, 1, 4, 4]],
        np.array([[0, 0, 5, 5], [1, 1, 4, 4]]),
        [[[0, 0, 5, 5], [1, 1, 4, 4]]],
    ):
        assert out_shape(image_processor(single, boxes=boxes)) == (2, 4)
    assert out_shape(image_processor(single, boxes=[])) == (0, 4)
    assert out_shape(image_processor(single, boxes=[[]])) == (0, 4)
    batch = image_processor(images[:2], boxes=torch.tensor([[[0, 0, 5, 5]], [[1, 1, 2, 2]]]))
    assert [tuple(b.shape) for b in batch["boxes"]] == [(1, 4), (1, 4)]


def out_shape(output):
    assert len(output["boxes"]) == 1
    return tuple(output["boxes"][0].shape)


def test_batch_of_mixed_sizes_and_kinds_equals_one_by_one():
    image_processor = CLOCImageProcessor(size=S)
    images = [
        random_image(40, 20, 1),
        np.asarray(random_image(15, 33, 2)),
        torch.from_numpy(np.array(random_image(8, 8, 3))).permute(2, 0, 1),
    ]
    boxes = [[[1, 1, 10, 10]], [], [[0, 0, 8, 8], [2, 2, 3, 3]]]
    out = image_processor(images, boxes=boxes, return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, S, S) and out["pixel_values"].dtype == torch.float32
    assert out["original_sizes"].tolist() == [[20, 40], [33, 15], [8, 8]]
    for i, (image, image_boxes) in enumerate(zip(images, boxes)):
        alone = image_processor(image, boxes=[image_boxes])
        assert torch.equal(alone["pixel_values"][0], out["pixel_values"][i])
        assert torch.equal(alone["boxes"][0], out["boxes"][i])
    as_numpy = image_processor(images, boxes=boxes, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and isinstance(as_numpy["boxes"][2], np.ndarray)
    assert np.array_equal(as_numpy["pixel_values"], out["pixel_values"].numpy())


# --- settings, LLaVA contract --------------------------------------------------------------------
def test_llava_contract_and_settings():
    image_processor = CLOCImageProcessor(size={"shortest_edge": 336})
    assert image_processor.size == 336 and image_processor.crop_size == {"height": 336, "width": 336}
    assert image_processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert image_processor.preprocess(PIL.Image.new("RGB", (5, 3)), return_tensors="pt")[
        "pixel_values"
    ].shape == (1, 3, 336, 336)
    # per-call overrides do not change the processor
    assert image_processor(PIL.Image.new("RGB", (5, 3)), size=S)["pixel_values"].shape == (1, 3, S, S)
    assert image_processor.size == 336
    unnormalised = image_processor(PIL.Image.new("RGB", (5, 3), (255, 0, 0)), do_normalize=False, size=8)[
        "pixel_values"
    ]
    assert unnormalised.min() >= 0 and unnormalised.max() == 1
    frame = image_processor.frame_transform(200, 100)
    assert (frame.size, frame.mode, frame.pad_offset) == (336, "pad", (0, 50))
    with pytest.raises(TypeError, match="do_center_crop"):
        image_processor(PIL.Image.new("RGB", (5, 3)), do_center_crop=True)
    with pytest.raises(ValueError, match="return_tensors"):
        image_processor(PIL.Image.new("RGB", (5, 3)), return_tensors="tf")
    for bad in (
        {"resize_mode": "stretch"},
        {"size": 0},
        {"size": {"height": 3, "width": 4}},
        {"crop_size": 100},
        {"image_std": [1, 0, 1]},
        {"image_mean": [0.5]},
        {"resample": 42},
    ):
        with pytest.raises(ValueError):
            CLOCImageProcessor(**bad)


# --- CLOCProcessor -------------------------------------------------------------------------------
def test_processor_call(processor):
    image = rectangle_image(60, 40, [10, 10, 30, 20])
    out = processor(
        images=[image, image], text=["a red box", "a photo of a cat"], boxes=[[[10, 10, 30, 20]], []]
    )
    assert set(out) == {"pixel_values", "original_sizes", "boxes", "input_ids", "attention_mask"}
    assert out["input_ids"].shape == (2, 7) and out["input_ids"][1].tolist() == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
    ]
    text_only = processor(text="a cat")
    assert set(text_only) == {"input_ids", "attention_mask"}
    assert set(processor(images=image)) == {"pixel_values", "original_sizes"}
    assert processor(text=["a cat", "a dog"], padding="max_length")["input_ids"].shape == (2, 77)
    assert processor(images=image, size=32)["pixel_values"].shape == (1, 3, 32, 32)
    back = processor.post_process_boxes(out["boxes"], out["original_sizes"])
    assert torch.allclose(back[0], torch.tensor([[10.0, 10.0, 30.0, 20.0]]), atol=1e-3)
    with pytest.raises(ValueError, match="images"):
        processor(text="a cat", boxes=[[[0, 0, 1, 1]]])
    with pytest.raises(ValueError):
        processor()
    with pytest.raises(ValueError, match="offline"):
        CLOCProcessor(image_processor=CLOCImageProcessor())


def test_processor_save_load_round_trip(processor, tmp_path):
    processor.image_processor.resize_mode = "center_crop"
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.image_processor.resize_mode = "pad"
    loaded = CLOCProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, CLOCImageProcessor)
    assert loaded.image_processor.to_dict() == {
        **processor.image_processor.to_dict(),
        "resize_mode": "center_crop",
    }
    assert len(loaded.tokenizer) == VOCAB_SIZE and loaded.tokenizer.model_max_length == 77
    assert loaded.tokenizer.pad_token_id == 49407
    assert loaded(text="a photo of a cat")["input_ids"].tolist() == [
        [49406, 320, 1125, 539, 320, 2368, 49407]
    ]
    image = random_image(30, 20)
    expected = CLOCImageProcessor(size=S, resize_mode="center_crop")(image)["pixel_values"]
    assert torch.equal(loaded(images=image)["pixel_values"], expected)
    # the image processor alone, and load-time overrides
    assert CLOCImageProcessor.from_pretrained(tmp_path).resize_mode == "center_crop"
    assert CLOCProcessor.from_pretrained(tmp_path, resize_mode="pad").image_processor.resize_mode == "pad"


def test_auto_processor_round_trip(processor, tmp_path):
    if processor_class_from_name("CLOCProcessor") is None:
        # cloc_hf registers the processor with its model config; until then use a stand-in config

        class ProcessorTestConfig(PreTrainedConfig):
            model_type = "cloc_processor_test"

        AutoProcessor.register(ProcessorTestConfig, CLOCProcessor)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CLOCProcessor)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()


def test_works_inside_transformers_llava_processor():
    """HF LLaVA reads an ``image_sizes`` output as the size of ``pixel_values`` and splits the image
    features by it, so the original sizes must travel under another name."""
    from transformers import LlavaProcessor

    tokenizer = build_clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    llava = LlavaProcessor(
        image_processor=CLOCImageProcessor(size=28),
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,  # the class token
        vision_feature_select_strategy="default",
        image_token="<image>",
    )
    out = llava(images=[PIL.Image.new("RGB", (50, 30))], text=["<image> a cat"], return_tensors="pt")
    assert "image_sizes" not in out
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    assert (
        out["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")
    ).sum() == 4  # 2x2 patches, CLS dropped


def test_return_original_sizes_setting(tmp_path):
    """``return_original_sizes=False`` leaves exactly the model's inputs (HF LLaVA's ``generate`` refuses
    unknown ones); the default keeps the sizes ``post_process_boxes`` needs, and old configs read as True."""
    import json

    from transformers import LlavaProcessor

    image = PIL.Image.new("RGB", (50, 30))
    default, bare = CLOCImageProcessor(size=28), CLOCImageProcessor(size=28, return_original_sizes=False)
    assert set(default(image)) == {"pixel_values", "original_sizes"}
    assert set(bare(image, boxes=[[1, 1, 9, 9]], return_tensors="np")) == {"pixel_values", "boxes"}
    assert set(bare(image, return_original_sizes=True)) == {"pixel_values", "original_sizes"}  # per call
    assert bare.return_original_sizes is False
    with pytest.raises(ValueError, match="return_original_sizes"):
        CLOCImageProcessor(return_original_sizes="no")

    bare.save_pretrained(tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "preprocessor_config.json").read_text())["return_original_sizes"] is False
    assert CLOCImageProcessor.from_pretrained(tmp_path / "bare").return_original_sizes is False
    assert CLOCImageProcessor.from_pretrained(tmp_path / "bare", return_original_sizes=True).return_original_sizes
    old = json.loads((tmp_path / "bare" / "preprocessor_config.json").read_text())
    del old["return_original_sizes"]  # as saved before the setting existed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(old))
    assert CLOCImageProcessor.from_pretrained(tmp_path / "old").return_original_sizes is True

    tokenizer = build_clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    llava = LlavaProcessor(image_processor=bare, tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
                           vision_feature_select_strategy="default", image_token="<image>")
    out = llava(images=[image], text=["<image> a cat"], return_tensors="pt")
    assert set(out) == {"pixel_values", "input_ids", "attention_mask"}
    asked = llava(images=[image], text=["<image> a cat"], return_tensors="pt", return_original_sizes=True)
    assert asked["original_sizes"].tolist() == [[30, 50]]
