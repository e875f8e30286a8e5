"""Run folders: the one module that knows where a run lives, what it writes and how it is read.

``runs/<preset>/<name>/`` holds a training run (``config.json``, ``history.json``,
``metrics.json`` with per-query values, ``env.json``, written by :func:`write_run`) or a
baseline (:func:`save_baseline_run`; :func:`record_not_run` marks one that could not run, and
writes no number). :func:`load_run` reads one back and :func:`collect_runs` all of a preset.
Every notebook also ends by writing ``outputs/<notebook>/<preset>/summary.json``
(:func:`save_summary`) with the preset, the seed and the environment, so a table or a test reads
measured values, never numbers typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

from ..evaluation.metrics import aggregate, summarize_metrics
from ..settings.config import CHECKOUT, EXPERIMENTS, project_root
from ..settings.provenance import record_run

__all__ = ["environment_info", "default_output_dir", "save_summary", "load_summary",
           "metrics_block", "scores_from_block", "run_dir", "write_run", "load_run", "RunError",
           "runs_root", "save_baseline_run", "record_not_run", "collect_runs",
           "write_json_files", "git_commit"]

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
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "torch_threads": _torch_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "packages": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


#: What the notebooks write into the checkout (figures, the results page, the chapters): a
#: change there is their output, not a change to the code that made it.
OUTPUT_FOLDERS = ("figures", "reports")


def git_commit() -> str | None:
    """The commit of the library's checkout, with ``+dirty`` when tracked files other than the
    notebooks' outputs (:data:`OUTPUT_FOLDERS`) differ from it; None outside git."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    *(f":(exclude){folder}" for folder in OUTPUT_FOLDERS))
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


def metrics_block(result: dict, seed: int = 0) -> dict:
    """A ``score_run`` result as saved in ``metrics.json``: aggregates with bootstrap CIs and
    the per-query values."""
    table = summarize_metrics(result, seed=seed)
    return {"corpus_size": result.get("corpus_size"),
            "aggregate": table.to_dict(orient="index"),
            "per_query": result["per_query"]}


def scores_from_block(block: dict) -> dict:
    """A ``metrics.json`` block back in :func:`~retrieval_lib.evaluation.metrics.score_run`'s
    shape."""
    per_query = block["per_query"]
    return {"per_query": per_query,
            "aggregate": {m: aggregate(list(v.values())) for m, v in per_query.items()},
            "corpus_size": block.get("corpus_size")}


class RunError(ValueError):
    """A saved run folder that cannot be read: names the file and what is wrong with it."""


