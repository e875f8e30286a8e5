"""Batching policies side by side on two processes: padding, tokens per process, steps per second.

    .venv/bin/python benchmarks/batching.py            # a few minutes on 2 CPU cores: writes
                                                       # benchmarks/batching.json, docs table
    .venv/bin/python benchmarks/batching.py --summary runs/01_data_preprocessing/summary.json
    .venv/bin/python benchmarks/batching.py --smoke    # seconds: what CI runs

Records: one positive passage length per record, drawn per source from the passage-length
percentiles that notebook 01 saves in its ``summary.json`` (``passage_token_percentiles``: give
``--summary`` the full preset's one), or, offline, from a **synthetic stand-in** (not measured):
five sources of equal size whose lengths are log-normal with the medians in
:data:`STAND_IN_MEDIANS`, from short encyclopaedia paragraphs to long court cases, as the five
Chinese sources of BGE-M3's data range. Passages are truncated at the full preset's 512 tokens
and padded to a multiple of 8, as the collator does.

Four policies, each with 2 processes × ``--batch-size`` queries and ``1 + K`` passages a query:

* ``random``: global random batches, each process half (as torch's ``DistributedSampler`` draws);
* ``grouped per process``: each process groups its own random half by length with its own seed
  (length grouping done by each process alone, as before this library shared the seed);
* ``grouped, shared seed``: :class:`~retrieval_lib.training.batching.BucketBatchSampler`, every
step one
  length bucket on both processes;
* ``grouped, shared seed, one source``: the same, each batch within one source (the default).

For each: the padding fraction of the passage positions, tokens per process per step (mean of
the larger over the smaller of the two processes), and steps per second over the whole epoch
(``--timed-steps`` times only the first steps). A DDP step waits for
its slower process, so a step's time here is the slower of the two processes' forward and
backward passes of their padded batches, timed one after the other on this CPU with the 27M
demo twin's shape (hard negatives as repeated positives: the lengths are what matters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "batching.json"
DOC = HERE.parent / "docs" / "performance.md"  # the page whose table this rewrites
TABLE_START, TABLE_END = "<!-- batching table: start -->", "<!-- batching table: end -->"
#: The stand-in's median passage length per source, in tokens (not measured; see above).
STAND_IN_MEDIANS = {"miracl": 150, "dureader": 300, "t2ranking": 450, "mldr": 3000,
                    "lecardv2": 6000}
STAND_IN_SIGMA = 0.6  # spread of log length
MAX_PASSAGE_TOKENS = 512  # the full preset's window
POLICIES = ("random", "grouped per process", "grouped, shared seed",
            "grouped, shared seed, one source")


def record_lengths(n_per_source: int, seed: int, summary: Path | None
                   ) -> tuple[list[int], list[str], str]:
    """Passage lengths and sources of the records, and where they come from."""
    rng = np.random.default_rng(seed)
    lengths, sources = [], []
    if summary is not None:
        saved = json.loads(summary.read_text(encoding="utf-8"))
        table = saved.get("passage_token_percentiles")
        if not table:
            raise SystemExit(f"{summary}: no 'passage_token_percentiles' (run notebook 01 of "
                             f"this version to write them)")
        for source, percentiles in sorted(table.items()):
            q = np.linspace(0, 100, len(percentiles))
            drawn = np.interp(rng.uniform(0, 100, n_per_source), q, percentiles)
            lengths += [max(1, int(x)) for x in drawn]
            sources += [source] * n_per_source
        return lengths, sources, f"percentiles of {summary}"
    for source, median in STAND_IN_MEDIANS.items():
        drawn = rng.lognormal(math.log(median), STAND_IN_SIGMA, n_per_source)
        lengths += [max(1, int(x)) for x in drawn]
        sources += [source] * n_per_source
    return lengths, sources, "synthetic stand-in (log-normal, medians in STAND_IN_MEDIANS)"


def policy_batches(policy: str, lengths: list[int], sources: list[str], batch_size: int,
                   seed: int, epoch: int = 1) -> list[list[list[int]]]:
    """``steps[step][rank]``: the record indices each of the 2 processes trains at each step."""
    from retrieval_lib.training import BucketBatchSampler

    n, world = len(lengths), 2
    if policy == "grouped per process":
        perm = np.random.default_rng(seed + epoch).permutation(n)
        halves = [sorted(perm[r::world].tolist()) for r in range(world)]
        per_rank = []
        for r, half in enumerate(halves):
            sampler = BucketBatchSampler(len(half), batch_size, seed + 1 + r,
                                         lengths=[lengths[i] for i in half])
            sampler.set_epoch(epoch)
            per_rank.append([[half[i] for i in b] for b in sampler])
        return [list(step) for step in zip(*per_rank, strict=True)]
    grouped = policy != "random"
    ranks = [BucketBatchSampler(n, batch_size, seed, lengths=lengths if grouped else None,
                                sources=sources if policy.endswith("one source") else None,
                                world=world, rank=r) for r in range(world)]
    for sampler in ranks:
        sampler.set_epoch(epoch)
    return [list(step) for step in zip(*(list(s) for s in ranks), strict=True)]


def padded(batch: list[int], lengths: list[int], passages_per_query: int) -> tuple[int, int]:
    """(real tokens, padded positions) of a process's passages for ``batch``."""
    cut = [min(lengths[i], MAX_PASSAGE_TOKENS) for i in batch] * passages_per_query
    width = -(-max(cut) // 8) * 8
    return sum(cut), width * len(cut)


def measure(policy: str, lengths, sources, args, model=None) -> dict:
    import torch

    steps = policy_batches(policy, lengths, sources, args.batch_size, args.seed)
    per_query = 1 + args.hard_negatives
    real = pads = 0
    ratios, times = [], []
    for k, step in enumerate(steps):
        counts = [padded(b, lengths, per_query) for b in step]
        real += sum(c[0] for c in counts)
        pads += sum(c[1] - c[0] for c in counts)
        ratios.append(max(c[1] for c in counts) / min(c[1] for c in counts))
        if model is not None and (k < args.timed_steps or not args.timed_steps):
            rank_times = []
            for batch in step:
                cut = [min(lengths[i], MAX_PASSAGE_TOKENS) for i in batch] * per_query
                width = -(-max(cut) // 8) * 8
                ids = torch.randint(5, model.encoder.config.vocab_size, (len(cut), width))
                mask = (torch.arange(width)[None, :] < torch.tensor(cut)[:, None]).long()
                start = time.perf_counter()
                emb = model.embed(ids, mask, "passage")
                emb.pow(2).sum().backward()  # the encoder's forward and backward
                rank_times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
            times.append(max(rank_times))
    out = {"steps": len(steps), "padding_fraction": pads / (real + pads),
           "tokens_per_process_max_over_min": float(np.mean(ratios))}
    if times:
        out["timed_steps"] = len(times)
        out["steps_per_second"] = len(times) / sum(times)
    return out


def _machine() -> dict:
    import torch

    from retrieval_lib.results import environment_info

    env = environment_info()
    return {"cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "commit": env["git_commit"], "date": time.strftime("%Y-%m-%d")}


def render_table(saved: dict) -> str:
    """The docs table of batching, from ``batching.json``."""
    s, m = saved["settings"], saved["machine"]
    lines = [f"Measured {m['date']} on {m['cpu_cores']} CPU cores, torch {m['torch']}, commit "
             f"`{m['commit']}`; `python benchmarks/batching.py` wrote "
             f"`benchmarks/batching.json`, and this table is rendered from it. Records: "
             f"{s['records']:,} ({s['lengths_from']}); 2 processes × {s['batch_size']} queries "
             f"× {1 + s['hard_negatives']} passages, passages cut at {MAX_PASSAGE_TOKENS} "
             f"tokens; step time = the slower process's forward + backward "
             f"({s['model']}, {s['timed_steps']} steps).", "",
             "| policy | padding of passage positions | tokens per process, max / min | "
             "steps per second | vs random |", "| --- | --- | --- | --- | --- |"]
    base = saved["policies"]["random"]["steps_per_second"]
    for name, r in saved["policies"].items():
        lines.append(f"| {name} | {r['padding_fraction']:.1%} | "
                     f"{r['tokens_per_process_max_over_min']:.2f} | "
                     f"{r['steps_per_second']:.2f} | {r['steps_per_second'] / base:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, help="notebook 01's summary.json (full preset)")
    parser.add_argument("--per-source", type=int, default=1600, help="records per source")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per process")
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=0,
                        help="steps of the epoch to time (0: all of them)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_source, args.timed_steps = 32, 1

    import torch

    from retrieval_lib.data import tokenizer
    from retrieval_lib.models import DualTowerRetriever
    from retrieval_lib.results import save_benchmark
    from retrieval_lib.settings import config

    lengths, sources, where = record_lengths(args.per_source, args.seed, args.summary)
    shape = config.get_experiment("minimind27_10k", "demo").model
    tok = tokenizer.train_bpe_tokenizer(["人民日报社论"] * 8, vocab_size=300)
    torch.manual_seed(args.seed)
    model = DualTowerRetriever.from_config(shape, tokenizer=tok, pretrained=False)
    policies = {}
    for policy in POLICIES:
        policies[policy] = measure(policy, lengths, sources, args, model)
        r = policies[policy]
        print(f"{policy:34s} padding {r['padding_fraction']:6.1%}  tokens max/min "
              f"{r['tokens_per_process_max_over_min']:5.2f}  {r['steps_per_second']:6.2f} "
              f"steps/s", flush=True)
    saved = {"machine": _machine(), "smoke": args.smoke, "policies": policies,
             "settings": {"records": len(lengths), "lengths_from": where,
                          "batch_size": args.batch_size, "hard_negatives": args.hard_negatives,
                          "timed_steps": policies["random"].get("timed_steps"),
                          "seed": args.seed,
                          "model": f"{shape.name}, {shape.num_hidden_layers} layers × "
                                   f"{shape.hidden_size}"}}
    save_benchmark(saved, RESULTS, DOC, TABLE_START, TABLE_END, render_table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
