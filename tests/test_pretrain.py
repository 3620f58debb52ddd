import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cloc_data.format import Region, RegionSample
from cloc_data.loader import EpochBatchSampler, RegionTextCollator
from training.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from cloc_data.synthetic import SyntheticSceneConfig, write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(SyntheticSceneConfig(seed=3), out, n_train=96, n_val=16, n_test=16)
    return out


def _run(args, out_dir, extra_env=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "training.pretrain", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _args(data, out_dir, steps, **extra):
    settings = dict(train_data=str(data / "train"), output_dir=str(out_dir), steps=steps, batch_size=8,
                    arch="cloc-tiny", save_every=2, log_every=1, progress=False, seed=5, **extra)
    return [x for k, v in settings.items() for x in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


def test_config_load_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = 7\nobjective = "clip"\n[model_overrides]\nprojection_dim = 16\n')
    config = PretrainConfig.load(path, ["batch_size=3", 'model_overrides={"text_filter_threshold": null}',
                                        "model_overrides.prompter_config.pooling=all"])
    assert (config.steps, config.objective, config.batch_size, config.collator_regions) == (7, "clip", 3, 0)
    model_config = config.model_config()  # the file's override is kept: --set merges into it
    assert model_config.text_filter_threshold is None and model_config.projection_dim == 16
    assert model_config.prompter_config.pooling == "all"
    with pytest.raises(ValueError, match="unknown pretraining config fields"):
        PretrainConfig.load(None, ["stepz=3"])
    with pytest.raises(ValueError, match="objective"):
        PretrainConfig(objective="siglip")


def test_collator_samples_at_most_m_regions_deterministically():
    from PIL import Image

    from cloc_hf import CLOCProcessor

    regions = [Region((i, i, i + 10, i + 12), f"thing {i}") for i in range(7)]
    sample = RegionSample("k", "a caption", 64, 48, regions, image=Image.new("RGB", (64, 48)))
    collator = RegionTextCollator(CLOCProcessor.offline(size=32), max_regions=4, seed=1)
    a, b = collator([(3, sample)]), collator([(3, sample)])
    assert [t.shape for t in a["region_boxes"]] == [(4, 4)]  # per-image lists, the model's one form
    assert [len(t) for t in a["region_input_ids"]] == [len(t) for t in a["region_attention_mask"]] == [4]
    torch.testing.assert_close(a["region_boxes"], b["region_boxes"])
    collator.set_epoch(1)
    c = collator([(3, sample)])
    assert not torch.equal(a["region_boxes"][0], c["region_boxes"][0])  # a new epoch draws other regions
    # boxes come out in the model frame: pad mode puts the 64x48 image at y offset 8 of a 64 square
    collator.set_epoch(0)
    chosen = collator._sample_regions(3, sample)
    expected = torch.tensor([[r.box[0] / 64, (r.box[1] + 8) / 64, r.box[2] / 64, (r.box[3] + 8) / 64]
                             for r in (regions[i] for i in chosen)])
    torch.testing.assert_close(a["region_boxes"][0], expected)
    phrases = collator.processor.tokenizer.batch_decode(a["region_input_ids"][0], skip_special_tokens=True)
    assert [p.strip() for p in phrases] == [f"thing {i}" for i in chosen]


def test_batch_sampler_shards_the_global_batch():
    single = list(EpochBatchSampler(40, 8, seed=2))
    ranks = [list(EpochBatchSampler(40, 4, seed=2, rank=r, world_size=2)) for r in range(2)]
    for step, batch in enumerate(single):
        assert batch == ranks[0][step] + ranks[1][step]
    resumed = EpochBatchSampler(40, 8, seed=2)
    resumed.set_epoch(0, skip_batches=3)
    assert list(resumed) == single[3:]


def test_cloc_and_clip_pretraining_save_loadable_models(synthetic_data, tmp_path):
    from transformers import AutoModel, AutoProcessor

    import cloc_hf  # noqa: F401  (registers the Auto classes)

    for objective in ("cloc", "clip"):
        out = tmp_path / objective
        proc = _run(_args(synthetic_data, out, 3, objective=objective), out)
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-3000:]
        records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
        assert ("loss_region" in records[-1]) == (objective == "cloc")
        model = AutoModel.from_pretrained(out)
        processor = AutoProcessor.from_pretrained(out)
        assert type(model).__name__ == "CLOCModel" and processor.image_processor.size == 32


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(synthetic_data, tmp_path):
    steps = 24
    straight = tmp_path / "straight"
    proc = _run(_args(synthetic_data, straight, steps), straight)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]

    killed = tmp_path / "killed"
    proc = _run(_args(synthetic_data, killed, steps), killed)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "checkpoint-6").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before SIGKILL: nothing was tested"
    resumed = _run([*_args(synthetic_data, killed, steps), "--resume"], killed)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_loss_and_gradients_equal_single_process():
    from training.distributed_check import run_check

    result = run_check(nproc=2, batch_size=8)
    assert result["regions_per_rank"][0] != result["regions_per_rank"][1]
    assert result["same_parameters_with_grad"]
    assert result["max_abs_loss_diff"] < 1e-9
    assert result["max_abs_grad_diff"] < 1e-9


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_with_deepspeed_zero2(synthetic_data, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training.pretrain",
           *_args(synthetic_data, out, 2, deepspeed=str(ROOT / "training/configs/ds_zero2.json"))]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (out / "checkpoints" / "checkpoint-2").exists() is False  # the last step saves the final model
    assert (out / "model.safetensors").exists()


