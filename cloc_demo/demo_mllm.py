"""The MLLM claim in miniature: a CLOC tower vs a CLIP tower inside the same tiny LLaVA, on a CPU.

    python -m cloc_demo.demo_mllm                  # `make demo-mllm` (runs `make demo` first if needed)
    python -m cloc_demo.demo_mllm --preset smoke   # a seconds-long run of the whole path (tests)

Steps, from the CLOC and CLIP-baseline checkpoints and the synthetic scenes `make demo` writes:

1. instruction data (``training.mllm.instructions``): REC records ("Where is the left red ring?" -> a
   box) from each object's referring expression, and referring-classification records ("Is the
   object [box] <region> a X or a Y?") whose distractor is another object of the same scene when
   there is one (a class that is not in the image could be ruled out from the image alone); boxes in
   the ``ferret`` convention (integers 0..999 of the original image: on 32 px scenes only 33 values,
   which the trained tokenizer keeps as single tokens); the REC questions of one training scene form
   one multi-turn record (:func:`merge_turns`), so its image tokens are paid once, and one of its
   classification questions is a record of its own (:func:`build_records` says why not all in one);
2. a byte-level BPE tokenizer trained on that text with ``tokenizers`` and a Llama language model
   initialised from scratch (``MLLMDemoSettings.lm``);
3. for each tower and seed, ``cloc-finetune-mllm``'s two stages with the same budget: ``align``
   (projectors only), then ``instruct`` with the whole language model trained (``--no-lora``: a
   language model from scratch has nothing for adapters to adapt). The CLOC tower's region tokens come
   from its Prompter, the CLIP tower's from RoI-Align over its patch tokens; both towers are frozen;
4. ``cloc-eval-mllm`` on the test split: REC Acc@0.5 by generation (the instruction prompt, answers
   read in the ``ferret`` convention), referring-classification accuracy, parse failures;
5. ``OUT/report.json``, ``OUT/report.md`` with a picture of predicted boxes next to the truth, and the
   final models of the first seed as ``OUT/cloc-llava`` and ``OUT/clip-llava`` (load with
   ``CLOCLlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``), the
   CLOC one with a model card.

The settings of a preset were chosen on the validation split (``--split val`` evaluates there).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_data.format import Region, RegionSample
from cloc_data.json_io import write_json_atomic
from cloc_data.shards import iter_shard_samples, list_shards
from cloc_demo.demo_mllm_report import METRICS, draw_predictions, goals, summarise, write_report
from eval.results import jsonable
from llava_bridge.constants import IMAGE_TOKEN
from training.mllm.instructions import InstructionBuilder, InstructionConfig, image_name

logger = logging.getLogger("cloc.demo_mllm")

CONVENTION = "ferret"
"""Box text of the demo's records and answers (integer grid 0..999 of the original image)."""
TOWERS = {"cloc": {"use_prompter": True}, "clip": {"use_prompter": False}}
"""The two rows: CLOC's tower with its Prompter's region tokens, the CLIP baseline's with RoI-Align ones."""
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<region>")


@dataclass
class MLLMDemoSettings:
    """What one ``make demo-mllm`` run does.

    n_train, n_eval: scenes whose records train / are evaluated (train split; val or test split).
        A training scene gives a multi-turn record of its REC questions (about two) and a record of
        one classification question; an evaluation scene gives one record per question.
    vocab_size: size of the BPE tokenizer trained on the records' text.
    lm: ``LlamaConfig`` fields of the language model trained from scratch.
    align_steps, instruct_steps: optimiser steps of the two stages (same for both towers); 800 instruct
        steps fit the 20-minute budget with two workers (13 minutes measured).
    ref_cls_share: share of the training scenes that also give a classification record (every scene gives
        its REC record); classification is learnt from far fewer examples than REC.
    align_lr, instruct_lr: their peak learning rates (cosine schedule, AdamW).
    batch_size: records per step.
    vision_feature_layer: tower layer the image tokens come from (LLaVA's -2).
    seeds: one full run per seed and tower; the report gives mean and std.
    eval_batch_size, max_new_tokens: generation settings.
    """

    n_train: int = 5000
    ref_cls_share: float = 1.0
    n_eval: int = 300
    vocab_size: int = 600
    lm: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256})
    align_steps: int = 20
    instruct_steps: int = 800
    align_lr: float = 1e-3
    instruct_lr: float = 2e-3
    batch_size: int = 32
    vision_feature_layer: int = -2
    seeds: tuple[int, ...] = (0, 1)
    eval_batch_size: int = 64
    max_new_tokens: int = 16


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    # a seconds-long run of the whole path, for tests
    "smoke": {"n_train": 48, "n_eval": 8, "vocab_size": 320, "align_steps": 2, "instruct_steps": 3,
              "batch_size": 8, "seeds": (0, 1), "eval_batch_size": 8,
              "lm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "max_position_embeddings": 256}},
}


