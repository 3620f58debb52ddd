"""VESL pseudo-labelling: noun phrases, box geometry, resumable chunked pipeline, CLI end to end.

Everything runs offline: the captioner (BLIP) and the detector (OWLv2) are tiny random models built
here with locally made tokenizers and loaded by path, as a user would load real checkpoints.
"""

from __future__ import annotations

import json
import logging
import string

import numpy as np
import pytest
import torch
from PIL import Image

from cloc_data.format import Region, RegionSample
from cloc_data.shards import ShardWriter, iter_shard_samples, list_shards
from training.vesl import (
    NP_GRAMMAR,
    Detection,
    PhraseExtractor,
    VeslConfig,
    assign_chunks,
    detections_from_outputs,
    lexicon_tagger,
    resolve_tagger,
    run_vesl,
    tokenize,
)
from training.vesl import phrases as phrases_mod
from training.vesl.cli import build_parser, config_from_args, main
from training.vesl.grounder import Owlv2Grounder, pad_resize_normalize

# --- stage 2: noun phrases ----------------------------------------------------------------------

# A hand-written Penn-Treebank lexicon, so the grammar is tested independently of any real tagger.
_TAGS = {
    "a": "DT",
    "an": "DT",
    "the": "DT",
    "this": "DT",
    "two": "CD",
    "of": "IN",
    "on": "IN",
    "in": "IN",
    "with": "IN",
    "and": "CC",
    "is": "VBZ",
    "sits": "VBZ",
    "holding": "VBG",
    "small": "JJ",
    "brown": "JJ",
    "wooden": "JJ",
    "red": "JJ",
    "bigger": "JJR",
    "biggest": "JJS",
    "very": "RB",
    "something": "NN",
    "one": "NN",
}


def dict_tagger(tokens):
    return [(t, _TAGS.get(t, "NN" if t[0].isalnum() else t)) for t in tokens]


@pytest.fixture
def extract():
    return PhraseExtractor(tagger=dict_tagger)


def test_grammar_is_the_papers():
    assert NP_GRAMMAR == "NP: {<DT>?<JJ.*>*<NN.*>+}"


def test_tokenize_lowercases_and_keeps_punctuation_apart():
    assert tokenize("A Dog's T-shirt, 2 CATS.") == ["a", "dog's", "t-shirt", ",", "2", "cats", "."]


def test_chunk_grammar(extract):
    assert extract("A small brown dog sits on the wooden bench.") == ["a small brown dog", "the wooden bench"]
    assert extract("the coffee cup") == ["the coffee cup"]  # NN+ : noun compounds stay together
    assert extract("a bigger biggest dog") == ["a bigger biggest dog"]  # JJ.* covers JJR / JJS
    assert extract("the red") == []  # adjectives without a noun are no phrase
    assert extract("two dogs") == ["dogs"]  # CD is not part of the grammar
    assert extract("a very red dog") == ["red dog"]  # an adverb breaks DT from the rest
    assert extract("a dog, a cat") == ["a dog", "a cat"]  # punctuation separates phrases


def test_web_words_are_dropped_before_tagging(extract):
    assert extract("Stock photo of a brown dog, HD wallpaper.jpg") == ["a brown dog"]
    assert extract("image.png") == []
    custom = PhraseExtractor(tagger=dict_tagger, web_words={"dog"})
    assert custom("stock photo of a brown dog") == ["stock photo"]


def test_stopword_only_phrases_dropped_and_dedup(extract):
    assert extract("this something with one") == []  # DT NN / NN of stopwords only
    assert extract("a dog and a dog and the dog") == ["a dog", "the dog"]  # exact duplicates only
    assert PhraseExtractor(tagger=dict_tagger, stopwords=set())("this something") == ["this something"]


