"""Cross-encoder rerankers: the second stage of two-stage retrieval.

A bi-encoder (the dual-tower retriever, or BM25) scores a query against every document of the
corpus with one vector or term list per text, so the documents are encoded once, ahead of
time. A cross-encoder reads the query and the document together, every layer attending across
both, and gives the pair one score: far too slow for a whole corpus, affordable for the first
stage's top k of each query. Why compute again after the bi-encoder: the bi-encoder must squeeze
a document into one vector before it has seen the query; the cross-encoder need not.

The reranker is a ``transformers`` ``AutoModelForSequenceClassification`` with one label:

* built from the same base LMs as the retrievers (:meth:`CrossEncoderReranker.from_base`): a
  MiniMind checkpoint (converted to Llama, :mod:`retrieval_lib.models.minimind`) becomes
  ``LlamaForSequenceClassification``, Qwen2 ``Qwen2ForSequenceClassification``; the score is a
  bias-free linear map of the last token that is not padding. Their tokenizers add no special
  tokens, so pairs are written ``query EOS passage EOS``
  (:func:`~retrieval_lib.data.tokenizer.with_eos_template`);
* or a published reranker (:data:`PUBLISHED_RERANKER`, ``BAAI/bge-reranker-v2-m3``, an
  ``XLMRobertaForSequenceClassification``: ``<s> query </s></s> passage </s>``, a dense + tanh +
  linear head on ``<s>``), loaded from a local folder or the hub as FlagEmbedding's
  ``FlagReranker`` does, its score the raw logit (``normalize=False``).

Pairs are tokenized as sentence-transformers' ``CrossEncoder`` does (``longest_first``
truncation to ``max_length``), so a folder written by :meth:`CrossEncoderReranker.save` loads
in ``CrossEncoder`` with the same scores
(:func:`retrieval_lib.serving.export.export_cross_encoder`).

Training (:func:`train_reranker`) is listwise, as FlagEmbedding's reranker and
sentence-transformers' cross-encoder losses train: per query a group of its positive and
``num_negatives`` hard negatives (drawn as the retrievers draw theirs,
:func:`~retrieval_lib.training.collator.draw_negatives`), softmax cross-entropy with the positive as
the target (:func:`listwise_loss`). Evaluation (:func:`rerank_run`) reorders each query's top
k of a first-stage run; the documents below k follow in their first-stage order, so reranking
never drops a document the first stage found.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenizer import load_pretrained_tokenizer, with_eos_template
from ..evaluation.metrics import rank_documents, score_run
from ..evaluation.search import qrels_for_split
from ..models.base import (
    autocast_for,
    choose_precision,
    dtype_kwarg,
    hf_config_from_shape,
)
from ..models.checkpoints import resolve_base_model
from ..settings.checkpoint import CheckpointError
from ..settings.config import ModelConfig, RerankerConfig
from ..settings.runlock import writes_run_folder
from ..settings.saved_folder import (
    atomic_folder,
    restore_interrupted,
    unreadable_files,
    verify_checksums,
    write_checksums,
)
from ..training.collator import draw_negatives, set_seed
from ..training.loop import VALIDATION_METRIC
from ..training.optim import (
    enable_checkpointing,
    make_optimizer,
    mixed_precision,
    optimizer_step,
    training_device,
)
from ..training.resume import data_fingerprint
from .baselines import bm25_run
from .runs import write_json_files

__all__ = ["PUBLISHED_RERANKER", "pair_tokens", "CrossEncoderReranker", "RandomScores",
           "listwise_loss",
           "RerankCollator", "rerank_run", "rerank_split", "train_reranker",
           "reranker_is_trained", "load_trained"]

logger = logging.getLogger(__name__)

#: The published reranker the full preset compares with (FlagEmbedding, XLM-R, 568M).
PUBLISHED_RERANKER = "BAAI/bge-reranker-v2-m3"


def pair_tokens(tokenizer, queries: Sequence[str], passages: Sequence[str],
                max_length: int) -> dict:
    """``(query, passage)`` pairs as sentence-transformers' ``CrossEncoder`` tokenizes them:
    the tokenizer's pair template, ``longest_first`` truncation to ``max_length``, padding to
    the longest pair; torch tensors."""
    return tokenizer(list(queries), list(passages), padding=True, truncation="longest_first",
                     max_length=max_length, return_tensors="pt")


class CrossEncoderReranker(nn.Module):
    """A sequence classifier with one label that scores (query, passage) pairs.

    ``model`` is an ``AutoModelForSequenceClassification`` (``num_labels=1``), ``tokenizer``
    its fast tokenizer; ``max_length`` caps the tokens of a pair, separators included."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 512):
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a reranker scores with one label; this model has "
                             f"{model.config.num_labels}")
        if tokenizer.pad_token is None:  # MiniMind's published tokenizer has none
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        if model.config.pad_token_id is None:  # decoder classifiers find the last token by it
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        #: precision of :meth:`score` (:func:`~retrieval_lib.models.base.choose_precision`)
        self.precision = "auto"

    @staticmethod
    def _pair_tokenizer(tokenizer):
        """Decoder tokenizers (no special tokens for a pair) get ``a EOS b EOS``."""
        if tokenizer.num_special_tokens_to_add(pair=True) == 0:
            return with_eos_template(tokenizer)
        return tokenizer

    @classmethod
    def from_base(cls, cfg: ModelConfig, tokenizer=None, pretrained: bool = True,
                  max_length: int = 512, seed: int | None = None) -> CrossEncoderReranker:
        """A reranker on the base LM of ``cfg``: its pretrained weights (MiniMind checkpoints
        converted as for the retrievers) and a new score head (random, drawn after
        ``torch.manual_seed(seed)`` when a seed is given), or a fresh model of the
        configured shape (``pretrained=False``: tests; needs ``tokenizer``)."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        if pretrained:
            path, _ = resolve_base_model(cfg.base_model)
            if seed is not None:  # the new head's initial weights
                torch.manual_seed(seed)
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its load report: "score.weight newly initialized"
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, trust_remote_code=cfg.trust_remote_code,
                    **dtype_kwarg(torch.float32))
            finally:
                hf_logging.set_verbosity(level)
            if tokenizer is None:
                tokenizer = load_pretrained_tokenizer(path, cfg.trust_remote_code)
        else:
            if tokenizer is None:
                raise ValueError("a reranker built from a config needs a tokenizer")
            hf = hf_config_from_shape(cfg)
            hf.num_labels = 1
            hf.pad_token_id = tokenizer.pad_token_id
            if seed is not None:
                torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(hf)
        return cls(model, cls._pair_tokenizer(tokenizer), max_length)

    # -- scoring ---------------------------------------------------------------------------------

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict:
        """Pairs as sentence-transformers' ``CrossEncoder`` tokenizes them."""
        return pair_tokens(self.tokenizer, queries, passages, self.max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The score (logit) of each pair, shape ``(pairs,)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits[:, 0]

    @torch.no_grad()
    def score(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32
              ) -> np.ndarray:
        """Scores of the pairs ``(queries[i], passages[i])``, float32; longest pairs batched
        together (less padding)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        out = np.zeros(len(queries), dtype=np.float32)
        device = next(self.parameters()).device
        order = sorted(range(len(queries)), key=lambda i: -len(queries[i]) - len(passages[i]))
        was_training = self.training
        self.eval()
        try:
            with autocast_for(device, choose_precision(device, self.precision)[0]):
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    enc = self.tokenize([queries[i] for i in idx], [passages[i] for i in idx])
                    logits = self(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                    out[idx] = logits.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the classifier and tokenizer (``save_pretrained``, safetensors),
        ``reranker_config.json`` and ``checksums.json``; written whole or not at all. A ``path``
        that holds anything but an earlier saved reranker is refused unless ``overwrite``."""
        path = Path(path)
        with atomic_folder(path, ("reranker_config.json",), overwrite) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / "reranker_config.json").write_text(
                json.dumps({"max_length": self.max_length}, indent=2), encoding="utf-8")
            write_checksums(tmp)
        return path

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu", max_length: int | None = None,
             trust_remote_code: bool = False) -> CrossEncoderReranker:
        """A reranker saved by :meth:`save` (checked against its ``checksums.json``) or a
        published one (a hub id or a local folder, e.g. :data:`PUBLISHED_RERANKER`).
        ``max_length``: the saved one, else 512 (FlagReranker's default; said in a warning
        for a local folder without ``reranker_config.json``). A cut weights or tokenizer file
        is named (:class:`CheckpointError`), checksums or not."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path)
        restore_interrupted(folder)
        if (folder / "checksums.json").exists() or (folder / "reranker_config.json").exists():
            verify_checksums(folder)  # a folder :meth:`save` wrote (a missing manifest: warned)
        saved = folder / "reranker_config.json"
        if max_length is None and saved.exists():
            try:
                max_length = int(json.loads(saved.read_text(encoding="utf-8"))["max_length"])
            except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
                raise CheckpointError(f"{saved}: unreadable ({type(exc).__name__}: {exc}); "
                                      f"save the reranker again") from None
        elif max_length is None:
            max_length = 512
            if folder.is_dir():  # a local folder: it may have been trained with another cut
                message = (f"{folder} has no reranker_config.json: scoring with max_length "
                           f"512 (FlagReranker's default), which may not be the length it was "
                           f"trained with; pass max_length to choose")
                logger.warning(message)
                warnings.warn(message, stacklevel=2)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), trust_remote_code=trust_remote_code, **dtype_kwarg(torch.float32))
            tokenizer = AutoTokenizer.from_pretrained(str(path),
                                                      trust_remote_code=trust_remote_code)
        except Exception as exc:  # transformers and tokenizers name no file for a cut one
            faults = unreadable_files(folder)
            if faults:
                raise CheckpointError(f"cannot load the reranker {path}: "
                                      f"{'; '.join(faults)}") from exc
            raise
        return cls(model, tokenizer, max_length).to(device)


class RandomScores:
    """The reference a trained reranker must beat: a score drawn uniformly at random for each
    pair (seeded), i.e. the first stage's top k shuffled."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def score(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32
              ) -> np.ndarray:
        return self.rng.random(len(passages)).astype(np.float32)


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each row of ``scores`` ``(queries, 1 + negatives)``, the
    positive in column 0: the mean over queries of ``-log softmax(row)[0]`` (in float32)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


