"""Saved folders (a retriever, a reranker, an export, an index, a stage-1 encoder): written
whole or not at all, replacing only what a save of the same kind wrote, put back after a save
killed part-way, and checked file by file against ``checksums.json`` on load.

Training checkpoints, which keep their own manifest, are in :mod:`.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import CheckpointError, _check_file, _fsync, _left_by_dead, file_sha256

__all__ = ["atomic_folder", "check_replaceable", "restore_interrupted", "reusable", "CHECKSUMS",
           "write_checksums", "verify_checksums", "unreadable_files"]

logger = logging.getLogger(__name__)


@contextmanager
def atomic_folder(target: str | os.PathLike, owns: tuple[str, ...],
                  overwrite: bool = False) -> Iterator[Path]:
    """Write a folder whole or not at all: yields an empty hidden folder beside ``target``; when
    the block ends, it replaces ``target``. An exception (disk full, a bug, Ctrl-C) removes it
    and leaves ``target`` as it was; a killed process leaves the old folder or the new one, never
    a mix. Killed between the two renames, it leaves no ``target`` and the old folder in
    ``.old-<name>-<pid>``: :func:`restore_interrupted`, which every load and the next save
    call, puts it back.

    A save replaces only what it owns: an existing ``target`` that is not empty and lacks one of
    the files ``owns`` names (what every save of this kind writes, so: not a previous save of
    it) is refused before anything is written, naming the folder and what it holds, unless
    ``overwrite``. Giving a save the run folder instead of ``run/best`` cannot delete a run.
    """
    target = Path(target)
    restore_interrupted(target)  # and clear what killed saves of dead processes left
    check_replaceable(target, owns, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted(target: str | os.PathLike) -> str | None:
    """Undo what a save into ``target`` that was killed left beside it: the old folder that a
    save killed between its two renames parked in ``.old-<name>-<pid>`` is put back when
    ``target`` is missing (else deleted), and the unfinished ``.tmp-<name>-<pid>`` folders of
    dead processes are deleted. Returns a message when a folder was restored, else None."""
    target = Path(target)
    if not target.parent.is_dir():
        return None
    restored = None
    for kind in (".old-", ".tmp-"):
        prefix = f"{kind}{target.name}-"
        for leftover in sorted(target.parent.glob(f"{prefix}*")):
            pid = leftover.name[len(prefix):]
            if not pid.isdigit() or not _left_by_dead(leftover.name):
                continue
            if kind == ".old-" and not (target.exists() or target.is_symlink()):
                os.replace(leftover, target)
                restored = (f"{target} was missing: a save killed part-way had left the "
                            f"previous copy in {leftover.name}; it was put back")
                logger.warning(restored)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
    return restored


def check_replaceable(target: str | os.PathLike, owns: tuple[str, ...],
                      overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` when a save of the kind that writes ``owns`` may not replace
    ``target`` (see :func:`atomic_folder`)."""
    target = Path(target)
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder a save can replace; choose "
                              f"another path (or pass overwrite=True to replace it)")
    held = sorted(p.name for p in target.iterdir())
    if held and not all((target / name).exists() for name in owns):
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise FileExistsError(
            f"{target} holds {len(held)} entries ({shown}) and is not an earlier save of this "
            f"kind (it has no {' / '.join(owns)}); nothing was written or deleted. Save into a "
            f"folder of its own, or pass overwrite=True to replace the folder and all it holds")


#: Size and SHA-256 of every other file of a saved folder (retriever, export, index).
CHECKSUMS = "checksums.json"


def write_checksums(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file under ``folder`` in ``CHECKSUMS``."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / CHECKSUMS):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                      "sha256": file_sha256(path)}
    (folder / CHECKSUMS).write_text(json.dumps({"files": files}, indent=2), encoding="utf-8")
    return folder / CHECKSUMS


def verify_checksums(folder: str | os.PathLike) -> bool:
    """Check a saved folder against its ``CHECKSUMS``: raise :class:`CheckpointError` naming
    the first listed file that is missing, of another size or another checksum, and the files
    it holds that the manifest does not list (they would load unchecked).

    A folder without ``CHECKSUMS`` (saved before the library recorded them, or the manifest
    was deleted) loads, by choice, unchecked: it returns ``False`` after a warning that names
    the folder and how to make it checked (save it again). Else ``True``."""
    folder = Path(folder)
    record = folder / CHECKSUMS
    if not record.exists():
        message = (f"{folder} has no {CHECKSUMS}: its files load unchecked (a folder saved "
                   f"before checksums were recorded, or its manifest was deleted); save it "
                   f"again to have it checked")
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
        return False
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{record}: unreadable ({type(exc).__name__}: {exc})") from None
    for name, (size, sha) in expected.items():
        _check_file(folder / name, size, sha, CHECKSUMS)
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p != record
                      and p.relative_to(folder).as_posix() not in expected)
    if unlisted:
        raise CheckpointError(
            f"{folder}: {len(unlisted)} file(s) that {CHECKSUMS} does not list "
            f"({', '.join(unlisted[:5])}): added after the save, so they would load unchecked. "
            f"Remove them, or save the folder again")
    return True


def unreadable_files(folder: str | os.PathLike) -> list[str]:
    """``"<file>: <fault>"`` for each JSON file of ``folder`` that does not parse and each
    safetensors file whose header cannot be read (cut or not safetensors): what to name when a
    library's own error names no file. Empty for a missing folder (a hub id, say)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return []
    faults = []
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            faults.append(f"{path}: not valid JSON ({exc}); cut or edited")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error type for a bad header
            faults.append(f"{path}: not a readable safetensors file ({exc}); cut or "
                          f"corrupt, download it again")
    return faults


def reusable(folder: str | os.PathLike, marker: str) -> bool:
    """Whether a cached folder (written with :func:`write_checksums`, ``marker`` its last file
    before them) is finished and intact, so that it can be reused. A damaged one is deleted,
    with a warning naming its fault, so that the caller builds it again; the unfinished
    folders that dead processes left beside it are deleted too."""
    folder = Path(folder)
    restore_interrupted(folder)
    if not (folder / marker).exists():
        return False
    fault = f"no {CHECKSUMS}: written before checksums were recorded"
    try:
        if (folder / CHECKSUMS).exists() and verify_checksums(folder):
            return True
    except CheckpointError as exc:
        fault = str(exc)
    message = f"the cached folder {folder} is damaged ({fault}); building it again"
    logger.warning(message)
    warnings.warn(message, stacklevel=2)
    shutil.rmtree(folder, ignore_errors=True)
    return False
