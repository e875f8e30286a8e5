"""retrieval_lib: turn pretrained Chinese language models into long-text dense retrievers.

The thin shared library behind the course notebooks. Modules by stage, in the order of the
course; a module imports only modules of earlier stages (``tests/test_architecture.py``):

1. Settings and shared helpers
   ``config`` (presets: every number of the report, once), ``allocator`` (freed CPU memory
   kept for reuse), ``hub`` (hub look-ups),
   ``checkpoint`` (atomic, checksummed training checkpoints), ``notebook_utils`` (running the
   notebooks), ``plotting`` (figures, CJK font).
2. Data
   ``records`` (the unified record, validation, JSON lines), ``bm25`` (the lexical retriever),
   ``tokenizer`` (pretrained or demo BPE), ``demo_corpus`` (People's Daily 1998), ``data``
   (BGE-M3 sources, splits, subsets, statistics).
3. Evaluation
   ``windows`` (documents longer than the window: FirstP, MaxP, SumP), ``evaluation``
   (encoding, exact search, metrics, confidence intervals, paired tests).
4. Losses and model
   ``distributed`` (process groups, gathering across devices), ``losses`` (InfoNCE, its
   cross-device form, and the one call every training loss has), ``gradcache`` (large batches
   in the memory of one chunk), ``m3`` (sparse and multi-vector heads, the unified loss),
   ``mining`` (hard negatives), ``minimind`` (published MiniMind checkpoints converted to
   Llama), ``modeling`` (base models, pooling, projection, the dual-tower retriever),
   ``expansion`` (new layers and their unfreezing schedule), ``pretraining`` (the demo LMs).
5. Training
   ``batching`` (length buckets, one source per batch, one bucket on every process),
   ``training`` (the loop), ``memory`` (memory and time plans of a run).
6. Results and serving
   ``runs`` (the one owner of a run folder: where it is, what it writes, how it is read),
   ``results`` (comparisons and report tables over the runs), ``baselines`` (BM25, BGE-M3),
   ``reranker`` (cross-encoder second stage: model, listwise training, reranking a run),
   ``export`` (sentence-transformers folders), ``serving`` (ONNX graphs run by onnxruntime,
   int8), ``index`` (faiss).
7. Orchestration
   ``experiment`` (one experiment end to end: input checks, base model, train, evaluate, the
   command line), ``studies`` (what the notebooks compare, with their tables and figures).
"""

__version__ = "0.1.0"

#: Modules in stage order: each may import only modules listed before it.
MODULES = ("config", "allocator", "hub", "checkpoint", "notebook_utils", "plotting",
           "records", "bm25", "tokenizer", "demo_corpus", "data",
           "windows", "evaluation",
           "distributed", "losses", "gradcache", "m3", "mining", "minimind", "modeling",
           "expansion", "pretraining",
           "batching", "training", "memory",
           "runs", "results", "baselines", "reranker", "export", "serving", "index",
           "experiment", "studies")
