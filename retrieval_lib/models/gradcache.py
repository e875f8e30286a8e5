"""Cached contrastive loss (GradCache, Gao et al. 2021): large InfoNCE batches in small memory.

InfoNCE couples every query with every passage of the batch, so the batch cannot simply be
split into gradient-accumulation pieces. GradCache splits the *computation* instead:

1. embed the queries and passages chunk by chunk **without** an autograd graph;
2. compute the loss on the full batch of (detached) embeddings and back-propagate it to the
   embeddings only, which gives ``∂L/∂e`` for every embedding;
3. embed each chunk again **with** a graph and back-propagate ``∂L/∂e`` through it
   (``(e · ∂L/∂e).sum().backward()``), accumulating the parameter gradients.

By the chain rule the parameter gradients equal those of the plain full-batch step; activation
memory is that of one chunk. The price is a second forward pass. The random state of each chunk
is replayed, so dropout draws the same masks in both passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .losses import InfoNCELoss, LossOutput

__all__ = ["split_inputs", "cached_contrastive_step", "GradCacheLoss"]


def split_inputs(inputs: dict[str, torch.Tensor], size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive slices of ``size`` rows of every tensor in ``inputs``."""
    rows = next(iter(inputs.values())).shape[0]
    for start in range(0, rows, size):
        yield {k: v[start:start + size] for k, v in inputs.items()}


def _rng_state(device: torch.device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_contrastive_step(model, query_inputs: dict, passage_inputs: dict,
                            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            chunk_size: int, autocast=None,
                            scale: Callable[[torch.Tensor], torch.Tensor] | None = None
                            ) -> torch.Tensor:
    """Accumulate into ``model``'s parameters the gradients of ``loss_fn(q, p)`` over the whole
    batch, embedding ``chunk_size`` texts at a time; returns the (detached) loss.

    ``model`` is a :class:`~retrieval_lib.models.retriever.DualTowerRetriever` (its ``embed``);
    ``autocast`` wraps every forward pass; ``scale`` (e.g. a GradScaler's ``scale``) is applied
    to the loss before its backward pass, so the replayed gradients carry the same scale.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    autocast = autocast or nullcontext()
    device = query_inputs["input_ids"].device
    jobs, parts = [], {"query": [], "passage": []}
    with torch.no_grad():
        for tower, inputs in (("query", query_inputs), ("passage", passage_inputs)):
            for chunk in split_inputs(inputs, chunk_size):
                state = _rng_state(device)
                with autocast:
                    parts[tower].append(model.embed(chunk["input_ids"], chunk["attention_mask"],
                                                    tower))
                jobs.append((tower, chunk, state))
    q = torch.cat(parts["query"]).detach().requires_grad_()
    p = torch.cat(parts["passage"]).detach().requires_grad_()
    loss = loss_fn(q, p)
    (scale(loss) if scale is not None else loss).backward()
    grads = {"query": q.grad.split(chunk_size), "passage": p.grad.split(chunk_size)}
    seen = {"query": 0, "passage": 0}
    after = _rng_state(device)
    for tower, chunk, state in jobs:
        _set_rng_state(state, device)
        with autocast:
            embedding = model.embed(chunk["input_ids"], chunk["attention_mask"], tower)
        (embedding * grads[tower][seen[tower]]).sum().backward()
        seen[tower] += 1
    _set_rng_state(after, device)
    return loss.detach()


class GradCacheLoss:
    """A loss (:class:`~retrieval_lib.models.losses.InfoNCELoss`) over the whole batch, embedded in
    chunks: the same loss and gradients in the memory of one chunk. Chunks hold
    ``chunk_size`` texts, or, with a ``token_budget``, as many texts as fit the budget at the
    batch's padded length, and only a batch whose passages exceed the budget is chunked
    (BGE-M3's sub-batches for long length groups; counted in ``sub_batched_steps``); a batch
    that fits takes the plain path. It has the call of every loss and accumulates the
    gradients itself when it chunks (``backward_done``); under DDP the processes agree on
    chunking or not (one all-reduce), and a chunked step averages the gradients over the
    processes, as DDP's own hooks do not see the chunked passes."""

    def __init__(self, inner: InfoNCELoss, chunk_size: int = 0, token_budget: int = 0):
        if chunk_size < 0 or token_budget < 0 or not (chunk_size or token_budget):
            raise ValueError(f"chunk_size or token_budget must be positive, got {chunk_size} "
                             f"and {token_budget}")
        self.inner, self.chunk_size, self.token_budget = inner, chunk_size, token_budget
        self.sub_batched_steps = 0

    def chunk_rows(self, passage_inputs: dict) -> int | None:
        """Texts per chunk for this batch, or None when it fits the token budget whole."""
        if self.chunk_size:
            return self.chunk_size
        rows, width = passage_inputs["input_ids"].shape
        if rows * width <= self.token_budget:
            return None
        return max(1, self.token_budget // max(width, 1))

    def __call__(self, model, query_inputs: dict, passage_inputs: dict, autocast=None,
                 scale=None) -> LossOutput:
        ddp = model if hasattr(model, "no_sync") else None
        module = getattr(model, "module", model)
        rows = self.chunk_rows(passage_inputs)
        together = ddp is not None and dist.is_initialized()
        if together and not self.chunk_size:  # every process chunks when one must
            flag = torch.tensor([float(rows is not None)], device=passage_inputs[
                "input_ids"].device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and rows is None:
                rows = passage_inputs["input_ids"].shape[0]
        if rows is None:
            return self.inner(model, query_inputs, passage_inputs, autocast=autocast,
                              scale=scale)
        self.sub_batched_steps += not self.chunk_size
        with ddp.no_sync() if ddp is not None else nullcontext():
            loss = cached_contrastive_step(module, query_inputs, passage_inputs,
                                           self.inner.scores_loss, rows, autocast, scale)
        if together:
            world = dist.get_world_size()
            for param in module.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= world
        return LossOutput(loss, backward_done=True)
