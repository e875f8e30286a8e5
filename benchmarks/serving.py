"""CPU serving: encoding (passages/s) and reranking (pairs/s) with onnxruntime in fp32 and int8
against the same model in PyTorch, with each contender's peak memory.

    .venv/bin/python benchmarks/serving.py           # a few minutes on 2 CPU cores: writes
                                                     # benchmarks/serving.json, docs table
    .venv/bin/python benchmarks/serving.py --smoke   # seconds: what CI runs

One model per shape, random weights: ``demo``, the 27M demo twin (passages cut at 128 tokens,
pairs at 160), and ``real``, MiniMind-27M's real shape (8 layers × 512; passages at 256 tokens,
pairs at 512). The parent process builds the retriever and the reranker, saves them
(safetensors) and exports them (:mod:`retrieval_lib.serving.onnx_runtime`, fp32 and int8); each
contender then runs in a process of its own that reads the texts from a file the parent wrote, so
its peak resident memory (``VmHWM``: Python with torch imported, the model and its
activations) is its own: ``torch`` is the
library's ``encode_passages`` / ``score`` in fp32, ``onnx`` and ``int8`` the ONNX graphs under
onnxruntime. Every contender encodes (scores) the same People's Daily passages (pairs), in
batches of ``--batch-size``; the figure is the best of ``--repeats`` passes after a warm-up
batch, each pass tokenising afresh (the retriever's token-id cache is cleared: a server sees
new texts). Quality is not measured here: ``03_beyond_the_report`` §7 compares the int8 retriever's
and reranker's test metrics with PyTorch's (paired tests).

sentence-transformers' own ONNX backend (``backend="onnx"``) would be the peer at its best, but
it needs ``optimum-onnx``, whose releases require ``transformers<4.58``; this project runs
transformers 5, so that peer cannot be installed beside it (measured: ``pip install --dry-run
optimum-onnx[onnxruntime]`` would downgrade transformers to 4.57).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "serving.json"
DOC = HERE.parent / "docs" / "serving.md"  # the page whose table this rewrites
TABLE_START, TABLE_END = "<!-- serving table: start -->", "<!-- serving table: end -->"
SHAPES = {"demo": {"passage": 128, "pair": 160}, "real": {"passage": 256, "pair": 512}}
CONTENDERS = ("torch", "onnx", "int8")


def _texts(n: int) -> tuple[list[str], list[str]]:
    """``n`` (query, passage) pairs of the demo corpus: headlines with their articles and hard
    negatives."""
    from retrieval_lib.data import demo_corpus, query_passage_pairs
    from retrieval_lib.settings import config

    records, _, _ = demo_corpus.load_demo_records(config.get_data_config("demo"))
    return query_passage_pairs(records, n)


def build(shape: str, folder: Path) -> dict:
    """The retriever and the reranker of ``shape`` saved and exported under ``folder``."""
    import torch

    from retrieval_lib.data import tokenizer
    from retrieval_lib.models import DualTowerRetriever, count_parameters
    from retrieval_lib.results import CrossEncoderReranker
    from retrieval_lib.serving import export_reranker_onnx, export_retriever_onnx
    from retrieval_lib.settings import config

    queries, passages = _texts(2000)
    (folder / "texts.json").write_text(json.dumps({"queries": queries, "passages": passages},
                                                  ensure_ascii=False), encoding="utf-8")
    tok = tokenizer.train_bpe_tokenizer(queries + passages, vocab_size=6400)
    preset = "demo" if shape == "demo" else "full"
    cfg = config.get_experiment("minimind27_10k", preset).model
    cfg = replace(cfg, vocab_size=len(tok), num_new_layers=0,
                  max_passage_length=SHAPES[shape]["passage"])
    torch.manual_seed(0)
    retriever = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
    retriever.save(folder / "retriever")
    export_retriever_onnx(retriever, folder / "retriever_onnx", quantize=True)
    reranker = CrossEncoderReranker.from_base(cfg, tokenizer=tok, pretrained=False,
                                              max_length=SHAPES[shape]["pair"], seed=0)
    reranker.save(folder / "reranker")
    export_reranker_onnx(reranker, folder / "reranker_onnx", quantize=True)
    return {"model": f"{cfg.num_hidden_layers} layers × {cfg.hidden_size}",
            "parameters": count_parameters(retriever.encoder)}


def contender(args) -> dict:
    """One contender on one task, in this process (``--contender``)."""
    import torch

    from retrieval_lib.models import DualTowerRetriever
    from retrieval_lib.results import CrossEncoderReranker
    from retrieval_lib.serving import OnnxReranker, OnnxRetriever

    folder, b = Path(args.folder), args.batch_size
    texts = json.loads((folder / "texts.json").read_text(encoding="utf-8"))
    queries, passages = texts["queries"][:args.items], texts["passages"][:args.items]
    if args.task == "encode":
        if args.contender == "torch":
            model = DualTowerRetriever.load(folder / "retriever")
        else:
            model = OnnxRetriever(folder / "retriever_onnx", args.contender == "int8")

        def run(texts):
            if args.contender == "torch":  # new texts every pass, as in serving: no ids kept
                model.clear_token_cache()
            return model.encode_passages(texts, batch_size=b)
        items = (passages,)
    else:
        if args.contender == "torch":
            model = CrossEncoderReranker.load(str(folder / "reranker"))
        else:
            model = OnnxReranker(folder / "reranker_onnx", args.contender == "int8")

        def run(q, p):
            return model.score(q, p, batch_size=b)
        items = (queries, passages)
    with torch.inference_mode():
        run(*(x[:b] for x in items))  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(*items)
            best = min(best, time.perf_counter() - start)
    return {"items": len(passages), "per_second": len(passages) / best,
            "peak_memory_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM``, which starts afresh with the program
    (``ru_maxrss`` would carry the parent's high-water mark across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def render_table(saved: dict) -> str:
    """The docs table of serving, from ``serving.json``."""
    m, s = saved["machine"], saved["settings"]
    lines = [f"Measured {m['date']} on {m['cpu_cores']} CPU cores, torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}, commit `{m['commit']}`; `python "
             f"benchmarks/serving.py` wrote `benchmarks/serving.json`, and this table is "
             f"rendered from it. Random weights, batches of {s['batch_size']}, best of "
             f"{s['repeats']} passes; peak memory is the contender's whole process.", "",
             "| shape | task | PyTorch fp32 | ONNX fp32 | ONNX int8 | ONNX fp32 / PyTorch | "
             "int8 / PyTorch | peak memory MB (PyTorch / fp32 / int8) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in saved["results"].items():
        shape, task = key.split("/")
        unit = "passages/s" if task == "encode" else "pairs/s"
        lengths = SHAPES[shape]["passage" if task == "encode" else "pair"]
        t, o, q = (r[c]["per_second"] for c in CONTENDERS)
        memory = " / ".join(f"{r[c]['peak_memory_mb']:.0f}" for c in CONTENDERS)
        lines.append(f"| {shape} ({saved['shapes'][shape]['model']}, cut at {lengths}) | "
                     f"{task}, {unit} | {t:.1f} | {o:.1f} | {q:.1f} | {o / t:.2f}× | "
                     f"{q / t:.2f}× | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-items", type=int, default=1024)
    parser.add_argument("--real-items", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    # one contender in this process (what the parent runs in its children)
    parser.add_argument("--contender", choices=CONTENDERS)
    parser.add_argument("--task", choices=("encode", "rerank"))
    parser.add_argument("--folder")
    parser.add_argument("--items", type=int)
    args = parser.parse_args(argv)
    if args.contender:
        print(json.dumps(contender(args)))
        return 0
    if args.smoke:
        args.demo_items, args.repeats = 64, 1

    import onnxruntime
    import torch

    from retrieval_lib.results import environment_info, save_benchmark

    results, shapes = {}, {}
    for shape in ("demo",) if args.smoke else ("demo", "real"):
        items = args.demo_items if shape == "demo" else args.real_items
        with tempfile.TemporaryDirectory() as folder:
            shapes[shape] = build(shape, Path(folder))
            for task in ("encode", "rerank"):
                row = {}
                for name in CONTENDERS:
                    out = subprocess.run(
                        [sys.executable, __file__, "--contender", name, "--task", task,
                         "--folder", folder, "--items", str(items), "--batch-size",
                         str(args.batch_size), "--repeats", str(args.repeats)],
                        capture_output=True, text=True, check=False)
                    if out.returncode:
                        raise SystemExit(f"{shape}/{task}/{name} failed:\n{out.stderr[-3000:]}")
                    row[name] = json.loads(out.stdout.strip().splitlines()[-1])
                results[f"{shape}/{task}"] = row
                print(f"{shape:5s} {task:7s} " + "  ".join(
                    f"{n} {r['per_second']:8.1f}/s {r['peak_memory_mb']:6.0f} MB"
                    for n, r in row.items()), flush=True)
    env = environment_info()
    saved = {"machine": {"cpu_cores": os.cpu_count(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "commit": env["git_commit"],
                         "date": time.strftime("%Y-%m-%d")},
             "smoke": args.smoke, "shapes": shapes, "results": results,
             "settings": {"batch_size": args.batch_size, "repeats": args.repeats,
                          "items": {"demo": args.demo_items, "real": args.real_items}}}
    save_benchmark(saved, RESULTS, DOC, TABLE_START, TABLE_END, render_table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
