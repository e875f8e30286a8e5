"""Reranking throughput: (query, passage) pairs per second, this library's cross-encoder against
sentence-transformers' ``CrossEncoder`` running the same model.

    .venv/bin/python benchmarks/reranking.py           # about two minutes on 2 CPU cores:
                                                       # writes benchmarks/reranking.json and
                                                       # the docs table
    .venv/bin/python benchmarks/reranking.py --smoke   # seconds: what CI runs

Both contenders score the same pairs (People's Daily headlines with their articles and hard
negatives), in batches of ``--batch-size``, with the same weights: the library's
:class:`~retrieval_lib.results.reranker.CrossEncoderReranker` and ``CrossEncoder`` loaded from
:func:`~retrieval_lib.serving.export.export_cross_encoder`'s folder (the scores agree; the largest
difference is printed and saved). Two shapes, random weights: ``demo``, the 27M demo twin with
pairs cut at the demo's 160 tokens, and ``real``, MiniMind-27M's real shape (8 layers × 512)
with pairs cut at 512 tokens. Two precisions: fp32, and bf16 (the library under bf16 autocast,
``precision="bf16"``; the peer with its weights loaded in bf16, how it is run in half
precision). Each figure is the best of ``--repeats`` timed passes after one warm-up batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "reranking.json"
DOC = HERE.parent / "docs" / "serving.md"  # the page whose table this rewrites
TABLE_START, TABLE_END = "<!-- reranking table: start -->", "<!-- reranking table: end -->"
SHAPES = {"demo": 160, "real": 512}  # tokens a pair is cut at


def _pairs(n: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` pairs from the demo corpus, and the texts a tokenizer is trained on."""
    from retrieval_lib.data import demo_corpus, query_passage_pairs
    from retrieval_lib.settings import config

    records, _, _ = demo_corpus.load_demo_records(config.get_data_config("demo"))
    queries, passages = query_passage_pairs(records, n)
    return queries, passages, queries + passages


def _best_rate(fn, n: int, repeats: int) -> float:
    fn(warm=True)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def measure(shape: str, precision: str, queries, passages, tok, args) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from retrieval_lib.models import dtype_kwarg
    from retrieval_lib.results import CrossEncoderReranker
    from retrieval_lib.serving import export_cross_encoder
    from retrieval_lib.settings import config

    cfg = config.get_experiment("minimind27_10k", shape if shape == "demo" else "full").model
    cfg = replace(cfg, vocab_size=len(tok), num_new_layers=0)
    model = CrossEncoderReranker.from_base(cfg, tokenizer=tok, pretrained=False,
                                           max_length=SHAPES[shape], seed=0)
    model.precision = precision
    with tempfile.TemporaryDirectory() as folder:
        export_cross_encoder(model, Path(folder) / "ce")
        kwargs = {"model_kwargs": dtype_kwarg(torch.bfloat16)} if precision == "bf16" else {}
        peer = CrossEncoder(str(Path(folder) / "ce"), device="cpu", **kwargs)
    n, b = len(queries), args.batch_size
    pairs = list(zip(queries, passages, strict=True))

    def ours(warm=False):
        return model.score(queries[:b] if warm else queries, passages[:b] if warm else passages,
                           batch_size=b)

    def st(warm=False):
        return peer.predict(pairs[:b] if warm else pairs, batch_size=b, show_progress_bar=False)

    with torch.inference_mode():
        ours_rate, st_rate = _best_rate(ours, n, args.repeats), _best_rate(st, n, args.repeats)
    difference = float(np.abs(ours() - st()).max())
    return {"pairs": n, "ours_pairs_per_second": ours_rate, "st_pairs_per_second": st_rate,
            "ratio": ours_rate / st_rate, "max_score_difference": difference,
            "model": f"{cfg.num_hidden_layers} layers × {cfg.hidden_size}",
            "max_length": SHAPES[shape]}


def render_table(saved: dict) -> str:
    """The docs table of reranking, from ``reranking.json``."""
    m, s = saved["machine"], saved["settings"]
    lines = [f"Measured {m['date']} on {m['cpu_cores']} CPU cores, torch {m['torch']}, commit "
             f"`{m['commit']}`; `python benchmarks/reranking.py` wrote "
             f"`benchmarks/reranking.json`, and this table is rendered from it. Random weights, "
             f"batches of {s['batch_size']} pairs, best of {s['repeats']} passes.", "",
             "| shape | precision | pairs | this library, pairs/s | `CrossEncoder.predict`, "
             "pairs/s | ratio | largest score difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in saved["results"].items():
        shape, precision = key.split("/")
        lines.append(f"| {shape} ({r['model']}, pairs cut at {r['max_length']}) | {precision} "
                     f"| {r['pairs']} | {r['ours_pairs_per_second']:.1f} | "
                     f"{r['st_pairs_per_second']:.1f} | {r['ratio']:.2f}× | "
                     f"{r['max_score_difference']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-pairs", type=int, default=1024)
    parser.add_argument("--real-pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.demo_pairs, args.real_pairs, args.repeats = 64, 8, 1

    import torch

    from retrieval_lib.data import tokenizer
    from retrieval_lib.models import cpu_has_native_bf16
    from retrieval_lib.results import environment_info, save_benchmark

    queries, passages, texts = _pairs(max(args.demo_pairs, args.real_pairs))
    tok = tokenizer.train_bpe_tokenizer(texts[:4000], vocab_size=6400)
    results = {}
    for shape in ("demo", "real") if not args.smoke else ("demo",):
        n = args.demo_pairs if shape == "demo" else args.real_pairs
        for precision in ("fp32", "bf16"):
            r = measure(shape, precision, queries[:n], passages[:n], tok, args)
            results[f"{shape}/{precision}"] = r
            print(f"{shape:5s} {precision}: ours {r['ours_pairs_per_second']:8.1f} pairs/s, "
                  f"CrossEncoder {r['st_pairs_per_second']:8.1f} pairs/s, ratio "
                  f"{r['ratio']:.2f}, largest score difference {r['max_score_difference']:.1e}",
                  flush=True)
    env = environment_info()
    saved = {"machine": {"cpu_cores": os.cpu_count(), "torch": torch.__version__,
                         "native_bf16": cpu_has_native_bf16(), "commit": env["git_commit"],
                         "date": time.strftime("%Y-%m-%d")},
             "smoke": args.smoke, "results": results,
             "settings": {"batch_size": args.batch_size, "repeats": args.repeats}}
    save_benchmark(saved, RESULTS, DOC, TABLE_START, TABLE_END, render_table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