def resolve_settings(preset: str, overrides: dict[str, Any] | None = None) -> MLLMDemoSettings:
    """Preset ``preset`` with ``overrides`` (``MLLMDemoSettings`` fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo-mllm preset {preset!r}; available: {sorted(PRESETS)}")
    merged = {**copy.deepcopy(PRESETS[preset]), **(overrides or {})}
    known = {f.name for f in dataclasses.fields(MLLMDemoSettings)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"demo-mllm overrides {unknown} are not MLLMDemoSettings fields ({sorted(known)})")
    if "seeds" in merged:
        merged["seeds"] = tuple(merged["seeds"])
    return MLLMDemoSettings(**merged)


# --------------------------------------------------------------------------------------------------
# instruction data
# --------------------------------------------------------------------------------------------------


class SceneInstructionBuilder(InstructionBuilder):
    """The library's builder with hard distractors: another object class of the same scene when
    there is one, so that referring classification needs the region, not just the image."""

    def _distractor(self, answer: str, sample: RegionSample) -> str | None:
        others = sorted({o for o in sample.meta.get("scene_classes", ()) if o != answer})
        return self.rng.choice(others) if others else super()._distractor(answer, sample)


def scene_samples(sample: RegionSample, task: str) -> RegionSample:
    """A synthetic scene with one region per object: phrase = its referring expression (``rec``; objects
    without one are left out) or its class name, ``"<colour> <shape>"`` (``ref_cls``)."""
    objects = sample.meta.get("objects")
    if not objects:
        raise ValueError(f"sample {sample.key!r} has no 'objects' in its meta: not a synthetic scene")
    classes = [f"{o['colour']} {o['shape']}" for o in objects]
    if task == "rec":  # objects without an unambiguous expression (ref None) get no REC question
        pairs = [(o, o["ref"]["sent"]) for o in objects if o.get("ref")]
    else:
        pairs = list(zip(objects, classes))
    regions = [Region(tuple(float(v) for v in o["box"]), p) for o, p in pairs]
    return dataclasses.replace(sample, regions=regions, meta={**sample.meta, "scene_classes": classes})


def build_records(data: Path, split: str, out: Path, limit: int, seed: int, tasks=("rec", "ref_cls"),
                  multi_turn: bool = False, ref_cls_share: float = 1.0) -> Path:
    """Instruction records of the first ``limit`` scenes of ``split`` -> ``out/data.json`` + ``out/images``;
    one per question, or with ``multi_turn`` (training) per scene: its REC questions as one multi-turn
    record (:func:`merge_turns`) and one of its referring-classification questions on its own, the
    latter for a random ``ref_cls_share`` of the scenes (default all).

    Why not every question of a scene in one record: a classification question carries its box as
    text, which is the REC answer of the same object (a REC turn after it is answered by copying, not
    from the image), and a second classification question of two-object scenes is answered by
    elimination. REC turns about different objects give nothing away to each other."""
    shards = list_shards(data / split)
    if not shards:
        raise FileNotFoundError(f"no shards under {data / split} (run `make demo` first)")
    if not 0.0 < ref_cls_share <= 1.0:
        raise ValueError(f"ref_cls_share must be in (0, 1], got {ref_cls_share}")
    pool = sorted({f"{c} {s}" for c in _scene_config(data)["colours"] for s in _scene_config(data)["shapes"]})
    builders = {t: SceneInstructionBuilder(InstructionConfig(tasks=(t,), convention=CONVENTION, seed=seed + k), pool)
                for k, t in enumerate(tasks)}
    records = []
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for n, sample in enumerate(iter_shard_samples(shards, decode_images=False)):
        if n >= limit:
            break
        (out / "images" / image_name(sample)).write_bytes(sample.image)
        for task, builder in builders.items():
            made = builder.records(scene_samples(sample, task))
            if not made:
                continue
            if not multi_turn:
                records += made
            elif task == "rec":
                records.append(merge_turns(made, rng))
            elif ref_cls_share >= 1.0 or rng.random() < ref_cls_share:
                records.append(rng.choice(made))
    write_json_atomic(out / "data.json", records)
    return out / "data.json"


def merge_turns(records: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    """One scene's one-question records as one multi-turn record (LLaVA's conversation layout), the
    questions in random order: the image tokens, most of every sequence, are then paid once per scene
    instead of once per question (the questions must not answer each other: see :func:`build_records`).
    ``<image>`` stays in the first human turn; ``regions`` follow the ``<region>`` tokens in turn order."""
    order = rng.sample(records, len(records))
    conversations, regions = [], []
    for k, record in enumerate(order):
        question, answer = (dict(t) for t in record["conversations"])
        body = question["value"].replace(f"{IMAGE_TOKEN}\n", "", 1)
        question["value"] = f"{IMAGE_TOKEN}\n{body}" if k == 0 else body
        conversations += [question, answer]
        regions += record["regions"]
    first = order[0]
    return {**first, "id": first["id"].rsplit("-", 2)[0] + "-multi", "conversations": conversations,
            "regions": regions, "task": "multi"}


def _scene_config(data: Path) -> dict[str, Any]:
    return json.loads((data / "demo_data.json").read_text())["config"]


# --------------------------------------------------------------------------------------------------
# tokenizer and language model
# --------------------------------------------------------------------------------------------------


def train_tokenizer(records: list[dict[str, Any]], vocab_size: int):
    """A byte-level BPE tokenizer trained on the records' questions and answers (and the chat tags),
    as a transformers fast tokenizer that adds ``<s>`` in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from training.mllm.dataset import render_prompt

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        for r in records:
            turns = r["conversations"]
            yield " ".join(render_prompt(q["value"]) + " " + a["value"] for q, a in zip(turns[0::2], turns[1::2]))

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=["<image>", "<region>"])


