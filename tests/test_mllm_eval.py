"""MLLM evaluation by generation (``eval.mllm_rec``, ``eval.mllm_generate``, ``eval.mllm_cli``,
``eval.lmms_plugin``): metric math with stub generators that return known answers, the pipeline
with a tiny randomly initialised CLOC-LLaVA (its answers are garbage) and an offline tokenizer.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from cloc_data.format import Region, RegionSample
from cloc_hf import CLOCImageProcessor, CLOCVisionConfig
from eval import mllm_cli
from eval.lmms_plugin import CLOCLlavaLMMS
from eval.mllm_generate import HFGenerator, cut_at_stop, wrap_question
from eval.mllm_rec import (
    INSTRUCTION_REC_TEMPLATE,
    LMMS_EVAL_PROMPT,
    RecExample,
    evaluate_rec_generation,
    evaluate_referring,
    mllm_rows,
    prompt_style,
    rec_examples,
    rec_examples_from_refs,
    rec_examples_from_rows,
    ref_cls_options,
    score_rec,
)
from eval.results import ROW_KEYS, field_for
from llava_bridge import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor, box_to_text
from llava_bridge.constants import IMAGE_TOKEN, REGION_TOKEN

ROOT = Path(__file__).resolve().parents[1]


# --- tiny model -------------------------------------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", IMAGE_TOKEN, REGION_TOKEN, "USER", ":", "ASSISTANT", "where", "is",
         "the", "cat", "dog", "a", "or", "?", "[", "]", ",", "."] + [str(i) for i in range(10)]
IMAGE_ID, REGION_ID = WORDS.index(IMAGE_TOKEN), WORDS.index(REGION_TOKEN)


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, REGION_TOKEN]})
    return tok


def _model(seed=0) -> CLOCLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLOCVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)
    config = CLOCLlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, region_token_id=REGION_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             prompter_config={"num_attention_heads": 2}, prompter_projection_dim=24)
    return CLOCLlavaForConditionalGeneration(config).eval()


def _processor(**kwargs) -> CLOCLlavaProcessor:
    return CLOCLlavaProcessor(image_processor=CLOCImageProcessor(size=32), tokenizer=_tokenizer(), patch_size=8,
                              vision_feature_select_strategy="default", **kwargs)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# --- data -------------------------------------------------------------------------------------------
def _samples():
    """Two refs of 200 x 100 images: val (two sentences, box touching the origin) and testA (one)."""
    img = _image(200, 100)
    return [
        RegionSample("ref1", "", 200, 100, [Region((0.0, 0.0, 100.0, 50.0), "the cat"),
                                            Region((0.0, 0.0, 100.0, 50.0), "left cat.")],
                     {"ref_id": 1, "ann_id": 11, "image_id": 5, "split": "val"}, img),
        RegionSample("ref2", "", 200, 100, [Region((100.0, 50.0, 200.0, 100.0), "the dog")],
                     {"ref_id": 2, "ann_id": 12, "image_id": 5, "split": "testA"}, img),
        RegionSample("ref3", "", 200, 100, [Region((10.0, 10.0, 20.0, 20.0), "a train ref")],
                     {"ref_id": 3, "ann_id": 13, "image_id": 5, "split": "train"}, img),
    ]


class Stub:
    """A generator returning fixed answers; records what it was asked."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, questions, images, boxes=None, **kwargs):
        self.calls.append((list(questions), list(images), boxes))
        assert len(self.answers) == len(questions)
        return list(self.answers)


def _box(ex, style="lmms_eval"):
    return "[" + ", ".join(f"{v:.4f}" for v in ex.gt_normalised) + "]"


def test_examples_one_per_expression_with_split_and_normalised_truth():
    examples = rec_examples(_samples())
    assert [(e.key, e.split, e.expression) for e in examples] == [
        ("ref1-0", "val", "the cat"), ("ref1-1", "val", "left cat."), ("ref2-0", "testA", "the dog")]
    assert examples[2].gt_normalised == (0.5, 0.5, 1.0, 1.0)
    assert examples[0].meta == {"ref_id": 1, "ann_id": 11, "image_id": 5}
    assert [e.split for e in rec_examples(_samples(), splits=["train"])] == ["train"]


