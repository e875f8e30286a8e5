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

How close to the machine (second table): the same step and an encoding batch (the passage
tower's forward, no gradients) in fp32 and in bf16 autocast, their floating-point operations
counted by ``torch.utils.flop_counter.FlopCounterMode`` (the matrix products and attention,
forward and backward: what the machine's peak is about; AdamW's and the norms' element-wise
work is not counted), divided by their median time, against this machine's matrix-product
peak measured in the same run, before and after the timed work (the best of a few square
products of side ``--peak-size``, half and a quarter of it, in that precision). bf16 is
measured only where the CPU has native bf16 (AVX-512 BF16 or AMX).
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
#: the README's one-line summary of the machine-use table
README = HERE.parent / "README.md"
SUMMARY_START, SUMMARY_END = "<!-- machine use: start -->", "<!-- machine use: end -->"
USE_START, USE_END = "<!-- machine use table: start -->", "<!-- machine use table: end -->"


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the table's caption."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def counted_flops(fn, *args) -> int:
    """Floating-point operations of ``fn(*args)`` as ``FlopCounterMode`` counts them (matrix
    products, attention and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def matmul_peak(precision: str, size: int, repeats: int) -> float:
    """This machine's matrix-product rate in ``precision`` (FLOP/s): the best over square
    products of side ``size``, ``size / 2`` and ``size / 4`` (2·n³ operations each; which one
    runs fastest depends on the CPU's caches), ``repeats`` of each after one warm-up."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    rate = 0.0
    for n in (size, size // 2, size // 4):
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            rate = max(rate, 2 * n ** 3 / (time.perf_counter() - start))
    return rate


def machine_use(model, batches, step, args) -> dict:
    """Achieved FLOP/s of the training step and of an encoding batch against the matrix-product
    peak, per precision (see the module docstring)."""
    import torch

    from retrieval_lib.models import autocast_for, cpu_has_native_bf16

    device = torch.device("cpu")

    def encode(q, p, precision):
        with torch.inference_mode(), autocast_for(device, precision):
            model.embed(p["input_ids"], p["attention_mask"], "passage")

    q, p = batches[0]
    flops = {"step": counted_flops(step, q, p, "fp32"),
             "encode": counted_flops(encode, q, p, "fp32")}
    rows = {}
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not cpu_has_native_bf16():
            continue
        before = matmul_peak(precision, args.peak_size, args.peak_repeats)
        seconds = {"step": [], "encode": []}
        for q, p in batches:
            for name, fn in (("step", step), ("encode", encode)):
                start = time.perf_counter()
                fn(q, p, precision)
                seconds[name].append(time.perf_counter() - start)
        # measured before and after the timed work: a slower moment of a shared machine on
        # one side does not lower the peak the work is compared with
        peaks = [before, matmul_peak(precision, args.peak_size, args.peak_repeats)]
        peak = max(peaks)
        median = {k: statistics.median(v[1:]) for k, v in seconds.items()}
        achieved = {k: flops[k] / median[k] for k in flops}
        rows[precision] = {"peak_flops": peak, "peaks_before_after": peaks,
                           "seconds": seconds, "median_s": median,
                           "achieved_flops": achieved,
                           "share_of_peak": {k: achieved[k] / peak for k in achieved}}
    return {"flops": flops, "peak_size": args.peak_size, "precisions": rows}


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

    def step(q, p, precision=args.precision):
        with autocast_for(device, precision):
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
    if args.compile:
        model.encoder = model.encoder._orig_mod  # the machine-use rows time the eager step
    use = machine_use(model, batches, step, args)
    return {"machine_use": use, "shape": args.shape, "precision": args.precision, "batch_size": b,
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


def render_machine_use(saved: dict) -> str:
    m, r = saved["machine"], saved["result"]
    use = r["machine_use"]
    lines = [
        f"Measured {m['date']} on {m['cpu_cores']} CPU cores ({m.get('cpu', 'CPU')}), the same "
        f"run and shape as the table above; operations per step counted by "
        f"`FlopCounterMode`: {use['flops']['step'] / 1e9:,.0f} GFLOP for the training step, "
        f"{use['flops']['encode'] / 1e9:,.0f} GFLOP for encoding its "
        f"{r['batch_size'] * (r['hard_negatives'] + 1)} passages; the peak is the best "
        f"square matrix product of side {use['peak_size']}, {use['peak_size'] // 2} or "
        f"{use['peak_size'] // 4} in the same precision, before and after the timed work.", "",
        "| precision | matrix-product peak (GFLOP/s) | training step: GFLOP/s | of the peak | "
        "encoding batch: GFLOP/s | of the peak |", "| --- | --- | --- | --- | --- | --- |"]
    for precision, row in use["precisions"].items():
        a, share = row["achieved_flops"], row["share_of_peak"]
        lines.append(f"| {precision} | {row['peak_flops'] / 1e9:,.0f} | {a['step'] / 1e9:,.0f} "
                     f"| {share['step']:.0%} | {a['encode'] / 1e9:,.0f} | "
                     f"{share['encode']:.0%} |")
    return "\n".join(lines)


def render_summary(saved: dict) -> str:
    """The README's sentence: what share of the machine's limit training uses."""
    use = saved["result"]["machine_use"]["precisions"]
    parts = [f"{p} {row['share_of_peak']['step']:.0%} (encoding "
             f"{row['share_of_peak']['encode']:.0%})" for p, row in use.items()]
    return (f"**How close to the machine.** A real-shape MiniMind-27M training step reaches "
            f"{' and '.join(parts)} of this CPU's measured matrix-product peak "
            f"([docs/performance.md](docs/performance.md), `benchmarks/step_share.py`).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("demo", "real"), default="real")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hard-negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--peak-size", type=int, default=4096,
                        help="side of the square matrix products that measure the peak")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, nothing compiled: seconds, for CI")
    args = parser.parse_args(argv)
    args.compile = not args.smoke
    if args.smoke:
        args.shape, args.batch_size, args.steps, args.vocab = "demo", 4, 3, 500
        args.peak_size, args.peak_repeats = 256, 2
    import torch

    from retrieval_lib.results import environment_info, save_benchmark, write_between_markers

    result = measure(args)
    saved = {"machine": {"cpu_cores": os.cpu_count(), "cpu": cpu_name(),
                         "torch": torch.__version__,
                         "commit": environment_info()["git_commit"],
                         "date": time.strftime("%Y-%m-%d")},
             "smoke": args.smoke, "result": result}
    save_benchmark(saved, RESULTS, DOC, TABLE_START, TABLE_END, render_table(saved))
    if not args.smoke:
        write_between_markers(DOC, USE_START, USE_END, render_machine_use(saved))
        write_between_markers(README, SUMMARY_START, SUMMARY_END, render_summary(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
