"""One experiment end to end, as the ``03_*`` notebooks run it.

``check_full_inputs`` stops a full run at once when its weights or data are missing;
``prepare_base_model`` gives the base LM (the real checkpoint, or the demo LM pretrained on the
demo corpus); ``run_experiment`` measures the untrained retriever, trains it, evaluates the best
epoch on the shared test set and writes the run folder that the results notebook reads:
``config.json``, ``history.json``, ``metrics.json`` (test metrics with per-query values) and
``env.json`` (versions, device, preset, seed, wall time).

From a shell (one process, or several with ``torchrun``)::

    python -m retrieval_lib.experiment --experiment minimind27_10k --preset demo
    torchrun --nproc_per_node 4 -m retrieval_lib.experiment --experiment minimind108_288k \\
        --preset full --data-dir /data/bge-m3-data
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import (
    EXPERIMENTS,
    PUBLISHED_BASE_MODELS,
    ExperimentConfig,
    cache_path,
    get_experiment,
    variant,
    with_overrides,
)
from .data import Splits, data_config_hash, find_source_files, prepare_data
from .distributed import is_main, main_first
from .evaluation import REPORT_METRICS, evaluate_retriever, paired_test
from .expansion import UnfreezeSchedule, expand_layers, new_layer_positions
from .hub import hub_has
from .m3 import evaluate_m3
from .memory import CUDA_CONTEXT_GIB, plan_table, training_plan
from .modeling import (
    DualTowerRetriever,
    check_base_model,
    count_parameters,
    parameter_count_from_config,
    resolve_base_model,
)
from .pretraining import PretrainConfig, pretrain_demo_lm
from .records import DataUnavailableError
from .runs import environment_info, load_run, metrics_block, run_dir, write_run
from .tokenizer import tokenizer_for_preset
from .training import set_seed, steps_per_epoch, train_retriever

__all__ = ["MissingInputsError", "check_full_inputs", "prepare_base_model",
           "run_experiment", "ensure_run", "result_summary", "describe",
           "expansion_parameters", "run_expansion_with_ablation", "untrained_gaps",
           "expansion_comparisons", "expansion_systems", "expansion_histories",
           "unfreeze_table", "expansion_summary", "run_differences", "differences_note",
           "unfreeze_plan", "show_plan", "OPTIONS_EXPERIMENT", "QUERY_INSTRUCTION",
           "option_variants", "option_systems", "option_comparisons"]


class MissingInputsError(FileNotFoundError):
    """A full-preset run whose weights or data cannot be found; the message lists each."""


def check_full_inputs(exp: ExperimentConfig) -> None:
    """Raise :class:`MissingInputsError` naming every missing model file and data source,
    before anything is downloaded or prepared.

    The model (:func:`~retrieval_lib.modeling.check_base_model`): a local folder must hold
    config.json, weights and a tokenizer (a MiniMind checkpoint must also be convertible); a
    hub id must be reachable or cached and hold the same. The data: prepared splits exist,
    ``exp.data.data_dir`` holds a file for every source, or the hub dataset is reachable.
    """
    missing = [f"- model ({exp.model.name}): {problem}" for problem in check_base_model(
        exp.model.base_model, exp.model.trust_remote_code,
        hub_id=PUBLISHED_BASE_MODELS.get(exp.model.name))]
    prepared = cache_path(exp.data) / f"prepared-{exp.data.kind}-{data_config_hash(exp.data)}"
    data_ok = (prepared / "manifest.json").exists()
    if not data_ok and exp.data.data_dir:
        try:
            find_source_files(exp.data.data_dir, exp.data.sources)
            data_ok = True
        except DataUnavailableError as exc:
            missing.append("- data: " + str(exc).split("\nSupply the data")[0])
    elif not data_ok:
        data_ok = hub_has(exp.data.hub_repo, "dataset")
        if not data_ok:
            missing.append(
                f"- data: no prepared splits at {prepared}, no `data_dir` given, and the hub "
                f"dataset {exp.data.hub_repo!r} is not reachable.\n  Supply it: download "
                f"bge-m3-data.tar.gz from https://huggingface.co/datasets/{exp.data.hub_repo}, "
                f"extract it and run with `-p data_dir DIR` (notebook 01 prepares the splits); "
                f"or set HF_ENDPOINT to a mirror.")
    if missing:
        raise MissingInputsError(
            f"the full preset of experiment {exp.name} ({exp.section}) cannot start:\n"
            + "\n".join(missing)
            + "\nOn a machine without GPU or hub access, run with `-p preset demo` instead.")


def prepare_base_model(exp: ExperimentConfig, splits: Splits,
                       pretrain: PretrainConfig | None = None) -> tuple[ExperimentConfig, dict]:
    """The experiment with ``base_model`` pointing at real weights; info on the base LM.

    ``full``: unchanged (hub id or local folder); a MiniMind checkpoint in its own format is
    converted to a ``LlamaModel`` here, once (the info holds the conversion report).
    ``demo``: a byte-level BPE tokenizer and a causal LM of the demo shape pretrained on the
    training pool's passages and queries (the validation passages are its held-out set), cached
    and shared by every notebook.
    """
    if exp.preset == "full":
        path, conversion = resolve_base_model(exp.model.base_model)
        if conversion:
            print(f"{exp.model.base_model}: {conversion['format']} checkpoint converted to a "
                  f"standard LlamaModel in {path} (RoPE theta {conversion['rope_theta']:g}, "
                  f"RMSNorm eps {conversion['rms_norm_eps']:g}; {conversion['rope_pairs']}); "
                  f"its own code was not run")
        return exp, {"base_model": exp.model.base_model, "pretrained_here": False,
                     "loaded_from": path, "conversion": conversion}
    cache = cache_path(exp.data)
    tok = tokenizer_for_preset("demo", splits.train, cache, vocab_size=exp.model.vocab_size)
    texts = [p["text"] for row in splits.train for p in row["positive_passages"]]
    texts += list(splits.train["query"])
    heldout = [p["text"] for row in splits.validation for p in row["positive_passages"]]
    path = pretrain_demo_lm(exp.model, tok, texts, heldout, cache, pretrain)
    report = json.loads((path / "pretrain.json").read_text(encoding="utf-8"))
    info = {"base_model": str(path), "pretrained_here": True,
            "heldout_perplexity_before": report["heldout_perplexity_before"],
            "heldout_perplexity_after": report["heldout_perplexity_after"],
            "pretrain_steps": report["config"]["max_steps"],
            "pretrain_wall_time_s": report["wall_time_s"]}
    return replace(exp, model=replace(exp.model, base_model=str(path))), info


def run_experiment(exp: ExperimentConfig, splits: Splits, base_info: dict | None = None,
                   out_dir: str | Path | None = None, show_progress: bool = True,
                   resume: bool = False) -> dict:
    """Untrained evaluation, training, test evaluation of the best epoch; writes the run folder.

    ``resume=True`` continues an interrupted training from its newest good checkpoint (see
    :func:`~retrieval_lib.training.train_retriever`).

    ``exp.model.base_model`` must point at loadable weights (see :func:`prepare_base_model`).
    When ``exp.model.num_new_layers`` > 0 the base model is first expanded
    (:func:`~retrieval_lib.expansion.expand_layers`) and the new layers follow an
    :class:`~retrieval_lib.expansion.UnfreezeSchedule`; the untrained row is the expanded model.
    Returns ``{"out_dir", "history", "untrained", "test", "parameters", "expansion",
    "wall_time_s", "m3"}`` where ``untrained`` and ``test`` are ``score_run`` results (dense)
    and ``m3``, for a model with M3 heads, one per mode of :func:`retrieval_lib.m3.evaluate_m3`
    (else None).
    """
    start = time.perf_counter()
    out = Path(out_dir) if out_dir else run_dir(exp.preset, exp.name)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(exp.training.seed)  # the projection's initialisation, hence the untrained row
    model = DualTowerRetriever.from_config(exp.model)
    expansion = {"parameters_before": count_parameters(model), "new_layers": []}
    schedule = None
    if exp.model.num_new_layers:
        expansion["new_layers"] = expand_layers(
            model.encoder, exp.model.num_new_layers, init=exp.model.expansion_init,
            position=exp.model.expansion_position, seed=exp.training.seed)
        schedule = UnfreezeSchedule(expansion["new_layers"], exp.model.unfreeze_every)
    parameters = count_parameters(model)
    untrained = evaluate_retriever(model, splits.test)
    train = splits.subset(exp.subset)
    history = train_retriever(model, train, splits.validation, exp.training, out,
                              show_progress=show_progress, unfreeze=schedule, resume=resume)
    best = DualTowerRetriever.load(out / "best", device=next(model.parameters()).device)
    test = evaluate_retriever(best, splits.test)
    m3 = None
    if best.m3 is not None:  # each score alone and the hybrid rerank of the dense top 100

        m3 = evaluate_m3(best, splits.test, weights=exp.training.m3_score_weights)
    wall = time.perf_counter() - start
    seed = exp.training.seed
    config = {**exp.to_dict(), "base_model_info": base_info or {}, "parameters": parameters,
              "expansion": expansion,
              "train_records": len(train), "data_manifest": {
                  "fingerprint": splits.manifest["fingerprint"],
                  "splits": splits.manifest["splits"]}}
    metrics = {"experiment": exp.name, "preset": exp.preset, "best_epoch": history["best_epoch"],
               "test": metrics_block(test, seed), "untrained": metrics_block(untrained, seed)}
    if m3 is not None:
        metrics["m3"] = {mode: metrics_block(result, seed) for mode, result in m3.items()}
    env = {**environment_info(exp.preset, seed), "wall_time_s": wall,
           "world_size": history["world_size"],
           "resumed_from": history.get("resumed_from", []),
           "repeat": f"python -m retrieval_lib.experiment --experiment {exp.name} "
                     f"--preset {exp.preset} (with the settings of config.json)"}
    if is_main():  # under torchrun every process evaluates the same model; one writes
        write_run(out, config, metrics, env)
    return {"out_dir": out, "history": history, "untrained": untrained, "test": test,
            "parameters": parameters, "expansion": expansion, "wall_time_s": wall, "m3": m3}


def _same_setup(saved: dict, exp: ExperimentConfig, splits: Splits) -> bool:
    """True when a saved run used ``exp``'s model, training, subset and exactly this data."""
    current = json.loads(json.dumps(exp.to_dict()))  # as saved: tuples become lists
    return (saved["data_manifest"]["fingerprint"] == splits.manifest["fingerprint"]
            and all(saved[k] == current[k] for k in ("model", "training", "subset")))