def test_exact_boxes_score_100_no_box_is_a_parse_failure_half_right_is_50():
    examples = rec_examples(_samples())
    style = prompt_style("lmms_eval")
    exact, _ = score_rec([_box(e) for e in examples], examples, style)
    assert exact["val"]["acc@0.5"] == exact["testA"]["acc@0.5"] == 100.0
    assert exact["val"]["miou"] == pytest.approx(100.0) and exact["val"]["parse_fail"] == 0.0
    assert set(exact["val"]) >= {f"acc@{t / 10:g}" for t in range(1, 10)} | {"center_acc", "num_expressions"}

    none, rows = score_rec(["I cannot tell", "a cat", "nothing"], examples, style)
    assert none["val"]["parse_fail"] == none["testA"]["parse_fail"] == 100.0
    assert none["val"]["miou"] == 0.0 and none["val"]["acc@0.1"] == 0.0
    # [0, 0, 0, 0] has its centre at the origin: inside the val truth (touching it), not the testA one
    assert none["val"]["center_acc"] == 100.0 and none["testA"]["center_acc"] == 0.0
    assert rows[0]["pred"] is None and rows[0]["gt"] == [0.0, 0.0, 0.5, 0.5]

    half, _ = score_rec([_box(examples[0]), "no box", _box(examples[2])], examples, style)
    assert half["val"]["acc@0.5"] == 50.0 and half["val"]["parse_fail"] == 50.0
    assert half["val"]["num_expressions"] == 2 and half["testA"]["acc@0.5"] == 100.0


def test_lmms_eval_grammar_first_box_strict_no_rescaling():
    examples = rec_examples(_samples())[:1]  # truth [0, 0, 0.5, 0.5]
    style = prompt_style("lmms_eval")
    score = lambda answer: score_rec([answer], examples, style)[0]["val"]  # noqa: E731
    assert score("box: [0.0,0.0, 0.5, 0.5] then [0.5, 0.5, 1.0, 1.0]")["acc@0.9"] == 100.0  # the first box
    assert score("[0.0 , 0.0, 0.5, 0.5]")["parse_fail"] == 100.0  # no space before a comma in lmms-eval
    assert score("[.0, 0, .5, .5]")["parse_fail"] == 100.0  # nor a number without its integer part
    assert score("[0, 0, 100, 50]")["acc@0.1"] == 0.0  # pixels are not rescaled: IoU about 0
    iou_quarter = score("[0.0, 0.0, 0.25, 0.5]")
    assert iou_quarter["acc@0.5"] == 100.0 and iou_quarter["acc@0.6"] == 0.0  # IoU 0.5 exactly: >= counts


def test_prompt_styles():
    lm = prompt_style("lmms_eval")
    assert lm.question("the cat") == LMMS_EVAL_PROMPT + "the cat"
    assert "floating point numbers bounded between 0 and 1" in LMMS_EVAL_PROMPT
    from training.mllm.instructions import TEMPLATES

    assert INSTRUCTION_REC_TEMPLATE in TEMPLATES["rec"]
    inst = prompt_style("instruction", convention="shikra")
    assert inst.question("left cat. ") == "Where is left cat? Answer with a bounding box."
    assert (inst.convention, inst.frame) == ("shikra", "pad")
    # an answer written in the padded frame scores against the original-frame truth
    examples = rec_examples(_samples())
    answers = [box_to_text(e.box, (e.width, e.height), "shikra") for e in examples]
    assert score_rec(answers, examples, inst)[0]["val"]["acc@0.9"] == 100.0
    assert score_rec(answers, examples, prompt_style("instruction", convention="shikra", frame="original"))[0]["val"]["acc@0.9"] == 0.0
    with pytest.raises(ValueError, match="unknown prompt style"):
        prompt_style("nope")
    with pytest.raises(ValueError, match="expr"):
        prompt_style("lmms_eval", template="no field")