def write_language_model(tokenizer, lm: dict[str, Any], out: Path, seed: int) -> Path:
    """A Llama causal LM with fresh weights (``seed``) and the tokenizer, saved to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **lm)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# fine-tuning and evaluation: the library's commands
# --------------------------------------------------------------------------------------------------


def finetune(tower_dir: Path, tower: str, lm_dir: Path, data: Path, out: Path, s: MLLMDemoSettings,
             seed: int) -> tuple[float, float]:
    """Both stages of ``cloc-finetune-mllm`` for one tower and seed; the final model is ``out/instruct``.
    Returns ``(wall seconds, CPU seconds of this process)``; on a shared machine the CPU seconds are the
    cost, the wall seconds also count the waiting."""
    from training.mllm.finetune import main as finetune_main

    common = ["--data", str(data), "--batch-size", str(s.batch_size), "--seed", str(seed), "--warmup", "0.05",
              "--save-steps", "1000000", "--logging-steps", "50", "--no-group-by-length"]
    start, cpu = time.perf_counter(), time.process_time()
    align = ["--stage", "align", "--cloc", str(tower_dir), "--lm", str(lm_dir), "--out", str(out / "align"),
             "--vision-feature-layer", str(s.vision_feature_layer), "--lr", str(s.align_lr),
             "--max-steps", str(s.align_steps)]
    if not TOWERS[tower]["use_prompter"]:
        align.append("--no-prompter")
    finetune_main(align + common)
    finetune_main(["--stage", "instruct", "--init", str(out / "align"), "--out", str(out / "instruct"), "--no-lora",
                   "--lr", str(s.instruct_lr), "--max-steps", str(s.instruct_steps)] + common)
    return time.perf_counter() - start, time.process_time() - cpu


def distinct_rec_answers(predictions: Path) -> int:
    """How many different answers a model gave to the REC questions (a handful: it ignores the image)."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    return len({r["answer"] for r in rows if "gt" in r})


