"""Baselines on the shared test set: BM25 (jieba + bm25s), the lexical floor of every table,
BGE-M3, the state of the art every model is compared with, and the hybrid of a trained dense
retriever with BM25.

BM25 itself lives in :mod:`retrieval_lib.data.bm25` (the demo corpus mines its hard negatives with
it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.bm25 import BM25Retriever
from ..evaluation.metrics import score_run
from ..evaluation.search import FUSIONS, fuse_runs, qrels_for_split, retrieve
from ..models.base import count_parameters, load_encoder
from ..models.m3 import MODES, SCORE_WEIGHTS, colbert_score, evaluate_reranked, lexical_score
from ..models.retriever import DualTowerRetriever
from ..settings.hub import model_available
from ..training.loop import VALIDATION_METRIC
from ..training.optim import training_device
from .runs import collect_runs, record_not_run, save_baseline_run

__all__ = ["bm25_run", "evaluate_bm25", "BGE_M3", "HYBRID_WEIGHTS",
           "BGE_M3_MODES", "lexical_score", "colbert_score", "bge_m3_available",
           "BGEM3Retriever", "evaluate_bge_m3", "bm25_baseline", "bge_m3_baseline",
           "best_dense_run", "FUSION_WEIGHTS", "choose_fusion", "hybrid_baseline"]

def bm25_run(split, top_k: int = 100, k1: float = 1.5, b: float = 0.75
             ) -> tuple[dict, dict, dict]:
    """BM25's top-``top_k`` run over the split's deduplicated passage corpus, numbered as the
    dense retrievers' (:func:`~retrieval_lib.evaluation.search.retrieve`): ``(qrels, run,
    info)``."""
    query_ids, queries, qrels, corpus = qrels_for_split(split)
    hits = BM25Retriever(corpus, k1=k1, b=b).search(queries, k=top_k)
    run = {qid: {f"d{j}": score for j, score in row} for qid, row in zip(query_ids, hits,
                                                                          strict=True)}
    return qrels, run, {"corpus_size": len(corpus)}


def evaluate_bm25(split, ks: Sequence[int] = (5, 10, 100), top_k: int = 100, k1: float = 1.5,
                  b: float = 0.75) -> dict:
    """BM25 over the split's deduplicated passage corpus, scored like the dense retrievers
    (:func:`~retrieval_lib.evaluation.search.evaluate_retriever`): same queries, corpus and
    qrels."""
    qrels, run, info = bm25_run(split, top_k, k1, b)
    return {**score_run(qrels, run, ks), **info}


# ---------------------------------------------------------------------------------------------
# BGE-M3: dense (CLS, normalised), sparse (lexical weights) and multi-vector (ColBERT) scores
# from one XLM-R forward pass, as in Chen et al. 2024 and FlagEmbedding's M3 embedder, computed
# here with ``transformers`` and the two head files of the checkpoint (no FlagEmbedding needed).
# ---------------------------------------------------------------------------------------------

BGE_M3 = "BAAI/bge-m3"
HYBRID_WEIGHTS = SCORE_WEIGHTS  # w of s_inter, BGE-M3's defaults (retrieval_lib.models.m3)
BGE_M3_MODES = MODES

_HEADS = ("sparse_linear.pt", "colbert_linear.pt")


def bge_m3_available(name_or_path: str = BGE_M3) -> bool:
    """True when ``name_or_path`` is a local folder, or a hub id that is cached or reachable."""
    return model_available(name_or_path)


class BGEM3Retriever:
    """BGE-M3 (or any XLM-R checkpoint with M3 heads) from a hub id or a local folder.

    ``heads=False`` loads the encoder alone (dense retrieval only). The head files
    ``sparse_linear.pt`` and ``colbert_linear.pt`` are read with ``weights_only=True``.
    """

    def __init__(self, name_or_path: str = BGE_M3, heads: bool = True, device=None,
                 dtype=None, max_length: int = 8192):
        import torch
        from transformers import AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None and self.device.type == "cuda":
            dtype = torch.float16
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.encoder = load_encoder(name_or_path, dtype=dtype).to(self.device).eval()
        self.max_length = max_length
        special = (self.tokenizer.cls_token_id, self.tokenizer.eos_token_id,
                   self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                   self.tokenizer.bos_token_id, self.tokenizer.sep_token_id)
        self.unused_tokens = {t for t in special if t is not None}
        self.sparse_linear = self.colbert_linear = None
        if heads:
            hidden = self.encoder.config.hidden_size
            states = [self._load_head(name_or_path, name) for name in _HEADS]
            self.sparse_linear = torch.nn.Linear(hidden, 1)
            out = states[1]["weight"].shape[0]
            self.colbert_linear = torch.nn.Linear(hidden, out)
            for module, state in zip((self.sparse_linear, self.colbert_linear), states,
                                     strict=True):
                module.load_state_dict(state)
                module.to(self.device, dtype=next(self.encoder.parameters()).dtype).eval()

    @staticmethod
    def _load_head(name_or_path: str, filename: str) -> dict:
        import os

        import torch

        if os.path.isdir(name_or_path):
            path = os.path.join(name_or_path, filename)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} is missing: a BGE-M3 folder holds the sparse and ColBERT heads "
                    f"({', '.join(_HEADS)}) beside the encoder; download the whole repository "
                    f"(huggingface-cli download {BGE_M3} --local-dir DIR) or pass heads=False "
                    f"for dense retrieval only")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name_or_path, filename)
        return torch.load(path, map_location="cpu", weights_only=True)

    def encode(self, texts: Sequence[str], batch_size: int = 16, max_length: int | None = None,
               sparse: bool = False, colbert: bool = False) -> dict:
        """``dense`` (N x H, L2-normalised CLS states), and on request ``sparse`` (per text,
        token id -> weight, the max over repeats, special tokens dropped) and ``colbert`` (per
        text, normalised vectors of every token after CLS). Texts are encoded in batches of
        similar length."""
        import torch

        if (sparse or colbert) and self.sparse_linear is None:
            raise ValueError("sparse and ColBERT scores need the M3 heads (heads=True)")
        max_length = max_length or self.max_length
        order = np.argsort([-len(t) for t in texts], kind="stable")
        dense = np.zeros((len(texts), self.encoder.config.hidden_size), dtype=np.float32)
        lexical, vectors = [None] * len(texts), [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                       max_length=max_length, return_tensors="pt").to(self.device)
                hidden = self.encoder(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
                cls = torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1)
                dense[index] = cls.cpu().numpy()
                if sparse:
                    weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1).float().cpu()
                    for row, i in enumerate(index):
                        ids = batch["input_ids"][row].tolist()
                        lexical[i] = self._token_weights(weights[row].tolist(), ids)
                if colbert:
                    vecs = self.colbert_linear(hidden[:, 1:]).float()
                    vecs = torch.nn.functional.normalize(vecs, dim=-1).cpu().numpy()
                    lengths = batch["attention_mask"].sum(1).tolist()
                    for row, i in enumerate(index):
                        vectors[i] = vecs[row, : lengths[row] - 1]
        out = {"dense": dense}
        if sparse:
            out["sparse"] = lexical
        if colbert:
            out["colbert"] = vectors
        return out

    def _token_weights(self, weights: list[float], ids: list[int]) -> dict[int, float]:
        result: dict[int, float] = {}
        for w, t in zip(weights, ids, strict=True):
            if t not in self.unused_tokens and w > 0 and w > result.get(t, 0.0):
                result[t] = w
        return result


def evaluate_bge_m3(retriever: BGEM3Retriever, split, ks: Sequence[int] = (5, 10, 100),
                    top_k: int = 100, modes: Sequence[str] = BGE_M3_MODES,
                    weights: Sequence[float] = HYBRID_WEIGHTS, batch_size: int = 16,
                    query_max_length: int = 512) -> dict[str, dict]:
    """BGE-M3 on a split: dense retrieval over the whole corpus (exact inner product); the
    sparse, ColBERT and hybrid (``w·(dense, sparse, colbert)``) scores rerank the dense top-k,
    as the BGE-M3 paper does for long documents
    (:func:`~retrieval_lib.models.m3.evaluate_reranked`). Returns a ``score_run`` result per
    mode."""
    multi = any(m != "dense" for m in modes)
    return evaluate_reranked(
        lambda texts: retriever.encode(texts, batch_size, query_max_length, sparse=multi,
                                       colbert=multi),
        lambda texts: retriever.encode(texts, batch_size, sparse=multi, colbert=multi),
        split, ks, top_k, modes, weights)


def bm25_baseline(split, preset: str, k1: float = 1.5, b: float = 0.75,
                  root=None) -> dict:
    """BM25 on ``split``, saved as the baseline run ``runs/<preset>/bm25``; returns its result."""
    result = evaluate_bm25(split, k1=k1, b=b)
    save_baseline_run("bm25", result, preset,
                      {"title": "BM25（jieba 分词 + bm25s）", "model_name": "BM25",
                       "parameters": None, "k1": k1, "b": b}, root=root)
    return result


def bge_m3_baseline(split, preset: str, name_or_path: str = BGE_M3, run: bool = True,
                    modes: Sequence[str] = BGE_M3_MODES, max_length: int = 8192,
                    query_max_length: int = 512, batch_size: int = 16, root=None) -> dict:
    """BGE-M3 on ``split`` when its weights can be loaded, each mode saved as a baseline run
    (``bge_m3`` is dense, ``bge_m3-<mode>`` the others); otherwise ``bge_m3`` is recorded as
    not run, with the reason and how to run it, and no number is written.

    Returns ``{"status": "done", "results": {mode: score_run}}`` or
    ``{"status": "not run", "reason": ..., "how_to_run": ...}``.
    """
    how = (f"download the model (huggingface-cli download {BGE_M3} --local-dir DIR) on a machine "
           f"with access and pass `-p bge_m3_path DIR`, or set HF_ENDPOINT to a mirror; then run "
           f"notebook 04 again (a GPU is advisable: 568M parameters, texts up to {max_length} "
           f"tokens)")
    if not run:
        reason = "not asked for (run_bge_m3=False)"
    elif not bge_m3_available(name_or_path):
        reason = (f"{name_or_path!r} is neither a local folder nor reachable on the Hugging Face "
                  f"hub from this machine")
    else:
        model = BGEM3Retriever(name_or_path, heads=any(m != "dense" for m in modes),
                               max_length=max_length)
        results = evaluate_bge_m3(model, split, modes=modes, batch_size=batch_size,
                                  query_max_length=query_max_length)
        parameters = count_parameters(model.encoder)
        for mode, result in results.items():
            save_baseline_run("bge_m3" if mode == "dense" else f"bge_m3-{mode}", result, preset,
                              {"title": f"BGE-M3（{mode}）", "model_name": "BGE-M3",
                               "parameters": parameters, "source": name_or_path, "mode": mode,
                               "max_length": max_length, "hybrid_weights": HYBRID_WEIGHTS},
                              root=root)
        return {"status": "done", "results": results}
    record_not_run("bge_m3", preset, reason, how, root=root)
    print(f"BGE-M3 not run: {reason}.\nTo run it: {how}.")
    return {"status": "not run", "reason": reason, "how_to_run": how}


# ---------------------------------------------------------------------------------------------
# Hybrid: a trained dense retriever and BM25 fused (reciprocal-rank or min-max score fusion).
# ---------------------------------------------------------------------------------------------


def best_dense_run(preset: str, root=None) -> dict | None:
    """The finished training run of ``preset`` with the highest validation NDCG@10 at its best
    epoch (chosen on the validation set, never on the test set), or None when there is none."""
    candidates = [run for run in collect_runs(preset, root).values()
                  if run["status"] == "done" and run["kind"] != "baseline"
                  and run.get("history", {}).get("best_epoch")]
    if not candidates:
        return None

    def validation(run):
        history = run["history"]
        best = next(e for e in history["epochs"] if e["epoch"] == history["best_epoch"])
        return best[f"val_{VALIDATION_METRIC}"]

    return max(candidates, key=validation)


#: Weights of the dense run (BM25's is 1) that :func:`hybrid_baseline` tries on validation.
#: Under RRF (k = 60) the top two BM25 ranks differ by 1/61 - 1/62, less than a tenth of the
#: 0.1/61 a dense weight of 0.1 adds at rank 1, so even 0.1 reorders BM25's top freely; the
#: smaller weights let a weak dense run act as a tie-breaker. Under min-max fusion both runs'
#: scores lie in [0, 1] per query, so the weight is the dense run's share of the sum.
FUSION_WEIGHTS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def _fused_validation(model, validation, fusions: Sequence[str], k: int, top_k: int
                      ) -> dict[str, dict[float, float]]:
    """Validation NDCG@10 of each fusion for each dense weight of :data:`FUSION_WEIGHTS`."""
    qrels, dense_run, _ = retrieve(model, validation, top_k)
    _, lexical, _ = bm25_run(validation, top_k)
    return {how: {w: score_run(qrels, fuse_runs([dense_run, lexical], how, k, (w, 1.0), top_k)
                               )["aggregate"][VALIDATION_METRIC]["mean"] for w in FUSION_WEIGHTS}
            for how in fusions}


def choose_fusion(curve: Mapping[str, Mapping[float, float]]) -> tuple[str, float]:
    """The (fusion, dense weight) with the best validation value in ``curve`` (``{fusion:
    {weight: value}}``, as :func:`hybrid_baseline` measures it); ties go to the fusion listed
    first, then to the weight listed first (the smaller, in :data:`FUSION_WEIGHTS` order).

    >>> choose_fusion({"rrf": {0.1: 0.80, 0.5: 0.79}, "minmax": {0.1: 0.81, 0.5: 0.81}})
    ('minmax', 0.1)
    """
    return max(((f, w) for f, ws in curve.items() for w in ws),
               key=lambda pair: curve[pair[0]][pair[1]])


def hybrid_baseline(split, preset: str, dense: str | None = None, how: str = "auto",
                    k: int = 60, weights: Sequence[float] | None = None, validation=None,
                    top_k: int = 100, root=None, device=None) -> dict:
    """A trained dense retriever fused with BM25 on ``split`` (:func:`~retrieval_lib.
    evaluation.fuse_runs`; ``k`` is RRF's constant), saved as the baseline run
    ``runs/<preset>/hybrid``. ``dense`` names the run (default: :func:`best_dense_run`).
    ``how`` is a fusion of :data:`~retrieval_lib.evaluation.search.FUSIONS`, or ``auto``: the fusion
    with the best NDCG@10 on ``validation`` (ties: the one listed first). ``weights`` (dense,
    BM25) default to the dense weight of :data:`FUSION_WEIGHTS` with the best NDCG@10 on
    ``validation`` under that fusion (BM25 weighs 1; ties: the smaller), or to (1, 1) without a
    validation split.

    Returns ``{"status": "done", "result", "dense", "fusion", "weights", "validation_curve",
    "dense_result", "bm25_result"}`` (the curve: ``{fusion: {dense weight: NDCG@10}}``, None
    without validation), or ``{"status": "not run", ...}`` (recorded, no number written) when
    no dense run exists."""
    if how == "auto" and (validation is None or weights is not None):
        raise ValueError("how='auto' chooses the fusion and its weights on the validation "
                         "split: pass validation= and no weights, or name a fusion")
    if how != "auto" and how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}; choose 'auto' or one of {', '.join(FUSIONS)}")
    runs = collect_runs(preset, root)
    chosen = runs.get(dense) if dense else best_dense_run(preset, root)
    if chosen is None or chosen["status"] != "done":
        reason = (f"no finished run {dense!r}" if dense else
                  "no finished dense training run for this preset")
        how_to = "run a 03_* notebook first, then notebook 04 again"
        record_not_run("hybrid", preset, reason, how_to, root=root)
        print(f"hybrid not run: {reason}. To run it: {how_to}.")
        return {"status": "not run", "reason": reason, "how_to_run": how_to}
    model = DualTowerRetriever.load(Path(chosen["out_dir"]) / "best", training_device(device))
    curve = None
    if weights is None and validation is not None:
        curve = _fused_validation(model, validation, FUSIONS if how == "auto" else (how,), k,
                                  top_k)
        how, w = choose_fusion(curve)
        weights = (w, 1.0)
    weights = tuple(weights or (1.0, 1.0))
    qrels, dense_run, info = retrieve(model, split, top_k)
    _, lexical, _ = bm25_run(split, top_k)
    fused = fuse_runs([dense_run, lexical], how, k, weights, depth=top_k)
    result = {**score_run(qrels, fused), **info}
    save_baseline_run("hybrid", result, preset,
                      {"title": f"混合：{chosen['title']} + BM25（{how}）", "model_name": "hybrid",
                       "parameters": chosen.get("parameters"), "dense_run": chosen["name"],
                       "selected_by": None if dense else f"validation {VALIDATION_METRIC}",
                       "fusion": how, "rrf_k": k, "weights": list(weights),
                       "weights_chosen_on_validation": curve is not None,
                       "fusion_chosen_on_validation": curve is not None and len(curve) > 1},
                      root=root)
    return {"status": "done", "result": result, "dense": chosen["name"], "fusion": how,
            "weights": weights,
            "validation_curve": curve, "dense_result": score_run(qrels, dense_run),
            "bm25_result": score_run(qrels, lexical)}