def ensure_run(exp: ExperimentConfig, splits: Splits, base_info: dict | None = None,
               allow_training: bool = True, show_progress: bool = True,
               resume: bool = False) -> dict | None:
    """The run of ``exp``: read from its run folder when a finished run with the same model,
    training settings and data is there, else trained now (or ``None`` when
    ``allow_training`` is false; ``resume`` as in :func:`run_experiment`). Says which."""
    folder = run_dir(exp.preset, exp.name)
    if (folder / "metrics.json").exists():
        run = load_run(folder)
        if _same_setup(run["config"], exp, splits):
            print(f"{exp.name}: reusing the finished run in {folder}")
            return run
        print(f"{exp.name}: the run in {folder} used other settings or data; not reused")
    if not allow_training:
        print(f"{exp.name}: no finished run with these settings, and training it was not "
              f"asked for")
        return None
    return run_experiment(exp, splits, base_info, show_progress=show_progress, resume=resume)


def expansion_parameters(exp: ExperimentConfig) -> dict:
    """Parameters of the retriever before and after the expansion, from the config alone."""
    before = parameter_count_from_config(exp.model, include_new_layers=False)
    after = parameter_count_from_config(exp.model)
    return {"layers_before": exp.model.num_hidden_layers,
            "layers_after": exp.model.num_hidden_layers + exp.model.num_new_layers,
            "before": before, "after": after, "added": after - before,
            "growth": after / before - 1}


