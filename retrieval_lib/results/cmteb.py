"""C-MTEB's retrieval tasks through ``mteb``, the benchmark every Chinese embedding model is
compared on, with mteb's own evaluator.

    evaluate_mteb(retriever, out_dir="runs/full/minimind27_10k")   # the 8 C-MTEB tasks
    evaluate_mteb(retriever, [local_retrieval_task("my_task", "my_data")])  # a local task

:class:`MtebRetriever` hands a :class:`~retrieval_lib.models.retriever.DualTowerRetriever` to
mteb: mteb's query texts go to the query tower (``encode_queries``, with the query instruction
the model was trained with, not mteb's task prompt) and its documents (title and text, joined by
mteb) to the passage tower, cut at the passage length as in training (FirstP); scores are
cosines. Results are saved beside the run: mteb's own result files under ``mteb/`` and the
scores of each task in ``cmteb.json``, which the results report shows as its own table
(:func:`cmteb_table`).

In-domain tasks: the full preset trains on BGE-M3's fine-tuning data, which holds the sources
of three C-MTEB tasks (T2Ranking for T2Retrieval, DuReader for DuRetrieval, mMARCO for
MMarcoRetrieval); :data:`IN_DOMAIN` names them, and the table marks them. The real tasks
download from the hub as mteb downloads them; offline, :func:`local_retrieval_task` reads a
folder in the layout of mteb's published retrieval datasets (configs ``corpus``, ``queries``
and ``default`` for the qrels), which :func:`write_retrieval_folder` writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..evaluation.search import evaluate_retriever, qrels_for_split
from ..models.retriever import DualTowerRetriever

__all__ = ["CMTEB_RETRIEVAL", "IN_DOMAIN", "CMTEB_FILE", "MtebRetriever", "evaluate_mteb",
           "write_retrieval_folder", "local_retrieval_task", "AGREEMENT_METRICS",
           "mteb_agreement", "cmteb_table"]

#: C-MTEB's retrieval tasks, as mteb names them.
CMTEB_RETRIEVAL = ("T2Retrieval", "MMarcoRetrieval", "DuRetrieval", "CovidRetrieval",
                   "CmedqaRetrieval", "EcomRetrieval", "MedicalRetrieval", "VideoRetrieval")
#: Tasks whose source is in BGE-M3's fine-tuning data (the full preset's training data).
IN_DOMAIN = {"T2Retrieval": "T2Ranking", "DuRetrieval": "DuReader",
             "MMarcoRetrieval": "mMARCO"}
#: The file beside a run that holds its mteb scores.
CMTEB_FILE = "cmteb.json"
#: What ``cmteb.json`` keeps of each task's scores (mteb's names).
KEPT_SCORES = ("main_score", "ndcg_at_10", "ndcg_at_5", "recall_at_5", "precision_at_5",
               "mrr_at_10", "map_at_10", "recall_at_100")


class MtebRetriever:
    """A retriever as mteb's encoder protocol sees it (see the module docstring): ``encode``
    routes each text to its tower, ``similarity`` is the cosine, ``mteb_model_meta`` names the
    model for mteb's result files."""

    def __init__(self, model: DualTowerRetriever, name: str = "retrieval_lib/retriever",
                 revision: str = "local", batch_size: int = 32):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        self.model, self.batch_size = model, batch_size
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": name, "revision": revision, "languages": ["cmn-Hans"],
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "embed_dim": model.projection_dim, "max_tokens": model.max_passage_length,
            "framework": ["PyTorch"], "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": bool(model.query_instruction)})

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None,
               **kwargs) -> np.ndarray:
        """mteb's texts (a DataLoader of batches with ``text``) through the query tower for
        queries, the passage tower for everything else."""
        from mteb.types import PromptType

        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == PromptType.query:
            return np.asarray(self.model.encode_queries(texts, batch_size=self.batch_size))
        return np.asarray(self.model.encode_passages(texts, batch_size=self.batch_size))

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