def test_rec_from_refer_layout(tmp_path):
    """refs(*).json + instances through eval.rec's reader: COCO xywh -> xyxy / W, H; train left out."""
    PIL.Image.new("RGB", (80, 40)).save(tmp_path / "a.jpg")
    instances = {"images": [{"id": 1, "file_name": "a.jpg", "width": 80, "height": 40}],
                 "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [8, 4, 40, 20], "area": 800, "iscrowd": 0},
                                 {"id": 8, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}],
                 "categories": [{"id": 1, "name": "cat"}]}
    refs = [{"ref_id": 1, "ann_id": 7, "image_id": 1, "split": "val", "category_id": 1, "sent_ids": [1, 2],
             "sentences": [{"sent_id": 1, "sent": "big cat", "raw": "Big cat"}, {"sent_id": 2, "sent": "cat", "raw": "cat"}]},
            {"ref_id": 2, "ann_id": 8, "image_id": 1, "split": "train", "category_id": 1, "sent_ids": [3],
             "sentences": [{"sent_id": 3, "sent": "small", "raw": "small"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs(unc).json").write_text(json.dumps(refs))
    examples = rec_examples_from_refs(tmp_path / "refs(unc).json", tmp_path / "instances.json", tmp_path)
    assert [e.expression for e in examples] == ["big cat", "cat"]
    assert examples[0].gt_normalised == (8 / 80, 4 / 40, 48 / 80, 24 / 40)
    assert examples[0].split == "val" and examples[0].meta["sent_id"] == 1
    stub = Stub(["[0.1, 0.1, 0.6, 0.6]", "[0.9, 0.9, 1.0, 1.0]"])
    result = evaluate_rec_generation(stub, examples)
    assert result["splits"]["val"]["acc@0.5"] == 50.0
    assert stub.calls[0][0][0] == LMMS_EVAL_PROMPT + "big cat" and Path(stub.calls[0][1][0]).name == "a.jpg"


# --- referring ----------------------------------------------------------------------------------------
def _records():
    return [
        {"id": "r-ref_cls-0", "image": "images/a.png", "width": 48, "height": 32, "task": "ref_cls", "regions": [[2, 2, 20, 20]],
         "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nIs the object [0.04, 0.06, 0.42, 0.62] {REGION_TOKEN} cat or dog?"},
                           {"from": "gpt", "value": "cat"}]},
        {"id": "r-ref_cls-1", "image": "images/a.png", "width": 48, "height": 32, "task": "ref_cls", "regions": [[20, 2, 40, 30]],
         "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhich is the region [0.42, 0.06, 0.83, 0.94] {REGION_TOKEN}: cat or dog?"},
                           {"from": "gpt", "value": "dog"}]},
        {"id": "r-ref_desc-0", "image": "images/a.png", "width": 48, "height": 32, "task": "ref_desc", "regions": [[2, 2, 20, 20]],
         "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is [0.04, 0.06, 0.42, 0.62] {REGION_TOKEN}?"},
                           {"from": "gpt", "value": "red cat"}]},
        {"id": "r-rec-0", "image": "images/a.png", "width": 48, "height": 32, "task": "rec", "regions": [],
         "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhere is cat?"}, {"from": "gpt", "value": "[0.1, 0.1, 0.2, 0.2]"}]},
    ]


