"""Training throughput of this library against FlagEmbedding's own fine-tuning, same run.

    python benchmarks/flagembedding.py          # both shapes x both precisions (~15 minutes on
                                                # 2 cores): benchmarks/flagembedding.json, docs
    python benchmarks/flagembedding.py --smoke  # seconds: what CI runs

FlagEmbedding (1.4) is the code that trains BGE-M3 and turns decoder LLMs into embedders. Its
decoder-only fine-tuning (``FlagEmbedding.finetune.embedder.decoder_only.base``:
``DecoderOnlyEmbedderRunner``, its dataset, collator and ``Trainer``) runs here as its users run
it, from a model folder and a JSON-lines file of ``{"query", "pos", "neg"}`` records, against
``train_retriever`` (``throughput.py``'s contender). Both start from the same randomly
initialised MiniMind-shaped encoder (the demo twin, and MiniMind-27M's real shape: 8 layers ×
512, passages of 256 tokens), the same People's Daily records, groups of 1 positive + K hard
negatives (``train_group_size = 1 + K``), batch, maximum lengths, temperature, pooling,
learning rate and precision (fp32, and bf16 autocast: the library's ``precision="bf16"``, the
peer's ``bf16=True``), each in its own process; each peer runs twice, with glibc's malloc as it
is and with freed memory kept (``+kept``), as the library runs itself.

The peer's settings, chosen for its best speed at the same arithmetic: full fine-tuning
(``use_lora=False``; its default LoRA would train other weights), no sub-batches
(``sub_batch_size`` unset), no gradient checkpointing, in-batch negatives on one device,
``dataloader_drop_last``. What still differs: FlagEmbedding's model has no projection head
(the library's adds one ``hidden x 128`` product per text, under 1% of the step's operations)
and pads on the left. Time: the first step's start to the last step's end (set-up not counted,
as the library's set-up is not).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "flagembedding.json"
DOC = HERE.parent / "docs" / "performance.md"
TABLE_START = "<!-- flagembedding table: start -->"
TABLE_END = "<!-- flagembedding table: end -->"
TARGET = 1.2  # the goal: this library's steps/s over the peer's at its best
README = HERE.parent / "README.md"
SUMMARY_START = "<!-- flagembedding summary: start -->"
SUMMARY_END = "<!-- flagembedding summary: end -->"


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_flag_records(records: list[dict], k: int, path: Path) -> Path:
    """``records`` in FlagEmbedding's training format: one JSON object a line with the query,
    its positive and its first ``k`` hard negatives."""
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"query": r["query"], "pos": [r["positive_passages"][0]["text"]],
                                "neg": [p["text"] for p in r["negative_passages"][:k]]},
                               ensure_ascii=False) + "\n")
    return path


def run_flag(args) -> dict:
    """FlagEmbedding's decoder-only fine-tuning, in this (child) process."""
    import torch
    from FlagEmbedding.abc.finetune.embedder import (
        AbsEmbedderDataArguments,
        AbsEmbedderTrainingArguments,
    )
    from FlagEmbedding.finetune.embedder.decoder_only.base import (
        DecoderOnlyEmbedderModelArguments,
        DecoderOnlyEmbedderRunner,
    )

    throughput = _throughput()
    model, records, training = throughput._setup(args)
    k = training.num_hard_negatives
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        model.encoder.save_pretrained(str(base), safe_serialization=True)
        model.tokenizer.save_pretrained(str(base))
        data = write_flag_records(records[: args.steps * args.batch_size], k,
                                  Path(tmp) / "train.jsonl")
        targs = AbsEmbedderTrainingArguments(
            output_dir=str(Path(tmp) / "out"), per_device_train_batch_size=args.batch_size,
            num_train_epochs=1, learning_rate=training.learning_rate, warmup_steps=0,
            report_to=[], save_strategy="no", logging_steps=10_000, dataloader_drop_last=True,
            disable_tqdm=True, seed=training.seed, bf16=args.precision == "bf16",
            use_cpu=not torch.cuda.is_available(), temperature=training.temperature,
            sentence_pooling_method=model.pooling, normalize_embeddings=True)
        runner = DecoderOnlyEmbedderRunner(
            DecoderOnlyEmbedderModelArguments(model_name_or_path=str(base), use_lora=False),
            AbsEmbedderDataArguments(train_data=[str(data)], train_group_size=1 + k,
                                     query_max_len=model.max_query_length,
                                     passage_max_len=model.max_passage_length,
                                     cache_path=str(Path(tmp) / "cache")),
            targs)
        clock = throughput._StepClock()
        runner.trainer.add_callback(clock)
        runner.trainer.train()
    seconds = clock.last_end - clock.first_begin
    samples = clock.steps * args.batch_size
    return {"items": samples, "steps": clock.steps, "seconds": seconds,
            "per_second": samples / seconds, "peak_memory_mb": throughput._peak_memory_mb()}