def save_final_model(src: Path, dst: Path) -> None:
    """Copy a fine-tuned model (without Trainer checkpoints) and save its processor with the box
    convention of the training data, so that boxes given to it are written as the model read them."""
    from transformers import AutoProcessor

    import llava_bridge  # noqa: F401  (registers cloc_llava with the Auto classes)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*"))
    p = AutoProcessor.from_pretrained(dst)
    type(p)(image_processor=p.image_processor, tokenizer=p.tokenizer, patch_size=p.patch_size,
            vision_feature_select_strategy=p.vision_feature_select_strategy, box_convention=CONVENTION,
            box_frame="original").save_pretrained(dst)


def training_key(s: MLLMDemoSettings, tower: str, seed: int, demo_dir: Path, tokenizer) -> dict[str, Any]:
    """Everything a fine-tuned model depends on (the evaluation settings excluded)."""
    fields = ("n_train", "ref_cls_share", "vocab_size", "lm", "align_steps", "instruct_steps", "align_lr", "instruct_lr", "batch_size",
              "vision_feature_layer")
    tower_config = (demo_dir / tower / "model.safetensors").stat()
    return jsonable({**{f: getattr(s, f) for f in fields}, "tower": tower, "seed": seed, "checkpoint": str(demo_dir / tower),
                     "checkpoint_size": tower_config.st_size, "checkpoint_mtime": int(tower_config.st_mtime),
                     "vocab": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()})


def finished_run(run_dir: Path, key: dict[str, Any]) -> tuple[float | None, float | None]:
    """``(wall, CPU seconds)`` recorded by a finished run of the same ``key`` in ``run_dir``, else ``(None, None)``."""
    info_path = run_dir / "run_info.json"
    if not (info_path.is_file() and (run_dir / "instruct" / "model.safetensors").is_file()):
        return None, None
    info = json.loads(info_path.read_text())
    if info.get("key") != key:
        logger.info("%s was trained with other settings: training it again", run_dir)
        return None, None
    logger.info("reusing the fine-tuned model in %s", run_dir)
    return info["train_seconds"], info["train_cpu_seconds"]


