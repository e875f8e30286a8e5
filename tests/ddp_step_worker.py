"""Worker for tests/test_distributed.py, launched by torchrun: one DDP step of a small embedding
model with cross-device negatives; rank 0 saves the mean loss and the gradients. The helpers
also give the test its single-process reference on the global batch. With ``flagembedding``
the loss is FlagEmbedding's cross-device in-batch-negatives loss instead of the library's."""

import sys

import torch
import torch.distributed as dist

N, K, DIM, TAU = 3, 2, 8, 0.05  # local queries per process, hard negatives, width, temperature


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))


def embed(net, x):
    return torch.nn.functional.normalize(net(x), dim=-1)


def global_batch(world: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(world * N, DIM, generator=g),
            torch.randn(world * N * (1 + K), DIM, generator=g))


def flagembedding_loss(q, p):
    """FlagEmbedding 1.4's loss with ``negatives_cross_device`` (its model's encoder is not
    used here: the embeddings are given)."""
    from FlagEmbedding.finetune.embedder.decoder_only.base.modeling import (
        BiDecoderOnlyEmbedderModel,
    )

    flag = BiDecoderOnlyEmbedderModel(torch.nn.Identity(), negatives_cross_device=True,
                                      temperature=TAU)
    return flag._compute_cross_device_neg_loss(q, p)[1]


def main(out_file: str, loss_of: str = "library") -> None:
    from retrieval_lib.models import cross_device_info_nce
    from retrieval_lib.settings import distributed

    rank, world, _ = distributed.init_from_env()
    try:
        net = torch.nn.parallel.DistributedDataParallel(model())
        queries, passages = global_batch(world)
        q = queries[rank * N:(rank + 1) * N]  # the local share of the global batch
        p = passages[rank * N * (1 + K):(rank + 1) * N * (1 + K)]
        compute = flagembedding_loss if loss_of == "flagembedding" else (
            lambda q, p: cross_device_info_nce(q, p, TAU))
        loss = compute(embed(net, q), embed(net, p))
        loss.backward()  # DDP averages the parameter gradients over the processes
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"loss": mean_loss / world,
                        "grads": [p.grad for p in net.module.parameters()]}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
