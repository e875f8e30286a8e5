"""retrieval_lib: turn pretrained Chinese language models into long-text dense retrievers.

The thin shared library behind the course notebooks. Its folders are the stages of the course,
in order; a module imports only modules of earlier stages, or those before it in its own folder
(``MODULES``, checked by ``tests/test_architecture.py``):

1. ``settings``: where a figure's numbers come from, presets (every number of the report,
   once), freed memory kept for reuse, hub look-ups, atomic checksummed checkpoints and saved
   folders, one writer per run folder, process groups.
2. ``data``: the unified record and its validation, BM25, tokenizers, the demo corpus (People's
   Daily 1998), BGE-M3's sources, the fixed splits and nested subsets, their statistics, pairs
   mined from unlabeled text.
3. ``evaluation``: windows of long documents (FirstP, MaxP, SumP), trec_eval metrics with
   confidence intervals and paired tests, exact search, fusion.
4. ``models``: InfoNCE and its cross-device form, GradCache, M3 heads, published MiniMind
   checkpoints converted to Llama, base models, the dual-tower retriever, expansion with new
   layers, the demo LMs' pretraining, RetroMAE auto-encoding for decoder LMs.
5. ``training``: length buckets, the collator, hard-negative mining, the optimizer step,
   resuming, the loop, memory and time plans, the RetroMAE loop.
6. ``results``: run folders (their one owner), report tables, baselines (BM25, BGE-M3, hybrid),
   the cross-encoder reranker.
7. ``serving``: sentence-transformers export, ONNX graphs run by onnxruntime (fp32, int8),
   faiss indexes.
8. ``course``: figures, one experiment end to end (``python -m retrieval_lib.course.experiment``),
   the studies the notebooks show, running every notebook (``python -m
   retrieval_lib.course.notebooks``).

Each folder's ``__init__`` names its public API: ``from retrieval_lib.models import
DualTowerRetriever``. The modules of the flat layout before December 2026
(``retrieval_lib.modeling``, ``retrieval_lib.studies``, ...) still import, with a warning that
names the module each name lives in now (:data:`MOVED`).
"""

from ._moved import MOVED, install

__version__ = "0.1.0"

#: The stages, in order.
PACKAGES = ("settings", "data", "evaluation", "models", "training", "results", "serving",
            "course")

#: Every module in stage order: each may import only modules listed before it.
MODULES = (
    "settings.provenance", "settings.config", "settings.allocator", "settings.hub",
    "settings.runlock", "settings.checkpoint", "settings.saved_folder", "settings.distributed",
    "data.records", "data.bm25", "data.tokenizer", "data.demo_corpus", "data.sources",
    "data.splits", "data.statistics", "data.pairs",
    "evaluation.windows", "evaluation.metrics", "evaluation.search",
    "models.losses", "models.gradcache", "models.m3", "models.shape_check", "models.minimind",
    "models.minimind_scripts", "models.checkpoints", "models.base",
    "models.retriever", "models.expansion", "models.pretraining", "models.retromae",
    "training.batching", "training.collator", "training.events", "training.mining",
    "training.optim", "training.resume", "training.loop", "training.memory", "training.stage1",
    "results.runs", "results.cmteb", "results.tables", "results.baselines", "results.reranker",
    "serving.export", "serving.projected_encoder", "serving.flag", "serving.card",
    "serving.onnx_runtime", "serving.index",
    "course.plotting", "course.result_plots", "course.inputs", "course.stage1",
    "course.experiment",
    "course.expansion", "course.ablation", "course.beyond", "course.stage_study", "course.start",
    "course.notebooks",
)

__all__ = ["MOVED", "MODULES", "PACKAGES", "__version__"]

install()