def test_referring_accuracy_exact_match_and_options(tmp_path):
    assert ref_cls_options(f"Which is the region [0.1] {REGION_TOKEN}: red cat or dog? Answer with one of them.") == ("red cat", "dog")
    stub = Stub(["Cat.", "cat", "a red cat"])  # right (normalised), the other option, wrong phrase
    out = evaluate_referring(stub, _records(), tmp_path)
    assert out["ref_cls"] == {"acc": 50.0, "num": 2, "other_option": 50.0, "neither": 0.0}
    assert out["ref_desc"] == {"acc": 0.0, "num": 1}
    questions, images, boxes = stub.calls[0]
    assert not questions[0].startswith(IMAGE_TOKEN) and REGION_TOKEN in questions[0]
    assert boxes == [[[2, 2, 20, 20]], [[20, 2, 40, 30]], [[2, 2, 20, 20]]] and images[0] == tmp_path / "images/a.png"
    with pytest.raises(ValueError, match="no records"):
        evaluate_referring(stub, _records()[3:], tmp_path)


# --- rows, CLI ------------------------------------------------------------------------------------------
def test_rows_use_the_results_schema():
    examples = rec_examples(_samples())
    rec = evaluate_rec_generation(Stub([_box(examples[0]), "none", "none"]), examples)
    rows = mllm_rows("cloc", "ckpt", rec, {"ref_cls": {"acc": 75.0}})
    assert [(r["split"], r["rec_acc50"], r["parse_fail"], r["ref_cls_acc"]) for r in rows] == [
        ("val", 50.0, 50.0, 75.0), ("testA", 0.0, 100.0, 75.0)]
    for key in ("rec_acc50", "ref_cls_acc", "ref_desc_acc", "parse_fail", "rec_center_acc", "rec_miou", "split"):
        assert field_for(key) is not None, key
    assert "parse_fail" not in ROW_KEYS  # region-method rows keep their keys
    assert mllm_rows("x", None, None, None)[0]["rec_acc50"] is None


def test_cli_run_writes_json_markdown_predictions(tmp_path):
    PIL.Image.new("RGB", (48, 32)).save(tmp_path / "a.png")
    (tmp_path / "images").mkdir()
    PIL.Image.new("RGB", (48, 32)).save(tmp_path / "images" / "a.png")
    (tmp_path / "data.json").write_text(json.dumps(_records()))
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 48, "height": 32}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 24, 16], "area": 384, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}]}))
    (tmp_path / "refs(unc).json").write_text(json.dumps([{"ref_id": 1, "ann_id": 7, "image_id": 1, "split": "val",
                                                          "category_id": 1, "sentences": [{"sent": "cat"}]}]))
    args = mllm_cli.parse_args(["--model", "m", "--out", str(tmp_path / "out"), "--refs", str(tmp_path / "refs(unc).json"),
                                "--instances", str(tmp_path / "instances.json"), "--image-dir", str(tmp_path),
                                "--instructions", str(tmp_path / "data.json")])

    def stub(questions, images, boxes=None, **kw):
        return ["[0.0, 0.0, 0.5, 0.5]"] if boxes is None else ["cat", "dog", "red cat"]

    mllm_cli.run(args, stub)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["rows"][0]["rec_acc50"] == 100.0 and results["rows"][0]["ref_cls_acc"] == 100.0
    assert results["rows"][0]["ref_desc_acc"] == 100.0 and results["rec"]["splits"]["val"]["parse_fail"] == 0.0
    assert "REC Acc@0.5" in (tmp_path / "out" / "results.md").read_text()
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="go together"):
        mllm_cli.run(mllm_cli.parse_args(["--model", "m", "--out", str(tmp_path), "--refs", "x"]), stub)


# --- generation with the tiny model -------------------------------------------------------------------
def test_chat_formats_and_stop_strings():
    tok = _tokenizer()
    assert wrap_question(f"{IMAGE_TOKEN}\nwhere is the cat?", "llava", tokenizer=tok) == f"USER: {IMAGE_TOKEN}\nwhere is the cat? ASSISTANT:"
    assert wrap_question("q", "auto", tokenizer=tok).startswith("USER:")  # no chat template: LLaVA's turn
    assert wrap_question("q", "<{image}>{question}") == f"<{IMAGE_TOKEN}>q"
    with pytest.raises(ValueError, match="chat format"):
        wrap_question("q", "vicuna")
    assert cut_at_stop(" [0.1, 0.2, 0.3, 0.4] ASSISTANT: more") == "[0.1, 0.2, 0.3, 0.4]"


