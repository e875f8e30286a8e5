r"""BGE-M3-style multi-functionality: sparse (lexical) and multi-vector (ColBERT) scores beside
the dense one, the unified loss with self-knowledge distillation, and retrieval with each score.

For a text with token states ``h_t`` (padding and special tokens left out):

* sparse: token weights ``w_t = ReLU(W_lex·h_t)``, the max over repeats of a token; the score
  of a query and a passage is ``Σ_{tokens in both} w_q(t)·w_p(t)``;
* multi-vector: ``v_t = normalize(W_mul·h_t)``; the score is the mean over query tokens of their
  best cosine with a passage token (late interaction);
* hybrid: ``s_inter = w1·s_dense + w2·s_sparse + w3·s_multi``, by default w = (1, 0.3, 1).

The unified loss (BGE-M3, Chen et al. 2024, section 3.2) on one batch, every score matrix laid
out as InfoNCE expects (:mod:`retrieval_lib.models.losses`), with ``CE`` the InfoNCE cross-entropy
of scores divided by τ::

    L  = (λ1·CE(s_dense) + λ2·CE(s_sparse) + λ3·CE(s_multi) + CE(s_inter)) / 4
    L' = (λ1·KL'(s_dense) + λ2·KL'(s_sparse) + λ3·KL'(s_multi)) / 3,
         KL'(s) = −Σ_j softmax(s_inter/τ)_j · log softmax(s/τ)_j   (teacher detached)
    L_final = (L + L') / 2,    λ = (1, 0.1, 1) by default.

At evaluation the dense score searches the whole corpus and the sparse, multi-vector and hybrid
scores rerank its top k, as the BGE-M3 paper does for long documents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.metrics import score_run
from ..evaluation.search import exact_search, qrels_for_split, run_from_search
from .losses import LossOutput, positive_columns

__all__ = ["SCORE_WEIGHTS", "LOSS_WEIGHTS", "MODES", "M3Heads", "sparse_scores",
           "colbert_scores", "lexical_score", "colbert_score", "unified_loss", "UnifiedM3Loss",
           "evaluate_reranked", "evaluate_m3"]

#: w in s_inter = w1·s_dense + w2·s_sparse + w3·s_multi (BGE-M3's defaults).
SCORE_WEIGHTS = (1.0, 0.3, 1.0)
#: λ of the unified loss for dense, sparse and multi-vector (BGE-M3's defaults).
LOSS_WEIGHTS = (1.0, 0.1, 1.0)
#: Retrieval modes: dense search, and the other scores reranking its top k.
MODES = ("dense", "sparse", "colbert", "hybrid")


class M3Heads(nn.Module):
    """The sparse head ``W_lex`` (hidden → 1) and the multi-vector head ``W_mul`` (hidden →
    ``colbert_dim``), shared by the query and passage towers."""

    def __init__(self, hidden_size: int, colbert_dim: int, special_token_ids: Sequence[int],
                 skip_first_token: bool = False):
        super().__init__()
        self.sparse_linear = nn.Linear(hidden_size, 1)
        self.colbert_linear = nn.Linear(hidden_size, colbert_dim)
        self.special_token_ids = sorted({int(t) for t in special_token_ids})
        # with CLS pooling the first state is the dense vector, as in BGE-M3
        self.skip_first_token = skip_first_token

    def token_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that count: not padding, not a special token (nor CLS when it is the
        dense vector)."""
        mask = attention_mask.bool()
        if self.special_token_ids:
            special = torch.tensor(self.special_token_ids, device=input_ids.device)
            mask = mask & ~torch.isin(input_ids, special)
        if self.skip_first_token:
            mask = mask.clone()
            mask[:, 0] = False
        return mask

    def sparse(self, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
               vocab_size: int) -> torch.Tensor:
        """``(B, vocab)`` token weights: ReLU(W_lex·h), the max over repeats, 0 elsewhere."""
        weights = torch.relu(self.sparse_linear(hidden).squeeze(-1).float()) * mask
        out = torch.zeros(hidden.shape[0], vocab_size, device=hidden.device,
                          dtype=weights.dtype)
        return out.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)

    def colbert(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, colbert_dim)`` unit token vectors; positions outside ``mask`` are 0."""
        vectors = F.normalize(self.colbert_linear(hidden).float(), dim=-1)
        return vectors * mask.unsqueeze(-1)


def sparse_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` lexical scores of vocabulary-sized weight vectors: Σ_t w_q(t)·w_p(t).

    >>> q = torch.tensor([[0.0, 0.5, 0.2, 0.0]]); p = torch.tensor([[0.0, 0.0, 0.4, 1.0]])
    >>> round(sparse_scores(q, p).item(), 6)  # only token 2 is shared: 0.2 · 0.4
    0.08
    """
    return q @ p.T