def evaluate_mteb(model: DualTowerRetriever | str, tasks=CMTEB_RETRIEVAL,
                  out_dir: str | os.PathLike | None = None, name: str | None = None,
                  batch_size: int = 32) -> dict:
    """Evaluate ``model`` on ``tasks`` (mteb task names or task objects) with mteb's evaluator;
    returns ``{"model", "mteb_version", "tasks": {name: {"split", "in_domain", scores…}}}`` and,
    given ``out_dir`` (the run folder), saves it there as ``cmteb.json`` with mteb's result
    files under ``out_dir/mteb``. Every task is evaluated afresh (nothing is read from an
    earlier cache: a retrained model keeps its name).

    ``model`` is a retriever, or the hub name of a model mteb implements itself (e.g.
    ``"BAAI/bge-m3"``: ``mteb.get_model``, as its authors run it)."""
    import mteb

    tasks = [mteb.get_task(t) if isinstance(t, str) else t for t in tasks]
    if isinstance(model, str):
        encoder, name = mteb.get_model(model), name or model
    else:
        name = name or (f"retrieval_lib/{Path(out_dir).name}" if out_dir else
                        "retrieval_lib/retriever")
        encoder = MtebRetriever(model, name=name, batch_size=batch_size)
    cache = mteb.ResultCache(Path(out_dir) / "mteb") if out_dir else None
    result = mteb.evaluate(encoder, tasks, cache=cache, overwrite_strategy="always",
                           encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
    saved = {"model": name, "mteb_version": mteb.__version__, "tasks": {}}
    for task_result in result.task_results:
        split, rows = next(iter(task_result.scores.items()))
        scores = rows[0]
        saved["tasks"][task_result.task_name] = {
            "split": split, "in_domain": IN_DOMAIN.get(task_result.task_name),
            **{k: scores[k] for k in KEPT_SCORES if k in scores}}
    if out_dir:
        (Path(out_dir) / CMTEB_FILE).write_text(json.dumps(saved, indent=2) + "\n",
                                                encoding="utf-8")
    return saved


def write_retrieval_folder(folder: str | os.PathLike, queries: dict[str, str],
                           corpus: dict[str, str], qrels: dict[str, dict[str, int]],
                           split: str = "test") -> Path:
    """A retrieval dataset in the layout of mteb's published ones (``mteb/T2Retrieval``): the
    configs ``corpus`` (``_id``, ``title``, ``text``), ``queries`` (``_id``, ``text``) and
    ``default`` (qrels: ``query-id``, ``corpus-id``, ``score``), one JSON-lines file each for
    ``split``, declared in ``README.md`` as the hub declares them."""
    folder = Path(folder)
    tables = {"corpus": [{"_id": i, "title": "", "text": t} for i, t in corpus.items()],
              "queries": [{"_id": i, "text": t} for i, t in queries.items()],
              "default": [{"query-id": q, "corpus-id": d, "score": int(s)}
                          for q, docs in qrels.items() for d, s in docs.items()]}
    configs = []
    for config, rows in tables.items():
        (folder / config).mkdir(parents=True, exist_ok=True)
        with (folder / config / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        configs += [f"- config_name: {config}", "  data_files:", f"  - split: {split}",
                    f"    path: {config}/{split}.jsonl"]
    (folder / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n",
                                      encoding="utf-8")
    return folder


def local_retrieval_task(folder: str | os.PathLike, name: str, split: str = "test"):
    """An mteb retrieval task over a local folder in mteb's layout (see
    :func:`write_retrieval_folder`), scored like C-MTEB's (main score NDCG@10)."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name, description=f"a local retrieval dataset ({folder})",
            reference=None, dataset={"path": str(folder), "revision": "local"},
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=[split],
            eval_langs=["cmn-Hans"], main_score="ndcg_at_10", date=None, domains=None,
            task_subtypes=None, license=None, annotations_creators=None, dialect=None,
            sample_creation=None, bibtex_citation="")

    return LocalRetrieval()


#: mteb's metric names -> the library's, compared by :func:`mteb_agreement`.
AGREEMENT_METRICS = {"ndcg_at_10": "ndcg@10", "ndcg_at_5": "ndcg@5", "recall_at_5": "recall@5",
                     "precision_at_5": "precision@5", "mrr_at_10": "mrr@10"}


def mteb_agreement(model: DualTowerRetriever, split, folder: str | os.PathLike,
                   name: str = "TestSplitRetrieval") -> dict[str, dict[str, float]]:
    """One split scored twice: by mteb's evaluator (the split written to ``folder`` in mteb's
    layout, a local task) and by the library (``evaluate_retriever``), same model and corpus.
    Returns ``{library metric: {"mteb": …, "library": …}}`` for :data:`AGREEMENT_METRICS`."""
    query_ids, queries, qrels, corpus = qrels_for_split(split)
    write_retrieval_folder(folder, dict(zip(query_ids, queries, strict=True)),
                           {f"d{j}": text for j, text in enumerate(corpus)}, qrels)
    theirs = evaluate_mteb(model, [local_retrieval_task(folder, name)])["tasks"][name]
    ours = evaluate_retriever(model, split, ks=(5, 10))["aggregate"]
    return {mine: {"mteb": theirs[key], "library": ours[mine]["mean"]}
            for key, mine in AGREEMENT_METRICS.items()}


def cmteb_table(runs: dict[str, dict], score: str = "ndcg_at_10") -> str | None:
    """The results report's C-MTEB table: one row per run with a ``cmteb.json``, one column
    per task (``score``), in-domain tasks marked †; ``None`` when no run has one."""
    found = {}
    for name, run in runs.items():
        path = Path(run.get("out_dir") or "") / CMTEB_FILE
        if run.get("status") == "done" and run.get("out_dir") and path.is_file():
            found[name] = json.loads(path.read_text(encoding="utf-8"))["tasks"]
    if not found:
        return None
    tasks = [t for t in CMTEB_RETRIEVAL if any(t in v for v in found.values())]
    tasks += sorted({t for v in found.values() for t in v} - set(tasks))
    header = [f"{t} †" if t in IN_DOMAIN else t for t in tasks]
    lines = ["| run | " + " | ".join(header) + " |", "| --- |" + " --- |" * len(tasks)]
    for name, scores in found.items():
        cells = [f"{scores[t][score]:.3f}" if t in scores else "" for t in tasks]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    marked = ", ".join(f"{t} ({IN_DOMAIN[t]})" for t in tasks if t in IN_DOMAIN)
    if marked:
        lines += ["", f"† in-domain for models trained on the full preset's data, which holds "
                      f"these tasks' sources: {marked}."]
    return "\n".join(lines)