def test_at_most_twenty_phrases_in_caption_order(extract):
    caption = ", ".join(f"thing{i}" for i in range(30))
    got = extract(caption)
    assert got == [f"thing{i}" for i in range(20)]
    assert PhraseExtractor(tagger=dict_tagger, max_phrases=3)(caption) == ["thing0", "thing1", "thing2"]


def test_tagger_contract_is_checked():
    bad = PhraseExtractor(tagger=lambda tokens: [(t, "NN") for t in tokens[:-1]])
    with pytest.raises(ValueError, match="tags for"):
        bad("a red dog")
    with pytest.raises(ValueError, match="unknown tagger"):
        PhraseExtractor(tagger="spacy")


def test_tagger_resolution_without_nltk_data(monkeypatch, caplog):
    monkeypatch.setattr(phrases_mod, "nltk_tagger_available", lambda: False)
    with pytest.raises(LookupError, match="averaged_perceptron_tagger_eng"):
        resolve_tagger("nltk")
    with caplog.at_level(logging.WARNING):
        tagger, name = resolve_tagger("auto")
    assert name == "lexicon" and tagger is lexicon_tagger
    assert "nltk.downloader averaged_perceptron_tagger_eng" in caplog.text


def test_cli_tagger_nltk_without_its_data_is_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(phrases_mod, "nltk_tagger_available", lambda: False)
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    argv = ["--input", str(images), "--output", str(out), "--keep-caption", "--detector", str(tmp_path / "none"),
            "--tagger", "nltk"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cloc-vesl: error: --tagger nltk: ") and len(err.strip().splitlines()) == 1
    assert "python -m nltk.downloader averaged_perceptron_tagger_eng" in err and "Traceback" not in err
    assert not out.exists()  # nothing started


def test_lexicon_tagger_finds_simple_phrases():
    extract = PhraseExtractor(tagger="lexicon")
    got = extract("The image shows a small brown dog sitting on a wooden bench next to two red apples.")
    assert got == ["a small brown dog", "a wooden bench", "red apples"]


# --- stage 3: boxes back to original pixels ------------------------------------------------------


def _owl_image_processor():
    from transformers import Owlv2ImageProcessorPil

    return Owlv2ImageProcessorPil(size={"height": 8, "width": 8})


def _cxcywh(x1, y1, x2, y2, side):
    return [(x1 + x2) / 2 / side, (y1 + y2) / 2 / side, (x2 - x1) / side, (y2 - y1) / side]


def test_installed_owlv2_processor_pads_bottom_right():
    """The box mapping relies on this: content at the top-left, padding below / to the right."""
    image = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4) + 1  # (C, H=2, W=4), no zeros
    padded = _owl_image_processor().pad(image)
    assert padded.shape == (3, 4, 4)
    np.testing.assert_array_equal(padded[:, :2, :], image)
    assert (padded[:, 2:, :] == 0).all()
    tall = np.ones((3, 4, 2), dtype=np.float32)
    padded = _owl_image_processor().pad(tall)
    assert (padded[:, :, :2] == 1).all() and (padded[:, :, 2:] == 0).all()


def test_torch_preprocessing_matches_processor_geometry():
    processor = _owl_image_processor()
    pixels = (np.random.default_rng(0).random((4, 8, 3)) * 255).astype(np.uint8)  # H=4, W=8
    image = Image.fromarray(pixels)
    ours = pad_resize_normalize([image], processor)[0]  # size 8x8 = the padded side: no resampling
    theirs = processor.pad(processor.rescale(np.asarray(image, np.float32).transpose(2, 0, 1), 1 / 255))
    theirs = processor.normalize(
        theirs, processor.image_mean, processor.image_std, input_data_format="channels_first"
    )
    torch.testing.assert_close(ours, torch.from_numpy(np.asarray(theirs, np.float32)), atol=1e-5, rtol=0)


