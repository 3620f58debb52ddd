"""Cross-rank gathering for the contrastive losses (open_clip's ``local_loss + gather_with_grad``).

Each rank computes logits of its own rows against the features of *all* ranks, which are gathered with
gradients; the number of regions differs per rank, so counts are gathered first and rows padded, then
trimmed. :class:`GatherCommunicator` plugs into :func:`cloc_hf.loss.cloc_losses`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sums every rank's gradient for this rank's rows.

    Written here (instead of ``torch.distributed.nn.all_gather``) so the backward is one ``all_reduce``,
    which every backend (gloo included) implements.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class GatherCommunicator:
    """Gathers with gradients across the default process group (any row counts per rank)."""

    def __init__(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GatherCommunicator needs an initialised torch.distributed process group")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def _counts(self, rows: int, device) -> list[int]:
        count = torch.tensor([rows], device=device, dtype=torch.long)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        return [int(c) for c in counts]

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        counts = self._counts(x.shape[0], x.device)
        longest = max(counts)
        padded = x
        if x.shape[0] < longest:
            padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])], dim=0)
        everything = _AllGatherWithGrad.apply(padded)
        rows = [everything[r * longest : r * longest + counts[r]] for r in range(self.world_size)]
        return torch.cat(rows, dim=0), sum(counts[: self.rank])

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        dist.all_reduce(x)
        return x


def make_communicator():
    """A :class:`GatherCommunicator` in a multi-process run, ``None`` (= local) otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GatherCommunicator()
    return None