def run_one(args, throughput) -> dict:
    """The library and the peer (plain and ``+kept``) at one shape and precision, each in its
    own process (in this one for ``--smoke``)."""
    from retrieval_lib.settings import ENV_VAR

    forwarded = ["--batch-size", str(args.batch_size), "--hard-negatives",
                 str(args.hard_negatives), "--steps", str(args.steps), "--records",
                 str(args.records), "--vocab", str(args.vocab), "--shape", args.shape,
                 "--precision", args.precision]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for contender in ("ours", "flag", "flag" + throughput.KEPT):
        if args.smoke:
            if contender == "ours":
                results[contender] = throughput.run_contender(throughput.replace_args(
                    args, model="minimind27", what="train", contender="ours", passages=0))
            elif not contender.endswith(throughput.KEPT):
                results[contender] = run_flag(args)
            continue
        script = HERE / ("throughput.py" if contender == "ours" else "flagembedding.py")
        extra = ["--what", "train", "--contender", "ours"] if contender == "ours" else [
            "--contender", contender]
        out = subprocess.run([sys.executable, str(script), *forwarded, *extra],
                             capture_output=True, text=True,
                             env=env if contender != "flag" else {**env, ENV_VAR: "default"})
        if out.returncode != 0:
            raise RuntimeError(f"{contender} failed:\n{out.stderr[-4000:]}")
        results[contender] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def render_table(saved: dict) -> str:
    m = saved["machine"]
    lines = [f"Measured {m['date']} on {m['cpu_cores']} CPU cores, torch {m['torch']}, "
             f"FlagEmbedding {saved['flagembedding_version']}, commit "
             f"`{m['commit']}`; `python benchmarks/flagembedding.py` wrote "
             f"`benchmarks/flagembedding.json`, and this table is rendered from it. Batch "
             f"{saved['batch_size']}, 1 positive + {saved['hard_negatives']} hard negatives per "
             f"query.", "",
             "| shape | precision | steps | this library, samples/s | FlagEmbedding, samples/s | "
             "FlagEmbedding, freed memory kept | ratio to the peer at its best |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in saved["runs"]:
        r = run["results"]
        best = max(r["flag"]["per_second"], r["flag+kept"]["per_second"])
        rate = [_rate(r[k]["per_second"]) for k in ("ours", "flag", "flag+kept")]
        lines.append(f"| {run['shape']} | {run['precision']} | {run['steps']} | "
                     f"{' | '.join(rate)} | {r['ours']['per_second'] / best:.2f}× |")
    return "\n".join(lines + ["", summary(saved)])


def _rate(per_second: float) -> str:
    """Three significant digits at either shape (the real one trains ~1 sample/s)."""
    return f"{per_second:.1f}" if per_second >= 10 else f"{per_second:.2f}"


def ratios(saved: dict) -> dict[str, float]:
    """This library's samples/s over the peer's at its best, per shape and precision."""
    out = {}
    for run in saved["runs"]:
        r = run["results"]
        best = max(r["flag"]["per_second"], r["flag+kept"]["per_second"])
        out[f"{run['shape']} {run['precision']}"] = r["ours"]["per_second"] / best
    return out


def summary(saved: dict) -> str:
    found = ratios(saved)
    met = sum(v >= TARGET for v in found.values())
    cells = ", ".join(f"{k} {v:.2f}×" for k, v in found.items())
    return (f"Against FlagEmbedding at its best: {cells} (target ≥ {TARGET}×: met in {met} of "
            f"{len(found)}).")


def readme_summary(saved: dict) -> str:
    """The README's sentence: training speed against FlagEmbedding's own fine-tuning."""
    return (f"**Against the field's trainer.** Training samples/s of this library over "
            f"FlagEmbedding {saved['flagembedding_version']}'s own decoder-only fine-tuning, "
            f"same model, records and settings: {summary(saved).split(': ', 1)[1][:-1]} "
            f"([docs/performance.md](docs/performance.md), `benchmarks/flagembedding.py`).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("demo", "real"), default="demo")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hard-negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="training steps (demo shape)")
    parser.add_argument("--real-steps", type=int, default=8, help="training steps (real shape)")
    parser.add_argument("--records", type=int, default=2400)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = "minimind27"
    if args.smoke:
        args.steps, args.records, args.vocab, args.batch_size = 2, 120, 500, 4
    throughput = _throughput()
    if args.contender:  # child process
        if args.contender.endswith(throughput.KEPT):
            from retrieval_lib.settings import allocator

            allocator.keep_freed_memory()
        print(json.dumps(run_flag(args)))
        return 0
    runs = []
    cells = [("demo", "fp32")] if args.smoke else [
        (shape, precision) for shape in ("demo", "real") for precision in ("fp32", "bf16")]
    for shape, precision in cells:
        steps = args.steps if shape == "demo" else args.real_steps
        one = throughput.replace_args(args, shape=shape, precision=precision, steps=steps)
        runs.append({"shape": shape, "precision": precision, "steps": steps,
                     "results": run_one(one, throughput)})
    from importlib.metadata import version

    saved = {"machine": throughput._machine(), "flagembedding_version": version("FlagEmbedding"),
             "batch_size": args.batch_size,
             "hard_negatives": args.hard_negatives, "smoke": args.smoke, "runs": runs}
    if not args.smoke:
        from retrieval_lib.results import write_between_markers

        RESULTS.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        write_between_markers(DOC, TABLE_START, TABLE_END, render_table(saved))
        write_between_markers(README, SUMMARY_START, SUMMARY_END, readme_summary(saved))
        print(render_table(saved))
    print(json.dumps(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
