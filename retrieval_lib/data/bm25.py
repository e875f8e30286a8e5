"""BM25, the lexical retriever: jieba tokens scored by ``bm25s``.

Shared by the demo corpus (its hard negatives), hard-negative mining and the baselines, so it
sits below all of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["tokenize_zh", "BM25Retriever"]

_KEEP = re.compile(r"\w", re.UNICODE)


def tokenize_zh(text: str) -> list[str]:
    """Segment Chinese text with jieba (precise mode), dropping punctuation and whitespace.

    Full-width ASCII (e.g. "１９９８") is folded to half-width first so that both spellings match.

    >>> tokenize_zh("北京举行新年音乐会！")
    ['北京', '举行', '新年', '音乐会']
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)
    text = text.translate(_FULLWIDTH)
    return [w.lower() for w in jieba.lcut(text) if _KEEP.search(w)]


_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}
_FULLWIDTH[0x3000] = 0x20


class BM25Retriever:
    """BM25 over a fixed corpus of texts; ``search`` returns ``(index, score)`` lists.

    Uses ``bm25s`` (Lucene's BM25 variant, k1=1.5, b=0.75) on jieba tokens.
    """

    def __init__(self, corpus: Sequence[str], k1: float = 1.5, b: float = 0.75,
                 show_progress: bool = False):
        import bm25s

        if not corpus:
            raise ValueError("BM25Retriever needs a non-empty corpus")
        self.corpus_size = len(corpus)
        self.show_progress = show_progress
        self._model = bm25s.BM25(k1=k1, b=b)
        tokens = [tokenize_zh(t) or ["<empty>"] for t in corpus]
        self._model.index(tokens, show_progress=show_progress)

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[tuple[int, float]]]:
        """Top-``k`` corpus indices with their BM25 scores for each query, best first.

        Ties in score are broken by corpus index so that results are deterministic.
        """
        k = min(k, self.corpus_size)
        query_tokens = [tokenize_zh(q) or ["<empty>"] for q in queries]
        ids, scores = self._model.retrieve(query_tokens, k=k, show_progress=self.show_progress,
                                           n_threads=1)
        results = []
        for row_ids, row_scores in zip(np.asarray(ids), np.asarray(scores), strict=True):
            order = sorted(range(len(row_ids)), key=lambda j: (-row_scores[j], row_ids[j]))
            results.append([(int(row_ids[j]), float(row_scores[j])) for j in order])
        return results

    def scores(self, query: str, indices: Sequence[int]) -> list[float]:
        """BM25 scores of ``query`` for the corpus texts ``indices``."""
        full = self._model.get_scores(tokenize_zh(query) or ["<empty>"])
        return [float(full[i]) for i in indices]