def colbert_scores(q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor,
                   p_mask: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` late-interaction scores: for each query token its best passage token, then
    the mean over the query's tokens. A passage without tokens scores 0.

    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]); p = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    >>> ones = torch.ones(1, 2, dtype=torch.bool)
    >>> round(colbert_scores(q, ones, p, ones).item(), 6)  # (1 + 0.8) / 2
    0.9
    """
    sim = torch.einsum("itd,jsd->ijts", q, p)
    sim = sim.masked_fill(~p_mask.bool()[None, :, None, :], float("-inf"))
    best = sim.max(dim=-1).values
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    qm = q_mask.to(best.dtype)[:, None, :]
    return (best * qm).sum(-1) / qm.sum(-1).clamp(min=1.0)


def lexical_score(query: dict, passage: dict) -> float:
    """:func:`sparse_scores` for one pair of ``{token id: weight}`` dicts.

    >>> round(lexical_score({1: 0.5, 2: 0.2}, {2: 0.4, 3: 1.0}), 6)
    0.08
    """
    return float(sum(w * passage[t] for t, w in query.items() if t in passage))


def colbert_score(query: np.ndarray, passage: np.ndarray) -> float:
    """:func:`colbert_scores` for one pair of ``(tokens, dim)`` arrays.

    >>> colbert_score(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.6, 0.8]]))
    0.9

    A text with no token vectors matches nothing: the score is 0.
    """
    if len(query) == 0 or len(passage) == 0:
        return 0.0
    return float((query @ passage.T).max(axis=1).mean())


def unified_loss(s_dense: torch.Tensor, s_sparse: torch.Tensor, s_multi: torch.Tensor,
                 temperature: float, score_weights: Sequence[float] = SCORE_WEIGHTS,
                 loss_weights: Sequence[float] = LOSS_WEIGHTS) -> tuple[torch.Tensor, dict]:
    """``L_final = (L + L')/2`` of the module docstring, and its parts (floats) for logging."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = [s.float() / temperature for s in (s_dense, s_sparse, s_multi)]
    w, lam = score_weights, loss_weights
    inter = sum(wk * s for wk, s in zip(w, scores, strict=True))
    labels = positive_columns(*s_dense.shape).to(s_dense.device)
    ce = [F.cross_entropy(s, labels) for s in scores]
    ce_inter = F.cross_entropy(inter, labels)
    loss = (sum(lk * c for lk, c in zip(lam, ce, strict=True)) + ce_inter) / 4
    teacher = torch.softmax(inter.detach(), dim=-1)
    distil = [-(teacher * torch.log_softmax(s, dim=-1)).sum(-1).mean() for s in scores]
    loss_distil = sum(lk * d for lk, d in zip(lam, distil, strict=True)) / 3
    parts = {"dense": ce[0].item(), "sparse": ce[1].item(), "multi": ce[2].item(),
             "inter": ce_inter.item(), "distil": loss_distil.item()}
    return (loss + loss_distil) / 2, parts


class UnifiedM3Loss:
    """The unified loss as a training loss, with the call of every loss
    (:class:`retrieval_lib.models.losses.InfoNCELoss`): one encoder pass per tower gives the dense,
    sparse and multi-vector representations (under ``autocast``); the three score matrices and
    the loss are computed in float32. One process, no GradCache."""

    def __init__(self, temperature: float, score_weights: Sequence[float] = SCORE_WEIGHTS,
                 loss_weights: Sequence[float] = LOSS_WEIGHTS):
        self.temperature, self.score_weights, self.loss_weights = (
            temperature, tuple(score_weights), tuple(loss_weights))

    def __call__(self, model, query_inputs: dict, passage_inputs: dict, autocast=None,
                 scale=None) -> LossOutput:
        model = getattr(model, "module", model)  # the retriever inside a wrapper
        with autocast or nullcontext():
            q = model.embed_m3(query_inputs["input_ids"], query_inputs["attention_mask"],
                               "query")
            p = model.embed_m3(passage_inputs["input_ids"], passage_inputs["attention_mask"],
                               "passage")
        q, p = ({k: v.float() if v.is_floating_point() else v for k, v in x.items()}
                for x in (q, p))
        loss, parts = unified_loss(
            q["dense"] @ p["dense"].T, sparse_scores(q["sparse"], p["sparse"]),
            colbert_scores(q["colbert"], q["colbert_mask"], p["colbert"], p["colbert_mask"]),
            self.temperature, self.score_weights, self.loss_weights)
        return LossOutput(loss, parts)


def evaluate_reranked(encode_queries: Callable[[list[str]], dict],
                      encode_passages: Callable[[list[str]], dict], split,
                      ks: Sequence[int] = (5, 10, 100), top_k: int = 100,
                      modes: Sequence[str] = MODES,
                      weights: Sequence[float] = SCORE_WEIGHTS) -> dict[str, dict]:
    """Any M3-style model on a split. ``encode_*`` return ``dense`` (N x D, unit rows) and, when
    a mode other than dense is asked for, ``sparse`` (per text ``{token id: weight}``) and
    ``colbert`` (per text a ``(tokens, dim)`` array). Dense searches the whole corpus (exact
    inner product); sparse, ColBERT and hybrid rerank the dense top k. Returns a
    :func:`~retrieval_lib.evaluation.metrics.score_run` result per mode."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    query_ids, queries, qrels, corpus = qrels_for_split(split)
    q, p = encode_queries(queries), encode_passages(corpus)
    scores, indices = exact_search(q["dense"], p["dense"], top_k)
    doc_ids = [f"d{j}" for j in range(len(corpus))]
    results = {}
    if "dense" in modes:
        results["dense"] = score_run(qrels, run_from_search(query_ids, doc_ids, scores, indices),
                                     ks)
    if any(m != "dense" for m in modes):
        runs = {m: {} for m in ("sparse", "colbert", "hybrid")}
        for qi, qid in enumerate(query_ids):
            for m in runs:
                runs[m][qid] = {}
            for dense, j in zip(scores[qi], indices[qi], strict=True):
                if j < 0:
                    continue
                s = lexical_score(q["sparse"][qi], p["sparse"][j])
                c = colbert_score(q["colbert"][qi], p["colbert"][j])
                runs["sparse"][qid][doc_ids[j]] = s
                runs["colbert"][qid][doc_ids[j]] = c
                runs["hybrid"][qid][doc_ids[j]] = (weights[0] * float(dense) + weights[1] * s
                                                   + weights[2] * c)
        results.update({m: score_run(qrels, runs[m], ks) for m in runs if m in modes})
    for result in results.values():
        result["corpus_size"] = len(corpus)
    return results


def evaluate_m3(model, split, ks: Sequence[int] = (5, 10, 100), top_k: int = 100,
                modes: Sequence[str] = MODES, weights: Sequence[float] = SCORE_WEIGHTS,
                batch_size: int = 32) -> dict[str, dict]:
    """A :class:`~retrieval_lib.models.retriever.DualTowerRetriever` with M3 heads on a split, every
    mode (see :func:`evaluate_reranked`)."""
    return evaluate_reranked(lambda texts: model.encode_m3(texts, "query", batch_size),
                             lambda texts: model.encode_m3(texts, "passage", batch_size),
                             split, ks, top_k, modes, weights)
