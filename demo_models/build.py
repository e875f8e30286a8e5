"""Pretrain the demo LMs once and ship them in this folder.

    .venv/bin/python demo_models/build.py     # tens of minutes on 2 CPU cores
                                              # (MANIFEST.json: the seconds of each)

The demo preset's three base-model shapes (the MiniMind-27M, MiniMind-108M and Qwen2-0.5B
twins) are pretrained from scratch on the demo corpus, with the default
``retrieval_lib.models.pretraining.PretrainConfig`` (its seed and schedule), exactly as
``experiment.prepare_base_model`` would on a cache miss; each folder is copied here under its
cache name (shape + a hash of the schedule, tokenizer and corpus), with ``checksums.json``.
``MANIFEST.json`` records the command, the prepared data's fingerprint, the seed, the schedule
and the held-out perplexity. ``pretrain_demo_lm`` copies a shipped folder into the cache
instead of pretraining when, and only when, every one of those inputs is the same.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from retrieval_lib import data
from retrieval_lib.course import experiment
from retrieval_lib.models import pretraining
from retrieval_lib.settings import config, saved_folder

HERE = Path(__file__).resolve().parent
#: One experiment per demo base-model shape.
SHAPES = ("minimind27_10k", "minimind108_10k", "qwen2_494_288k")


def main() -> int:
    entries = []
    with tempfile.TemporaryDirectory() as home:
        config.set_project_home(home)
        pretraining.SHIPPED_DEMO_LMS = Path(home) / "none"  # pretrain afresh, never copy
        for name in SHAPES:
            exp = config.get_experiment(name, "demo")
            splits = data.prepare_data(exp.data)
            start = time.perf_counter()
            exp, info = experiment.prepare_base_model(exp, splits)
            folder = Path(exp.model.base_model)
            shipped = HERE / folder.name
            if shipped.exists():
                shutil.rmtree(shipped)
            shutil.copytree(folder, shipped)
            saved_folder.write_checksums(shipped)
            report = json.loads((folder / "pretrain.json").read_text(encoding="utf-8"))
            entries.append({"folder": folder.name, "experiment": name,
                            "architecture": exp.model.architecture,
                            "data_fingerprint": splits.manifest["fingerprint"],
                            "pretrain": asdict(pretraining.PretrainConfig()),
                            "heldout_perplexity_before": info["heldout_perplexity_before"],
                            "heldout_perplexity_after": info["heldout_perplexity_after"],
                            "kept_step": report.get("kept_step"),
                            "heldout_curve": report.get("heldout_curve"),
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name}: {folder.name}, held-out perplexity "
                  f"{info['heldout_perplexity_before']:.0f} -> "
                  f"{info['heldout_perplexity_after']:.1f} (weights of step "
                  f"{report.get('kept_step')})", flush=True)
    keep = {e["folder"] for e in entries}
    for old in HERE.glob("demo-lm-*"):  # folders of an earlier schedule or corpus
        if old.name not in keep:
            shutil.rmtree(old)
    (HERE / "MANIFEST.json").write_text(json.dumps(
        {"command": "python demo_models/build.py", "date": time.strftime("%Y-%m-%d"),
         "models": entries}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
