"""Training logs where users look: TensorBoard event files beside ``history.json``.

:func:`write_events` turns a training history (:func:`~retrieval_lib.training.loop.train_retriever`
writes it after every epoch) into ``<run>/tensorboard/``: per optimizer step the loss, its parts
(M3) and the learning rate; per epoch the training loss and the validation metrics; and the
unfreeze points of an expansion (the number of trainable new layers from each stage's first
step). The folder is written whole each time (a resumed run's log holds each step once) and
swapped in, so ``%tensorboard --logdir runs`` in Colab shows every run as it trains.

It needs the ``tensorboard`` package (torch's ``SummaryWriter`` writes through it): where it is
not installed, :data:`TENSORBOARD` is False and nothing is written; ``history.json`` always is.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = ["TENSORBOARD", "EVENTS_DIR", "write_events"]

#: Whether TensorBoard event files are written (the ``tensorboard`` package is installed).
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

#: The folder of a run that holds its event files.
EVENTS_DIR = "tensorboard"


def write_events(out_dir: str | Path, history: Mapping, enabled: bool | None = None
                 ) -> Path | None:
    """Write ``out_dir/tensorboard/`` from ``history`` (tags ``train/loss``, ``train/lr``,
    ``train/loss_<part>``, ``epoch/train_loss``, ``epoch/val_<metric>`` and
    ``unfreeze/trainable_new_layers``, each at its optimizer step; an epoch's values at the
    step that ends it). Returns the folder, or None when ``enabled`` (default: where
    tensorboard is installed) is false."""
    if not (TENSORBOARD if enabled is None else enabled):
        return None
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out_dir)
    final, tmp = out / EVENTS_DIR, out / f"{EVENTS_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tmp))
    try:
        for s in history.get("steps", []):
            writer.add_scalar("train/loss", s["loss"], s["step"])
            if "lr" in s:
                writer.add_scalar("train/lr", s["lr"], s["step"])
            for part, value in (s.get("loss_parts") or {}).items():
                writer.add_scalar(f"train/loss_{part}", value, s["step"])
        per_epoch = history.get("steps_per_epoch") or 0
        for e in history.get("epochs", []):
            step = e["epoch"] * per_epoch
            for key, value in e.items():
                if key == "train_loss" or key.startswith("val_"):
                    writer.add_scalar(f"epoch/{key}", value, step)
        for stage in history.get("unfreeze") or []:
            writer.add_scalar("unfreeze/trainable_new_layers",
                              len(stage["trainable_new_layers"]), stage["start_step"])
    finally:
        writer.close()
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
