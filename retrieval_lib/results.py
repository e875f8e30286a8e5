"""Run records: what each notebook and run measured, saved as JSON for later notebooks and tests.

Every notebook ends by writing a summary (``summary.json``) under its output folder, with the
preset, the seed and the environment, so a table or a test reads measured values, never numbers
typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from .config import project_root

__all__ = ["environment_info", "default_output_dir", "save_summary", "load_summary"]

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
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "packages": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
