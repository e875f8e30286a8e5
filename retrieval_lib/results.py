"""Run records: what each notebook and run measured, saved as JSON for later notebooks and tests.

Every notebook ends by writing a summary (``summary.json``) under its output folder, with the
preset, the seed and the environment, so a table or a test reads measured values, never numbers
typed by hand.

The run registry: every training run (``runs/<preset>/<experiment>/``, written by
:func:`~retrieval_lib.experiment.run_experiment`) and every baseline (written by
:func:`save_baseline_run`, or marked by :func:`record_not_run` when it could not run) is read back
by :func:`collect_runs`; :func:`report_table` turns them into the report's table, with the
reference system (BGE-M3, or BM25 where BGE-M3 was not run), each model's gain over its base and
paired tests, and :func:`markdown_table` writes it for the README.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from .config import EXPERIMENTS, project_root
from .evaluation import (
    HEADLINE_METRICS,
    aggregate,
    bootstrap_ci,
    paired_test,
    summarize_metrics,
    summarize_systems,
)

__all__ = ["environment_info", "default_output_dir", "save_summary", "load_summary",
           "metrics_block", "scores_from_block", "load_run", "runs_root", "save_baseline_run",
           "record_not_run", "collect_runs", "reference_system", "report_table",
           "markdown_table", "write_markdown_report", "system_summaries", "efficiency_points",
           "data_scaling_groups", "TABLE_METRICS", "PUBLISHED_RESULTS"]

#: The metrics of the report's tables.
TABLE_METRICS = HEADLINE_METRICS

#: Numbers the original report published, ``{experiment: {metric: mean}}``, shown beside the
#: measured ones and labelled as published. Empty: the report's tables are not in this
#: repository; add them here from the report (never from a run of this code).
PUBLISHED_RESULTS: dict[str, dict[str, float]] = {}

_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "numpy", "pandas", "jieba",
             "bm25s", "faiss-cpu", "matplotlib", "retrieval_lib")


def environment_info(preset: str | None = None, seed: int | None = None) -> dict:
    """Versions, device, preset and seed: what is needed to repeat a run."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)})"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return {
        "preset": preset,
        "seed": seed,
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
        "torch_threads": _torch_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "packages": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _git_commit() -> str | None:
    """The commit of the checkout, with ``+dirty`` when files differ from it; None outside
    git."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


def default_output_dir(notebook: str, preset: str) -> Path:
    """``<project root>/outputs/<notebook>/<preset>``: presets never overwrite each other."""
    return project_root() / "outputs" / notebook / preset


def save_summary(out_dir: str | os.PathLike, summary: dict, preset: str,
                 seed: int | None = None) -> Path:
    """Write ``summary.json`` (the notebook's measured values plus its environment)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"preset": preset, **summary, "env": environment_info(preset, seed)}
    path = out / "summary.json"
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=2, default=_jsonable),
                    encoding="utf-8")
    return path


def load_summary(out_dir: str | os.PathLike) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ---------------------------------------------------------------------------------------------
# The run registry
# ---------------------------------------------------------------------------------------------


def metrics_block(result: dict, seed: int = 0) -> dict:
    """A ``score_run`` result as saved in ``metrics.json``: aggregates with bootstrap CIs and
    the per-query values."""
    table = summarize_metrics(result, seed=seed)
    return {"corpus_size": result.get("corpus_size"),
            "aggregate": table.to_dict(orient="index"),
            "per_query": result["per_query"]}


def scores_from_block(block: dict) -> dict:
    """A ``metrics.json`` block back in :func:`~retrieval_lib.evaluation.score_run`'s shape."""
    per_query = block["per_query"]
    return {"per_query": per_query,
            "aggregate": {m: aggregate(list(v.values())) for m, v in per_query.items()},
            "corpus_size": block.get("corpus_size")}