def test_continued_pretraining_from_a_converted_checkpoint(synthetic_data, tmp_path):
    """init_from loads a CLOC checkpoint (e.g. `cloc-convert` output) and its processor, then trains on."""
    import cloc_hf
    from training.pretrain import Trainer

    torch.manual_seed(11)
    source = cloc_hf.create_model("cloc-tiny", projection_dim=24)
    source.save_pretrained(tmp_path / "src")
    cloc_hf.CLOCProcessor.offline(size=32).save_pretrained(tmp_path / "src")
    config = PretrainConfig(init_from=str(tmp_path / "src"), train_data=str(synthetic_data / "train"), steps=2,
                            batch_size=8, output_dir=str(tmp_path / "out"), progress=False,
                            model_overrides={"text_filter_threshold": None})
    trainer = Trainer(config)
    start = trainer.unwrapped.state_dict()
    for name, value in source.state_dict().items():
        torch.testing.assert_close(start[name], value, msg=name)
    assert trainer.unwrapped.config.projection_dim == 24 and trainer.unwrapped.config.text_filter_threshold is None
    trainer.train()
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not torch.equal(trained["visual_projection.weight"], source.visual_projection.weight)


def test_streaming_dataset_shards_across_ranks_and_resumes(synthetic_data):
    from cloc_data.loader import StreamingRegionTextDataset
    from cloc_hf import CLOCProcessor

    path = synthetic_data / "train"
    single = StreamingRegionTextDataset(path, shuffle_buffer=16, seed=3)
    items = list(single)
    assert len(items) == 96 and len({s.key for _, s in items}) == 96
    assert [s.key for _, s in items] == [s.key for _, s in StreamingRegionTextDataset(path, shuffle_buffer=16, seed=3)]
    resumed = StreamingRegionTextDataset(path, shuffle_buffer=16, seed=3)
    resumed.set_epoch(0, skip=40)
    assert [s.key for _, s in resumed] == [s.key for _, s in items[40:]]
    batch = RegionTextCollator(CLOCProcessor.offline(size=32))(items[:4])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and any(len(b) for b in batch["region_boxes"])
    with pytest.raises(ValueError, match="cannot be split over 2 ranks"):
        StreamingRegionTextDataset(path, rank=1, world_size=2)


def test_streaming_pretraining_runs(synthetic_data, tmp_path):
    out = tmp_path / "stream"
    proc = _run(_args(synthetic_data, out, 2, streaming=True), out)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
