"""Search at scale: a faiss index over an encoded corpus, saved with its id mapping.

``PassageIndex.build(embeddings, ids, kind)`` makes an inner-product index over L2-normalised
passage embeddings (so scores are cosine similarities):

* ``"flat"`` (default): exact search, ``IndexFlatIP``; what the evaluation uses;
* ``"hnsw"``: a navigable small-world graph (``IndexHNSWFlat``), sub-linear search for millions
  of passages, no training; ``ef_search`` trades speed for recall;
* ``"ivf"``: inverted lists over k-means cells (``IndexIVFFlat``), trained on the corpus;
  ``nprobe`` cells are searched per query.

``save(folder)`` writes ``index.faiss`` and ``ids.json`` (the passage ids in index order, the
kind, its settings, the dimension and the count); ``load(folder)`` checks that they agree.
``recall_against_exact`` reports how much of the exact top-k an approximate index finds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .checkpoint import atomic_folder, verify_checksums, write_checksums

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
    """A faiss inner-product index and the passage ids of its rows."""

    def __init__(self, index, ids: Sequence[str], kind: str, settings: dict):
        ids = list(ids)
        if len(set(ids)) != len(ids):
            seen: set = set()
            repeated = next(i for i in ids if i in seen or seen.add(i))
            raise ValueError(f"passage ids must be unique; {len(ids) - len(set(ids))} repeat "
                             f"(first: {repeated!r})")
        self.index, self.ids, self.kind, self.settings = index, ids, kind, dict(settings)

    @classmethod
    def build(cls, embeddings, ids: Sequence[str], kind: str = "flat", hnsw_m: int = 32,
              ef_construction: int = 200, ef_search: int = 128, nlist: int | None = None,
              nprobe: int = 16) -> PassageIndex:
        """Index ``embeddings`` (one row per passage, row i has id ``ids[i]``)."""
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
        return cls(index, ids, kind, settings)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` passage ids per query and their scores (``-inf`` where fewer were found)."""
        matrix = _as_matrix(queries, "queries")
        scores, rows = self.index.search(matrix, min(k, len(self)))
        hits = [[self.ids[j] for j in row if j >= 0] for row in rows]
        return hits, np.where(rows >= 0, scores, -np.inf)

    def save(self, folder: str | Path) -> Path:
        """Write ``index.faiss``, ``ids.json`` and ``checksums.json`` as ``folder``, whole or
        not at all (a failed save leaves the previous index there); ``folder`` is replaced
        whole, so give the index a folder of its own."""
        import faiss

        with atomic_folder(folder) as out:
            faiss.write_index(self.index, str(out / "index.faiss"))
            meta = {"kind": self.kind, "settings": self.settings, "dim": self.index.d,
                    "count": len(self), "ids": self.ids}
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
        for name in ("index.faiss", "ids.json"):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} is missing: not a saved PassageIndex")
        verify_checksums(folder)
        try:
            meta = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{folder / 'ids.json'}: not valid JSON ({exc})") from None
        index = faiss.read_index(str(folder / "index.faiss"))
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
        return cls(index, meta["ids"], meta["kind"], meta["settings"])


def recall_against_exact(index: PassageIndex, exact: PassageIndex, queries, k: int = 10) -> float:
    """Mean over queries of the share of the exact top-``k`` that ``index`` also returns."""
    found, _ = index.search(queries, k)
    truth, _ = exact.search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth,
                                                                        strict=True)]))