def test_boxes_map_to_original_pixels_for_non_square_images():
    wide, tall = (200, 100), (60, 120)  # (width, height): padded squares of side 200 and 120
    boxes = torch.tensor(
        [
            [_cxcywh(20, 30, 80, 70, 200), _cxcywh(150, 60, 190, 140, 200), _cxcywh(10, 120, 50, 180, 200)],
            [_cxcywh(6, 12, 54, 108, 120), _cxcywh(70, 10, 110, 50, 120), _cxcywh(0, 0, 30, 30, 120)],
        ]
    )
    big, low = 5.0, -5.0
    logits = torch.tensor(
        [
            # box 0 -> phrase 1; box 1 (reaches into the bottom padding) -> phrase 0; box 2 (only padding)
            [[low, big, low], [big, low, low], [big, big, low]],
            # image 2 has one phrase: query columns 1-2 are padding and must never win, even with the
            # highest logit; box 1 lies in the right padding; box 2 scores below the threshold
            [[big, 9.0, 9.0], [big, low, low], [-3.0, 9.0, 9.0]],
        ]
    )
    phrases = [["a dog", "a red ball"], ["a tree"]]  # query 2 of image 1 is padding too
    got = detections_from_outputs(
        _owl_image_processor().post_process_object_detection,
        logits,
        boxes,
        phrases,
        [wide, tall],
        threshold=0.1,
    )
    first = {d.phrase: d for d in got[0]}
    assert set(first) == {"a red ball", "a dog"} and len(got[0]) == 2
    assert first["a red ball"].box == pytest.approx((20, 30, 80, 70), abs=1e-4)
    assert first["a dog"].box == pytest.approx((150, 60, 190, 100), abs=1e-4)  # clipped to the image
    assert first["a dog"].score == pytest.approx(torch.sigmoid(torch.tensor(big)).item())
    assert len(got[1]) == 1
    assert got[1][0].phrase == "a tree" and got[1][0].box == pytest.approx((6, 12, 54, 108), abs=1e-4)


def test_nms_and_cap():
    boxes = torch.tensor(
        [[_cxcywh(0, 0, 50, 50, 100), _cxcywh(2, 2, 52, 52, 100), _cxcywh(60, 60, 90, 90, 100)]]
    )
    logits = torch.tensor([[[3.0], [2.0], [1.0]]])
    post = _owl_image_processor().post_process_object_detection
    args = (post, logits, boxes, [["a box"]], [(100, 100)])
    assert len(detections_from_outputs(*args)[0]) == 3
    kept = detections_from_outputs(*args, nms_iou=0.5)[0]
    assert [d.score for d in kept] == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0])).tolist())
    assert len(detections_from_outputs(*args, max_detections=1)[0]) == 1


# --- tiny offline models --------------------------------------------------------------------------

_CAPTION_WORDS = "a the red blue green small large dog cat ball tree box circle square".split()


def _build_tiny_blip(path):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CAPTION_WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=32)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(path)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=2,
        sep_token_id=3,
        pad_token_id=0,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    with torch.no_grad():  # a random decoder would mostly emit special tokens, i.e. empty captions
        model.text_decoder.cls.predictions.bias[:5] = -1e4
    model.save_pretrained(path)


def _build_tiny_owlv2(path):
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    # id 0 must not be the start token: OWLv2 masks out every query whose first token id is 0
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase + string.digits:  # character-level BPE: no merges needed
        vocab[c] = len(vocab)
        vocab[f"{c}</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    Owlv2Processor(Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(path)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # random box heads saturate to empty boxes; zero -> one box per patch
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _build_tiny_blip(root / "blip")
    _build_tiny_owlv2(root / "owlv2")
    return str(root / "blip"), str(root / "owlv2")


def _make_images(folder, sizes):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        sub = folder / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i}.{('png', 'jpg', 'webp')[i % 3]}")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.md").write_text("not an image")


