"""Check that the multi-process CLOC loss equals the single-process loss on the same global batch.

    python -m training.distributed_check --nproc 2

Spawns ``nproc`` gloo processes on this CPU. The global batch is split unevenly in regions (ranks
hold different numbers of regions, one image has none). Each rank runs the model on its share,
computes :meth:`CLOCModel.compute_loss` with the gathering communicator and backpropagates; gradients
are averaged across ranks as DDP does. The result is compared with one process computing the loss on
the whole batch. Prints the largest differences and exits non-zero above the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TERMS = ("loss", "loss_clip", "loss_region", "loss_grounding")


def _global_batch(batch_size: int, max_regions: int = 4, seed: int = 0) -> dict:
    from cloc_hf.prompts import padded_to_per_image

    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch_size, max_regions, 2, generator=gen) * 0.6
    wh = torch.rand(batch_size, max_regions, 2, generator=gen) * 0.3 + 0.05
    mask = torch.zeros(batch_size, max_regions, dtype=torch.bool)
    counts = torch.randint(0, max_regions + 1, (batch_size,), generator=gen)
    counts[0] = 0  # an image without regions
    counts[1] = max_regions
    for i, n in enumerate(counts.tolist()):
        mask[i, :n] = True
    ids = torch.randint(1, 400, (batch_size, 8), generator=gen)
    ids[:, -1] = 49407
    # a small phrase vocabulary, so duplicate phrases (false negatives) occur across ranks
    vocab = torch.randint(1, 400, (6, 5), generator=gen)
    vocab[:, -1] = 49407
    region_ids = vocab[torch.randint(0, 6, (batch_size, max_regions), generator=gen)]
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        # per-image region lists, the model's one form (row b keeps its first counts[b] regions)
        "region_boxes": padded_to_per_image(torch.cat([xy, xy + wh], dim=-1), mask),
        "region_input_ids": padded_to_per_image(region_ids, mask),
        "region_attention_mask": padded_to_per_image(torch.ones_like(region_ids), mask),
    }


def _model():
    import cloc_hf

    torch.manual_seed(0)
    # float64, so the comparison shows the algebra is exact rather than float32 summation-order noise
    return cloc_hf.create_model("cloc-tiny", point_prompt_loss=True).double()


def _loss_and_grads(model, batch, comm=None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.train()
    def double(t):
        return t.double() if t.is_floating_point() else t

    batch = {k: [double(t) for t in v] if isinstance(v, list) else double(v) for k, v in batch.items()}
    outputs = model(**batch, return_loss=False)
    losses = model.compute_loss(outputs, comm=comm)
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(losses[k].detach()) for k in TERMS}, grads


def _worker(rank: int, world: int, init_file: str, out_dir: str, batch_size: int) -> None:
    from training.distributed import GatherCommunicator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batch = _global_batch(batch_size)
    per = batch_size // world
    local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    comm = GatherCommunicator()
    model = _model()
    local_losses, grads = _loss_and_grads(model, local, comm)
    for name in sorted(grads):  # DDP: average gradients over ranks
        dist.all_reduce(grads[name])
        grads[name] /= world
    # logged value: mean of the ranks' losses
    mean_losses = {}
    for key, value in local_losses.items():
        t = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(t)
        mean_losses[key] = float(t) / world
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "grads.pt"))  # our own tensors, read back with weights_only=True
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump({"losses": mean_losses, "regions_per_rank": [sum(len(b) for b in local["region_boxes"])]}, f)
    dist.barrier()
    dist.destroy_process_group()


def run_check(nproc: int = 2, batch_size: int = 8) -> dict:
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} must be divisible by nproc {nproc}")
    batch = _global_batch(batch_size)
    single_losses, single_grads = _loss_and_grads(_model(), batch)
    per = batch_size // nproc
    regions = [sum(len(b) for b in batch["region_boxes"][r * per : (r + 1) * per]) for r in range(nproc)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(nproc, os.path.join(tmp, "init"), tmp, batch_size), nprocs=nproc, join=True)
        multi = json.load(open(os.path.join(tmp, "losses.json")))["losses"]
        multi_grads = torch.load(os.path.join(tmp, "grads.pt"), weights_only=True)
    loss_diff = {k: abs(single_losses[k] - multi[k]) for k in TERMS}
    grad_diff = max(float((single_grads[n] - multi_grads[n]).abs().max()) for n in single_grads)
    grad_scale = max(float(g.abs().max()) for g in single_grads.values())
    return {
        "nproc": nproc,
        "regions_per_rank": regions,
        "single_process": single_losses,
        "multi_process": multi,
        "max_abs_loss_diff": max(loss_diff.values()),
        "max_abs_grad_diff": grad_diff,
        "max_abs_grad": grad_scale,
        "same_parameters_with_grad": sorted(single_grads) == sorted(multi_grads),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--atol", type=float, default=1e-9)
    args = parser.parse_args(argv)
    result = run_check(args.nproc, args.batch_size)
    print(json.dumps(result, indent=1))
    ok = result["max_abs_loss_diff"] <= args.atol and result["max_abs_grad_diff"] <= args.atol
    ok = ok and result["same_parameters_with_grad"]
    print("equal to single-process" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
