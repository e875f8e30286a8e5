"""Training and encoding throughput of this library against sentence-transformers, same run.

    python benchmarks/throughput.py                 # both benchmarks, demo corpus, CPU or GPU
    python benchmarks/throughput.py --smoke         # seconds: what CI runs

Every contender starts from the same randomly initialised MiniMind-shaped retriever (the 27M
demo twin unless ``--model`` says otherwise), the same People's Daily records, batch size, hard
negatives, maximum lengths and temperature, and runs in its own child process, so its peak
memory (``ru_maxrss``, or ``torch.cuda.max_memory_allocated`` on a GPU) is its own:

* training: ``train_retriever`` (one epoch, the time of the training loop) against
  ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss(scale=1/τ)`` and with
  ``CachedMultipleNegativesRankingLoss`` on the exported copy of the same model;
* encoding: ``encode_passages`` against ``SentenceTransformer.encode_document``.

It prints samples (or passages) per second, peak memory and the ratio to each peer.
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

MODELS = {"minimind27": "minimind27_10k", "minimind108": "minimind108_10k",
          "qwen2": "qwen2_494_288k"}


def _setup(args):
    import torch

    from retrieval_lib import config, demo_corpus, tokenizer
    from retrieval_lib.modeling import DualTowerRetriever

    exp = config.get_experiment(MODELS[args.model], "demo")
    records, _, _ = demo_corpus.load_demo_records(exp.data)
    records = records[: args.records]
    texts = [r["query"] for r in records] + [p["text"] for r in records
                                             for p in r["positive_passages"]]
    tok = tokenizer.train_bpe_tokenizer(texts, vocab_size=args.vocab)
    cfg = replace(exp.model, vocab_size=len(tok))
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
    training = replace(exp.training, epochs=1, batch_size=args.batch_size,
                       num_hard_negatives=args.hard_negatives, warmup_ratio=0.0)
    return model, records, training


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _st_model(model, workdir):
    import torch

    from retrieval_lib.export import to_sentence_transformer

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

    model, records, training = _setup(args)
    if args.what == "encode":
        passages = [p["text"] for r in records for p in r["positive_passages"]
                    + r["negative_passages"]][: args.passages]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.contender == "ours":
            model.to(device)
            encode = lambda: model.encode_passages(passages, batch_size=args.batch_size)  # noqa: E731
        else:
            with tempfile.TemporaryDirectory() as tmp:
                st = _st_model(model, tmp)
            encode = lambda: st.encode_document(passages, batch_size=args.batch_size)  # noqa: E731
        encode()  # warm-up
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
                                      tmp, show_progress=False)
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
                disable_tqdm=True, seed=training.seed)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("train", "encode", "all"), default="all")
    parser.add_argument("--model", choices=tuple(MODELS), default="minimind27")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hard-negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="training steps per contender")
    parser.add_argument("--passages", type=int, default=1024, help="passages to encode")
    parser.add_argument("--records", type=int, default=2400)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    parser.add_argument("--contender", choices=("ours", "st", "st-cached"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.passages, args.records, args.vocab = 2, 32, 120, 500
        args.batch_size = min(args.batch_size, 4)
    if args.contender:  # child process
        print(json.dumps(run_contender(args)))
        return 0
    peers = {"train": ("ours", "st", "st-cached"), "encode": ("ours", "st")}
    whats = ("train", "encode") if args.what == "all" else (args.what,)
    forwarded = ["--model", args.model, "--batch-size", str(args.batch_size),
                 "--hard-negatives", str(args.hard_negatives), "--steps", str(args.steps),
                 "--passages", str(args.passages), "--records", str(args.records),
                 "--vocab", str(args.vocab)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    report = {}
    for what in whats:
        results = {}
        for contender in peers[what]:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--what", what,
                                  "--contender", contender], capture_output=True, text=True,
                                 env=env)
            if out.returncode != 0:
                print(out.stderr[-4000:], file=sys.stderr)
                return out.returncode
            results[contender] = json.loads(out.stdout.strip().splitlines()[-1])
        unit = "samples/s" if what == "train" else "passages/s"
        print(f"\n{what} ({args.model} demo shape, batch {args.batch_size}, "
              f"{args.hard_negatives} hard negatives{', smoke' if args.smoke else ''}):")
        for contender, r in results.items():
            ratio = results["ours"]["per_second"] / r["per_second"]
            peak = r["peak_memory_mb"]
            print(f"  {contender:10s} {r['per_second']:9.1f} {unit}  peak {peak:8.0f} MB"
                  + ("" if contender == "ours" else f"  ours/this = {ratio:.2f}x"))
        report[what] = results
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