def load_run(path: str | os.PathLike) -> dict:
    """A saved run folder read back: :func:`~retrieval_lib.experiment.run_experiment`'s return
    shape (``out_dir``, ``test``, ``untrained``, ``history``, ``parameters``, ``expansion``,
    ``wall_time_s``, and ``m3`` for a model with M3 heads) plus ``config`` and ``kind``. A
    training run needs all four files; a baseline (``kind: baseline``) has no history and no
    untrained row."""
    out = Path(path)

    def read(name):
        return json.loads((out / name).read_text(encoding="utf-8"))

    needed = ["config.json", "metrics.json", "env.json"]
    kind = read("config.json").get("kind", "experiment") if (out / "config.json").exists() \
        else "experiment"
    if kind == "experiment":
        needed.insert(1, "history.json")
    missing = [n for n in needed if not (out / n).exists()]
    if missing:
        raise FileNotFoundError(f"{out} is not a finished run: {', '.join(missing)} missing")
    config, metrics = read("config.json"), read("metrics.json")
    run = {"out_dir": out, "config": config, "kind": kind,
           "test": scores_from_block(metrics["test"]),
           "parameters": config.get("parameters"), "expansion": config.get("expansion"),
           "wall_time_s": read("env.json").get("wall_time_s")}
    if "untrained" in metrics:
        run["untrained"] = scores_from_block(metrics["untrained"])
    if "m3" in metrics:  # a model with M3 heads: every retrieval mode
        run["m3"] = {mode: scores_from_block(block) for mode, block in metrics["m3"].items()}
    if (out / "history.json").exists():
        run["history"] = read("history.json")
    return run


def runs_root(preset: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/runs/<preset>``: where every run and baseline of a preset is saved."""
    return Path(root or project_root()) / "runs" / preset


def save_baseline_run(name: str, result: dict, preset: str, info: dict,
                      root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Save a baseline's test result like a training run: ``config.json`` (``info`` plus
    ``kind: baseline``), ``metrics.json`` and ``env.json`` under ``runs/<preset>/<name>``."""
    out = runs_root(preset, root) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "not_run.json").unlink(missing_ok=True)
    config = {"name": name, "kind": "baseline", "preset": preset, **info}
    metrics = {"experiment": name, "preset": preset, "kind": "baseline",
               "test": metrics_block(result, seed)}
    for filename, payload in (("config.json", config), ("metrics.json", metrics),
                              ("env.json", environment_info(preset, seed))):
        (out / filename).write_text(json.dumps(payload, ensure_ascii=False, indent=2,
                                               default=_jsonable), encoding="utf-8")
    return out


