"""Train the demo's stage-1 runs once and ship them in this folder.

    .venv/bin/python demo_stage1/build.py                   # half an hour on 2 CPU cores
                                                            # (MANIFEST.json: each run's time)
    .venv/bin/python demo_stage1/build.py minimind27_10k    # one base-model shape

For each demo base-model shape (the MiniMind-27M, MiniMind-108M and Qwen2-0.5B twins, from the
LMs shipped in ``demo_models/``), both stages of ``retrieval_lib.course.stage1`` run in a fresh
project home exactly as an experiment with ``pretraining_stages=("retromae", "contrastive")``
runs them on a cache miss: RetroMAE on the LM, then the contrastive stage on its encoder. Each
run's ``config.json``, ``history.json`` and ``encoder/`` are copied here under the run's folder
name (the stage, the shape and a digest of every input: the upstream weights, the data, the
texts, the model's retrieval settings and the stage's settings), with ``checksums.json``.
``MANIFEST.json`` records the command and, per run, its inputs and seconds.
``run_stage`` copies a shipped run instead of training when, and only when, its folder name,
so every input, is the same. The stage recipes then cost ``make demo`` nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from retrieval_lib import data
from retrieval_lib.course import experiment, stage1
from retrieval_lib.settings import config, saved_folder

HERE = Path(__file__).resolve().parent
#: One experiment per demo base-model shape.
SHAPES = ("minimind27_10k", "minimind108_10k", "qwen2_494_288k")
STAGES = ("retromae", "contrastive")


def main(argv: list[str] | None = None) -> int:
    names = tuple(argv) if argv else SHAPES
    manifest = HERE / "MANIFEST.json"
    entries = {e["folder"]: e for e in json.loads(manifest.read_text(encoding="utf-8"))["runs"]
               } if manifest.exists() and argv else {}
    built = []
    with tempfile.TemporaryDirectory() as home:
        config.set_project_home(home)
        stage1.SHIPPED_STAGE1 = Path(home) / "none"  # train afresh, never copy
        for name in names:
            exp = config.with_overrides(config.get_experiment(name, "demo"),
                                        pretraining_stages="+".join(STAGES))
            splits = data.prepare_data(exp.data)
            start = time.perf_counter()
            _, info = experiment.prepare_base_model(exp, splits)
            seconds = round(time.perf_counter() - start, 1)
            for run in info["pretraining_stages"]:
                folder = Path(run["folder"])
                shipped = HERE / folder.name
                if shipped.exists():
                    shutil.rmtree(shipped)
                shipped.mkdir()
                for part in stage1.SHIPPED_PARTS:
                    copy = shutil.copytree if (folder / part).is_dir() else shutil.copy2
                    copy(folder / part, shipped / part)
                saved_folder.write_checksums(shipped)
                history = json.loads((folder / "history.json").read_text(encoding="utf-8"))
                entries[folder.name] = {
                    "folder": folder.name, "experiment": name, "stage": run["stage"],
                    "data_fingerprint": run["data_fingerprint"], "settings": run["settings"],
                    "wall_time_s": history.get("wall_time_s") or sum(
                        e.get("time_s", 0.0) for e in history.get("epochs", [])),
                    "chain_seconds": seconds}
                built.append(folder.name)
                print(f"{name}: {run['stage']} -> {folder.name}", flush=True)
    if not argv:  # a full build: folders of an earlier schedule or corpus go
        for old in HERE.iterdir():
            if old.is_dir() and old.name not in built and old.name != "__pycache__":
                shutil.rmtree(old)
        entries = {k: v for k, v in entries.items() if k in built}
    manifest.write_text(json.dumps(
        {"command": "python demo_stage1/build.py", "date": time.strftime("%Y-%m-%d"),
         "runs": sorted(entries.values(), key=lambda e: e["folder"])}, indent=2) + "\n",
        encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
