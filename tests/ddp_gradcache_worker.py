"""Worker for tests/test_distributed.py, launched by torchrun: GradCacheLoss with a token budget
on 2 processes whose batches differ in length. Step 1: rank 0's passages exceed the budget and
rank 1's fit, so both must chunk (DDP's hooks and the chunked step's own all-reduce cannot
mix); step 2: both fit, so neither chunks. Rank 0 saves each step's averaged gradients and
mean loss, and every rank's count of sub-batched steps. The helpers give the test its
single-process reference on the global batches."""

import sys

import torch
import torch.distributed as dist
from toy import FILLER, TOPICS, worker_model  # this folder is on sys.path

TAU = 0.05


def records():
    """The texts the worker model's tokenizer is trained on (every batch's)."""
    return [{"query": f"{a}{b}", "positive_passages": [{"text": text}]}
            for a, b in zip(TOPICS, TOPICS[1:], strict=False)
            for text in (f"{a}{b}", f"{a}{FILLER}{b}")]


def batch(rank: int, long: bool) -> tuple[list[str], list[str]]:
    """2 queries with 1 positive and 1 hard negative each (per-query layout); ``long``
    passages carry the filler, short ones are two topic words."""
    q = [f"{TOPICS[4 * rank + i]}{TOPICS[4 * rank + i + 1]}" for i in range(2)]
    words = [(TOPICS[4 * rank + i], TOPICS[4 * rank + i + 1]) for i in range(2)]
    if long:
        p = [t for a, b in words for t in (f"{a}{FILLER}{b}", f"{b}{FILLER}{a}")]
    else:
        p = [t for a, b in words for t in (f"{a}{b}", f"{b}{a}")]
    return q, p


def steps():
    """Per step, whether each rank's passages are long: mixed, then both short."""
    return [(True, False), (False, False)]


def main(out_file: str, budget: str) -> None:
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss
    from retrieval_lib.settings import distributed

    rank, world, _ = distributed.init_from_env()
    try:
        model = worker_model(records())
        net = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = GradCacheLoss(InfoNCELoss(TAU), token_budget=int(budget))
        saved = {"grads": [], "losses": []}
        counts = []
        for longs in steps():
            q, p = batch(rank, longs[rank])
            out = loss_fn(net, model.tokenize(q, "query"), model.tokenize(p, "passage"))
            if not out.backward_done:
                out.loss.backward()
            counts.append(loss_fn.sub_batched_steps)
            saved["grads"].append([t.grad.clone() for t in model.parameters()])
            mean = out.loss.detach().clone()  # each process's loss is its queries' mean
            dist.all_reduce(mean)
            saved["losses"].append(mean / world)
            model.zero_grad(set_to_none=True)
        everyone = [None] * world
        dist.all_gather_object(everyone, counts)
        if rank == 0:
            torch.save({**saved, "sub_batched_steps": everyone}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
