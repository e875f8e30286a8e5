"""Where a real-shape training step spends its time, and what compiling the encoder buys.

    python benchmarks/step_share.py          # minutes: saved to benchmarks/step_share.json,
                                             # docs table
    python benchmarks/step_share.py --smoke  # seconds: what CI runs

The throughput benchmark finds this library and sentence-transformers at the same speed at the
real MiniMind-27M shape. This one asks how much faster any trainer could be without changing
the arithmetic: it times, on the same batches (``throughput.py``'s real shape: 8 layers x 512,
random weights, 16 queries with a positive and 3 hard negatives of 256 tokens, bf16 autocast
by default), three things in turn:

* ``step``: a whole training step as ``train_retriever`` takes it: both towers, InfoNCE over
  in-batch and hard negatives, backward, AdamW;
* ``encoder``: the encoder's own forward and backward on the same inputs (a mean of its
  states as the loss), which every trainer of this model has to run;
* ``compiled``: the whole step with ``torch.compile`` of the encoder (its first step, which
  compiles, reported apart; later steps may recompile for new query lengths).

``step / encoder`` bounds the speed-up of any change outside the encoder's kernels (data
loading, loss, optimizer, bookkeeping): Amdahl's law. The median of the steps after the first
is reported (the first one allocates and, compiled, compiles).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "step_share.json"
DOC = HERE.parent / "docs" / "performance.md"  # the page whose table this rewrites
TABLE_START, TABLE_END = "<!-- step share table: start -->", "<!-- step share table: end -->"


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(args) -> dict:
    import torch

    from retrieval_lib.models import autocast_for, count_parameters, info_nce
    from retrieval_lib.settings import allocator

    allocator.keep_freed_memory()  # as train_retriever does on the CPU
    throughput = _throughput()
    setup = argparse.Namespace(model="minimind27", shape=args.shape, records=args.records,
                               vocab=args.vocab, batch_size=args.batch_size,
                               hard_negatives=args.hard_negatives)
    model, records, training = throughput._setup(setup)
    model.train()
    b, k = args.batch_size, args.hard_negatives
    batches = []
    for i in range(args.steps):
        rs = records[i * b:(i + 1) * b]
        passages = [p["text"] for r in rs
                    for p in r["positive_passages"][:1] + r["negative_passages"][:k]]
        batches.append((model.tokenize([r["query"] for r in rs], "query"),
                        model.tokenize(passages, "passage")))
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate)

    def step(q, p):
        with autocast_for(device, args.precision):
            loss = info_nce(*model(q, p), training.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def encoder_only(q, p):
        with autocast_for(device, args.precision):
            hq = model.encoder(**q).last_hidden_state
            hp = model.encoder(**p).last_hidden_state
        (hq.float().mean() + hp.float().mean()).backward()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> list[float]:
        out = []
        for q, p in batches:
            start = time.perf_counter()
            fn(q, p)
            out.append(time.perf_counter() - start)
        return out

    # interleaved per batch would share caches; each in turn over the same batches instead
    times = {"step": timed(step), "encoder": timed(encoder_only)}
    if args.compile:  # off in the smoke run: compiling alone takes half a minute on 2 cores
        with tempfile.TemporaryDirectory() as cache:  # a cold compile, as a user's first run
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            model.encoder = torch.compile(model.encoder)
            times["compiled"] = timed(step)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    return {"shape": args.shape, "precision": args.precision, "batch_size": b,
            "hard_negatives": k, "steps": args.steps, "parameters": count_parameters(model),
            "passage_tokens": int(batches[0][1]["input_ids"].shape[1]),
            "seconds": times, "median_s": median,
            "encoder_share": median["encoder"] / median["step"],
            "bound_outside_encoder": median["step"] / median["encoder"],
            "compiled_speedup": median["step"] / median["compiled"] if args.compile else None,
            "first_compiled_step_s": times["compiled"][0] if args.compile else None}


def render_table(saved: dict) -> str:
    m, r = saved["machine"], saved["result"]
    md = r["median_s"]
    compiled = []
    if "compiled" in md:
        compiled = [f"| whole step, encoder under `torch.compile` (its first step, compiling "
                    f"from an empty cache: {r['first_compiled_step_s']:.0f} s) | "
                    f"{md['compiled']:.2f} | {r['compiled_speedup']:.2f}× faster |"]
    return "\n".join([
        f"Measured {m['date']} on {m['cpu_cores']} CPU cores, torch {m['torch']}, commit "
        f"`{m['commit']}`; `python benchmarks/step_share.py` wrote `benchmarks/step_share.json`, "
        f"and this table is rendered from it. Shape {r['shape']} ({r['parameters']:,} "
        f"parameters, {r['batch_size']} queries × {r['hard_negatives'] + 1} passages of "
        f"{r['passage_tokens']} tokens), {r['precision']}, median of steps 2–{r['steps']}.", "",
        "| what is timed | seconds per step | against the whole step |",
        "| --- | --- | --- |",
        f"| whole training step (both towers, InfoNCE, backward, AdamW) | {md['step']:.2f} | "
        f"1.00× |",
        f"| the encoder's own forward + backward | {md['encoder']:.2f} | "
        f"{r['encoder_share']:.0%} of it: no change outside the encoder can be faster than "
        f"{r['bound_outside_encoder']:.2f}× |", *compiled])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("demo", "real"), default="real")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hard-negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, nothing compiled: seconds, for CI")
    args = parser.parse_args(argv)
    args.compile = not args.smoke
    if args.smoke:
        args.shape, args.batch_size, args.steps, args.vocab = "demo", 4, 3, 500
    import torch

    from retrieval_lib.results import environment_info, save_benchmark

    result = measure(args)
    saved = {"machine": {"cpu_cores": os.cpu_count(), "torch": torch.__version__,
                         "commit": environment_info()["git_commit"],
                         "date": time.strftime("%Y-%m-%d")},
             "smoke": args.smoke, "result": result}
    save_benchmark(saved, RESULTS, DOC, TABLE_START, TABLE_END, render_table(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