def test_generator_left_pads_batches_like_single_questions():
    model, processor = _model(), _processor()
    gen = HFGenerator(model, processor, batch_size=3, max_new_tokens=4, progress=False)
    questions = ["where is the cat ?", "where is the big dog or the cat ?", "is"]
    images = [_image(40, 30, 1), _image(32, 32, 2), _image(20, 50, 3)]
    batched = gen(questions, images)
    single = [gen([q], [im])[0] for q, im in zip(questions, images)]
    assert batched == single and all(isinstance(a, str) for a in batched)
    assert processor.tokenizer.padding_side == "right"  # restored after the call
    with pytest.raises(ValueError, match="as many images"):
        gen(questions, images[:1])


def test_pipeline_with_tiny_model_counts_garbage_as_parse_failures():
    examples = rec_examples(_samples())
    gen = HFGenerator(_model(), _processor(), batch_size=2, max_new_tokens=3, progress=False)
    result = evaluate_rec_generation(gen, examples)
    for split, m in result["splits"].items():
        failed = [p for p in result["predictions"] if p["split"] == split and p["pred"] is None]
        assert m["parse_fail"] == 100.0 * len(failed) / m["num_expressions"]
        assert 0.0 <= m["acc@0.5"] <= 100.0 and math.isfinite(m["miou"])


def test_referring_with_region_boxes_through_the_processor(tmp_path):
    (tmp_path / "images").mkdir()
    _image(48, 32).save(tmp_path / "images" / "a.png")
    processor = _processor(box_convention="llava", box_frame="original")  # box text is in the records already
    gen = HFGenerator(_model(), processor, batch_size=2, max_new_tokens=2, progress=False)
    seen = []
    original = processor.__class__.__call__

    def spy(self, *args, **kwargs):
        seen.append((self.box_convention, kwargs.get("text")))
        return original(self, *args, **kwargs)

    processor.__class__.__call__ = spy
    try:
        out = evaluate_referring(gen, _records(), tmp_path)
    finally:
        processor.__class__.__call__ = original
    assert out["ref_cls"]["num"] == 2 and 0.0 <= out["ref_cls"]["acc"] <= 100.0
    assert all(conv is None for conv, _ in seen) and processor.box_convention == "llava"
    assert seen[0][1][0].count("[0.04, 0.06, 0.42, 0.62]") == 1


# --- lmms-eval plugin -----------------------------------------------------------------------------------
def _request(context, gen_kwargs, doc_id, task="refcoco_bbox_rec_val"):
    return SimpleNamespace(args=(context, gen_kwargs, lambda doc: [doc["image"]], doc_id, task, "val"))