def test_owlv2_grounder_end_to_end_geometry(tiny_models):
    """The real grounder path with the detector's outputs replaced by known ones."""
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    grounder = Owlv2Grounder(tiny_models[1], threshold=0.1)
    images = [Image.new("RGB", (200, 100)), Image.new("RGB", (50, 50)), Image.new("RGB", (30, 90))]
    phrases = [["a dog", "a ball"], [], ["a tree"]]
    seen = {}

    def fake_model(input_ids, attention_mask, pixel_values):
        seen["pixels"], seen["queries"] = tuple(pixel_values.shape), tuple(input_ids.shape)
        boxes = torch.tensor([[_cxcywh(20, 30, 80, 70, 200)], [_cxcywh(3, 9, 27, 81, 90)]])
        logits = torch.tensor([[[-5.0, 4.0]], [[4.0, 6.0]]])  # image 3's 2nd query is padding
        return Owlv2ObjectDetectionOutput(logits=logits, pred_boxes=boxes)

    grounder.model = fake_model
    got = grounder(images, phrases)
    assert seen == {"pixels": (2, 3, 32, 32), "queries": (4, 16)}  # the phrase-less image is not run
    assert got[1] == []
    assert [(d.phrase, d.box) for d in got[0]] == [("a ball", pytest.approx((20, 30, 80, 70), abs=1e-4))]
    assert [(d.phrase, d.box) for d in got[2]] == [("a tree", pytest.approx((3, 9, 27, 81), abs=1e-4))]


def test_hf_captioner_batches_and_strips_prompt(tiny_models):
    from training.vesl.captioner import HFCaptioner

    images = [Image.new("RGB", (40, 20), (200, 0, 0)), Image.new("RGB", (20, 40), (0, 0, 200))]
    plain = HFCaptioner(tiny_models[0], max_new_tokens=6)
    captions = plain(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    prompted = HFCaptioner(tiny_models[0], prompt="a small", max_new_tokens=6)
    assert all(not c.startswith("a small") for c in prompted(images))
    with pytest.raises(ValueError, match="could not be loaded"):
        HFCaptioner(tiny_models[0] + "-missing")


def _build_tiny_llava(path):
    """A decoder-only chat VLM: the output repeats the prompt, which the captioner must cut off."""
    from transformers import (
        BertTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    words = ["user", "assistant", "describe", "this", *_CAPTION_WORDS]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<image>", *words])}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=128)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    ).save_pretrained(path)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"])
    LlavaForConditionalGeneration(config).save_pretrained(path)


