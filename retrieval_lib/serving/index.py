"""Search at scale: a faiss index over an encoded corpus, saved with its id mapping.

``PassageIndex.build(embeddings, ids, kind)`` makes an inner-product index over L2-normalised
passage embeddings (so scores are cosine similarities):

* ``"flat"`` (default): exact search, ``IndexFlatIP``; what the evaluation uses;
* ``"hnsw"``: a navigable small-world graph (``IndexHNSWFlat``), sub-linear search for millions
  of passages, no training; ``ef_search`` trades speed for recall;
* ``"ivf"``: inverted lists over k-means cells (``IndexIVFFlat``), trained on the corpus;
  ``nprobe`` cells are searched per query.

Long documents (:mod:`retrieval_lib.evaluation.windows`): :meth:`PassageIndex.encode` indexes each
window of a document that is longer than the model's window as its own row, with the document it
belongs to; ``search`` then returns documents, each once, scored by its best window (MaxP).

``save(folder)`` writes ``index.faiss`` and ``ids.json`` (the row ids in index order, the
documents of windowed rows, the kind, its settings, the dimension and the count);
``load(folder)`` checks that they agree.
``recall_against_exact`` reports how much of the exact top-k an approximate index finds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..evaluation.windows import split_windows, window_tokens
from ..settings.saved_folder import (
    atomic_folder,
    restore_interrupted,
    verify_checksums,
    write_checksums,
)

__all__ = ["INDEX_KINDS", "PassageIndex", "recall_against_exact"]

INDEX_KINDS = ("flat", "hnsw", "ivf")


def _as_matrix(embeddings, what: str) -> np.ndarray:
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2 or not len(matrix):
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValueError(f"{what} row {bad} holds NaN or inf")
    return matrix


class PassageIndex:
    """A faiss inner-product index and the passage ids of its rows; with ``documents``, row
    i is a window of document ``documents[i]`` and search returns documents (MaxP)."""

    def __init__(self, index, ids: Sequence[str], kind: str, settings: dict,
                 documents: Sequence[str] | None = None):
        ids = list(ids)
        if len(set(ids)) != len(ids):
            seen: set = set()
            repeated = next(i for i in ids if i in seen or seen.add(i))
            raise ValueError(f"passage ids must be unique; {len(ids) - len(set(ids))} repeat "
                             f"(first: {repeated!r})")
        if documents is not None:
            documents = [str(d) for d in documents]
            if len(documents) != len(ids):
                raise ValueError(f"{len(documents)} documents for {len(ids)} rows")
        self.index, self.ids, self.kind, self.settings = index, ids, kind, dict(settings)
        self.documents = documents

    @classmethod
    def build(cls, embeddings, ids: Sequence[str], kind: str = "flat", hnsw_m: int = 32,
              ef_construction: int = 200, ef_search: int = 128, nlist: int | None = None,
              nprobe: int = 16, documents: Sequence[str] | None = None) -> PassageIndex:
        """Index ``embeddings`` (one row per passage, row i has id ``ids[i]``; with
        ``documents``, row i is a window of document ``documents[i]``)."""
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        matrix = _as_matrix(embeddings, "embeddings")
        ids = [str(i) for i in ids]
        if len(ids) != len(matrix):
            raise ValueError(f"{len(ids)} ids for {len(matrix)} embeddings")
        dim = matrix.shape[1]
        if kind == "flat":
            index, settings = faiss.IndexFlatIP(dim), {}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            settings = {"hnsw_m": hnsw_m, "ef_construction": ef_construction,
                        "ef_search": ef_search}
        else:
            nlist = nlist or max(1, min(len(matrix) // 39, int(4 * math.sqrt(len(matrix)))))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(matrix)
            index.nprobe = min(nprobe, nlist)
            settings = {"nlist": nlist, "nprobe": index.nprobe}
        index.add(matrix)
        return cls(index, ids, kind, settings, documents)

    @classmethod
    def encode(cls, model, texts: Sequence[str], ids: Sequence[str], kind: str = "flat",
               batch_size: int = 32, **settings) -> PassageIndex:
        """Encode ``texts`` (document ``ids[i]`` is ``texts[i]``) with ``model`` and index
        them as :meth:`build` does. A model whose ``passage_aggregation`` is ``max`` indexes
        every window of a document longer than its window (``passage_stride`` apart; rows
        ``<id>#<n>``) and search returns documents by their best window; ``first`` indexes
        the truncated text. ``sum`` cannot be served from a top-k index and is refused."""
        ids = [str(i) for i in ids]
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        how = getattr(model, "passage_aggregation", "first")
        if how == "first":
            return cls.build(model.encode_passages(list(texts), batch_size=batch_size), ids,
                             kind, **settings)
        if how != "max":
            raise ValueError(f"an index returns documents by their best window (max) or their "
                             f"first (first); passage_aggregation {how!r} needs every window "
                             f"score: use evaluation.evaluate_retriever")
        windows = split_windows(list(texts), model.tokenizer, window_tokens(model),
                                getattr(model, "passage_stride", None))
        counts = np.bincount(windows.owners)
        rows, seen = [], np.zeros(len(ids), dtype=np.int64)
        for owner in windows.owners:
            rows.append(ids[owner] if counts[owner] == 1 else f"{ids[owner]}#{seen[owner]}")
            seen[owner] += 1
        return cls.build(model.encode_passages(windows.texts, batch_size=batch_size), rows,
                         kind, documents=[ids[o] for o in windows.owners], **settings)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids per query and their scores (``-inf`` where fewer were found): passage
        ids, or for a windowed index document ids, each once, scored by its best window."""
        matrix = _as_matrix(queries, "queries")
        if self.documents is None:
            scores, rows = self.index.search(matrix, min(k, len(self)))
            hits = [[self.ids[j] for j in row if j >= 0] for row in rows]
            return hits, np.where(rows >= 0, scores, -np.inf)
        return self._search_documents(matrix, k)

    def _search_documents(self, matrix: np.ndarray, k: int):
        """Windows in score order, each document kept at its first (best) window; more windows
        are fetched until every query has ``k`` documents or the index is exhausted."""
        k = min(k, len(set(self.documents)))
        fetch = min(len(self), 4 * k)
        while True:
            scores, rows = self.index.search(matrix, fetch)
            found = []
            for row_s, row_r in zip(scores, rows, strict=True):
                best: dict[str, float] = {}
                for s, r in zip(row_s, row_r, strict=True):
                    if r >= 0 and self.documents[r] not in best:
                        best[self.documents[r]] = float(s)
                        if len(best) == k:
                            break
                found.append(best)
            if fetch >= len(self) or all(len(b) == k for b in found):
                break
            fetch = min(len(self), 2 * fetch)
        out = np.full((len(matrix), k), -np.inf, dtype=np.float32)
        for i, best in enumerate(found):
            out[i, :len(best)] = list(best.values())
        return [list(b) for b in found], out

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``index.faiss``, ``ids.json`` and ``checksums.json`` as ``folder``, whole or
        not at all (a failed save leaves the previous index there); a ``folder`` holding anything
        but an earlier saved index is refused unless ``overwrite``."""
        import faiss

        with atomic_folder(folder, ("index.faiss", "ids.json"), overwrite) as out:
            faiss.write_index(self.index, str(out / "index.faiss"))
            meta = {"kind": self.kind, "settings": self.settings, "dim": self.index.d,
                    "count": len(self), "ids": self.ids, "documents": self.documents}
            (out / "ids.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            write_checksums(out)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> PassageIndex:
        """Read an index saved by :meth:`save`: its files must match their checksums (a
        :class:`CheckpointError` names the one that does not), the ids be unique and as many
        as the index's rows."""
        import faiss

        folder = Path(folder)
        restore_interrupted(folder)
        for name in ("index.faiss", "ids.json"):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} is missing: not a saved PassageIndex")
        verify_checksums(folder)
        try:
            meta = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{folder / 'ids.json'}: not valid JSON ({exc})") from None
        missing = [k for k in ("kind", "settings", "dim", "count", "ids")
                   if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ValueError(f"{folder / 'ids.json'}: no field {', '.join(missing)}: not written "
                             f"by PassageIndex.save; build the index and save it again")
        try:
            index = faiss.read_index(str(folder / "index.faiss"))
        except RuntimeError as exc:  # faiss names no file
            raise ValueError(f"{folder / 'index.faiss'}: not a readable faiss index "
                             f"({str(exc).splitlines()[0][:200]}); cut or damaged, build the "
                             f"index and save it again") from None
        if index.ntotal != len(meta["ids"]) or index.ntotal != meta["count"]:
            raise ValueError(f"{folder / 'ids.json'}: {len(meta['ids'])} ids (count "
                             f"{meta['count']}) for an index of {index.ntotal} vectors")
        if index.d != meta["dim"]:
            raise ValueError(f"{folder / 'ids.json'}: dimension {meta['dim']}, index has "
                             f"{index.d}")
        if meta["kind"] == "hnsw":
            index.hnsw.efSearch = meta["settings"]["ef_search"]
        elif meta["kind"] == "ivf":
            index.nprobe = meta["settings"]["nprobe"]
        documents = meta.get("documents")
        if documents is not None and len(documents) != len(meta["ids"]):
            raise ValueError(f"{folder / 'ids.json'}: {len(documents)} documents for "
                             f"{len(meta['ids'])} rows")
        return cls(index, meta["ids"], meta["kind"], meta["settings"], documents)


def recall_against_exact(index: PassageIndex, exact: PassageIndex, queries, k: int = 10) -> float:
    """Mean over queries of the share of the exact top-``k`` that ``index`` also returns."""
    found, _ = index.search(queries, k)
    truth, _ = exact.search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth,
                                                                        strict=True)]))
