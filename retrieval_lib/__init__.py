"""retrieval_lib: turn pretrained Chinese language models into long-text dense retrievers.

The thin shared library behind the course notebooks; one module per stage of the pipeline:
``config`` (presets), ``data`` (records, loaders, splits, demo corpus), ``tokenizer``,
``baselines`` (BM25) and ``plotting`` (figures, CJK fonts).
"""

__version__ = "0.1.0"
