"""BGE-M3's stage ablation on the demo: does retrieval-oriented pretraining help the twins?

    .venv/bin/python benchmarks/stage1_ablation.py          # ~30 minutes on 2 CPU cores;
                                                            # writes stage1_ablation.json here
    .venv/bin/python benchmarks/stage1_ablation.py --smoke  # a minute: what CI runs

For the 27M and 108M demo twins, four recipes (the seed paper's ablation, XLM-R / +RetroMAE /
+RetroMAE +unsupervised, with the contrastive stage alone added):

1. LM -> fine-tuning (today's recipe)
2. LM -> 1a RetroMAE -> fine-tuning
3. LM -> 1a RetroMAE -> 1b contrastive -> fine-tuning
4. LM -> 1b contrastive -> fine-tuning

Each is trained in a project home of its own (the course's runs are not touched), with the
demo's stage-1 settings (``config.DEMO_STAGE1``) and fine-tuning settings. A recipe is judged
**on the validation set** (NDCG@10 of the kept epoch, paired randomisation test against recipe
1 of the same twin), so choosing the demo's default from this table does not tune on the test
set; the test NDCG@5 (with its paired test against recipe 1 and its share of BM25's) is there
for reference, with the untrained row (the encoder a recipe hands to fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("stage1_ablation.json")
DOC = ROOT / "docs" / "stage1.md"  # the page whose table this rewrites
TABLE_START, TABLE_END = ("<!-- stage 1 ablation table: start -->",
                          "<!-- stage 1 ablation table: end -->")
README = ROOT / "README.md"  # and the short form of it, one row per twin
SUMMARY_START, SUMMARY_END = ("<!-- stage 1 summary: start -->", "<!-- stage 1 summary: end -->")

MODELS = ("minimind27_10k", "minimind108_10k")


def run(smoke: bool, home: Path, models=MODELS) -> dict:
    from retrieval_lib import data, evaluation
    from retrieval_lib.course import experiment
    from retrieval_lib.course.stage_study import STAGE_RECIPES
    from retrieval_lib.models import DualTowerRetriever, PretrainConfig
    from retrieval_lib.results import baselines
    from retrieval_lib.results.runs import git_commit
    from retrieval_lib.settings import config

    config.set_project_home(home)
    if smoke:  # a sliver: 100 records, 30 LM steps, 20 RetroMAE steps, one epoch each
        config.DEMO_STAGE1 = replace(config.DEMO_STAGE1, retromae_steps=20, eval_every=10,
                                     pairs_per_text=1, contrastive_epochs=1)
    out = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "smoke": smoke,
           "cores": os.cpu_count(), "stage1": None, "models": {}}
    for name in models:
        base = config.get_experiment(name, "demo")
        if smoke:
            base = replace(base, data=replace(base.data, val_size=40, test_size=40,
                                              subset_sizes={"10k": 100, "96k": 150,
                                                            "288k": 200}),
                           training=replace(base.training, epochs=1))
        splits = data.prepare_data(base.data)
        bm25 = baselines.evaluate_bm25(splits.test)["aggregate"]["ndcg@5"]["mean"]
        out["stage1"] = json.loads(json.dumps(config.get_stage1_config("demo").__dict__))
        rows, per_query = {}, {}
        for key, (stages, what) in STAGE_RECIPES.items():
            exp = config.variant(base, key, pretraining_stages=stages)
            start = time.perf_counter()
            exp, info = experiment.prepare_base_model(
                exp, splits, PretrainConfig(max_steps=30) if smoke else None,
                show_progress=False)
            result = experiment.run_experiment(exp, splits, info, show_progress=False)
            best = DualTowerRetriever.load(Path(result["out_dir"]) / "best")
            validation = evaluation.evaluate_retriever(best, splits.validation)
            per_query[key] = {"validation": validation["per_query"]["ndcg@10"],
                              "test": result["test"]["per_query"]["ndcg@5"]}
            test = result["test"]["aggregate"]["ndcg@5"]["mean"]
            rows[key] = {
                "what": what, "stages": list(stages),
                "stage_runs": [{k: s[k] for k in ("stage", "texts", "folder") if k in s}
                               | {k: s[k] for k in ("pairs", "windows", "best_step",
                                                    "best_heldout_loss", "best_epoch")
                                  if k in s} for s in info.get("pretraining_stages", [])],
                "untrained_test_ndcg@5": result["untrained"]["aggregate"]["ndcg@5"]["mean"],
                "best_epoch": result["history"]["best_epoch"],
                "validation_ndcg@10": validation["aggregate"]["ndcg@10"]["mean"],
                "test_ndcg@5": test, "test_share_of_bm25": test / bm25,
                "seconds": round(time.perf_counter() - start, 1)}
            if key != "lm":
                for split in ("validation", "test"):
                    rows[key][f"{split}_vs_lm"] = evaluation.paired_test(
                        per_query[key][split], per_query["lm"][split])
            print(f"{name} {key:22s} val NDCG@10 {rows[key]['validation_ndcg@10']:.4f}  "
                  f"test NDCG@5 {test:.4f} ({test / bm25:.0%} of BM25)  "
                  f"{rows[key]['seconds']:.0f} s", flush=True)
        out["models"][name] = {"bm25_test_ndcg@5": bm25, "recipes": rows}
    return out


def _p(test: dict | None) -> str:
    from retrieval_lib.course.stage_study import difference_text

    return difference_text(test, (" (", ")"))


def _label(key: str) -> str:
    """A recipe's label as the library names it today (the saved ``what`` is the label of the
    day it was measured: "LM -> fine-tuning" was then the demo's current recipe)."""
    from retrieval_lib.course.stage_study import STAGE_RECIPES

    return STAGE_RECIPES[key][1]


