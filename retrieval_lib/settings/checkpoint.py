"""Training checkpoints that survive a killed process: atomic, checksummed, resumable.

A checkpoint is a folder ``<run>/checkpoints/step-<step as 8 digits>`` (e.g. ``step-00000500``)
holding

* ``model.safetensors``: every parameter and buffer of the retriever (tied weights once);
* ``optimizer.pt``, ``state.pt``: optimizer, LR schedule, gradient scaler and torch RNG states,
  read back with ``torch.load(weights_only=True)`` (tensors and plain containers, no code);
* ``trainer_state.json``: epoch, batches done in that epoch, step, early-stopping state, the
  history so far, the Python / NumPy RNG states and the negative sampler's state;
* ``manifest.json``: size and SHA-256 of each file above, written last.

It is written into a hidden temporary folder and renamed into place, so a process killed while
writing leaves either the previous checkpoints or a complete new one. :func:`latest_checkpoint`
verifies the manifest and falls back to the newest older checkpoint that verifies, with a
warning naming what was wrong. The last ``keep`` checkpoints and the one of the best epoch are
kept; older ones are deleted.

The same two guarantees serve every other folder the library writes (saved retrievers,
sentence-transformers exports, faiss indexes) in :mod:`.saved_folder`. Temporary folders are
named after the process writing them, and only those of dead processes are cleaned up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .runlock import leftover_pid, pid_alive

__all__ = ["CheckpointError", "WEIGHT_LIMIT", "save_checkpoint", "load_checkpoint",
           "load_optimizer_state", "latest_checkpoint", "verify_checkpoint", "list_checkpoints",
           "remove_partial", "rng_state", "set_rng_state", "file_sha256", "good_checkpoints",
           "skip_warning", "UnsafeCheckpointError"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")


def _folder_name(step: int) -> str:
    return f"step-{step:08d}"
_FILES = ("model.safetensors", "optimizer.pt", "state.pt", "trainer_state.json")

#: A checkpoint whose largest weight (in absolute value) is above this, or not finite, is not a
#: good one to continue from: pretrained transformers keep their weights far below 100, and a
#: run that diverged (e.g. to 4.6e13 before its loss became NaN) would only diverge again.
WEIGHT_LIMIT = 1e4


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or belongs to another training setup."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that holds code: never loaded; a resume uses the previous one."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random states, JSON-able where they can be."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (temporary folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, scheduler, scaler,
                    trainer_state: dict, keep: int = 2, protect: int | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the last ``keep``
    checkpoints and the one of step ``protect`` (the best epoch's). Returns its folder."""
    from safetensors.torch import save_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _folder_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rng = rng_state()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": rng.pop("torch"), "cuda_rng": rng.pop("cuda")}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(
        json.dumps({**trainer_state, "rng": rng}, ensure_ascii=False), encoding="utf-8")
    files = {}
    for name in _FILES:
        _fsync(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
    largest = max((p.detach().abs().max().item() for p in model.parameters() if p.numel()),
                  default=0.0)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files,
                                            "max_abs_weight": largest}, indent=2),
                                encoding="utf-8")
    _fsync(tmp / MANIFEST)
    if final.exists():  # the same step saved again after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep, protect)
    return final


def remove_partial(root: str | os.PathLike) -> list[str]:
    """Delete the temporary folders that processes killed while writing left under ``root``
    (those of a process that still runs are its work in progress and stay); returns their
    names."""
    stale = [p for p in sorted(Path(root).glob(".tmp-step-*")) if _left_by_dead(p.name)] \
        if Path(root).is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return [p.name for p in stale]


