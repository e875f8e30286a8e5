"""The expansion studies of 4.1.2 / 4.2.4 / 4.3 and what every experiment notebook shows
before it trains.

* the settings in which compared runs differ (:func:`run_differences`), the unfreezing schedule
  and the cost of a run before it starts (:func:`unfreeze_plan`, :func:`show_plan`);
* :class:`ExpansionStudy`: the expanded model, its ablation with another initialisation, and
  the unexpanded base they are held against.

Runs come from :mod:`retrieval_lib.course.experiment`; nothing here trains except by calling it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.splits import Splits
from ..evaluation.metrics import (
    HEADLINE_METRICS,
    REPORT_METRICS,
    metrics_table,
    paired_test,
    summarize_systems,
)
from ..models.base import parameter_count_from_config
from ..models.expansion import UnfreezeSchedule, new_layer_positions
from ..results.runs import (
    default_output_dir,
    save_summary,
)
from ..settings.config import (
    ExperimentConfig,
    get_experiment,
    get_stage1_config,
    variant,
    with_overrides,
)
from ..training.collator import steps_per_epoch
from ..training.memory import CUDA_CONTEXT_GIB, plan_table, training_plan
from ..training.stage1 import stage1_plan, stage1_table
from .experiment import result_summary, run_experiment
from .inputs import check_full_inputs, realised, training_pool
from .plotting import save_figure
from .result_plots import plot_metric_bars, plot_training_curves, plot_unfreeze_schedule

__all__ = ["run_differences", "differences_note", "unfreeze_plan", "show_plan", "SHARED_INPUTS",
           "expansion_experiments", "expansion_parameters", "parameter_table",
           "run_expansion_with_ablation", "untrained_gaps", "expansion_comparisons",
           "expansion_systems", "expansion_histories", "unfreeze_table", "expansion_summary",
           "ExpansionStudy"]

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
    (:func:`~retrieval_lib.settings.config.with_overrides`), and the unexpanded base it is held
    against (its ``base_experiment``) with the training settings of its own notebook: of the
    parameters, the base takes only where the data and the base model are
    (:data:`SHARED_INPUTS`), so it is the run that notebook trains (and can be reused from it).
    Under the full preset, missing weights or data stop here, before anything is prepared
    (:func:`~retrieval_lib.course.inputs.check_full_inputs`); both come back with the
    checkpoint's shape and the prepared record counts where known
    (:func:`~retrieval_lib.course.inputs.realised`)."""
    exp = with_overrides(get_experiment(name, preset), **parameters)
    if exp.base_experiment is None:
        raise ValueError(f"{name} is not an expansion: it grows from no other experiment")
    shared = {k: v for k, v in parameters.items() if k in SHARED_INPUTS}
    base = with_overrides(get_experiment(exp.base_experiment, preset), **shared)
    if preset == "full":
        check_full_inputs(exp)
    return realised(exp), realised(base)


def run_expansion_with_ablation(exp: ExperimentConfig, splits: Splits, base_info: dict,
                                ablation_init: str | None = "identity",
                                resume: bool = False) -> dict[str, dict]:
    """Runs of ``exp`` keyed by the initialisation of its new layers: the configured one, then
    ``ablation_init`` (a :func:`~retrieval_lib.settings.config.variant` with its own run folder)
    unless it is empty or the same. ``resume`` as in :func:`run_experiment`, for each."""
    runs = {exp.model.expansion_init: run_experiment(exp, splits, base_info, resume=resume)}
    if ablation_init and ablation_init != exp.model.expansion_init:
        runs[ablation_init] = run_experiment(variant(exp, expansion_init=ablation_init), splits,
                                             base_info, resume=resume)
    return runs


def show_plan(exp: ExperimentConfig, train_records: int | None = None):
    """Print what a run will cost before it starts (optimizer steps, tokens per step, the
    estimated memory of its batch) and return the per-GPU estimate table
    (:func:`~retrieval_lib.training.memory.training_plan`; estimates, labelled as such)."""
    plan = training_plan(exp.model, exp.training, train_records or exp.train_size)
    gib = plan["memory_gib"]
    print(f"{exp.name}：{plan['total_steps']:,} 个优化器步（每轮 {plan['steps_per_epoch']:,}），"
          f"每步最多 {plan['tokens_per_step']:,} 个 token；估计显存（bf16，不含约 "
          f"{CUDA_CONTEXT_GIB} GiB 的 CUDA 上下文）：不用梯度检查点 {gib['plain']:.1f} GiB，"
          f"用梯度检查点 {gib['checkpointing']:.1f} GiB。下表的小时数由 FLOPs 按峰值算力的 "
          f"{plan['utilisation']:.0%} 估计，只是估计。")
    if exp.model.pretraining_stages:  # stage 1 runs first, on the base model
        stage1 = get_stage1_config(exp.preset)
        # it reads the whole training pool's passages, not the subset fine-tuning uses
        texts, known = training_pool(exp)
        pool = "的" if known else "（数据尚未准备，至少是最大子集的）"
        first = stage1_plan(exp.model, stage1, texts)
        retromae = first["retromae"]
        print(f"微调之前先做第一阶段（{' → '.join(exp.model.pretraining_stages)}）："
              f"RetroMAE {retromae['steps']:,} 步、每步 {retromae['tokens_per_step']:,} 个 "
              f"token、估计显存 {retromae['memory_gib']:.1f} GiB；无监督对比读训练池"
              f"{pool} {texts:,} 条记录的段落，约 "
              f"{first['pairs']:,} 对{'（估计）' if first['pairs_estimated'] else ''}、"
              f"{first['contrastive']['total_steps']:,} 步。各 GPU 上的估计：")
        print(stage1_table(first).to_string())
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
    and trained, for :func:`~retrieval_lib.evaluation.metrics.metrics_table` and the bar chart."""
    labelled = _expansion_labels(base_exp, base_run, runs)
    systems = {}
    if not trained_only:
        systems.update({f"{label}（微调前）": run["untrained"] for label, run in labelled})
    systems.update({f"{label}（微调后）" if not trained_only else label: run["test"]
                    for label, run in labelled})
    return systems


def expansion_summary(exp: ExperimentConfig, base_exp: ExperimentConfig, base_info: dict,
                      base_run: dict | None, runs: dict[str, dict]) -> dict:
    """What an expansion notebook measured, for its ``summary.json``: parameters from the
    configs (full and this preset) and counted on the trained model, the schedule, every run's
    summary, the paired tests, the identity check, and the settings in which a reused base run
    differs from its notebook's."""
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
        # a reused base run trained with other settings than its notebook's: which, and how
        "base_run_differs": {k: list(v) for k, v in (base_run or {}).get("differs", {}).items()},
    }


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
