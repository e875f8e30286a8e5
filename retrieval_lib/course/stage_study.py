"""The stage chapter's study (``03_stage1_pretraining``): the seed's stage ablation on one
experiment, each recipe a run of its own, judged on validation.

The recipes (:data:`STAGE_RECIPES`) are the BGE-M3 paper's ablation (XLM-R / + RetroMAE /
+ RetroMAE + unsupervised data) with the contrastive stage alone added. The recipe an
experiment already asks for (``exp.model.pretraining_stages``) is ``exp`` itself, so the
course's own run of it is shared; the others are variants (``<name>-lm``,
``<name>-retromae``, ...). A recipe is judged on the validation set (NDCG@10 of the kept epoch,
paired randomisation test against ``lm``); the test set is reported, never used to choose.
``benchmarks/stage1_ablation.py`` runs the same study for two twins in a home of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..data.splits import Splits
from ..evaluation.metrics import paired_test, significant
from ..evaluation.search import evaluate_retriever
from ..models.retriever import DualTowerRetriever
from ..settings.config import ExperimentConfig, variant
from .experiment import ensure_run, prepare_base_model
from .stage1 import check_stages

__all__ = ["STAGE_RECIPES", "recipe_variants", "run_stage_study", "difference_text",
           "stage_study_rows", "stage_study_sentences"]

#: recipe -> (its pretraining stages, its label in tables and figures)
STAGE_RECIPES: dict[str, tuple[tuple[str, ...], str]] = {
    "lm": ((), "LM → 微调（种子报告的做法）"),
    "retromae": (("retromae",), "LM → 1a RetroMAE → 微调"),
    "retromae_contrastive": (("retromae", "contrastive"), "LM → 1a → 1b 无监督对比 → 微调"),
    "contrastive": (("contrastive",), "LM → 1b 无监督对比 → 微调"),
}


def recipe_variants(exp: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """Each recipe of :data:`STAGE_RECIPES` as an experiment: ``exp`` itself for the stages it
    already has, else ``<exp.name>-<recipe>`` with only ``pretraining_stages`` changed."""
    mine = check_stages(exp.model.pretraining_stages)
    return {key: exp if stages == mine else
            variant(exp, key.replace("_", "-"), pretraining_stages=stages)
            for key, (stages, _) in STAGE_RECIPES.items()}


def run_stage_study(exp: ExperimentConfig, splits: Splits, resume: bool = False,
                show_progress: bool = True) -> dict[str, dict]:
    """Every recipe of ``exp`` run (its stages run or reused, then fine-tuned, or the finished
    run reused), with its stage runs' configs under ``"stages"`` and its best model's
    per-query validation NDCG@10 under ``"validation"`` (what the recipe is judged by)."""
    runs = {}
    for key, recipe in recipe_variants(exp).items():
        ready, info = prepare_base_model(recipe, splits, show_progress=show_progress)
        run = ensure_run(ready, splits, info, show_progress=show_progress, resume=resume)
        model = DualTowerRetriever.load(Path(run["out_dir"]) / "best")
        validation = evaluate_retriever(model, splits.validation)
        runs[key] = {**run, "stages": info.get("pretraining_stages", []),
                     "validation": validation}
    return runs


def difference_text(test: Mapping | None, brackets: tuple[str, str] = ("（", "）")) -> str:
    """A paired test's mean difference with its p-value, ``+0.034（p 0.010）`` (empty for
    none), as the study's tables show it."""
    if test is None:
        return ""
    p = test["p_value"]
    return (f"{test['mean_difference']:+.3f}{brackets[0]}p "
            f"{'< 0.001' if p < 0.001 else f'{p:.3f}'}{brackets[1]}")


def stage_study_rows(runs: Mapping[str, dict], reference: float | None = None) -> list[dict]:
    """One row per recipe: test NDCG@5 of the encoder a recipe hands to fine-tuning
    (untrained), validation NDCG@10 and test NDCG@5 after fine-tuning, each with its paired
    difference to ``lm``, and the share of ``reference`` (BM25's test NDCG@5) where given."""
    base = runs["lm"]
    rows = []
    for key, run in runs.items():
        vs = key != "lm"
        test = run["test"]["aggregate"]["ndcg@5"]["mean"]
        row = {"配方": STAGE_RECIPES[key][1], "运行": Path(run["out_dir"]).name,
               "第一阶段后 测试 NDCG@5": run["untrained"]["aggregate"]["ndcg@5"]["mean"],
               "验证 NDCG@10": run["validation"]["aggregate"]["ndcg@10"]["mean"],
               "Δ 验证（vs LM）": difference_text(paired_test(
                   run["validation"]["per_query"]["ndcg@10"],
                   base["validation"]["per_query"]["ndcg@10"]) if vs else None),
               "测试 NDCG@5": test,
               "Δ 测试（vs LM）": difference_text(paired_test(
                   run["test"]["per_query"]["ndcg@5"],
                   base["test"]["per_query"]["ndcg@5"]) if vs else None)}
        if reference:
            row["占 BM25 比例"] = f"{test / reference:.0%}"
        rows.append(row)
    return rows


def stage_study_sentences(runs: Mapping[str, dict], reference: float | None = None
                          ) -> list[str]:
    """What the study found, in Chinese, from its numbers: the recipe validation picks, and
    for every recipe whether its validation and test NDCG differ from ``lm`` significantly."""
    def score(run, split, metric):
        return run[split]["aggregate"][metric]["mean"]

    picked = max(runs, key=lambda k: score(runs[k], "validation", "ndcg@10"))
    best = runs[picked]
    test = score(best, "test", "ndcg@5")
    out = [f"验证集选出的配方是「{STAGE_RECIPES[picked][1]}」（验证 NDCG@10 "
           f"{score(best, 'validation', 'ndcg@10'):.3f}，LM 直接微调为 "
           f"{score(runs['lm'], 'validation', 'ndcg@10'):.3f}）；它的测试 NDCG@5 为 {test:.3f}"
           + (f"，是 BM25（{reference:.3f}）的 {test / reference:.0%}。" if reference else "。")]
    for key, run in runs.items():
        if key == "lm":
            continue
        parts = []
        for split, metric, name in (("validation", "ndcg@10", "验证"), ("test", "ndcg@5", "测试")):
            t = paired_test(run[split]["per_query"][metric], runs["lm"][split]["per_query"][metric])
            verdict = ("显著更高" if t["mean_difference"] > 0 else "显著更低") \
                if significant(t) else "差异不显著"
            parts.append(f"{name} {metric.upper()} {t['mean_difference']:+.3f}"
                         f"（p = {t['p_value']:.3g}，{verdict}）")
        out.append(f"「{STAGE_RECIPES[key][1]}」比 LM 直接微调：" + "；".join(parts) + "。")
    return out