def test_lmms_plugin_generate_until_and_loglikelihood():
    model, processor = _model(), _processor()
    lm = CLOCLlavaLMMS(model=model, processor=processor, batch_size="2", max_new_tokens="3")
    docs = [{"image": _image(40, 30, i)} for i in range(3)]
    lm.task_dict = {"refcoco_bbox_rec_val": {"val": docs}}
    requests = [_request("where is the cat ?", {"until": ["ASSISTANT:"]}, 0),
                _request("where is the dog ?", {"until": "ASSISTANT:", "max_new_tokens": 2}, 1),
                _request("is", {"until": ["ASSISTANT:"]}, 2)]
    answers = lm.generate_until(requests)
    gen = HFGenerator(model, processor, max_new_tokens=3, progress=False)
    assert answers[0] == gen(["where is the cat ?"], [docs[0]["image"]])[0]
    assert answers[2] == gen(["is"], [docs[2]["image"]])[0]
    assert answers[1] == gen(["where is the dog ?"], [docs[1]["image"]], max_new_tokens=2)[0]

    # the greedy continuation is greedy, with a finite negative log-probability
    tok = processor.tokenizer
    inputs = processor(images=[docs[0]["image"]], text=[gen.text("where is the cat ?")], return_tensors="pt")
    greedy_ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    greedy_text = "".join(" " + t for t in tok.convert_ids_to_tokens(greedy_ids))
    ll = lm.loglikelihood([SimpleNamespace(args=("where is the cat ?", greedy_text, lambda d: [d["image"]], 0,
                                                 "refcoco_bbox_rec_val", "val"))])
    assert tok(greedy_text, add_special_tokens=False)["input_ids"] == greedy_ids.tolist()  # word-level round trip
    assert ll[0][1] is True and ll[0][0] < 0 and math.isfinite(ll[0][0])
    other = next(w for w in ("cat", "dog") if tok.convert_tokens_to_ids(w) != int(greedy_ids[0]))
    worse = lm.loglikelihood([SimpleNamespace(args=("where is the cat ?", " " + other, lambda d: [d["image"]], 0,
                                                    "refcoco_bbox_rec_val", "val"))])
    assert worse[0][1] is False
    with pytest.raises(ValueError, match="unknown model_args"):
        CLOCLlavaLMMS(model=model, processor=processor, temperature=1)
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])


