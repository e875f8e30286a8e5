"""Studies: what the notebooks compare, with the Chinese labels of their tables and figures.

* the settings in which compared runs differ (:func:`run_differences`), the unfreezing schedule
  and the cost of a run before it starts (:func:`unfreeze_plan`, :func:`show_plan`);
* the expansion studies of 4.1.2 / 4.2.4 / 4.3 (:class:`ExpansionStudy`: the expanded model,
  its ablation with another initialisation, and the unexpanded base they are held against);
* the options beyond the report (:func:`option_variants`, keyed by what each changes);
* documents longer than the window: one trained retriever scored by its first, best or summed
  windows (:func:`aggregation_study`);
* two-stage retrieval: a cross-encoder reranker over the dense and the BM25 top k
  (:func:`rerank_study`);
* CPU serving: the same retriever and reranker exported to ONNX, in fp32 and int8
  (:func:`serving_study`).

Runs come from :mod:`retrieval_lib.experiment` (rerankers from :mod:`retrieval_lib.reranker`);
nothing here trains except by calling them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .baselines import bm25_run
from .config import ExperimentConfig, RerankerConfig, get_experiment, variant, with_overrides
from .data import Splits
from .evaluation import (
    HEADLINE_METRICS,
    REPORT_METRICS,
    comparison_sentence,
    evaluate_embeddings,
    evaluate_retriever,
    metrics_table,
    paired_test,
    qrels_for_split,
    rank_documents,
    retrieve,
    score_run,
    significant,
    summarize_systems,
)
from .expansion import UnfreezeSchedule, new_layer_positions
from .experiment import check_full_inputs, result_summary, run_experiment
from .hub import model_available
from .memory import CUDA_CONTEXT_GIB, plan_table, training_plan
from .modeling import DualTowerRetriever, count_parameters, parameter_count_from_config
from .plotting import plot_metric_bars, plot_training_curves, plot_unfreeze_schedule, save_figure
from .reranker import (
    PUBLISHED_RERANKER,
    CrossEncoderReranker,
    RandomScores,
    load_trained,
    rerank_split,
    reranker_is_trained,
    train_reranker,
)
from .runs import default_output_dir, record_not_run, run_dir, save_baseline_run, save_summary
from .serving import OnnxReranker, OnnxRetriever, export_reranker_onnx, export_retriever_onnx
from .training import steps_per_epoch, training_device

__all__ = ["run_differences", "differences_note", "unfreeze_plan", "show_plan",
           "SHARED_INPUTS", "expansion_experiments", "expansion_parameters", "parameter_table",
           "run_expansion_with_ablation",
           "untrained_gaps", "expansion_comparisons", "expansion_systems",
           "expansion_histories", "unfreeze_table", "expansion_summary", "ExpansionStudy",
           "OPTIONS_EXPERIMENT", "QUERY_INSTRUCTION", "OPTION_LABELS", "option_variants",
           "option_systems", "option_comparisons", "AGGREGATION_LABELS",
           "WINDOWED_LABEL", "windowed_variant", "aggregation_study", "ABLATION_RESULTS",
           "load_ablation", "ablation_sentences",
           "ablation_table", "RERANK_LABELS", "reranker_folder", "rerank_study",
           "SERVING_LABELS", "serving_study"]


def expansion_parameters(exp: ExperimentConfig) -> dict:
    """Parameters of the retriever before and after the expansion, from the config alone."""
    before = parameter_count_from_config(exp.model, include_new_layers=False)
    after = parameter_count_from_config(exp.model)
    return {"layers_before": exp.model.num_hidden_layers,
            "layers_after": exp.model.num_hidden_layers + exp.model.num_new_layers,
            "before": before, "after": after, "added": after - before,
            "growth": after / before - 1}


#: Settings that name a run rather than change what it computes.
_LABEL_FIELDS = {"name", "title", "section", "preset", "base_experiment", "model.name"}
#: Settings that change memory or bookkeeping but not the mathematics of a step.
_SAME_MATHS = {"training.gradient_checkpointing", "training.grad_cache_chunk_size",
               "training.checkpoint_steps", "training.keep_checkpoints"}


def run_differences(exps: dict[str, ExperimentConfig], expected: tuple[str, ...] = ()):
    """Every setting in which the runs a notebook compares differ, read from their configs,
    plus what follows from them: optimizer steps and training samples seen (a pandas table,
    one column per run). ``expected`` names the settings the comparison is about (e.g.
    ``("train_records",)``); the table marks the others (settings that save memory without
    changing the step's mathematics, such as gradient checkpointing, count as intended), so a
    notebook can say exactly what else differs and by how much."""
    import pandas as pd

    def flat(exp: ExperimentConfig) -> dict:
        row = {"subset": exp.subset, "train_records": exp.train_size}
        row.update({f"model.{k}": v for k, v in asdict(exp.model).items()})
        row.update({f"training.{k}": v for k, v in asdict(exp.training).items()})
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in row.items()
                if k not in _LABEL_FIELDS}

    rows = {label: flat(exp) for label, exp in exps.items()}
    keys = [k for k in next(iter(rows.values()))
            if len({repr(r.get(k)) for r in rows.values()}) > 1]
    table = {label: {k: rows[label][k] for k in keys} for label in rows}
    for label, exp in exps.items():
        steps = steps_per_epoch(exp.train_size, exp.training) * exp.training.epochs
        table[label]["optimizer_steps"] = steps
        table[label]["samples_seen"] = steps * exp.training.batch_size
    frame = pd.DataFrame(table)
    frame.insert(0, "intended", [k in expected or k in _SAME_MATHS
                                 or k in ("optimizer_steps", "samples_seen")
                                 for k in frame.index])
    return frame


def differences_note(table, intended: str) -> str:
    """One Chinese sentence for a :func:`run_differences` table: what besides ``intended``
    differs between the runs, with the values, or that nothing else does."""
    others = table[~table["intended"]].drop(columns="intended")
    steps = " / ".join(f"{v:,}" for v in table.loc["optimizer_steps"].drop("intended"))
    if others.empty:
        return (f"这些运行只在{intended}上不同（由此优化器步数为 {steps}）。")
    parts = [f"{k}（{' / '.join(str(v) for v in row)}）" for k, row in others.iterrows()]
    return (f"除{intended}外，这些运行还在以下设置上不同：{'；'.join(parts)}；"
            f"所以优化器步数为 {steps}。比较时要把这些差别算进去。")


# ---------------------------------------------------------------------------------------------
# Expansion studies (the 4.1.2 / 4.2.4 / 4.3 notebooks): the expanded model with the configured
# initialisation, the same expansion with another one, and the unexpanded base they are held
# against.
# ---------------------------------------------------------------------------------------------


#: The notebook parameters that say where the inputs are: the only ones the unexpanded base
#: shares with its expansion.
SHARED_INPUTS = ("data_dir", "model_path", "trust_remote_code")


def expansion_experiments(name: str, preset: str, **parameters
                          ) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The expansion ``name`` with the notebook's ``parameters`` applied
    (:func:`~retrieval_lib.config.with_overrides`), and the unexpanded base it is held against
    (its ``base_experiment``) with the training settings of its own notebook: of the
    parameters, the base takes only where the data and the base model are
    (:data:`SHARED_INPUTS`), so it is the run that notebook trains (and can be reused from it).
    Under the full preset, missing weights or data stop here, before anything is prepared
    (:func:`~retrieval_lib.experiment.check_full_inputs`)."""
    exp = with_overrides(get_experiment(name, preset), **parameters)
    if exp.base_experiment is None:
        raise ValueError(f"{name} is not an expansion: it grows from no other experiment")
    shared = {k: v for k, v in parameters.items() if k in SHARED_INPUTS}
    base = with_overrides(get_experiment(exp.base_experiment, preset), **shared)
    if preset == "full":
        check_full_inputs(exp)
    return exp, base


def run_expansion_with_ablation(exp: ExperimentConfig, splits: Splits, base_info: dict,
                                ablation_init: str | None = "identity",
                                resume: bool = False) -> dict[str, dict]:
    """Runs of ``exp`` keyed by the initialisation of its new layers: the configured one, then
    ``ablation_init`` (a :func:`~retrieval_lib.config.variant` with its own run folder) unless
    it is empty or the same. ``resume`` as in :func:`run_experiment`, for each."""
    runs = {exp.model.expansion_init: run_experiment(exp, splits, base_info, resume=resume)}
    if ablation_init and ablation_init != exp.model.expansion_init:
        runs[ablation_init] = run_experiment(variant(exp, expansion_init=ablation_init), splits,
                                             base_info, resume=resume)
    return runs


def show_plan(exp: ExperimentConfig, train_records: int | None = None):
    """Print what a run will cost before it starts (optimizer steps, tokens per step, the
    estimated memory of its batch) and return the per-GPU estimate table
    (:func:`~retrieval_lib.memory.training_plan`; estimates, labelled as such)."""
    plan = training_plan(exp.model, exp.training, train_records or exp.train_size)
    gib = plan["memory_gib"]
    print(f"{exp.name}：{plan['total_steps']:,} 个优化器步（每轮 {plan['steps_per_epoch']:,}），"
          f"每步最多 {plan['tokens_per_step']:,} 个 token；估计显存（bf16，不含约 "
          f"{CUDA_CONTEXT_GIB} GiB 的 CUDA 上下文）：不用梯度检查点 {gib['plain']:.1f} GiB，"
          f"用梯度检查点 {gib['checkpointing']:.1f} GiB。下表的小时数由 FLOPs 按峰值算力的 "
          f"{plan['utilisation']:.0%} 估计，只是估计。")
    return plan_table(plan)


def unfreeze_plan(exp: ExperimentConfig, train_records: int | None = None):
    """The unfreezing schedule of ``exp`` from its config, before training: one row per stage
    with the new layers that train, the optimizer step and epoch where it starts, and its
    length (a pandas table). ``train_records`` defaults to the subset's configured size."""
    import pandas as pd

    spe = steps_per_epoch(train_records or exp.train_size, exp.training)
    new = new_layer_positions(exp.model.num_hidden_layers, exp.model.num_new_layers,
                              exp.model.expansion_position)
    plan = UnfreezeSchedule(new, exp.model.unfreeze_every).plan(spe * exp.training.epochs, spe)
    return pd.DataFrame([{"阶段": r["stage"], "训练中的新层": r["trainable_new_layers"],
                          "起始步": r["start_step"], "步数": r["steps"],
                          "起始轮次": round(r["start_epoch"], 2)} for r in plan.stages()]
                        ).set_index("阶段")


def untrained_gaps(base_run: dict | None, runs: dict[str, dict],
                   metric: str = "ndcg@10") -> dict[str, float]:
    """For each initialisation, the largest per-query difference of ``metric`` between the
    untrained base and the untrained expansion: how much adding the new layers changed the
    model before any training. Identity initialisation gives 0 (up to rank flips among
    near-ties): both compute the same function. Empty without a base run."""
    if base_run is None:
        return {}
    before = base_run["untrained"]["per_query"][metric]
    return {init: max(abs(before[q] - run["untrained"]["per_query"][metric][q]) for q in before)
            for init, run in runs.items()}


def expansion_comparisons(base_run: dict | None, runs: dict[str, dict],
                          metrics=("ndcg@10", "recall@100")) -> dict[str, dict]:
    """Paired randomisation tests on the test queries: each expansion against the base, and
    the second initialisation against the first. Keys say which minus which."""
    inits = list(runs)
    tests = {}
    for metric in metrics:
        if base_run is not None:
            for init, run in runs.items():
                tests[f"扩容（{init}）− 对照 · {metric}"] = paired_test(
                    run["test"]["per_query"][metric], base_run["test"]["per_query"][metric])
        if len(inits) > 1:
            tests[f"{inits[1]} − {inits[0]} · {metric}"] = paired_test(
                runs[inits[1]]["test"]["per_query"][metric],
                runs[inits[0]]["test"]["per_query"][metric])
    return tests


def _expansion_labels(base_exp: ExperimentConfig, base_run: dict | None,
                      runs: dict[str, dict]) -> list[tuple[str, dict]]:
    """(label, run) of the base (when there is one) and of each expansion, as tables and
    figures name them."""
    labelled = [(f"对照：{base_exp.model.name}", base_run)] if base_run is not None else []
    return labelled + [(f"扩容（{init} 初始化）", run) for init, run in runs.items()]


def expansion_histories(base_exp: ExperimentConfig, base_run: dict | None,
                        runs: dict[str, dict]) -> dict[str, dict]:
    """Labelled training histories of the base and of every expansion (training curves)."""
    return {label: run["history"] for label, run in _expansion_labels(base_exp, base_run, runs)}


def unfreeze_table(run: dict):
    """Per epoch of an expansion run: which new layers trained, the training loss and the
    validation NDCG@10 (a pandas table)."""
    import pandas as pd

    return pd.DataFrame([{"轮次": e["epoch"], "训练中的新层": e["trainable_new_layers"],
                          "训练损失": e["train_loss"], "验证 NDCG@10": e["val_ndcg@10"]}
                         for e in run["history"]["epochs"]]).set_index("轮次")


def expansion_systems(base_exp: ExperimentConfig, base_run: dict | None,
                      runs: dict[str, dict], trained_only: bool = False) -> dict[str, dict]:
    """Labelled test results (``score_run`` shape) of the base and of every expansion, untrained
    and trained, for :func:`~retrieval_lib.evaluation.metrics_table` and the bar chart."""
    labelled = _expansion_labels(base_exp, base_run, runs)
    systems = {}
    if not trained_only:
        systems.update({f"{label}（未训练）": run["untrained"] for label, run in labelled})
    systems.update({f"{label}（训练后）" if not trained_only else label: run["test"]
                    for label, run in labelled})
    return systems


def expansion_summary(exp: ExperimentConfig, base_exp: ExperimentConfig, base_info: dict,
                      base_run: dict | None, runs: dict[str, dict]) -> dict:
    """What an expansion notebook measured, for its ``summary.json``: parameters from the
    configs (full and this preset) and counted on the trained model, the schedule, every run's
    summary, the paired tests and the identity check."""
    first = next(iter(runs.values()))
    return {
        "experiment": exp.name, "base_experiment": base_exp.name, "base_model": base_info,
        "inits": list(runs),
        "parameters": {"full": expansion_parameters(get_experiment(exp.name, "full")),
                       exp.preset: expansion_parameters(exp),
                       "measured_before": first["expansion"]["parameters_before"],
                       "measured_after": first["parameters"]},
        "new_layers": first["expansion"]["new_layers"],
        "num_layers": exp.model.num_hidden_layers + exp.model.num_new_layers,
        "runs": {"base": result_summary(base_run) if base_run is not None else None,
                 **{init: result_summary(run) for init, run in runs.items()}},
        "paired_tests": expansion_comparisons(base_run, runs),
        "untrained_max_difference": untrained_gaps(base_run, runs),
    }


# ---------------------------------------------------------------------------------------------
# Beyond the report (03_beyond_the_report): M3-style unified training, dynamic hard negatives
# and query instructions, each a variant of one experiment with its own run folder.
# ---------------------------------------------------------------------------------------------

#: The experiment whose variants ``03_beyond_the_report`` trains by default (4.1.1), and whose
#: variants the results notebook looks for.
OPTIONS_EXPERIMENT = "minimind27_10k"

#: Query instruction of the decoder-only ablation (the BGE family's Chinese retrieval prompt).
QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


def parameter_table(exp: ExperimentConfig):
    """Parameters before and after the expansion: the report's model (full configs) and this
    run's (a styled pandas table)."""
    import pandas as pd

    rows = {"报告中的模型（full）": expansion_parameters(get_experiment(exp.name, "full"))}
    if exp.preset != "full":
        rows[f"本次运行（{exp.preset}）"] = expansion_parameters(exp)
    return pd.DataFrame(rows).T.style.format(
        {"before": "{:,.0f}", "after": "{:,.0f}", "added": "{:,.0f}", "growth": "{:.1%}"})


@dataclass
class ExpansionStudy:
    """One expansion notebook's comparison: the expanded runs (by initialisation, from
    :func:`run_expansion_with_ablation`), the base they are held against (or None), and every
    table and figure the notebook shows of them; a method that draws saves the figure under
    its fixed name and returns the path. The three expansion notebooks differ in their
    experiment and prose, not in this code."""

    notebook: str  # figures go to figures/<notebook>_<name>.png
    exp: ExperimentConfig
    base_exp: ExperimentConfig
    base_info: dict
    base_run: dict | None
    runs: dict[str, dict]  # initialisation -> run

    @property
    def main_run(self) -> dict:
        """The run with the configured initialisation."""
        return self.runs[self.exp.model.expansion_init]

    def untrained_gaps(self) -> dict[str, float]:
        return untrained_gaps(self.base_run, self.runs)

    def schedule(self):
        """The unfreezing schedule as it ran (figure saved) and its per-epoch table."""
        model = self.exp.model
        fig = plot_unfreeze_schedule(
            self.main_run["history"], model.num_hidden_layers + model.num_new_layers,
            self.main_run["expansion"]["new_layers"],
            title=f"{model.name}+{model.num_new_layers} 层：逐步解冻时间表")
        save_figure(fig, self.notebook, "unfreeze_schedule")
        return unfreeze_table(self.main_run)

    def curves(self):
        fig = plot_training_curves(expansion_histories(self.base_exp, self.base_run, self.runs),
                                   title=f"{self.exp.title}：训练曲线（预设：{self.exp.preset}）")
        return save_figure(fig, self.notebook, "training_curves")

    def test_table(self):
        return metrics_table(expansion_systems(self.base_exp, self.base_run, self.runs),
                             REPORT_METRICS)

    def test_bars(self):
        trained = expansion_systems(self.base_exp, self.base_run, self.runs, trained_only=True)
        fig = plot_metric_bars(summarize_systems(trained), HEADLINE_METRICS,
                               title=f"{self.exp.title}：测试集指标（预设：{self.exp.preset}）")
        return save_figure(fig, self.notebook, "test_metrics")

    def paired_tests(self):
        import pandas as pd

        return pd.DataFrame(expansion_comparisons(self.base_run, self.runs)).T.round(4)

    def save(self, **extra):
        """Write the notebook's ``summary.json`` (plus ``extra``) and return the trained means."""
        import pandas as pd

        summary = {"notebook": self.notebook, **expansion_summary(
            self.exp, self.base_exp, self.base_info, self.base_run, self.runs), **extra}
        print(save_summary(default_output_dir(self.notebook, self.exp.preset), summary,
                           self.exp.preset, self.exp.training.seed))
        return pd.DataFrame({k: r["trained"] for k, r in summary["runs"].items() if r}).round(4)


#: The options compared, by key, with their labels in tables and figures (the dense baseline
#: with static negatives first).
OPTION_LABELS = {"dense": "稠密（基线）", "m3": "统一训练（稠密+稀疏+多向量）",
                 "ance": "动态难负例（每轮重挖）", "last": "末位池化",
                 "last_instr": "末位池化 + 查询指令"}

#: Which option is compared with which (the paired tests): what each changes, against the run
#: that differs only in that.
_OPTION_PAIRS = (("m3", "dense"), ("ance", "dense"), ("last", "dense"), ("last_instr", "last"))


def option_variants(exp: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The options beyond the report as variants of ``exp``, keyed as :data:`OPTION_LABELS`
    (``exp`` itself, dense-only with static negatives, under ``dense``)."""
    return {
        "dense": exp,
        "m3": variant(exp, "m3", m3_heads=True),
        "ance": variant(exp, "ance", {"remine_every": 1}),
        "last": variant(exp, "last", pooling="last_token"),
        "last_instr": variant(exp, "last-instr", pooling="last_token",
                              query_instruction=QUERY_INSTRUCTION),
    }


def option_systems(runs: dict[str, dict]) -> dict[str, dict]:
    """Labelled test results of :func:`option_variants` runs (keyed the same way); a run with
    M3 heads adds its sparse, ColBERT and hybrid (rerank of the dense top 100) results."""
    systems = {}
    for key, run in runs.items():
        label = OPTION_LABELS[key]
        systems[label] = run["test"]
        for mode, result in (run.get("m3") or {}).items():
            if mode != "dense":
                systems[f"{label} · {mode}"] = result
    return systems


def option_comparisons(runs: dict[str, dict], metrics=("ndcg@10", "recall@100")
                       ) -> dict[str, dict]:
    """Paired randomisation tests of each option against what it changes: unified, dynamic
    and last-token against the dense baseline, the instruction against last-token without it,
    and the hybrid rerank against the same model's dense search. Keys say which minus which."""
    tests = {}
    for metric in metrics:
        for a, b in _OPTION_PAIRS:
            if a in runs and b in runs:
                tests[f"{OPTION_LABELS[a]} − {OPTION_LABELS[b]} · {metric}"] = paired_test(
                    runs[a]["test"]["per_query"][metric], runs[b]["test"]["per_query"][metric])
        m3 = runs.get("m3", {}).get("m3")
        if m3:
            tests[f"{OPTION_LABELS['m3']}：hybrid − dense · {metric}"] = paired_test(
                m3["hybrid"]["per_query"][metric], m3["dense"]["per_query"][metric])
    return tests


#: Labels of the passage aggregations (:mod:`retrieval_lib.windows`) in tables and figures.
AGGREGATION_LABELS = {"first": "FirstP（只读首个窗口）", "max": "MaxP（最佳窗口）",
                      "sum": "SumP（窗口得分之和）"}
#: Label of the run trained on random windows and searched with MaxP.
WINDOWED_LABEL = "MaxP，训练时读随机窗口"


def windowed_variant(exp: ExperimentConfig) -> ExperimentConfig:
    """``exp`` trained on a random window of each long positive and evaluated with MaxP (its
    own run folder, ``<name>-windows``): what MaxP gives when training saw more than the
    first window."""
    return variant(exp, "windows", {"positive_window": "random"}, passage_aggregation="max")


def aggregation_study(run: dict, split, stride: int | None = None,
                      metrics=("ndcg@5", "ndcg@10", "recall@100"), device=None,
                      windowed: dict | None = None) -> dict:
    """The trained retriever of ``run`` (its ``best`` folder) on ``split`` with each passage
    aggregation (FirstP, MaxP, SumP; windows ``stride`` tokens apart, default half a window),
    and the test result of ``windowed`` (the run of :func:`windowed_variant`) when given:
    ``{"results": {label: score_run result}, "windows": what was cut, "comparisons": paired
    tests of each against FirstP}``."""
    model = DualTowerRetriever.load(Path(run["out_dir"]) / "best", training_device(device))
    results = {AGGREGATION_LABELS[how]: evaluate_retriever(model, split, aggregation=how,
                                                           stride=stride)
               for how in AGGREGATION_LABELS}
    if windowed is not None:
        results[WINDOWED_LABEL] = windowed["test"]
    first = results[AGGREGATION_LABELS["first"]]
    comparisons = {f"{label} − {AGGREGATION_LABELS['first']} · {metric}": paired_test(
        result["per_query"][metric], first["per_query"][metric])
        for metric in metrics for label, result in results.items()
        if label != AGGREGATION_LABELS["first"]}
    return {"results": results, "windows": results[AGGREGATION_LABELS["max"]]["windows"],
            "comparisons": comparisons}


#: Where ``benchmarks/demo_ablation.py`` saves its results (in a checkout of the repository).
ABLATION_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_ablation.json"


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
RERANK_LABELS = {"dense": ("稠密检索（第一阶段）", None),
                 "dense_rerank": ("稠密 → 交叉编码器重排", "rerank-dense"),
                 "bm25": ("BM25（第一阶段）", None),
                 "bm25_rerank": ("BM25 → 交叉编码器重排", "rerank-bm25"),
                 "bm25_random": ("BM25 → 随机打乱前 k 篇（参照）", None),
                 "published_dense": ("稠密 → bge-reranker-v2-m3", "rerank_published-dense"),
                 "published_bm25": ("BM25 → bge-reranker-v2-m3", "rerank_published-bm25")}

#: The paired tests of :func:`rerank_study`: (system, system it is compared with).
_RERANK_PAIRS = (("dense_rerank", "dense"), ("bm25_rerank", "bm25"), ("dense_rerank", "bm25"),
                 ("bm25_rerank", "bm25_random"),
                 ("bm25_rerank", "dense_rerank"), ("published_dense", "dense_rerank"),
                 ("published_bm25", "bm25_rerank"))


def reranker_folder(exp: ExperimentConfig) -> Path:
    """Where the reranker on ``exp``'s base model and training records is trained and kept:
    ``runs/<preset>/reranker_<experiment>`` (no ``metrics.json``: not a row of the tables)."""
    return run_dir(exp.preset, f"reranker_{exp.name}")


def _reranker(exp: ExperimentConfig, splits: Splits, cfg: RerankerConfig, device,
              show_progress: bool) -> tuple[CrossEncoderReranker, dict]:
    """The reranker of ``exp``: read back when its folder holds a finished training with these
    settings and records, else trained now. Says which."""
    folder, train = reranker_folder(exp), splits.subset(exp.subset)
    if reranker_is_trained(folder, cfg, exp.model.base_model, train):
        print(f"reranker: reusing the finished training in {folder}")
        return load_trained(folder, device)
    model = CrossEncoderReranker.from_base(exp.model, max_length=cfg.max_length, seed=cfg.seed)
    history = train_reranker(model, train, splits.validation, cfg, folder,
                             base=exp.model.base_model, device=device,
                             show_progress=show_progress)
    return model, history


def rerank_study(exp: ExperimentConfig, splits: Splits, dense_run: dict, cfg: RerankerConfig,
                 published: str = "", device=None, show_progress: bool = False,
                 metrics=("ndcg@5", "ndcg@10", "mrr")) -> dict:
    """Two-stage retrieval on the test set of ``splits``.

    A cross-encoder on ``exp``'s base model, trained on ``exp``'s records and hard negatives
    (:func:`~retrieval_lib.reranker.train_reranker`; reused when already trained), reorders
    the top ``cfg.top_k`` of two first stages: the retriever of ``dense_run`` (its ``best``
    folder) and BM25, each retrieving the top 100. ``published`` (a local folder or a hub id,
    e.g. :data:`~retrieval_lib.reranker.PUBLISHED_RERANKER`; empty: not run) reranks the same
    two first stages when it can be loaded; otherwise it is recorded as not run. BM25's top k
    shuffled at random (:class:`~retrieval_lib.reranker.RandomScores`) is the reference a
    reranker that learned something beats.

    The reranked systems are saved as baseline runs (``rerank-dense``, ``rerank-bm25``, and
    ``rerank_published-*``), so the results notebook lists them. Returns ``{"results": {label:
    score_run result}, "comparisons": paired tests (keys say which minus which),
    "sentences": what the tests on the first metric say, "history": the reranker's
    training, "top_k", "published": "done" / the reason}``.
    """
    device = training_device(device)
    reranker, history = _reranker(exp, splits, cfg, device, show_progress)
    dense_model = DualTowerRetriever.load(Path(dense_run["out_dir"]) / "best", device)
    qrels, dense, _ = retrieve(dense_model, splits.test, 100)
    _, lexical, _ = bm25_run(splits.test, 100)
    first = {"dense": dense, "bm25": lexical}
    results = {}
    for key in ("dense", "bm25"):
        results[key] = score_run(qrels, first[key])
        results[f"{key}_rerank"] = rerank_split(reranker, splits.test, first[key], cfg.top_k)
    # what a reranker that learned nothing gives: BM25's top k shuffled
    results["bm25_random"] = rerank_split(RandomScores(cfg.seed), splits.test, lexical,
                                          cfg.top_k)
    status = "not asked for"
    if published and model_available(published):
        other = CrossEncoderReranker.load(published, device)
        for key in ("dense", "bm25"):
            results[f"published_{key}"] = rerank_split(other, splits.test, first[key],
                                                       cfg.top_k)
        status = "done"
    elif published:
        status = f"{published!r} is neither a local folder nor reachable on the hub"
        for key in ("published_dense", "published_bm25"):  # no stale numbers stay behind
            record_not_run(RERANK_LABELS[key][1], exp.preset, status,
                           f"download {PUBLISHED_RERANKER} (huggingface-cli download "
                           f"{PUBLISHED_RERANKER} --local-dir DIR) and pass its folder as "
                           f"`published_reranker`")
    for key, result in results.items():
        label, name = RERANK_LABELS[key]
        if name is None:
            continue
        own = key in ("dense_rerank", "bm25_rerank")
        save_baseline_run(name, {k: v for k, v in result.items() if k != "run"}, exp.preset, {
            "title": label, "model_name": "reranker",
            "reranker": str(reranker_folder(exp) / "best") if own else published,
            "first_stage": "BM25" if key.endswith("bm25") else exp.title,
            "dense_run": Path(dense_run["out_dir"]).name, "top_k": cfg.top_k,
            "parameters": count_parameters(reranker if own else other)})
    comparisons = {f"{RERANK_LABELS[a][0]} − {RERANK_LABELS[b][0]} · {metric}": paired_test(
        results[a]["per_query"][metric], results[b]["per_query"][metric])
        for metric in metrics for a, b in _RERANK_PAIRS if a in results and b in results}
    sentences = [comparison_sentence(RERANK_LABELS[a][0], RERANK_LABELS[b][0],
                                     comparisons[f"{RERANK_LABELS[a][0]} − {RERANK_LABELS[b][0]}"
                                                 f" · {metrics[0]}"], metrics[0].upper())
                 for a, b in _RERANK_PAIRS if a in results and b in results]
    return {"results": {RERANK_LABELS[k][0]: r for k, r in results.items()},
            "comparisons": comparisons, "sentences": sentences, "history": history,
            "top_k": cfg.top_k, "published": status}


# ---------------------------------------------------------------------------------------------
# CPU serving: ONNX in fp32 and int8 against PyTorch.
# ---------------------------------------------------------------------------------------------

#: Labels of the systems of :func:`serving_study`, by how the model runs.
SERVING_LABELS = {"torch": "PyTorch（fp32）", "onnx": "ONNX Runtime（fp32）",
                  "int8": "ONNX Runtime（int8 动态量化）"}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def serving_study(exp: ExperimentConfig, splits: Splits, dense_run: dict, cfg: RerankerConfig,
                  metrics=("ndcg@5", "ndcg@10", "mrr")) -> dict:
    """The retriever of ``dense_run`` and the reranker of :func:`rerank_study` (trained
    already with ``cfg``; it reorders BM25's top ``cfg.top_k`` here too) exported to ONNX
    (``onnx/`` in their folders, fp32 and int8) and run by onnxruntime on the test set of
    ``splits``.

    Returns ``{"results": {label: score_run result}`` (the retriever alone: PyTorch, ONNX fp32,
    ONNX int8), ``"vectors"``: the cosine of each ONNX vector with the PyTorch one over the
    test queries and documents (min, mean), ``"seconds"``: wall time to encode the test
    corpus with each, ``"reranker"``: the largest score difference over the pairs of
    reranking BM25's top k and the reranked NDCG@5 of each, ``"comparisons"``: paired tests
    of each ONNX run against PyTorch}``."""
    device = torch.device("cpu")  # CPU serving: every contender on the CPU
    model = DualTowerRetriever.load(Path(dense_run["out_dir"]) / "best", device)
    folder = export_retriever_onnx(model, Path(dense_run["out_dir"]) / "onnx", quantize=True)
    contenders = {"torch": model, "onnx": OnnxRetriever(folder),
                  "int8": OnnxRetriever(folder, quantized=True)}
    query_ids, queries, qrels, corpus = qrels_for_split(splits.test)
    results, seconds, vectors = {}, {}, {}
    for key, contender in contenders.items():
        (q, p), seconds[key] = _timed(lambda c=contender: (c.encode_queries(queries),
                                                           c.encode_passages(corpus)))
        vectors[key] = (q, p)
        results[key] = evaluate_embeddings(q, p, query_ids, qrels)
    agreement = {}
    for key in ("onnx", "int8"):
        cos = np.concatenate([np.sum(a * b, axis=1) for a, b in
                              zip(vectors[key], vectors["torch"], strict=True)])
        agreement[key] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    # the reranker: PyTorch, ONNX fp32 and int8 on BM25's top k of the test queries
    folder_of_reranker = reranker_folder(exp)
    reranker, _ = load_trained(folder_of_reranker, device)
    rr_folder = export_reranker_onnx(reranker, folder_of_reranker / "onnx", quantize=True)
    top_k = cfg.top_k
    _, first, _ = bm25_run(splits.test, top_k)
    rerankers = {"torch": reranker, "onnx": OnnxReranker(rr_folder),
                 "int8": OnnxReranker(rr_folder, quantized=True)}
    reranked = {key: rerank_split(r, splits.test, first, top_k) for key, r in rerankers.items()}
    scores = {key: np.array([s for qid in first for s in (r["run"][qid][d] for d in
                                                             rank_documents(first[qid]))])
              for key, r in reranked.items()}
    reranker_info = {SERVING_LABELS[key]: {
        "largest_score_difference": float(np.abs(scores[key] - scores["torch"]).max()),
        "ndcg@5": r["aggregate"]["ndcg@5"]["mean"]} for key, r in reranked.items()}
    comparisons = {f"{SERVING_LABELS[key]} − {SERVING_LABELS['torch']} · {metric}": paired_test(
        results[key]["per_query"][metric], results["torch"]["per_query"][metric])
        for metric in metrics for key in ("onnx", "int8")}
    comparisons.update({f"重排器 {SERVING_LABELS['int8']} − {SERVING_LABELS['torch']} · "
                        f"{metric}": paired_test(reranked["int8"]["per_query"][metric],
                                                 reranked["torch"]["per_query"][metric])
                        for metric in metrics})
    return {"results": {SERVING_LABELS[k]: r for k, r in results.items()},
            "vectors": {SERVING_LABELS[k]: v for k, v in agreement.items()},
            "seconds": {SERVING_LABELS[k]: v for k, v in seconds.items()},
            "texts": len(queries) + len(corpus), "reranker": reranker_info,
            "comparisons": comparisons}
