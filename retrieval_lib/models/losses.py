r"""InfoNCE over in-batch and hard negatives, and its analytic gradients.

A batch holds N queries ``q`` (N, d) and N·(1+K) passages ``p`` laid out per query as
``[positive_i, negative_i1, …, negative_iK]``. Every passage of the batch is a candidate for
every query; the label of query i is its own positive, at column ``i·(1+K)``. With cosine
similarities ``s_ij = q_i·p_j`` (unit vectors) and temperature τ:

    L = -1/N Σ_i log( exp(s_i⁺/τ) / Σ_j exp(s_ij/τ) )

and with ``P_ij = softmax_j(s_ij/τ)`` the gradients with respect to the similarities are

    ∂L/∂s_i⁺ = (P_i⁺ − 1) / (N·τ)        ∂L/∂s_ij = P_ij / (N·τ)  for every other j.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..settings.distributed import gather_with_grad, is_distributed

__all__ = ["positive_columns", "similarity_matrix", "info_nce", "cross_device_info_nce",
           "normalisation_backward", "info_nce_embedding_gradients",
           "LossOutput", "InfoNCELoss", "info_nce_score_gradients", "autograd_score_gradients",
           "random_batch", "optimise_embeddings"]


def positive_columns(num_queries: int, num_passages: int) -> torch.Tensor:
    """Column of each query's positive: ``i·(1+K)`` where ``num_passages = N·(1+K)``."""
    if num_queries <= 0 or num_passages % num_queries:
        raise ValueError(f"{num_passages} passages do not divide into {num_queries} groups of "
                         f"[positive, negatives…]")
    return torch.arange(num_queries) * (num_passages // num_queries)


def similarity_matrix(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``s = q·pᵀ`` (N, N·(1+K)); the cosine similarity when both are L2-normalised."""
    return q @ p.T


def _scaled_scores(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s/τ``, in at least float32 (half-precision logits would lose the softmax's tail)."""
    return _scaled_scores_from(similarity_matrix(q, p), temperature)


def _scaled_scores_from(s: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    return s / temperature


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float, first_query: int = 0,
             total_queries: int | None = None) -> torch.Tensor:
    """Mean InfoNCE loss over the queries of the batch (see the module docstring).

    ``q`` may be a slice of a larger batch whose passages are all in ``p`` (the queries
    ``first_query …`` of ``total_queries``, as under torchrun); their positives are found in
    that batch's layout.

    >>> q = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(info_nce(q, p, 1.0).item(), 6)  # log(1 + e^-1)
    0.313262
    """
    scores = _scaled_scores(q, p, temperature)
    n = q.shape[0]
    columns = positive_columns(total_queries or n, p.shape[0])[first_query:first_query + n]
    return F.cross_entropy(scores, columns.to(scores.device))


def cross_device_info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of the local queries against the passages of every process (under torchrun;
    in one process, :func:`info_nce`). Gradients reach every process's passages."""
    if not is_distributed():
        return info_nce(q, p, temperature)
    n, world = q.shape[0], dist.get_world_size()
    return info_nce(q, gather_with_grad(p), temperature, first_query=dist.get_rank() * n,
                    total_queries=n * world)


@dataclass
class LossOutput:
    """What a training loss returns: the loss, its parts for logging, and whether the
    gradients are already accumulated (GradCache runs its own backward passes)."""

    loss: torch.Tensor
    parts: dict[str, float] | None = None
    backward_done: bool = False


class InfoNCELoss:
    """InfoNCE over in-batch and hard negatives as a training loss.

    Every training loss has this call: ``loss(model, query_inputs, passage_inputs,
    autocast=None, scale=None) -> LossOutput``, where ``model`` is the retriever (possibly
    wrapped in DDP), ``autocast`` wraps the encoder passes and ``scale`` (a GradScaler's) is
    for losses that run their own backward. The others:
    :class:`retrieval_lib.models.m3.UnifiedM3Loss` and
    :class:`retrieval_lib.models.gradcache.GradCacheLoss`. The scores and the loss are computed in
    float32 outside autocast; under torchrun every query meets the passages of all processes.
    """

    def __init__(self, temperature: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def scores_loss(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The loss of given embeddings (what GradCache differentiates)."""
        return cross_device_info_nce(q, p, self.temperature)

    def __call__(self, model, query_inputs: dict, passage_inputs: dict, autocast=None,
                 scale=None) -> LossOutput:
        with autocast or nullcontext():
            q, p = model(query_inputs, passage_inputs)
        return LossOutput(self.scores_loss(q, p))


def info_nce_score_gradients(q: torch.Tensor, p: torch.Tensor, temperature: float
                             ) -> torch.Tensor:
    """Analytic ``∂L/∂s`` (N, N·(1+K)): ``P/(N·τ)``, minus ``1/(N·τ)`` at each positive."""
    n = q.shape[0]
    probs = torch.softmax(_scaled_scores(q, p, temperature), dim=1)
    grad = probs / (n * temperature)
    cols = positive_columns(n, p.shape[0]).to(grad.device)
    grad[torch.arange(n, device=grad.device), cols] -= 1.0 / (n * temperature)
    return grad


def normalisation_backward(u: torch.Tensor, grad_unit: torch.Tensor) -> torch.Tensor:
    """Chain rule through L2 normalisation, row by row: for ``û = u/‖u‖``,
    ``∂L/∂u = (I − û ûᵀ) ∂L/∂û / ‖u‖`` (the part along ``û`` is removed: scaling a vector does
    not change its direction)."""
    norm = u.norm(dim=-1, keepdim=True)
    unit = u / norm
    return (grad_unit - (grad_unit * unit).sum(-1, keepdim=True) * unit) / norm


def info_nce_embedding_gradients(u_q: torch.Tensor, u_p: torch.Tensor, temperature: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic ``∂L/∂u_q`` and ``∂L/∂u_p`` for the vectors *before* the retriever's L2
    normalisation (the projection's outputs): ``∂L/∂q̂ = G p̂``, ``∂L/∂p̂ = Gᵀ q̂`` with
    ``G = ∂L/∂s`` (:func:`info_nce_score_gradients`), then :func:`normalisation_backward`."""
    q, p = F.normalize(u_q, dim=-1), F.normalize(u_p, dim=-1)
    grad = info_nce_score_gradients(q, p, temperature)
    return normalisation_backward(u_q, grad @ p), normalisation_backward(u_p, grad.T @ q)


def autograd_score_gradients(q: torch.Tensor, p: torch.Tensor, temperature: float
                             ) -> torch.Tensor:
    """``∂L/∂s`` by automatic differentiation of :func:`info_nce` (to check the analytic one)."""
    s = similarity_matrix(q.detach(), p.detach()).requires_grad_(True)
    labels = positive_columns(q.shape[0], p.shape[0]).to(s.device)
    F.cross_entropy(_scaled_scores_from(s, temperature), labels).backward()
    return s.grad


def random_batch(num_queries: int, num_hard_negatives: int, dim: int, seed: int,
                 positive_noise: float | None = None, hard_negative_noise: float | None = None,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm ``q`` (N, d) and ``p`` (N·(1+K), d) in the per-query layout.

    By default every vector is independent. With ``positive_noise`` / ``hard_negative_noise``
    the positive / hard negatives of query i are ``normalize(q_i + noise·u)`` with ``u`` a random
    unit vector (cosine to the query about ``1/sqrt(1+noise²)``), so a smaller noise puts them
    closer to their query, as real positives and hard negatives are.
    """
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_queries, dim, generator=g, dtype=dtype), dim=-1)
    p = torch.randn(num_queries, 1 + num_hard_negatives, dim, generator=g, dtype=dtype)
    for col, noise in ((slice(0, 1), positive_noise), (slice(1, None), hard_negative_noise)):
        if noise is not None:
            p[:, col] = q[:, None, :] + noise * F.normalize(p[:, col], dim=-1)
    return q, F.normalize(p.reshape(-1, dim), dim=-1)


def optimise_embeddings(q: torch.Tensor, p: torch.Tensor, temperature: float, steps: int = 20,
                        lr: float = 0.5) -> list[dict]:
    """Gradient descent on the embeddings themselves (kept on the unit sphere).

    A measured version of the seed report's "optimisation table": returns, per step, the loss,
    the mean positive similarity and the mean negative similarity (in-batch and hard negatives).
    """
    q = q.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    cols = positive_columns(q.shape[0], p.shape[0])
    history = []
    for step in range(steps + 1):
        qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
        loss = info_nce(qn, pn, temperature)
        with torch.no_grad():
            s = similarity_matrix(qn, pn)
            pos_mask = torch.zeros_like(s, dtype=torch.bool)
            pos_mask[torch.arange(s.shape[0]), cols] = True
            history.append({"step": step, "loss": loss.item(),
                            "mean_positive_similarity": s[pos_mask].mean().item(),
                            "mean_negative_similarity": s[~pos_mask].mean().item()})
        if step == steps:
            break
        loss.backward()
        with torch.no_grad():
            q -= lr * q.grad
            p -= lr * p.grad
            q.grad = None
            p.grad = None
    return history
