"""The demo ablation (``benchmarks/demo_ablation.py``) as the course shows it: the saved table
and sentences built from its numbers."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.metrics import (
    comparison_sentence,
    significant,
)
from ..settings.config import CHECKOUT

__all__ = ["ABLATION_RESULTS", "load_ablation", "ablation_sentences", "ablation_table"]

ABLATION_RESULTS = CHECKOUT / "benchmarks" / "demo_ablation.json"


def load_ablation(path: str | Path = ABLATION_RESULTS) -> dict | None:
    """The saved demo ablation, or None where there is none (e.g. a pip install)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def ablation_sentences(saved: dict, alpha: float = 0.05) -> list[str]:
    """Chinese sentences on the variants whose validation NDCG@10 differs from the unchanged
    twin's in the paired test (p < ``alpha``, CI excluding 0), and how many did not; first, for
    each variant whose LM read a second corpus, how much text that added and what it did to
    the LM's held-out perplexity (measured on the demo's own validation passages)."""
    out, same = [], 0
    base = saved["variants"].get("baseline")
    for v in saved["variants"].values():
        if not v.get("extra_pretraining_texts"):
            continue
        dropped = v["extra_corpus_report"]["dropped"]
        sentence = (f"「{v['what']}」：语言模型共用 {v['pretraining_chars']:,} 字预训练，"
                    f"其中第二份语料 {v['extra_pretraining_texts']:,} 条、"
                    f"{v['extra_pretraining_chars']:,} 字（读入 "
                    f"{v['extra_corpus_report']['read']:,} 行，去掉重复 "
                    f"{dropped.get('duplicate', 0):,} 行、空行 "
                    f"{dropped.get('blank_line', 0):,} 行）")
        if base is not None:
            sentence += (f"；不变的配置只用训练池的 {base['pretraining_chars']:,} 字。新闻验证文本"
                         f"上的留出困惑度 {base['heldout_perplexity']:.1f} → "
                         f"{v['heldout_perplexity']:.1f}")
        out.append(sentence + "。")
    for v in saved["variants"].values():
        test = v.get("validation_vs_baseline")
        if test is None:
            continue
        if significant(test, alpha):
            out.append(comparison_sentence(v["what"], "不变的 demo 配置", test, "NDCG@10",
                                           alpha, split="验证"))
        else:
            same += 1
    out.append(f"其余 {same} 个改动在验证集上与不变的配置相比没有显著差别。" if same else
               "每个改动在验证集上都与不变的配置显著不同。")
    return out


def ablation_table(saved: dict):
    """The demo ablation (``benchmarks/demo_ablation.py``'s saved JSON) as a table: per
    variant, what changed, validation NDCG@10 with its paired difference from the unchanged
    twin (95% CI, p), the test NDCG@5 and its share of BM25's (a pandas table)."""
    import pandas as pd

    rows = []
    for v in saved["variants"].values():
        test = v.get("validation_vs_baseline")
        rows.append({"改动": v["what"], "验证 NDCG@10": round(v["validation_ndcg@10"], 4),
                     "与不变相比（验证）": "—" if test is None else (
                         f"{test['mean_difference']:+.4f} [{test['ci_low']:+.4f}, "
                         f"{test['ci_high']:+.4f}] p={test['p_value']:.3g}"),
                     "测试 NDCG@5": round(v["test_ndcg@5"], 4),
                     "占 BM25 的比例（测试）": f"{v['test_share_of_bm25']:.0%}",
                     "LM 留出困惑度": round(v["heldout_perplexity"], 1),
                     "训练轮数（最佳）": f"{v['epochs_run']}（{v['best_epoch']}）",
                     "秒": v["seconds"]})
    return pd.DataFrame(rows).set_index("改动")


# ---------------------------------------------------------------------------------------------
# Two-stage retrieval: a cross-encoder reranks the first stage's top k.
# ---------------------------------------------------------------------------------------------

#: Labels of the systems of :func:`rerank_study`, and the run each is saved as (None: the first
#: stage alone, already saved as its own run).