def _prune(root: Path, keep: int, protect: int | None) -> None:
    remove_partial(root)
    folders = list_checkpoints(root)
    keep_names = {p.name for p in folders[-keep:]} if keep > 0 else set()
    if protect is not None:
        keep_names.add(_folder_name(protect))
    for folder in folders:
        if folder.name not in keep_names:
            shutil.rmtree(folder, ignore_errors=True)


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless every file of the manifest is there with its
    size and checksum, and the weights it holds are finite and at most :data:`WEIGHT_LIMIT`."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}/{MANIFEST}: unreadable ({exc})") from None
    for name in _FILES:
        if name not in files:
            raise CheckpointError(f"{folder}/{MANIFEST}: no entry for {name}")
        _check_file(folder / name, files[name]["bytes"], files[name]["sha256"], MANIFEST)
    largest = manifest.get("max_abs_weight", 0.0)  # older checkpoints do not record it
    if not math.isfinite(largest) or largest > WEIGHT_LIMIT:
        raise CheckpointError(f"{folder}: the weights diverged (largest |w| = {largest:.3g}, "
                              f"above {WEIGHT_LIMIT:g}); not a good checkpoint to continue from")


def good_checkpoints(root: str | os.PathLike) -> Iterator[Path]:
    """The checkpoints under ``root`` that verify, newest first; a broken one is skipped with a
    warning saying why."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as exc:
            skip_warning(folder, exc)
            continue
        yield folder


def skip_warning(folder: Path, fault: Exception) -> None:
    message = f"skipping checkpoint {folder.name}: {fault}; trying the previous one"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (:func:`good_checkpoints`); ``None``
    when there is none."""
    return next(good_checkpoints(root), None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, file: str | os.PathLike) -> None:
    """Restore ``optimizer`` from ``file`` with its state where a fresh optimizer keeps it.

    The file is read onto the CPU and ``load_state_dict`` moves each moment to its parameter's
    device; AdamW's step counters stay on the CPU, as in a fresh optimizer. (Reading the file
    straight onto the GPU would leave the counters there: a device sync per parameter and
    step.)"""
    optimizer.load_state_dict(_tensors_only(file))


def _tensors_only(file: str | os.PathLike):
    """``torch.load(weights_only=True)``: a file that holds code (a pickle that would run it)
    is refused as :class:`UnsafeCheckpointError`, naming the file."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{file}: holds more than tensors and plain containers, so it was not loaded "
            f"(weights_only refused: {str(exc).splitlines()[0][:160]})") from None


def load_checkpoint(folder: str | os.PathLike, model, optimizer, scheduler, scaler) -> dict:
    """Restore model, optimizer, schedule, scaler and every RNG from ``folder`` (verified
    first); return the trainer state."""
    from safetensors.torch import load_model

    folder = Path(folder)
    verify_checkpoint(folder)
    _check_shapes(folder / "model.safetensors", model)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False,
                                     device=str(device))
    if missing or unexpected:
        raise CheckpointError(f"{folder}/model.safetensors does not fit this model: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    load_optimizer_state(optimizer, folder / "optimizer.pt")
    state = _tensors_only(folder / "state.pt")
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    trainer_state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    set_rng_state({**trainer_state.pop("rng"), "torch": state["torch_rng"],
                   "cuda": state["cuda_rng"]})
    return trainer_state


def _check_shapes(file: Path, model) -> None:
    """A checkpoint written for a model of another shape (width, depth, vocabulary) is named
    with the first tensor that differs, before torch's size-mismatch error could be raised."""
    from safetensors import safe_open

    here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as fh:
        differ = [(k, tuple(fh.get_slice(k).get_shape()), here[k]) for k in fh.keys()
                  if k in here and tuple(fh.get_slice(k).get_shape()) != here[k]]
    if differ:
        name, there, ours = differ[0]
        raise CheckpointError(
            f"{file} was written for a model of another shape: {name} is {there} there and "
            f"{ours} in this model ({len(differ)} tensors differ). Resume with the settings the "
            f"run was started with, or train from the start without resume")


def _left_by_dead(name: str) -> bool:
    """Whether a ``.tmp-``/``.old-`` name ending in a process id was left by a process that is
    gone (or by this one, which is not writing it now); a name without an id counts as dead."""
    pid = leftover_pid(name)
    return pid is None or pid == os.getpid() or not pid_alive(pid)


def _check_file(path: Path, size: int, sha256: str, record: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({record} lists it)")
    if path.stat().st_size != size:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, {record} says {size} "
                              f"(truncated or replaced?)")
    if file_sha256(path) != sha256:
        raise CheckpointError(f"{path}: checksum differs from {record} (corrupt or edited)")