def _build_tiny_vision_encoder_decoder(path):
    """A captioner with an image processor and a tokenizer but no multimodal processor."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CAPTION_WORDS])}
    BertTokenizer(vocab=vocab, model_max_length=32).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    encoder = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    decoder = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        is_decoder=True,
        add_cross_attention=True,
        max_position_embeddings=32,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config).save_pretrained(path)


def test_hf_captioner_chat_vlm_and_vision_encoder_decoder(tmp_path):
    from training.vesl.captioner import HFCaptioner

    images = [Image.new("RGB", (40, 20), (200, 0, 0)), Image.new("RGB", (20, 40), (0, 0, 200))]
    _build_tiny_llava(tmp_path / "llava")
    with pytest.raises(ValueError, match="chat model"):
        HFCaptioner(str(tmp_path / "llava"))
    chat = HFCaptioner(str(tmp_path / "llava"), prompt="describe this", max_new_tokens=4)
    assert chat.use_chat_template and chat.tokenizer.padding_side == "left"
    captions = chat(images)
    # with the prompt left in, each caption would start with "user describe this assistant"
    assert len(captions) == 2 and all(len(c.split()) <= 4 for c in captions)

    _build_tiny_vision_encoder_decoder(tmp_path / "ved")
    captions = HFCaptioner(str(tmp_path / "ved"), max_new_tokens=4)(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    with pytest.raises(ValueError, match="takes no prompt"):
        HFCaptioner(str(tmp_path / "ved"), prompt="a picture of")


# --- the pipeline ---------------------------------------------------------------------------------


def _cli_args(images, out, tiny_models, *extra):
    blip, owl = tiny_models
    return [
        "--input",
        str(images),
        "--output",
        str(out),
        "--captioner",
        blip,
        "--detector",
        owl,
        "--tagger",
        "lexicon",
        "--chunk-size",
        "2",
        "--caption-batch-size",
        "2",
        "--detect-batch-size",
        "3",
        "--max-new-tokens",
        "6",
        *extra,
    ]


def test_cli_end_to_end_and_resume(tmp_path, tiny_models, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    sizes = [(48, 24), (20, 40), (32, 32), (64, 16), (24, 56)]
    _make_images(images, sizes)
    argv = _cli_args(images, out, tiny_models)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "unreadable_image: 1" in printed

    shards = list_shards(out)  # 6 listed images (one broken) in chunks of 2
    assert [s.rsplit("/", 1)[1] for s in shards] == ["vesl-000000.tar", "vesl-000001.tar", "vesl-000002.tar"]
    samples = list(iter_shard_samples(shards))
    assert sorted(s.key for s in samples) == ["img0", "img2", "img4", "sub_img1", "sub_img3"]
    by_path = {s.meta["source_path"]: s for s in samples}
    num_regions = 0
    for i, (w, h) in enumerate(sizes):
        rel = f"{'sub/' if i % 2 else ''}img{i}.{('png', 'jpg', 'webp')[i % 3]}"
        sample = by_path[rel]
        assert (sample.width, sample.height) == (w, h) == sample.image.size
        vesl = sample.meta["vesl"]
        assert vesl["captioner"] == tiny_models[0] and vesl["detector"] == tiny_models[1]
        assert len(vesl["phrases"]) <= 20
        for region in sample.regions:
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert region.source == "owlv2" and region.score > 0.1 and region.phrase in vesl["phrases"]
        num_regions += len(sample.regions)
    assert num_regions > 0  # the tiny random models do produce phrases and boxes

    stats = json.loads((out / "vesl_stats.json").read_text())
    assert stats["images"] == 5 and stats["chunks_finished"] == 3 == stats["chunks_total"]
    assert stats["skipped"] == {"unreadable_image": 1} and stats["regions"] == num_regions
    assert set(stats["images_per_second"]) == {"load", "caption", "phrases", "ground", "write"}
    assert stats["regions_per_image"] == pytest.approx(num_regions / 5)

    # a second run skips every finished chunk without loading a model
    config = config_from_args(build_parser().parse_args(argv))
    before = {
        p: (out / p).stat().st_mtime_ns for p in ("vesl-000000.tar", "vesl-000001.tar", "vesl-000002.tar")
    }
    result = run_vesl(config, process_index=0, num_processes=1)
    assert result.processed == [] and result.resumed == [0, 1, 2]
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before

    # a crash mid-chunk 1: its stats marker is gone, a half-written temporary folder and .tmp remain
    (out / "vesl-000001.stats.json").unlink()
    (out / ".vesl-000001.tmp").mkdir()
    (out / ".vesl-000001.tmp" / "vesl-000001-000000.tar.tmp").write_bytes(b"partial")
    (out / "vesl-000001.tar.tmp").write_bytes(b"partial")
    result = run_vesl(config, process_index=0, num_processes=1)
    assert result.processed == [1] and result.resumed == [0, 2]
    assert not (out / ".vesl-000001.tmp").exists() and not (out / "vesl-000001.tar.tmp").exists()
    assert len(list(iter_shard_samples(list_shards(out)))) == 5
    assert json.loads((out / "vesl_stats.json").read_text())["images"] == 5

    # other settings into the same folder are refused, naming what differs
    with pytest.raises(ValueError, match="threshold"):
        run_vesl(
            config_from_args(build_parser().parse_args([*argv, "--threshold", "0.3"])),
            process_index=0,
            num_processes=1,
        )


class FakeCaptioner:
    name = "fake-captioner"

    def __call__(self, images):
        return ["A red square next to a blue circle, stock photo." for _ in images]


class FakeGrounder:
    name = "fake-detector"
    source = "fake"

    def __call__(self, images, phrases):
        return [
            [Detection((0.0, 0.0, im.width / 2, im.height / 2), p[0], 0.9)] if p else []
            for im, p in zip(images, phrases)
        ]


def test_assign_chunks_round_robin():
    ranks = [assign_chunks(7, r, 2) for r in range(2)]
    assert ranks == [[0, 2, 4, 6], [1, 3, 5]]
    assert sorted(ranks[0] + ranks[1]) == list(range(7)) and not set(ranks[0]) & set(ranks[1])
    assert assign_chunks(2, 2, 3) == []
    with pytest.raises(ValueError, match="process_index"):
        assign_chunks(4, 2, 2)


def test_two_processes_split_the_chunks(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    _make_images(images, [(16, 8)] * 7)
    config = VeslConfig(
        input=str(images), output=str(out), captioner="unused", tagger="lexicon", chunk_size=2
    )
    # 8 listed files (one broken) -> 4 chunks; rank 1 runs first, as it might on a real cluster
    rank1 = run_vesl(
        config, captioner=FakeCaptioner(), grounder=FakeGrounder(), process_index=1, num_processes=2
    )
    rank0 = run_vesl(
        config, captioner=FakeCaptioner(), grounder=FakeGrounder(), process_index=0, num_processes=2
    )
    assert rank1.processed == [1, 3] and rank0.processed == [0, 2] and rank1.stats is None
    assert rank0.stats["chunks_finished"] == 4 and rank0.stats["images"] == 7
    samples = list(iter_shard_samples(list_shards(out)))
    assert len({s.key for s in samples}) == 7
    sample = samples[0]
    assert sample.caption == "A red square next to a blue circle, stock photo."
    assert sample.meta["vesl"]["phrases"] == ["a red square", "a blue circle"]
    assert sample.regions[0].source == "fake" and sample.regions[0].phrase == "a red square"


def test_shard_input_keep_caption(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    with ShardWriter(src, max_samples_per_shard=2) as writer:
        for i, caption in enumerate(["a green tree", "", "a large dog"]):
            writer.write(
                RegionSample(
                    key=f"k{i}",
                    caption=caption,
                    width=20,
                    height=10,
                    image=Image.new("RGB", (20, 10)),
                    regions=[Region((1, 1, 5, 5), "human box", None, "human")],
                    meta={"dataset": "toy"},
                )
            )
    config = VeslConfig(
        input=str(src), output=str(out), keep_caption=True, tagger="lexicon", keep_existing_regions=True
    )
    result = run_vesl(config, grounder=FakeGrounder(), process_index=0, num_processes=1)
    assert result.processed == [0, 1]  # one chunk per input shard
    samples = {s.key: s for s in iter_shard_samples(list_shards(out))}
    assert set(samples) == {"k0", "k2"}  # k1 has no caption to keep: skipped and counted
    assert result.stats["skipped"] == {"missing_caption": 1}
    k0 = samples["k0"]
    assert k0.caption == "a green tree" and k0.meta["dataset"] == "toy"
    assert k0.meta["vesl"]["captioner"] == "existing"
    assert [r.source for r in k0.regions] == ["human", "fake"]


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="captioning model"):
        VeslConfig(input="x", output="y")
    with pytest.raises(FileNotFoundError, match="neither"):
        run_vesl(
            VeslConfig(input=str(tmp_path / "missing"), output=str(tmp_path / "o"), keep_caption=True),
            grounder=FakeGrounder(),
            process_index=0,
            num_processes=1,
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        run_vesl(
            VeslConfig(input=str(empty), output=str(tmp_path / "o"), keep_caption=True),
            grounder=FakeGrounder(),
            process_index=0,
            num_processes=1,
        )