def result_summary(result: dict, metrics=REPORT_METRICS) -> dict:
    """Means of the untrained and the trained retriever on the test set, for ``summary.json``,
    with a paired randomisation test of trained vs untrained on NDCG@10 and Recall@100."""
    tests = {m: paired_test(result["test"]["per_query"][m], result["untrained"]["per_query"][m])
             for m in ("ndcg@10", "recall@100")}
    return {
        "run_dir": str(result["out_dir"]),
        "parameters": result["parameters"],
        "best_epoch": result["history"]["best_epoch"],
        "epochs_run": len(result["history"]["epochs"]),
        "untrained": {m: result["untrained"]["aggregate"][m]["mean"] for m in metrics},
        "trained": {m: result["test"]["aggregate"][m]["mean"] for m in metrics},
        "trained_vs_untrained": tests,
        "trainable_new_layers": [e["trainable_new_layers"] for e in result["history"]["epochs"]],
        "wall_time_s": result["wall_time_s"],
    }


def describe(exp: ExperimentConfig) -> dict:
    """The settings of an experiment as flat rows for a notebook table."""
    return {"section": exp.section, "title": exp.title, "preset": exp.preset,
            "subset": exp.subset, "train_records": exp.train_size,
            **{f"model.{k}": v for k, v in asdict(exp.model).items()},
            **{f"training.{k}": v for k, v in asdict(exp.training).items()}}


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
# Beyond the report (notebook 06): M3-style unified training, dynamic hard negatives and query
# instructions, each a variant of one experiment with its own run folder.
# ---------------------------------------------------------------------------------------------