def _verdict(saved: dict) -> str:
    """Per twin, the recipe validation picks (highest validation NDCG@10) and its test share
    of BM25: the sentence is built from the saved numbers."""
    parts = []
    for name, model in saved["models"].items():
        key, best = max(model["recipes"].items(), key=lambda kv: kv[1]["validation_ndcg@10"])
        lm = model["recipes"]["lm"]
        parts.append(f"{name}: {_label(key)} (validation NDCG@10 "
                     f"{best['validation_ndcg@10']:.3f} against {lm['validation_ndcg@10']:.3f}; "
                     f"test NDCG@5 {best['test_ndcg@5']:.3f}, {best['test_share_of_bm25']:.0%} of "
                     f"BM25's {model['bm25_test_ndcg@5']:.3f})")
    return "The recipe validation picks for each twin: " + "; ".join(parts) + "."


def render_table(saved: dict) -> str:
    """The docs table of the stage ablation, from ``stage1_ablation.json``."""
    s = saved["stage1"]
    lines = [f"Measured {saved['date']} on {saved['cores']} CPU cores, commit "
             f"`{saved['commit']}`; `python benchmarks/stage1_ablation.py` wrote "
             f"`benchmarks/stage1_ablation.json`, and this table is rendered from it. Stage 1a: "
             f"{s['retromae_steps']} steps of {s['retromae_batch_size']} windows, learning rate "
             f"{s['retromae_learning_rate']:g}, masks {s['encoder_mask_ratio']:g} / "
             f"{s['decoder_mask_ratio']:g}; stage 1b: {s['contrastive_epochs']} epochs, batch "
             f"{s['contrastive_batch_size']}, learning rate {s['contrastive_learning_rate']:g}, "
             f"{s['pairs_per_text']} pairs per passage and kind ({', '.join(s['pair_kinds'])}). "
             f"Δ: the paired difference to recipe 1 of the same twin, with its p-value.", "",
             "| twin | recipe | after stage 1 (test NDCG@5) | validation NDCG@10 | Δ validation | "
             "test NDCG@5 | Δ test | share of BM25 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, model in saved["models"].items():
        for key, r in model["recipes"].items():
            lines.append(
                f"| {name} | {_label(key)} | {r['untrained_test_ndcg@5']:.3f} | "
                f"{r['validation_ndcg@10']:.3f} | {_p(r.get('validation_vs_lm'))} | "
                f"{r['test_ndcg@5']:.3f} | {_p(r.get('test_vs_lm'))} | "
                f"{r['test_share_of_bm25']:.0%} |")
    return "\n".join(lines + ["", _verdict(saved)])


def render_summary(saved: dict) -> str:
    """The README's short form of the ablation: test NDCG@5 per twin and recipe, with the
    paired difference to LM -> fine-tuning, from ``stage1_ablation.json``."""
    first = next(iter(saved["models"].values()))["recipes"]
    lines = ["| twin (test NDCG@5) | " + " | ".join(map(_label, first))
             + " | BM25 |", "| --- " * (len(first) + 2) + "|"]
    for name, model in saved["models"].items():
        cells = [f"{r['test_ndcg@5']:.3f}" + (f", Δ {_p(r['test_vs_lm'])}" if "test_vs_lm" in r
                                              else "") for r in model["recipes"].values()]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {model['bm25_test_ndcg@5']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a sliver of one twin, not saved")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        out = run(args.smoke, Path(home), MODELS[:1] if args.smoke else MODELS)
    from retrieval_lib.results.tables import save_benchmark

    print(render_table(out))
    save_benchmark(out, RESULTS, DOC, TABLE_START, TABLE_END, render_table(out))
    if not out["smoke"]:
        from retrieval_lib.results.tables import write_between_markers

        write_between_markers(README, SUMMARY_START, SUMMARY_END, render_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