def load_run(path: str | os.PathLike) -> dict:
    """A saved run folder read back: :func:`~retrieval_lib.course.experiment.run_experiment`'s
    return shape (``out_dir``, ``test``, ``untrained``, ``history``, ``parameters``, ``expansion``,
    ``wall_time_s``, and ``m3`` for a model with M3 heads) plus ``config`` and ``kind``. A
    training run needs all four files; a baseline (``kind: baseline``) has no history and no
    untrained row. A cut or edited file raises :class:`RunError` naming it."""
    out = Path(path)

    def read(name):
        try:
            payload = json.loads((out / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{out / name}: not valid JSON ({exc}); the write was cut or the "
                           f"file edited") from None
        if not isinstance(payload, dict):
            raise RunError(f"{out / name}: a JSON {type(payload).__name__}, not an object")
        return payload

    needed = ["config.json", "metrics.json", "env.json"]
    kind = read("config.json").get("kind", "experiment") if (out / "config.json").exists() \
        else "experiment"
    if kind == "experiment":
        needed.insert(1, "history.json")
    missing = [n for n in needed if not (out / n).exists()]
    if missing:
        raise FileNotFoundError(f"{out} is not a finished run: {', '.join(missing)} missing")
    config, metrics = read("config.json"), read("metrics.json")
    block = "test"
    try:
        run = {"out_dir": out, "config": config, "kind": kind,
               "test": scores_from_block(metrics["test"]),
               "parameters": config.get("parameters"), "expansion": config.get("expansion"),
               "wall_time_s": read("env.json").get("wall_time_s")}
        if "untrained" in metrics:
            block = "untrained"
            run["untrained"] = scores_from_block(metrics["untrained"])
        if "m3" in metrics:  # a model with M3 heads: every retrieval mode
            block = "m3"
            run["m3"] = {mode: scores_from_block(b) for mode, b in metrics["m3"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, RunError):
            raise
        raise RunError(f"{out / 'metrics.json'}: block {block!r} is incomplete "
                       f"({type(exc).__name__}: {exc})") from None
    if (out / "history.json").exists():
        run["history"] = read("history.json")
    record_run(out)  # a figure drawn from it names it (settings.provenance)
    return run


def runs_root(preset: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/runs/<preset>``: where every run and baseline of a preset is saved."""
    return Path(root or project_root()) / "runs" / preset


def run_dir(preset: str, name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/runs/<preset>/<name>``: presets never overwrite each other."""
    return runs_root(preset, root) / name


def write_json_files(out: Path, files: dict[str, dict]) -> None:
    """Each file written beside its place and renamed into it: a kill never leaves a cut one."""
    for filename, payload in files.items():
        tmp = out / f".tmp-{filename}-{os.getpid()}"
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=2, default=_jsonable),
                       encoding="utf-8")
        os.replace(tmp, out / filename)


def write_run(out: str | os.PathLike, config: dict, metrics: dict, env: dict) -> Path:
    """Write a training run's ``config.json``, ``metrics.json`` and ``env.json`` (training
    itself writes ``history.json`` and the checkpoints)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # metrics.json last: it is what marks a run finished (collect_runs)
    write_json_files(out, {"config.json": config, "env.json": env, "metrics.json": metrics})
    record_run(out)
    return out


def save_baseline_run(name: str, result: dict, preset: str, info: dict,
                      root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Save a baseline's test result like a training run: ``config.json`` (``info`` plus
    ``kind: baseline``), ``metrics.json`` and ``env.json`` under ``runs/<preset>/<name>``."""
    out = run_dir(preset, name, root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "not_run.json").unlink(missing_ok=True)
    config = {"name": name, "kind": "baseline", "preset": preset, **info}
    metrics = {"experiment": name, "preset": preset, "kind": "baseline",
               "test": metrics_block(result, seed)}
    write_json_files(out, {"config.json": config, "env.json": environment_info(preset, seed),
                      "metrics.json": metrics})
    record_run(out)
    return out


def record_not_run(name: str, preset: str, reason: str, how_to_run: str,
                   root: str | os.PathLike | None = None) -> Path:
    """Mark a baseline as not run (no number is written), with why and how to run it."""
    out = run_dir(preset, name, root)
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
            try:
                run = load_run(path)
            except (RunError, FileNotFoundError) as exc:  # the other runs still load
                warnings.warn(f"skipping the broken run {path.name}: {exc}", RuntimeWarning,
                              stacklevel=2)
                runs[path.name] = {"name": path.name, "kind": "experiment", "status": "broken",
                                   "reason": str(exc),
                                   "how_to_run": f"delete {path} and run its notebook again"}
                continue
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


#: Baselines in the order of the tables (a reranked first stage after the first stages).
_BASELINE_ORDER = ("bge_m3", "bm25", "hybrid", "rerank", "rerank_published")


def _course_order(name: str) -> tuple:
    """Experiments in the report's order (an ablation right after its experiment), then the
    baselines (BGE-M3 first), then anything else by name."""
    base, _, variant = name.partition("-")
    if base in EXPERIMENTS:
        return (0, EXPERIMENTS.index(base), variant)
    if base in _BASELINE_ORDER:
        return (1, _BASELINE_ORDER.index(base), variant)
    return (2, 0, name)
