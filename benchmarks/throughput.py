"""Training and encoding throughput of this library against sentence-transformers, same run.

    python benchmarks/throughput.py                 # one shape and precision, CPU or GPU
    python benchmarks/throughput.py --matrix        # both shapes x both precisions, saved to
                                                    # benchmarks/results.json, docs table
    python benchmarks/throughput.py --smoke         # seconds: what CI runs

Every contender starts from the same randomly initialised MiniMind-shaped retriever, the same
People's Daily records, batch size, hard negatives, maximum lengths, temperature and precision,
and runs in its own child process, so its peak memory (``ru_maxrss``, or
``torch.cuda.max_memory_allocated`` on a GPU) is its own. Two shapes (``--shape``): ``demo``,
the 27M demo twin the notebooks train (0.5M parameters, passages of 128 tokens), and ``real``,
MiniMind-27M's real shape (8 layers x 512, random weights, passages of 256 tokens), so a ratio is
not an artefact of a tiny model. Two precisions (``--precision``): fp32, and bf16 autocast, which
each contender gets its own way (this library's ``precision="bf16"``; the peer's Trainer
``bf16=True``, and a bf16 copy of the model for its ``encode``):

* training: ``train_retriever`` (one epoch, the time of the training loop) against
  ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss(scale=1/τ)`` and with
  ``CachedMultipleNegativesRankingLoss`` on the exported copy of the same model;
* encoding: ``encode_passages`` against ``SentenceTransformer.encode_document``.

This library keeps freed CPU memory for reuse (``retrieval_lib.settings.allocator``); each peer runs
twice, as a user runs it (glibc's malloc as it is) and with the same setting (``+kept``), so the
ratio to the peer at its best does not credit the library with an allocator switch.

It prints samples (or passages) per second, peak memory and the ratio to each peer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from retrieval_lib.settings import ENV_VAR as ALLOCATOR_ENV

MODELS = {"minimind27": "minimind27_10k", "minimind108": "minimind108_10k",
          "qwen2": "qwen2_494_288k"}


#: The real shapes: the full preset's model with random weights and these passage lengths.
REAL_PASSAGE_LENGTH = 256
RESULTS = Path(__file__).with_name("results.json")
DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"  # its table
TABLE_START, TABLE_END = "<!-- throughput table: start -->", "<!-- throughput table: end -->"


def _setup(args):
    import torch

    from retrieval_lib.data import tokenizer
    from retrieval_lib.models import DualTowerRetriever
    from retrieval_lib.settings import config

    exp = config.get_experiment(MODELS[args.model], "demo")
    records = _demo_records(MODELS[args.model])[: args.records]
    texts = [r["query"] for r in records] + [p["text"] for r in records
                                             for p in r["positive_passages"]]
    tok = tokenizer.train_bpe_tokenizer(texts, vocab_size=args.vocab)
    cfg = exp.model
    if args.shape == "real":
        full = config.get_experiment(MODELS[args.model], "full").model
        cfg = replace(full, max_passage_length=REAL_PASSAGE_LENGTH, num_new_layers=0)
    cfg = replace(cfg, vocab_size=len(tok))
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
    training = replace(exp.training, epochs=1, batch_size=args.batch_size,
                       num_hard_negatives=args.hard_negatives, warmup_ratio=0.0)
    return model, records, training


@functools.cache
def _demo_records(experiment: str) -> list[dict]:
    """The demo corpus's records, read once per process: the smoke run sets up its five
    contenders in one process, and building the records (BM25 over every article) costs more
    than their smoke-sized steps."""
    from retrieval_lib.data import demo_corpus
    from retrieval_lib.settings import config

    return demo_corpus.load_demo_records(config.get_experiment(experiment, "demo").data)[0]


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _st_model(model, workdir):
    import torch

    from retrieval_lib.serving import to_sentence_transformer

    st = to_sentence_transformer(model, workdir)
    return st.to("cuda" if torch.cuda.is_available() else "cpu")


def _StepClock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        first_begin = last_end = None
        steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_begin is None:
                self.first_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.last_end = time.perf_counter()
            self.steps += 1

    return StepClock()


def run_contender(args) -> dict:
    """One contender, in this (child) process."""
    import torch
    from datasets import Dataset

    from retrieval_lib.settings import allocator

    if args.contender.endswith(KEPT):
        allocator.keep_freed_memory()  # what the library does for itself
        args = replace_args(args, contender=args.contender.removesuffix(KEPT))

    model, records, training = _setup(args)
    if args.what == "encode":
        passages = [p["text"] for r in records for p in r["positive_passages"]
                    + r["negative_passages"]][: args.passages]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.contender == "ours":
            model.to(device)
            model.precision = args.precision
            encode = lambda: model.encode_passages(passages, batch_size=args.batch_size)  # noqa: E731
        else:
            with tempfile.TemporaryDirectory() as tmp:
                st = _st_model(model, tmp)
            if args.precision == "bf16":
                st = st.to(torch.bfloat16)
            encode = lambda: st.encode_document(passages, batch_size=args.batch_size)  # noqa: E731
        encode()  # warm-up
        if args.contender == "ours":  # time a first encoding: no token ids kept from the warm-up
            model.clear_token_cache()
        start = time.perf_counter()
        encode()
        seconds = time.perf_counter() - start
        return {"items": len(passages), "seconds": seconds, "per_second": len(passages) / seconds,
                "peak_memory_mb": _peak_memory_mb()}
    steps = args.steps
    train = Dataset.from_list(records[: steps * args.batch_size])
    if args.contender == "ours":
        from retrieval_lib.training import train_retriever

        with tempfile.TemporaryDirectory() as tmp:
            history = train_retriever(model, train, Dataset.from_list(records[-8:]), training,
                                      tmp, show_progress=False, precision=args.precision)
        epoch = history["epochs"][0]
        seconds, samples = epoch["train_time_s"], epoch["train_samples"]
    else:
        from sentence_transformers import (
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from sentence_transformers.sentence_transformer import losses

        k = training.num_hard_negatives
        rows = {"anchor": [r["query"] for r in train],
                "positive": [r["positive_passages"][0]["text"] for r in train]}
        for j in range(k):
            rows[f"negative_{j + 1}"] = [r["negative_passages"][j]["text"] for r in train]
        with tempfile.TemporaryDirectory() as tmp:
            st = _st_model(model, tmp)
            scale = 1 / training.temperature
            loss = (losses.CachedMultipleNegativesRankingLoss(st, scale=scale,
                                                              mini_batch_size=args.batch_size)
                    if args.contender == "st-cached"
                    else losses.MultipleNegativesRankingLoss(st, scale=scale))
            targs = SentenceTransformerTrainingArguments(
                output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                learning_rate=training.learning_rate, warmup_ratio=0.0, report_to=[],
                save_strategy="no", logging_steps=10_000, dataloader_drop_last=True,
                disable_tqdm=True, seed=training.seed, bf16=args.precision == "bf16",
                use_cpu=not torch.cuda.is_available())
            clock = _StepClock()
            trainer = SentenceTransformerTrainer(model=st, args=targs,
                                                 train_dataset=Dataset.from_dict(rows), loss=loss,
                                                 callbacks=[clock])
            trainer.train()
        # from the first step's start to the last step's end: the trainer's set-up is not
        # counted, as the set-up of train_retriever is not
        seconds = clock.last_end - clock.first_begin
        samples = clock.steps * args.batch_size
    return {"items": samples, "seconds": seconds, "per_second": samples / seconds,
            "peak_memory_mb": _peak_memory_mb()}


def _run_one(args) -> dict:
    """Every contender of the chosen benchmarks at one shape and precision, each in a child
    process (its peak memory its own), or all in this one for ``--smoke``."""
    peers = {"train": ("ours", "st", "st-cached"), "encode": ("ours", "st")}
    if not args.smoke:  # the allocator is per process: the smoke run keeps one process
        peers = {what: (*names, *(n + KEPT for n in names[1:])) for what, names in peers.items()}
    whats = ("train", "encode") if args.what == "all" else (args.what,)
    forwarded = ["--model", args.model, "--batch-size", str(args.batch_size),
                 "--hard-negatives", str(args.hard_negatives), "--steps", str(args.steps),
                 "--passages", str(args.passages), "--records", str(args.records),
                 "--vocab", str(args.vocab), "--shape", args.shape,
                 "--precision", args.precision]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    plain_malloc = {**env, ALLOCATOR_ENV: "default"}  # a peer as its users run it
    report = {}
    for what in whats:
        results = {}
        for contender in peers[what]:
            if args.smoke:  # nothing is recorded: one process, no start-up per contender
                results[contender] = run_contender(replace_args(args, what=what,
                                                                contender=contender))
                continue
            out = subprocess.run([sys.executable, __file__, *forwarded, "--what", what,
                                  "--contender", contender], capture_output=True, text=True,
                                 env=env if contender == "ours" or contender.endswith(KEPT)
                                 else plain_malloc)
            if out.returncode != 0:
                raise RuntimeError(f"{contender} {what} failed:\n{out.stderr[-4000:]}")
            results[contender] = json.loads(out.stdout.strip().splitlines()[-1])
        unit = "samples/s" if what == "train" else "passages/s"
        print(f"\n{what} ({args.model}, {args.shape} shape, {args.precision}, batch "
              f"{args.batch_size}, {args.hard_negatives} hard negatives"
              f"{', smoke' if args.smoke else ''}):")
        for contender, r in results.items():
            ratio = results["ours"]["per_second"] / r["per_second"]
            peak = r["peak_memory_mb"]
            print(f"  {contender:15s} {r['per_second']:9.1f} {unit}  peak {peak:8.0f} MB"
                  + ("" if contender == "ours" else f"  ours/this = {ratio:.2f}x"))
        report[what] = results
    return report


def _machine() -> dict:
    """Where and with what the results were measured (commit, versions, CPU, GPU, date)."""
    import torch

    from retrieval_lib.models import cpu_has_native_bf16
    from retrieval_lib.results import environment_info

    env = environment_info()
    return {"cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "native_bf16_on_cpu": cpu_has_native_bf16(), "commit": env["git_commit"],
            "packages": env["packages"], "date": time.strftime("%Y-%m-%d")}


#: Contender suffix: the peer run with freed memory kept, as this library runs itself.
KEPT = "+kept"


PEER_NAMES = {"st": "`SentenceTransformerTrainer` + `MultipleNegativesRankingLoss`",
              "st-cached": "`SentenceTransformerTrainer` + `CachedMultipleNegativesRankingLoss`",
              "st-encode": "`SentenceTransformer.encode_document`"}


def render_table(saved: dict) -> str:
    """The docs table of throughput, from the saved results of ``--matrix``."""
    machine = saved["machine"]
    lines = [f"Measured {machine['date']} on {machine['cpu_cores']} CPU cores"
             f"{', GPU ' + machine['gpu'] if machine['gpu'] else ', no GPU'}, torch "
             f"{machine['torch']} (native bf16 on this CPU: "
             f"{'yes' if machine['native_bf16_on_cpu'] else 'no'}), commit "
             f"`{machine['commit']}`; `python benchmarks/throughput.py --matrix` wrote "
             f"`benchmarks/results.json`, and this table is rendered from it.", "",
             "| shape | precision | benchmark | this library | peer | peer's figure | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in saved["runs"]:
        shape, precision = run["shape"], run["precision"]
        for what, unit in (("train", "samples/s"), ("encode", "passages/s")):
            results = run["report"][what]
            ours = results["ours"]["per_second"]
            for peer, r in results.items():
                if peer == "ours":
                    continue
                base = peer.removesuffix(KEPT)
                name = PEER_NAMES["st-encode" if what == "encode" else base] + (
                    ", freed memory kept" if peer.endswith(KEPT) else "")
                lines.append(f"| {shape} | {precision} | {what}, {unit} | {ours:.1f} | {name} | "
                             f"{r['per_second']:.1f} | {ours / r['per_second']:.2f}× |")
    lines += ["", target_summary(saved)]
    return "\n".join(lines)


def target_summary(saved: dict, target: float = 1.5) -> str:
    """One sentence per benchmark: the ratio to the peer at its best (its fastest variant,
    freed memory kept or not) at each shape and precision, against the target."""
    parts = []
    for what, name in (("train", "Training"), ("encode", "Encoding")):
        ratios = {}
        for run in saved["runs"]:
            results = run["report"][what]
            best = max(r["per_second"] for peer, r in results.items() if peer != "ours")
            ratios[f"{run['shape']} {run['precision']}"] = results["ours"]["per_second"] / best
        cells = ", ".join(f"{cell} {ratio:.2f}×" for cell, ratio in ratios.items())
        met = sum(ratio >= target for ratio in ratios.values())
        parts.append(f"{name} against the peer at its best: {cells} "
                     f"(target ≥ {target}×: met in {met} of {len(ratios)}).")
    return " ".join(parts)


def write_readme_table(saved: dict, readme: Path) -> None:
    from retrieval_lib.results import write_between_markers

    write_between_markers(readme, TABLE_START, TABLE_END, render_table(saved))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("train", "encode", "all"), default="all")
    parser.add_argument("--model", choices=tuple(MODELS), default="minimind27")
    parser.add_argument("--shape", choices=("demo", "real"), default="demo")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--matrix", action="store_true",
                        help="both shapes and precisions; save results.json, update the README")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hard-negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="training steps per contender")
    parser.add_argument("--real-steps", type=int, default=8,
                        help="training steps per contender at the real shape (--matrix)")
    parser.add_argument("--passages", type=int, default=1024, help="passages to encode")
    parser.add_argument("--records", type=int, default=2400)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.passages, args.records, args.vocab = 2, 32, 120, 500
        args.batch_size = min(args.batch_size, 4)
    if args.contender:  # child process
        print(json.dumps(run_contender(args)))
        return 0
    if not args.matrix:
        print(json.dumps(_run_one(args)))
        return 0
    runs = []
    for shape in ("demo", "real"):
        for precision in ("fp32", "bf16"):
            steps = args.steps if shape == "demo" or args.smoke else args.real_steps
            passages = args.passages if shape == "demo" or args.smoke else args.passages // 4
            one = replace_args(args, shape=shape, precision=precision, steps=steps,
                               passages=passages)
            runs.append({"shape": shape, "precision": precision, "steps": steps,
                         "passages": passages, "report": _run_one(one)})
    saved = {"machine": _machine(), "batch_size": args.batch_size,
             "hard_negatives": args.hard_negatives, "smoke": args.smoke, "runs": runs}
    if not args.smoke:
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        write_readme_table(saved, DOC)
    print(render_table(saved))
    print(json.dumps(saved))
    return 0


def replace_args(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    raise SystemExit(main())
