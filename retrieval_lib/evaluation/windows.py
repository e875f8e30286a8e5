"""Documents longer than the model's window: overlapping passage windows and their aggregation.

A retriever reads at most ``max_passage_length`` tokens of a passage. **FirstP** (the default,
what truncation does) scores a document by its first window only; **MaxP** splits it into
overlapping token windows, embeds each, and scores the document by its best window; **SumP**
by the sum over its windows (Dai & Callan, 2019, "Deeper Text Understanding for IR with
Contextual Neural Language Modeling", name the three).

* :func:`split_windows` cuts texts into windows of ``size`` tokens every ``stride`` tokens
  (the last window ends at the text's end), returned as text spans (character offsets of the
  tokenizer), so every encoder, cache and index works on them as on any passage;
* :func:`aggregate_scores` turns query × window scores into query × document scores;
* :func:`search_documents` is exact search over windows with the aggregation, top-k documents;
* :func:`window_table`: per source, how many passages are longer than the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AGGREGATIONS", "POSITIVE_WINDOWS", "Windows", "window_tokens", "window_stride",
           "split_windows", "aggregate_scores", "search_documents", "window_table"]

#: How a document's score is made from its windows' scores.
AGGREGATIONS = ("first", "max", "sum")

#: Which window of a long positive a training step reads (:class:`~retrieval_lib.training.
#: RetrievalCollator`): the first (truncation), one at random, or the current model's best.
POSITIVE_WINDOWS = ("first", "random", "best")


def window_tokens(model) -> int:
    """Text tokens that fit in one window of ``model`` (a retriever): its
    ``max_passage_length`` less the special tokens its tokenizer adds and the EOS that
    last-token pooling appends."""
    tok = model.tokenizer
    special = tok.num_special_tokens_to_add(pair=False)
    eos = 1 if model.pooling == "last_token" else 0
    size = model.max_passage_length - special - eos
    if size < 1:
        raise ValueError(f"max_passage_length {model.max_passage_length} leaves no room for text")
    return size


@dataclass(frozen=True)
class Windows:
    """Windows of a list of documents: ``texts[i]`` is a window of document ``owners[i]``;
    the windows of one document are consecutive and in reading order."""

    texts: list[str]
    owners: np.ndarray  # (windows,) int, non-decreasing, every document at least once
    size: int
    stride: int

    @property
    def documents(self) -> int:
        return int(self.owners[-1]) + 1 if len(self.owners) else 0

    def split_documents(self) -> int:
        """Documents that needed more than one window."""
        return int((np.bincount(self.owners) > 1).sum())


def window_stride(size: int, stride: int | None = None) -> int:
    """Tokens between window starts: ``stride``, or by default half a window (each token is
    then read in two windows)."""
    return stride or max(1, size // 2)


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Start tokens of the windows of an ``n``-token text: every ``stride`` tokens, and one
    more ending at the last token if the regular ones stop short of it."""
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


def split_windows(texts: Sequence[str], tokenizer, size: int, stride: int | None = None
                  ) -> Windows:
    """Cut each text into windows of ``size`` tokens starting every ``stride`` tokens (default
    ``size // 2``: each token is in two windows), as character spans of the text from the
    tokenizer's offsets (needs a fast tokenizer). A text of at most ``size`` tokens is one
    window, itself."""
    stride = window_stride(size, stride)
    if size < 1 or stride < 1 or stride > size:
        raise ValueError(f"window size {size} and stride {stride}: need 1 <= stride <= size")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("passage windows need a fast tokenizer (character offsets)")
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out, owners = [], []
    for doc, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"], strict=True)):
        if len(offsets) <= size:
            out.append(text)
            owners.append(doc)
            continue
        for start in _starts(len(offsets), size, stride):
            end = min(start + size, len(offsets)) - 1
            out.append(text[offsets[start][0]:offsets[end][1]])
            owners.append(doc)
    return Windows(out, np.asarray(owners, dtype=np.int64), size, stride)


def aggregate_scores(scores: np.ndarray, owners: np.ndarray, how: str) -> np.ndarray:
    """Document scores ``(queries, documents)`` from window scores ``(queries, windows)``:
    the first window's (``first``), the best window's (``max``) or the sum (``sum``)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")
    owners = np.asarray(owners)
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    if len(starts) != owners[-1] + 1 or np.any(np.diff(owners) < 0):
        raise ValueError("window owners must be consecutive documents 0, 1, ... in order")
    if how == "first":
        return scores[:, starts]
    reduce = np.maximum if how == "max" else np.add
    return reduce.reduceat(scores, starts, axis=1)


def search_documents(query_embeddings: np.ndarray, window_embeddings: np.ndarray,
                     owners: np.ndarray, how: str, k: int, block: int = 1 << 26
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` documents per query by aggregated window scores: ``(scores, indices)``
    shaped like faiss's, best first. Queries go in blocks of about ``block`` scores."""
    q = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    w = np.ascontiguousarray(window_embeddings, dtype=np.float32)
    n_docs = int(owners[-1]) + 1
    k = min(k, n_docs)
    rows = max(1, block // max(len(w), 1))
    top_s = np.empty((len(q), k), dtype=np.float32)
    top_i = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), rows):
        docs = aggregate_scores(q[start:start + rows] @ w.T, owners, how)
        part = np.argpartition(-docs, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(docs, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        top_i[start:start + rows] = np.take_along_axis(part, order, axis=1)
        top_s[start:start + rows] = np.take_along_axis(part_s, order, axis=1)
    return top_s, top_i


def window_table(lengths: dict[str, dict[str, list[int]]], size: int, stride: int | None = None):
    """Per source (``lengths`` as :func:`retrieval_lib.data.statistics.collect_lengths` counts
    tokens): the passages, the share longer than a window of ``size`` text tokens (FirstP reads only
    their beginning), the share of all their tokens that FirstP never reads, and the windows
    MaxP encodes per passage (mean and max) at ``stride`` (default half a window)."""
    import pandas as pd

    stride = window_stride(size, stride)
    rows = []
    for source, by_kind in lengths.items():
        n = np.asarray(by_kind["passage"])
        if not len(n):
            continue
        count = np.array([len(_starts(int(x), size, stride)) for x in n])
        rows.append({"source": source, "passages": len(n), "longer_than_window": (n > size).mean(),
                     "unread_token_share": np.maximum(n - size, 0).sum() / max(n.sum(), 1),
                     "windows_mean": count.mean(), "windows_max": int(count.max())})
    return pd.DataFrame(rows).set_index("source")