#: The experiment whose variants ``03_beyond_the_report`` trains by default (4.1.1), and whose
#: variants the results notebook looks for.
OPTIONS_EXPERIMENT = "minimind27_10k"

#: Query instruction of the decoder-only ablation (the BGE family's Chinese retrieval prompt).
QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


def option_variants(exp: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The options compared in notebook 06, as labelled variants of ``exp`` (``exp`` itself,
    dense-only with static negatives, first)."""
    return {
        "稠密（基线）": exp,
        "统一训练（稠密+稀疏+多向量）": variant(exp, "m3", m3_heads=True),
        "动态难负例（每轮重挖）": variant(exp, "ance", {"remine_every": 1}),
        "末位池化": variant(exp, "last", pooling="last_token"),
        "末位池化 + 查询指令": variant(exp, "last-instr", pooling="last_token",
                                     query_instruction=QUERY_INSTRUCTION),
    }


def option_systems(runs: dict[str, dict]) -> dict[str, dict]:
    """Labelled test results of :func:`option_variants` runs; a run with M3 heads adds its
    sparse, ColBERT and hybrid (rerank of the dense top 100) results."""
    systems = {}
    for label, run in runs.items():
        systems[label] = run["test"]
        for mode, result in (run.get("m3") or {}).items():
            if mode != "dense":
                systems[f"{label} · {mode}"] = result
    return systems


def option_comparisons(runs: dict[str, dict], metrics=("ndcg@10", "recall@100")
                       ) -> dict[str, dict]:
    """Paired randomisation tests of each option against what it changes: unified, dynamic
    and last-token against the dense baseline, the instruction against last-token without it,
    and the hybrid rerank against the same model's dense search."""
    labels = list(runs)
    base, unified, dynamic, last, instructed = labels[:5]
    pairs = [(unified, base), (dynamic, base), (last, base), (instructed, last)]
    tests = {}
    for metric in metrics:
        for a, b in pairs:
            tests[f"{a} − {b} · {metric}"] = paired_test(runs[a]["test"]["per_query"][metric],
                                                         runs[b]["test"]["per_query"][metric])
        m3 = runs[unified].get("m3")
        if m3:
            tests[f"{unified}：hybrid − dense · {metric}"] = paired_test(
                m3["hybrid"]["per_query"][metric], m3["dense"]["per_query"][metric])
    return tests


def main(argv: list[str] | None = None) -> int:
    """Run one experiment of the report from the command line (see the module docstring)."""
    import argparse

    parser = argparse.ArgumentParser(description="Train and evaluate one experiment.")
    parser.add_argument("--experiment", required=True, choices=EXPERIMENTS)
    parser.add_argument("--preset", default="auto", choices=("full", "demo", "auto"))
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="queries per process and step")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--grad-cache-chunk-size", type=int,
                        help="GradCache: embed this many texts at a time (large batches)")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="let a checkpoint that ships its own model code run it (MiniMind "
                             "never needs this: it is converted to a Llama model)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest good checkpoint of the run folder")
    args = parser.parse_args(argv)
    exp = with_overrides(get_experiment(args.experiment, args.preset), data_dir=args.data_dir,
                         model_path=args.model_path, epochs=args.epochs,
                         batch_size=args.batch_size, learning_rate=args.learning_rate,
                         gradient_checkpointing=args.gradient_checkpointing,
                         grad_cache_chunk_size=args.grad_cache_chunk_size,
                         trust_remote_code=args.trust_remote_code)
    if exp.preset == "full":
        check_full_inputs(exp)
    # the main process prepares data and the demo base model first; the others read its caches
    splits = main_first(lambda: prepare_data(exp.data))
    exp, base_info = main_first(lambda: prepare_base_model(exp, splits))
    result = run_experiment(exp, splits, base_info, show_progress=is_main(),
                            resume=args.resume)
    if is_main():
        print(json.dumps(result_summary(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