def record_not_run(name: str, preset: str, reason: str, how_to_run: str,
                   root: str | os.PathLike | None = None) -> Path:
    """Mark a baseline as not run (no number is written), with why and how to run it."""
    out = runs_root(preset, root) / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "config.json", "env.json"):
        (out / stale).unlink(missing_ok=True)
    path = out / "not_run.json"
    path.write_text(json.dumps({"name": name, "preset": preset, "status": "not run",
                                "reason": reason, "how_to_run": how_to_run,
                                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                               ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def collect_runs(preset: str, root: str | os.PathLike | None = None) -> dict[str, dict]:
    """Every run and baseline saved for ``preset``, by name (presets are never mixed).

    Each entry has ``name``, ``kind`` (``experiment`` or ``baseline``), ``status`` (``done`` or
    ``not run``) and, when done, ``title``, ``model``, ``parameters``, ``train_records``,
    ``base_experiment``, ``test`` (and ``untrained`` / ``history`` for training runs).
    """
    folder = runs_root(preset, root)
    runs = {}
    paths = [p for p in folder.glob("*") if p.is_dir()] if folder.exists() else []
    for path in sorted(paths, key=lambda p: _course_order(p.name)):
        if (path / "metrics.json").exists():
            run = load_run(path)
            config, model = run["config"], run["config"].get("model") or {}
            runs[path.name] = {**run, "name": path.name, "status": "done",
                               "title": config.get("title", path.name),
                               "model": model.get("name", config.get("model_name")),
                               "train_records": config.get("train_records"),
                               "base_experiment": config.get("base_experiment"),
                               "num_new_layers": model.get("num_new_layers", 0),
                               "expansion_init": model.get("expansion_init")}
        elif (path / "not_run.json").exists():
            marker = json.loads((path / "not_run.json").read_text(encoding="utf-8"))
            runs[path.name] = {"name": path.name, "kind": "baseline", "status": "not run",
                               "reason": marker["reason"], "how_to_run": marker["how_to_run"]}
    return runs


def _course_order(name: str) -> tuple:
    """Experiments in the report's order (an ablation right after its experiment), then the
    baselines (BGE-M3 first), then anything else by name."""
    base, _, variant = name.partition("-")
    if base in EXPERIMENTS:
        return (0, EXPERIMENTS.index(base), variant)
    if base in ("bge_m3", "bm25"):
        return (1, ("bge_m3", "bm25").index(base), variant)
    return (2, 0, name)


def reference_system(runs: dict[str, dict]) -> str | None:
    """The system every model is compared with: BGE-M3 (dense) when it was run, else BM25."""
    for name in ("bge_m3", "bm25"):
        if runs.get(name, {}).get("status") == "done":
            return name
    return None


def _base_of(name: str, run: dict, runs: dict[str, dict]) -> str | None:
    """The run a model's gain is measured against: its base experiment for an expansion (or an
    ablation variant of one), nothing for a model trained from its pretrained LM."""
    base = run.get("base_experiment")
    return base if base in runs and runs[base]["status"] == "done" else None


def report_table(runs: dict[str, dict], metrics=TABLE_METRICS, reference: str | None = None,
                 test_metric: str = "ndcg@5", seed: int = 0):
    """The report's table, one row per system that was run (not-run baselines are listed with
    their status only): for each metric mean, std, 95% bootstrap CI and % of the reference;
    the gain of ``test_metric`` over the untrained model and over the base experiment; a
    paired randomisation test of ``test_metric`` against the reference; and the published
    number of the report where :data:`PUBLISHED_RESULTS` has it."""
    import pandas as pd

    if not runs:
        raise ValueError("no saved runs: run the 03_* and 04 notebooks of this preset first")
    reference = reference or reference_system(runs)
    ref = runs[reference]["test"] if reference else None
    rows = []
    for name, run in runs.items():
        row = {"system": name, "kind": run["kind"], "status": run["status"]}
        if run["status"] != "done":
            row["note"] = run["reason"]
            rows.append(row)
            continue
        row.update({"title": run["title"], "parameters": run["parameters"],
                    "train_records": run["train_records"]})
        per_query = run["test"]["per_query"]
        for metric in metrics:
            values = list(per_query[metric].values())
            agg = run["test"]["aggregate"][metric]
            low, high = bootstrap_ci(values, seed=seed)
            row.update({f"{metric}": agg["mean"], f"{metric}_std": agg["std"],
                        f"{metric}_ci_low": low, f"{metric}_ci_high": high})
            if ref is not None:
                ref_mean = ref["aggregate"][metric]["mean"]
                row[f"{metric}_pct_of_reference"] = (agg["mean"] / ref_mean if ref_mean
                                                     else float("nan"))
            published = PUBLISHED_RESULTS.get(name, {}).get(metric)
            row[f"{metric}_published"] = published
        mean = run["test"]["aggregate"][test_metric]["mean"]
        if "untrained" in run:
            row[f"{test_metric}_gain_over_untrained"] = (
                mean - run["untrained"]["aggregate"][test_metric]["mean"])
        base = _base_of(name, run, runs)
        row["base"] = base
        if base:
            row[f"{test_metric}_gain_over_base"] = (
                mean - runs[base]["test"]["aggregate"][test_metric]["mean"])
        if ref is not None and name != reference:
            test = paired_test(per_query[test_metric], ref["per_query"][test_metric], seed=seed)
            row.update({f"{test_metric}_vs_reference": test["mean_difference"],
                        "p_value_vs_reference": test["p_value"]})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("system")
    table.attrs["reference"] = reference
    table.attrs["test_metric"] = test_metric
    return table


def markdown_table(table, metrics=TABLE_METRICS, digits: int = 3) -> str:
    """The report table as GitHub markdown: "mean ± std" per metric, % of the reference, gain
    over the base, p-value against the reference; not-run systems with their reason."""
    reference = table.attrs.get("reference")
    test_metric = table.attrs.get("test_metric", "ndcg@5")
    header = (["system", "params", "train"] + [m for m in metrics]
              + [f"% of {reference}" if reference else "% of reference",
                 f"Δ{test_metric} vs base", f"p vs {reference or 'reference'}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        if row["status"] != "done":
            cells = [name, "", ""] + ["not run"] * len(metrics) + ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        params = row.get("parameters")
        cells = [name, f"{params / 1e6:.1f}M" if params == params and params else "—",
                 f"{int(row['train_records']):,}" if row.get("train_records") == row.get(
                     "train_records") and row.get("train_records") else "—"]
        cells += [f"{row[m]:.{digits}f} ± {row[f'{m}_std']:.{digits}f}" for m in metrics]
        pct = row.get(f"{test_metric}_pct_of_reference")
        cells.append(f"{pct:.0%}" if pct == pct and pct is not None else "—")
        gain = row.get(f"{test_metric}_gain_over_base")
        cells.append(f"{gain:+.{digits}f} ({row['base']})" if gain == gain and gain is not None
                     else "—")
        p = row.get("p_value_vs_reference")
        cells.append(f"{p:.3g}" if p == p and p is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown_report(table, preset: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/reports/results_<preset>.md``: the report table with what made it (preset,
    reference, machine, versions), for the README to link."""
    env = environment_info(preset)
    reference = table.attrs.get("reference") or "none"
    lines = [f"# Results: `{preset}` preset", "",
             f"Built by `05_results_and_plots.ipynb` from the saved runs in `runs/{preset}/` on "
             f"{env['time_utc']} ({env['device']}, {env['cpu_count']} CPUs, torch "
             f"{env['packages'].get('torch')}). Each cell is the mean ± sample std over the test "
             f"queries; `% of {reference}` and `p vs {reference}` compare "
             f"{table.attrs.get('test_metric', 'ndcg@5')} with the reference system (a paired "
             f"randomisation test over the same queries); Δ vs base is the gain over the model "
             f"an expansion grew from.", ""]
    if preset == "demo":
        lines += ["The demo preset uses tiny models and the People's Daily 1998 corpus: these "
                  "numbers show that the pipeline works, not how the real models compare.", ""]
    path = Path(root or project_root()) / "reports" / f"results_{preset}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + markdown_table(table), encoding="utf-8")
    return path


def system_summaries(runs: dict[str, dict], metrics=TABLE_METRICS, seed: int = 0) -> dict:
    """``{system: {metric: {mean, std, ci_low, ci_high, n}}}`` of every run that was done."""
    return summarize_systems({name: run["test"] for name, run in runs.items()
                              if run["status"] == "done"}, list(metrics), seed)


def efficiency_points(runs: dict[str, dict], metric: str = "ndcg@5", seed: int = 0) -> dict:
    """Parameters and ``metric`` (mean, CI) of every run with a parameter count."""
    summaries = system_summaries(runs, [metric], seed)
    return {name: {"parameters": runs[name]["parameters"], **summaries[name][metric]}
            for name in summaries if runs[name].get("parameters")}


def data_scaling_groups(runs: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Training runs of one unexpanded model on several data sizes: ``{model: {run: records}}``
    (models with a single size are left out)."""
    groups: dict[str, dict[str, int]] = {}
    for name, run in runs.items():
        if run["kind"] == "experiment" and run["status"] == "done" and not run["num_new_layers"]:
            groups.setdefault(run["model"], {})[name] = run["train_records"]
    return {model: sizes for model, sizes in groups.items() if len(set(sizes.values())) > 1}