class RerankCollator:
    """Records -> one listwise batch: per query the pairs ``(query, positive)`` and ``(query,
    negative)`` for ``k`` negatives, in groups of ``1 + k`` rows. Negatives are drawn as the
    retrievers draw them (:func:`~retrieval_lib.training.collator.draw_negatives`); records with too
    few or no hard negatives are counted (``short_negatives``, ``random_negatives``)."""

    def __init__(self, reranker: CrossEncoderReranker, k: int, fallback: Sequence[str],
                 seed: int):
        self.reranker, self.k, self.fallback = reranker, k, list(fallback)
        self.rng = random.Random(seed)
        self.short_negatives = self.random_negatives = 0

    def __call__(self, rows: list[dict]) -> dict:
        queries, passages = [], []
        for row in rows:
            positive = self.rng.choice(row["positive_passages"])["text"]
            negatives, how = draw_negatives(row, positive, self.k, self.rng, self.fallback)
            self.short_negatives += how == "short"
            self.random_negatives += how == "random"
            group = [positive, *negatives]
            queries += [row["query"]] * len(group)
            passages += group
        return dict(self.reranker.tokenize(queries, passages))


# ---------------------------------------------------------------------------------------------
# Reranking a first-stage run.
# ---------------------------------------------------------------------------------------------

