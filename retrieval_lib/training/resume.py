"""Resuming an interrupted run: the training data's fingerprint, the settings that may change
between a run and its resumption, and the state read back from its newest sound checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..settings.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    good_checkpoints,
    list_checkpoints,
    load_checkpoint,
    skip_warning,
    verify_checkpoint,
)
from ..settings.config import TrainingConfig, with_defaults

__all__ = ["CHECKPOINTS", "data_fingerprint", "resume_state"]

#: Sub-folder of a run that holds its training checkpoints.
CHECKPOINTS = "checkpoints"

#: Settings that may change between an interrupted run and its resumption: they change memory
#: or bookkeeping, not the mathematics of a step (e.g. turning on gradient checkpointing or
#: GradCache after an out-of-memory error). A change is recorded in ``history["resumed_from"]``.
_RESUMABLE_CHANGES = ("checkpoint_steps", "keep_checkpoints", "gradient_checkpointing",
                      "grad_cache_chunk_size", "sub_batch_tokens")


def data_fingerprint(train) -> str:
    """SHA-256 (16 hex digits) of the training records' texts, in order: resuming on other data
    of the same size is refused."""
    import hashlib

    h = hashlib.sha256()
    for row in train:
        for text in [row["query"], *(p["text"] for p in row["positive_passages"]),
                     *(p["text"] for p in row["negative_passages"])]:
            h.update(text.encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:16]


def resume_state(out: Path, cfg: TrainingConfig, n_train: int, model, optimizer, schedule,
                  scaler, collator, fingerprint: str, world: int,
                  overrides: Sequence[str] = ()) -> dict | None:
    """Load the newest good checkpoint of ``out`` (None when there is none) and check that it
    was written by this training setup."""

    state = folder = None
    for folder in good_checkpoints(out / CHECKPOINTS):
        try:
            state = load_checkpoint(folder, model, optimizer, schedule, scaler)
            break
        except UnsafeCheckpointError as exc:  # a file that holds code: the previous one
            skip_warning(folder, exc)
            folder = None
    if folder is None:
        unreadable = list_checkpoints(out / CHECKPOINTS)
        if unreadable:  # never start over on top of checkpoints that could not be read
            faults = []
            for broken in unreadable:
                try:
                    verify_checkpoint(broken)
                    faults.append(f"  {broken}: a file in it holds code (not loaded)")
                except CheckpointError as exc:
                    faults.append(f"  {exc}")
            raise CheckpointError(
                f"resume=True, but none of the {len(unreadable)} checkpoints in "
                f"{out / CHECKPOINTS} can be verified; nothing was deleted:\n"
                + "\n".join(faults) + "\nRepair or move them away, or start again with "
                "resume=False (which deletes them)")
        return None
    saved, current = state["config"], json.loads(json.dumps(asdict(cfg)))  # tuples -> lists
    saved = with_defaults(saved, TrainingConfig)  # settings newer than the checkpoint
    unknown = sorted(set(overrides) - set(current))
    if unknown:
        raise ValueError(f"resume_overrides names no training setting: {', '.join(unknown)}")
    allowed = set(_RESUMABLE_CHANGES) | set(overrides)
    differs = [k for k in current if k not in allowed and saved.get(k) != current[k]]
    changes = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differs]
    if state["train_records"] != n_train:
        changes.append(f"training records: {state['train_records']} -> {n_train}")
    elif state.get("train_fingerprint", fingerprint) != fingerprint:
        changes.append(f"training data: {n_train} records, but not the same ones (fingerprint "
                       f"{state['train_fingerprint']} -> {fingerprint})")
    saved_world = state["history"].get("world_size", world)
    if saved_world != world:
        changes.append(f"processes (world size): {saved_world} -> {world}, which changes every "
                       f"batch")
    if changes:
        raise CheckpointError(
            f"{folder} was written by another training setup ({'; '.join(changes)}); resume "
            f"with the same settings or start again with resume=False")
    state["changed"] = {k: [saved.get(k), current[k]] for k in current
                        if k in allowed and saved.get(k) != current[k]}
    collator.rng.setstate((state["collator"]["rng"][0], tuple(state["collator"]["rng"][1]),
                           state["collator"]["rng"][2]))
    for key in collator.COUNTERS:  # counts a checkpoint from before a counter existed lacks
        setattr(collator, key, state["collator"].get(key, 0))
    state["folder"] = str(folder)
    return state

