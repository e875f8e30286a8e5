"""Train the demo's stage-1 runs once and ship them in this folder.

    .venv/bin/python demo_stage1/build.py                   # about 45 minutes on 2 CPU cores
                                                            # (MANIFEST.json: each run's time)
    .venv/bin/python demo_stage1/build.py minimind27_10k    # some chains, by their CHAINS key

Every stage chain the demo notebooks run (:data:`CHAINS`): for each demo base-model shape (the
MiniMind-27M, MiniMind-108M and Qwen2-0.5B twins, from the LMs shipped in ``demo_models/``)
the demo's default, RetroMAE on the LM and then the contrastive stage on its encoder; the
contrastive stage alone on the LM for the two MiniMind twins (the stage chapter's ablation);
and the 27M chain again with last-token pooling (``03_beyond_the_report``'s pooling options:
both stages depend on the pooling). Each runs in a fresh project home exactly as an experiment
with those ``pretraining_stages`` runs it on a cache miss. Each run's ``config.json``,
``history.json`` and ``encoder/`` are copied here under the run's folder name (the stage, the
shape and a digest of every input: the upstream weights, the data, the texts, the model's
retrieval settings and the stage's settings), with ``checksums.json``. ``MANIFEST.json``
records the command and, per run, its inputs and seconds. ``run_stage`` copies a shipped run
instead of training when, and only when, its folder name, so every input, is the same. The
stage recipes then cost ``make demo`` nothing.
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
STAGES = ("retromae", "contrastive")
#: key -> (the experiment whose demo model the chain starts from, its stages, model settings
#: that differ from the experiment's)
CHAINS: dict[str, tuple[str, tuple[str, ...], dict]] = {
    "minimind27_10k": ("minimind27_10k", STAGES, {}),
    "minimind108_10k": ("minimind108_10k", STAGES, {}),
    "qwen2_494_288k": ("qwen2_494_288k", STAGES, {}),
    "minimind27_10k-contrastive": ("minimind27_10k", ("contrastive",), {}),
    "minimind108_10k-contrastive": ("minimind108_10k", ("contrastive",), {}),
    "minimind27_10k-last": ("minimind27_10k", STAGES, {"pooling": "last_token"}),
}


def chain_experiment(key: str) -> config.ExperimentConfig:
    """The demo experiment whose stages chain ``key`` is."""
    name, stages, model = CHAINS[key]
    return config.variant(config.get_experiment(name, "demo"), "stage1",
                          pretraining_stages=stages, **model)


def main(argv: list[str] | None = None) -> int:
    names = tuple(argv) if argv else tuple(CHAINS)
    manifest = HERE / "MANIFEST.json"
    entries = {e["folder"]: e for e in json.loads(manifest.read_text(encoding="utf-8"))["runs"]
               } if manifest.exists() and argv else {}
    built = []
    with tempfile.TemporaryDirectory() as home:
        config.set_project_home(home)
        stage1.SHIPPED_STAGE1 = Path(home) / "none"  # train afresh, never copy
        for name in names:
            exp = chain_experiment(name)
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
