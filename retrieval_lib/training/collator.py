"""What a training step reads: seeds, hard negatives drawn per query, the collator that
tokenizes a batch (windows of long positives included), and the steps of an epoch."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch

from ..evaluation.windows import POSITIVE_WINDOWS, split_windows, window_tokens
from ..settings.config import TrainingConfig

__all__ = ["set_seed", "draw_negatives", "RetrievalCollator", "steps_per_epoch"]

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def draw_negatives(row: dict, positive: str, k: int, rng: random.Random,
                   fallback: Sequence[str]) -> tuple[list[str], str]:
    """``k`` negatives for one training record and how they were drawn: ``"hard"`` (``k`` of
    its hard negatives at random), ``"short"`` (fewer than ``k``: all of them, the rest drawn
    again with replacement) or ``"random"`` (none: ``k`` passages of ``fallback`` at random,
    never the positive). The retriever's and the reranker's batches draw them alike."""
    negatives = [n["text"] for n in row["negative_passages"]]
    if len(negatives) >= k:
        return rng.sample(negatives, k), "hard"
    if negatives:
        return negatives + rng.choices(negatives, k=k - len(negatives)), "short"
    pool = [t for t in rng.sample(list(fallback), min(len(fallback), k + 1)) if t != positive]
    return pool[:k], "random"


class RetrievalCollator:
    """Records -> one InfoNCE batch: N queries and N·(1+K) passages, per query
    ``[positive, K hard negatives]``.

    A query with more than K hard negatives gets K drawn at random each epoch; with fewer, its
    negatives are drawn with replacement; with none, K random passages of the training set are
    used. The last two cases are counted (``short_negatives``, ``random_negatives``).

    A positive longer than the model's window (:mod:`retrieval_lib.evaluation.windows`) is read as
    its first window (``positive_window="first"``: truncation), a window drawn at random each time
    (``"random"``), or the window the model being trained scores highest for the query
    (``"best"``, encoded without gradients); positives given another window than the first are
    counted (``windowed_positives``).
    """

    #: Counts kept across a resume (saved in every checkpoint).
    COUNTERS = ("short_negatives", "random_negatives", "windowed_positives", "tokens",
                "pad_tokens")

    def __init__(self, model, num_hard_negatives: int, fallback_passages: Sequence[str],
                 seed: int, pad_to_multiple_of: int | None = 8, positive_window: str = "first"):
        if positive_window not in POSITIVE_WINDOWS:
            raise ValueError(f"unknown positive_window {positive_window!r}; choose one of "
                             f"{', '.join(POSITIVE_WINDOWS)}")
        self.model = model
        self.k = num_hard_negatives
        self.fallback = list(fallback_passages)
        self.rng = random.Random(seed)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.positive_window = positive_window
        self._windows: dict[str, list[str]] = {}  # positive text -> its windows
        self.short_negatives = 0
        self.random_negatives = 0
        self.windowed_positives = 0
        self.tokens = 0  # attention-mask positions, padding included
        self.pad_tokens = 0

    def _windows_of(self, text: str) -> list[str]:
        if text not in self._windows:
            if len(self._windows) > self.model.TOKEN_CACHE_SIZE:  # bounded as its token cache
                self._windows.clear()
            self._windows[text] = split_windows(
                [text], self.model.tokenizer, window_tokens(self.model),
                self.model.passage_stride or None).texts
        return self._windows[text]

    def _choose_windows(self, queries: list[str], positives: list[str]) -> list[str]:
        """The window of each positive that this batch trains on."""
        if self.positive_window == "first":
            return positives
        windows = [self._windows_of(p) for p in positives]
        long = [i for i, w in enumerate(windows) if len(w) > 1]
        if not long:
            return positives
        chosen = list(positives)
        if self.positive_window == "random":
            picks = {i: self.rng.randrange(len(windows[i])) for i in long}
        else:  # best: the current model's highest-scoring window for the query
            q = self.model.encode_queries([queries[i] for i in long])
            flat = [w for i in long for w in windows[i]]
            p = self.model.encode_passages(flat)
            picks, start = {}, 0
            for row, i in enumerate(long):
                n = len(windows[i])
                picks[i] = int(np.argmax(p[start:start + n] @ q[row]))
                start += n
        for i, pick in picks.items():
            chosen[i] = windows[i][pick]
            self.windowed_positives += pick > 0
        return chosen

    @property
    def pad_fraction(self) -> float:
        """Share of the token positions of all batches so far that were padding."""
        return self.pad_tokens / self.tokens if self.tokens else 0.0

    def _tokenize(self, texts: list[str], tower: str) -> dict:
        enc = self.model.tokenize(texts, tower, pad_to_multiple_of=self.pad_to_multiple_of)
        mask = enc["attention_mask"]
        self.tokens += mask.numel()
        self.pad_tokens += int(mask.numel() - mask.sum())
        return enc

    def __call__(self, rows: list[dict]) -> dict:
        queries, passages, positives = [], [], []
        for row in rows:
            queries.append(row["query"])
            positive = self.rng.choice(row["positive_passages"])["text"]
            positives.append(len(passages))
            chosen, how = draw_negatives(row, positive, self.k, self.rng, self.fallback)
            self.short_negatives += how == "short"
            self.random_negatives += how == "random"
            passages.append(positive)
            passages.extend(chosen)
        windows = self._choose_windows(queries, [passages[i] for i in positives])
        for i, text in zip(positives, windows, strict=True):
            passages[i] = text
        return {"query_inputs": self._tokenize(queries, "query"),
                "passage_inputs": self._tokenize(passages, "passage")}


def steps_per_epoch(n_records: int, cfg: TrainingConfig, world: int = 1) -> int:
    """Optimizer steps of one epoch over ``n_records``: one per global batch of
    ``batch_size × world`` records (:class:`~retrieval_lib.training.batching.BucketBatchSampler`; a
    set smaller than one batch is one step on one process).

    >>> cfg = TrainingConfig(epochs=1, batch_size=16, learning_rate=1e-4)
    >>> steps_per_epoch(10_000, cfg), steps_per_epoch(10_000, cfg, world=2)
    (625, 312)
    """
    return max(n_records // (cfg.batch_size * world), 1 if n_records and world == 1 else 0)


