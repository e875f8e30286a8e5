"""Cross-device negatives for multi-GPU training with DDP (``torchrun`` / ``accelerate launch``).

With W processes each holding a local batch of N queries and N·(1+K) passages, every query is
scored against the passages of *all* processes: the negative pool grows W-fold at no extra
memory for activations. :func:`gather_with_grad` all-gathers the passage embeddings; its
backward pass sums, over processes, the gradient each process's loss sends to every slice and
returns this process its own slice. DDP then averages parameter gradients over processes, so
the step equals the single-process step on the global batch of W·N queries:

    ∇θ (1/W) Σ_r L_r = ∇θ L_global,   L_r = mean over the local queries of rank r.

Local batches must have equal sizes (``drop_last=True``). The loss itself is
:func:`~retrieval_lib.models.losses.cross_device_info_nce`; without an initialised process group, or
with one process, it reduces to :func:`~retrieval_lib.models.losses.info_nce`.

:func:`init_from_env` joins the process group that ``torchrun`` describes in the environment
(NCCL on GPUs, gloo on CPUs); :func:`~retrieval_lib.training.loop.train_retriever` calls it, so the
same code trains on one device or many::

    torchrun --nproc_per_node 4 -m retrieval_lib.course.experiment --experiment minimind108_288k \\
        --preset full --data-dir /data/bge-m3-data
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "init_from_env", "is_main", "barrier", "finish", "main_first",
           "gather_with_grad"]

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; joins the process group ``torchrun`` set up in the
    environment (once), or ``(0, 1, 0)`` for a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not is_distributed():
        return 0, 1, 0
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only one)."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def finish() -> None:
    """Leave the process group together (a barrier, then ``destroy_process_group``): a process
    that exits with the group still up can abort inside gloo as its peers tear down, and its
    exit status is then non-zero although its work was done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` in the main process first (it fills caches), then in the others.

    Joins the process group ``torchrun`` describes first (:func:`init_from_env`): before it
    exists every process would count as the main one and all would write the same caches at
    once."""
    init_from_env()
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process's loss reaches every slice
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process, concatenated in rank order; gradients flow back to each."""
    return _GatherWithGrad.apply(x) if is_distributed() else x