def rerank_run(reranker: CrossEncoderReranker, queries: Mapping[str, str],
               documents: Mapping[str, str], run: Mapping[str, Mapping[str, float]],
               top_k: int, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """``run`` with each query's first ``top_k`` documents (in
    :func:`~retrieval_lib.evaluation.metrics.rank_documents` order) reordered by the reranker's
    scores; the documents below ``top_k`` follow, in their first-stage order, scored below every
    reranked one. Every document of ``run`` stays in the result."""
    heads = {qid: rank_documents(scores)[:top_k] for qid, scores in run.items()}
    pairs = [(qid, doc) for qid, head in heads.items() for doc in head]
    scores = reranker.score([queries[q] for q, _ in pairs], [documents[d] for _, d in pairs],
                            batch_size)
    new: dict[str, dict[str, float]] = {qid: {} for qid in run}
    for (qid, doc), s in zip(pairs, scores, strict=True):
        new[qid][doc] = float(s)
    for qid, scores_of in run.items():
        tail = rank_documents(scores_of)[top_k:]
        floor = min(new[qid].values(), default=0.0) - 1.0
        for i, doc in enumerate(tail):
            new[qid][doc] = floor - i
    return new


def rerank_split(reranker: CrossEncoderReranker, split, run: Mapping[str, Mapping[str, float]],
                 top_k: int, ks: Sequence[int] = (5, 10, 100), batch_size: int = 32) -> dict:
    """A first-stage ``run`` over ``split`` (queries and documents numbered as
    :func:`~retrieval_lib.evaluation.search.qrels_for_split` numbers them) reranked and scored:
    :func:`~retrieval_lib.evaluation.metrics.score_run`'s result plus ``run`` (the reranked run),
    ``top_k`` and ``pairs`` (pairs scored)."""
    query_ids, queries, qrels, corpus = qrels_for_split(split)
    reranked = rerank_run(reranker, dict(zip(query_ids, queries, strict=True)),
                          {f"d{j}": text for j, text in enumerate(corpus)}, run, top_k,
                          batch_size)
    pairs = sum(min(top_k, len(s)) for s in run.values())
    return {**score_run(qrels, reranked, ks), "run": reranked, "top_k": top_k,
            "pairs": pairs, "corpus_size": len(corpus)}


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------

def _fingerprint(cfg: RerankerConfig, base: str, train) -> dict:
    return {"reranker": asdict(cfg), "base_model": base, "train_records": len(train),
            "train_data": data_fingerprint(train)}


def reranker_is_trained(out_dir: str | Path, cfg: RerankerConfig, base: str, train) -> bool:
    """True when ``out_dir`` holds a finished training of this reranker: its ``best`` model,
    and a ``config.json`` with these settings, base model and training records."""
    out = Path(out_dir)
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return ((out / "history.json").exists() and (out / "best" / "checksums.json").exists()
            and saved == json.loads(json.dumps(_fingerprint(cfg, base, train))))


@writes_run_folder("reranker training")
def train_reranker(reranker: CrossEncoderReranker, train, validation, cfg: RerankerConfig,
                   out_dir: str | Path, base: str = "", device=None,
                   show_progress: bool = False) -> dict:
    """Train ``reranker`` listwise on the records of ``train`` (query, positive and hard
    negative passages); after every epoch, rerank BM25's top ``cfg.top_k`` of ``validation``
    and keep the weights of the best validation NDCG@10 (stopping after
    ``cfg.early_stopping_patience`` epochs without improvement).

    A non-finite loss stops the training (FloatingPointError) in fp32 and bf16; under fp16 the
    GradScaler skips that step (counted in ``skipped_steps``).

    Writes ``out_dir/best`` (:meth:`CrossEncoderReranker.save`), ``history.json`` (loss per
    step, validation per epoch, best epoch, negatives counts, precision, wall time) and, last,
    ``config.json`` (the settings, ``base`` and the training data's fingerprint, which
    :func:`reranker_is_trained` compares). Returns the history."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # written last: marks a finished training
    set_seed(cfg.seed)
    device = training_device(device)
    reranker.to(device).train()
    autocast, scaler, precision, why = mixed_precision(device, cfg.precision)
    if cfg.gradient_checkpointing:
        enable_checkpointing(reranker.model)
    fallback = [p["text"] for r in train for p in r["positive_passages"]]
    collator = RerankCollator(reranker, cfg.num_negatives, fallback, cfg.seed)
    per_epoch = max(len(train) // cfg.batch_size, 1)
    optimizer = make_optimizer(reranker, cfg)
    schedule = get_linear_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * per_epoch * cfg.epochs), per_epoch * cfg.epochs)
    _, val_run, _ = bm25_run(validation, cfg.top_k)
    history = {"precision": precision, "precision_reason": why, "steps": [], "epochs": [],
               "first_stage": "bm25", "validation_metric": VALIDATION_METRIC,
               "group_size": 1 + cfg.num_negatives, "skipped_steps": []}
    rng = random.Random(cfg.seed)
    best, best_state, stale, start = -1.0, None, 0, time.perf_counter()
    rows = list(train)
    for epoch in range(1, cfg.epochs + 1):
        order = list(range(len(rows)))
        rng.shuffle(order)
        losses = []
        for step in tqdm(range(per_epoch), disable=not show_progress, desc=f"epoch {epoch}"):
            batch = collator([rows[i] for i in order[step * cfg.batch_size:
                                                     (step + 1) * cfg.batch_size]])
            with autocast:
                scores = reranker(batch["input_ids"].to(device),
                                  batch["attention_mask"].to(device))
            loss = listwise_loss(scores.view(-1, 1 + cfg.num_negatives))
            finite = bool(torch.isfinite(loss))
            if not finite and scaler is None:
                raise FloatingPointError(
                    f"reranker loss is {loss.item()} at step {step + 1} of epoch {epoch}; "
                    f"lower RerankerConfig.learning_rate (now {cfg.learning_rate:g})")
            (scaler.scale(loss) if scaler is not None else loss).backward()
            # a non-finite fp16 step: the scaler skips it and backs its scale off
            optimizer_step(reranker, optimizer, schedule, scaler, cfg.max_grad_norm)
            if not finite:
                history["skipped_steps"].append({"epoch": epoch, "step": step + 1})
                continue
            losses.append(loss.item())
            history["steps"].append({"epoch": epoch, "loss": losses[-1]})
        val = rerank_split(reranker, validation, val_run, cfg.top_k)["aggregate"]
        value = val[VALIDATION_METRIC]["mean"]
        history["epochs"].append({"epoch": epoch,
                                  "loss": float(np.mean(losses)) if losses else None,
                                  f"val_{VALIDATION_METRIC}": value,
                                  "val_mrr": val["mrr"]["mean"]})
        if value > best:
            best, stale = value, 0
            best_state = {k: v.detach().cpu().clone() for k, v in
                          reranker.state_dict().items()}
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                break
    reranker.load_state_dict(best_state)
    history.update(short_negatives=collator.short_negatives,
                   random_negatives=collator.random_negatives,
                   wall_time_s=time.perf_counter() - start)
    reranker.save(out / "best")
    write_json_files(out, {"history.json": history,
                           "config.json": _fingerprint(cfg, base, train)})
    return history


def load_trained(out_dir: str | Path, device=None) -> tuple[CrossEncoderReranker, dict]:
    """The best reranker of a finished :func:`train_reranker` and its history."""
    out = Path(out_dir)
    try:
        history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{out / 'history.json'}: cannot be read ({type(exc).__name__}: "
                              f"{exc}); train the reranker again") from None
    return CrossEncoderReranker.load(str(out / "best"), training_device(device)), history