def evaluate_model(model_dir: Path, data: Path, split: str, records: Path, out: Path, s: MLLMDemoSettings,
                   name: str) -> dict[str, Any]:
    """``cloc-eval-mllm`` on ``split``: REC from the synthetic RefCOCO-format refs, referring
    classification from ``records``. Returns its results (``OUT/results.json``)."""
    from eval.mllm_cli import main as eval_main

    rc = eval_main(["--model", str(model_dir), "--out", str(out), "--name", name,
                    "--refs", str(data / "refs(synthetic).json"), "--instances", str(data / f"instances_{split}.json"),
                    "--image-dir", str(data / split / "images"), "--splits", split, "--max-images", str(s.n_eval),
                    "--prompt-style", "instruction", "--convention", CONVENTION, "--instructions", str(records),
                    "--chat-format", "llava", "--batch-size", str(s.eval_batch_size),
                    "--max-new-tokens", str(s.max_new_tokens), "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"cloc-eval-mllm failed for {model_dir} (exit code {rc})")
    return json.loads((out / "results.json").read_text())


@dataclass
class FinetuneJob:
    """One fine-tuning run (tower x seed) and its evaluation; ``key`` is its :func:`training_key`."""

    tower: str
    seed: int
    demo_dir: Path
    lm_dir: Path
    train_data: Path
    eval_data: Path
    run_dir: Path
    split: str
    key: dict[str, Any]
    reuse: bool


def run_job(job: FinetuneJob, s: MLLMDemoSettings) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Fine-tune (or, with ``job.reuse``, keep a finished run of the same key) and evaluate one job.
    Returns ``(row with seed and times, cloc-eval-mllm results, whether the training was reused)``."""
    seconds, cpu = finished_run(job.run_dir, job.key) if job.reuse else (None, None)
    reused = seconds is not None
    if not reused:
        shutil.rmtree(job.run_dir, ignore_errors=True)
        seconds, cpu = finetune(job.demo_dir / job.tower, job.tower, job.lm_dir, job.train_data, job.run_dir, s, job.seed)
        write_json_atomic(job.run_dir / "run_info.json", {"key": job.key, "train_seconds": seconds, "train_cpu_seconds": cpu})
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_model(job.run_dir / "instruct", job.demo_dir / "data", job.split, job.eval_data,
                         job.run_dir / "eval", s, job.tower)
    row = {**res["rows"][0], "seed": job.seed, "train_seconds": seconds, "train_cpu_seconds": cpu,
           "eval_seconds": time.perf_counter() - t0, "eval_cpu_seconds": time.process_time() - c0}
    return row, res, reused


def _run_job_in_worker(job: FinetuneJob, s: MLLMDemoSettings):
    """:func:`run_job` in a worker process: one torch thread (the workers share the cores), logs on."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {job.tower}-seed{job.seed} %(name)s %(message)s",
                        force=True)  # a worker runs several jobs: each its own prefix
    return run_job(job, s)


def run_jobs(jobs: list[FinetuneJob], s: MLLMDemoSettings, workers: int) -> list[tuple[dict, dict, bool]]:
    """Every job's :func:`run_job` result, in order; ``workers`` > 1 runs that many at once in spawned
    processes (the runs are independent: same inputs, own folders), else one after another here."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1 or len(jobs) == 1:
        return [run_job(job, s) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_job_in_worker, job, s) for job in jobs]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def ensure_demo(demo_dir: Path) -> None:
    """Run `make demo`'s job when its checkpoints or data are missing."""
    if all((demo_dir / p).exists() for p in ("cloc/config.json", "clip/config.json", "data/demo_data.json")):
        return
    from cloc_demo.demo import run_demo as run_pretraining_demo

    logger.info("%s lacks the demo checkpoints: running `make demo` first", demo_dir)
    run_pretraining_demo("demo", demo_dir)


def run_demo(preset: str = "demo", out: str | Path = "runs/demo-mllm", demo_dir: str | Path = "runs/demo",
             split: str = "test", overrides: dict[str, Any] | None = None, reuse: bool = False,
             workers: int = 1) -> dict[str, Any]:
    """Run the preset and write the report, pictures and final models; returns the report.

    ``workers``: fine-tuning runs (tower x seed) trained at once, each in its own process on one thread
    (``make demo-mllm`` uses 2, one per core); 1 trains them one after another in this process.

    ``reuse``: keep the fine-tuned models already in ``out/work`` whose training settings, tower, seed,
    checkpoints and tokenizer are the ones asked for (e.g. a run evaluated on val, now on test); their
    recorded training times are reported. Default off: every run trains afresh."""
    s = resolve_settings(preset, overrides)
    out, demo_dir = Path(out), Path(demo_dir)
    ensure_demo(demo_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    data, work = demo_dir / "data", out / "work"
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
    train_data = build_records(data, "train", work / "data" / "train", s.n_train, seed=0, multi_turn=True,
                               ref_cls_share=s.ref_cls_share)
    eval_data = build_records(data, split, work / "data" / split, s.n_eval, seed=1000, tasks=("ref_cls",))
    train_records = json.loads(train_data.read_text())
    tokenizer = train_tokenizer(train_records, s.vocab_size)
    jobs = []
    for seed in s.seeds:
        lm_dir = write_language_model(tokenizer, s.lm, work / f"lm-seed{seed}", seed)  # one start for both towers
        jobs += [FinetuneJob(tower, seed, demo_dir, lm_dir, train_data, eval_data, work / f"{tower}-seed{seed}", split,
                             training_key(s, tower, seed, demo_dir, tokenizer), reuse) for tower in TOWERS]
    done = run_jobs(jobs, s, workers)
    per_seed: dict[str, list[dict[str, Any]]] = {t: [] for t in TOWERS}
    results = {}
    for job, (row, res, _) in zip(jobs, done):
        per_seed[job.tower].append(row)
        results[f"{job.tower}-seed{job.seed}"] = res
        logger.info("%s seed %d: %s", job.tower, job.seed, {k: row[k] for k in METRICS})
    reused = [(f"{j.tower}-seed{j.seed}", row["train_seconds"], row["train_cpu_seconds"])
              for j, (row, _, was_reused) in zip(jobs, done) if was_reused]
    rows = {t: summarise(t, per_seed[t]) for t in TOWERS}
    first = s.seeds[0]
    for tower in TOWERS:  # the final models: the first seed's
        save_final_model(work / f"{tower}-seed{first}" / "instruct", out / f"{tower}-llava")
    draw_predictions({t: work / f"{t}-seed{first}" / "eval" / "predictions.jsonl" for t in TOWERS},
                     data / f"instances_{split}.json", data / split / "images", out / "rec_examples.png")
    first_res = results[f"cloc-seed{first}"]
    report = {
        "preset": preset, "split": split, "settings": jsonable(dataclasses.asdict(s)),
        "vocab_size": len(tokenizer), "num_train_records": len(train_records),
        "num_rec": first_res["rec"]["splits"][split]["num_expressions"],
        "num_ref_cls": first_res["referring"]["ref_cls"]["num"],
        "rows": list(rows.values()), "per_seed": per_seed, "goals": goals(rows),
        "train_seconds": sum(r["train_seconds"] for t in TOWERS for r in per_seed[t]),
        "eval_seconds": sum(r["eval_seconds"] for t in TOWERS for r in per_seed[t]),
        "train_cpu_seconds": sum(r["train_cpu_seconds"] for t in TOWERS for r in per_seed[t]),
        "eval_cpu_seconds": sum(r["eval_cpu_seconds"] for t in TOWERS for r in per_seed[t]),
        "models": {t: str(out / f"{t}-llava") for t in TOWERS},
        "rec_details": {k: v["rec"]["splits"][split] for k, v in results.items()},
        "ref_cls_details": {k: v["referring"]["ref_cls"] for k, v in results.items()},
        "rec_distinct_answers": {k: distinct_rec_answers(work / k / "eval" / "predictions.jsonl") for k in results},
    }
    # reused runs trained in an earlier invocation: their recorded training time counts as this run's
    report["reused_runs"] = [name for name, _, _ in reused]
    report["total_seconds"] = time.perf_counter() - started + sum(w for _, w, _ in reused)
    # runs in worker processes: their CPU seconds are not this process's
    workers_cpu = sum(r["eval_cpu_seconds"] + (0.0 if was_reused else r["train_cpu_seconds"]) for r, _, was_reused in done)
    in_workers = workers > 1 and len(jobs) > 1
    report["total_cpu_seconds"] = (time.process_time() - cpu_started + sum(c for _, _, c in reused)
                                   + (workers_cpu if in_workers else 0.0))
    report["workers"] = min(workers, len(jobs))
    write_json_atomic(out / "report.json", jsonable(report))
    write_report(out, report)
    from model_cards import write_mllm_card

    write_mllm_card(report, out / "cloc-llava")
    shutil.rmtree(work / "data", ignore_errors=True)  # images and records are rebuilt from the shards each run
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloc_demo.demo_mllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--out", default="runs/demo-mllm")
    parser.add_argument("--demo-dir", default="runs/demo", help="`make demo`'s output (run first when missing)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="val: for choosing settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a setting, e.g. --set instruct_steps=800 --set 'seeds=[0]'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="fine-tuning runs at once, one process and thread each (default 1; `make demo-mllm`: 2)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep fine-tuned models in OUT/work trained with the same settings (evaluate them again)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: the value must be JSON (e.g. 800, 1e-3, [0, 1])")
    report = run_demo(args.preset, args.out, args.demo_dir, args.split, overrides, reuse=args.reuse,
                      workers=args.workers)
    print((Path(args.out) / "report.md").read_text())
    print(f"total {report['total_seconds']:.0f} s; report in {args.out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