def test_lmms_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    module, attr = entry["cloc_llava"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    pytest.importorskip("lmms_eval")
    from eval.lmms_plugin import manifest

    assert manifest().simple_class_path == "eval.lmms_plugin.CLOCLlavaLMMS"


def test_lmms_eval_loads_the_plugin_by_name_from_a_checkpoint(tmp_path):
    """Where lmms-eval is installed with this project: ``--model cloc_llava --model_args pretrained=...``."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    try:
        cls = get_model("cloc_llava")
    except ValueError:
        pytest.skip("the project's entry points are not installed in this environment (pip install it)")
    assert cls is CLOCLlavaLMMS
    _model().save_pretrained(tmp_path / "ckpt")
    _processor().save_pretrained(tmp_path / "ckpt")
    lm = cls.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},chat_format=llava,max_new_tokens=2",
                                    {"batch_size": 2, "device": "cpu"})
    lm.task_dict = {"t": {"val": [{"image": _image(30, 20)}]}}
    (answer,) = lm.generate_until([_request("where is the cat ?", {"until": ["ASSISTANT:"]}, 0, task="t")])
    assert isinstance(answer, str) and lm.batch_size == 2


def test_scores_match_lmms_eval_on_its_refcoco_task(tmp_path, monkeypatch):
    """Where lmms-eval is installed: its own refcoco REC task (the template yaml, pointed at a local
    parquet in the lmms-lab layout) run through the plugin with known answers scores what score_rec does."""
    lmms_eval = pytest.importorskip("lmms_eval")
    import datasets
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sizes, boxes = [(200, 100), (64, 48), (50, 90)], [[0, 0, 100, 50], [8, 4, 30, 20], [10, 20, 20, 30]]
    rows = [{"question_id": f"q{i}", "image": _image(*sizes[i], seed=i), "answer": [f"cat {i}", f"dog {i}"],
             "bbox": [float(v) for v in boxes[i]]} for i in range(3)]
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "answer": datasets.Sequence(datasets.Value("string")),
                                  "bbox": datasets.Sequence(datasets.Value("float64"))})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "val.parquet"))
    template = Path(lmms_eval.__file__).parent / "tasks" / "refcoco" / "_default_template_bbox_rec_yaml"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(
        f"include: {template}\ntask: local_rec_val\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    val: {tmp_path / 'val.parquet'}\n  cache_dir: {tmp_path / 'cache'}\ntest_split: val\n")
    answers = ["[0.0, 0.0, 0.5, 0.5]", "no box", "[0.1 , 0.2, 0.3, 0.4]", "at [0.2,0.2, 0.6,0.7] or [0,0,1,1]",
               "[0.5, 0.5, 0.25, 1.0]", "[0.1, 0.05, 0.5, 0.5]"]
    seen = []

    def stub(contexts, images, max_new_tokens=None, until=None):
        seen.extend(zip(contexts, images))
        return [answers[(len(seen) - len(contexts) + k) % len(answers)] for k in range(len(contexts))]

    lm = CLOCLlavaLMMS(model=_model(), processor=_processor(), batch_size=4)
    stub.max_new_tokens = 8  # the plugin reads the generator's default budget
    lm.generator = stub
    out = simple_evaluate(model=lm, tasks=["local_rec_val"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                          log_samples=True, batch_size=4)
    theirs = out["results"]["local_rec_val"]
    examples, given = [], []
    for sample in out["samples"]["local_rec_val"]:
        doc = sample["doc"]
        i = int(doc["question_id"][1:])
        x, y, w, h = boxes[i]
        examples.append(RecExample(doc["question_id"], None, *sizes[i], doc["answer"], (x, y, x + w, y + h), "val"))
        resp = sample["resps"][0]
        given.append(resp[0] if isinstance(resp, list) else resp)
    assert len(examples) == 6 and all(c.startswith(LMMS_EVAL_PROMPT) for c, _ in seen)
    ours = score_rec(given, examples, prompt_style("lmms_eval"))[0]["val"]
    for metric, key in (("IoU", "miou"), ("ACC@0.1", "acc@0.1"), ("ACC@0.3", "acc@0.3"), ("ACC@0.5", "acc@0.5"),
                        ("ACC@0.7", "acc@0.7"), ("ACC@0.9", "acc@0.9"), ("Center_ACC", "center_acc")):
        assert theirs[f"refcoco_{metric},none"] == pytest.approx(ours[key] / 100, abs=1e-12), metric
    assert ours["parse_fail"] == pytest.approx(100 * 2 / 6)


def test_cli_main_end_to_end_from_saved_checkpoint_and_shards(tmp_path, capsys):
    """A saved tiny cloc_llava checkpoint + converter-style shards -> results per split (answers are garbage)."""
    from cloc_data.shards import ShardWriter

    with ShardWriter(tmp_path / "shards") as writer:
        for sample in _samples():
            writer.write(sample)
    _model().save_pretrained(tmp_path / "ckpt")
    _processor().save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    rc = mllm_cli.main(["--model", str(tmp_path / "ckpt"), "--shards", str(tmp_path / "shards"), "--out", str(out),
                        "--batch-size", "2", "--max-new-tokens", "3", "--chat-format", "llava", "--no-progress"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["split"] for r in rows] == ["val", "testA"] and all(r["parse_fail"] is not None for r in rows)
    assert "| val |" in capsys.readouterr().out
    assert mllm_cli.main(["--model", str(tmp_path / "missing"), "--shards", str(tmp_path / "shards"), "--out", str(out)]) == 1
    assert "cloc-eval-mllm: error:" in capsys.readouterr().err


def test_rec_from_lmms_lab_rows_sizes_from_the_embedded_image(tmp_path):
    """The parquet files lmms-eval reads: one example per answer, size from the image, split from the file name."""
    import io

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    _image(40, 30).save(buf, format="PNG")
    rows = [{"question_id": "12_3", "image": {"bytes": buf.getvalue(), "path": None}, "question": "prompt",
             "answer": ["woman in red", "red shirt"], "segmentation": [], "bbox": [2.0, 3.0, 10.0, 12.0],
             "iscrowd": 0, "file_name": "a.jpg"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "testB-00000-of-00001.parquet")
    examples = rec_examples_from_rows(tmp_path / "testB-00000-of-00001.parquet")
    assert [(e.expression, e.split, e.width, e.height) for e in examples] == [
        ("woman in red", "testB", 40, 30), ("red shirt", "testB", 40, 30)]
    assert examples[0].gt_normalised == (2 / 40, 3 / 30, 12 / 40, 15 / 30)
