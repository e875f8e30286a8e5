"""One writer per run folder, and whose leftovers may be cleaned up.

A training writes ``history.json``, ``best/`` and ``checkpoints/`` of its run folder over many
minutes. Two trainings of one folder (a Colab cell run twice, two terminals, a notebook and the
CLI) would interleave those files, so that the folder holds the history of one run and the model
of the other, or one run's clean-up deletes the other's checkpoints. :func:`run_lock` lets the
first writer in and refuses the second, naming the holder (process, host, start time).

How a holder is known to be alive:

- on one machine, by the kernel: the lock file is held with ``flock``, which the kernel releases
  when the process dies however it dies (SIGKILL included), so the lock of a dead process is
  stale and is taken over, with a warning naming it;
- where the file system has no ``flock`` (some network mounts), by the process id and its start
  time (a re-used id is not mistaken for the holder);
- from another machine (a run folder on a shared drive, a new Colab runtime), by a heartbeat:
  the holder touches the lock file every :data:`HEARTBEAT_S` seconds, and a lock not touched for
  :data:`STALE_AFTER_S` seconds is stale.

:func:`pid_alive` also decides which temporary folders a clean-up may delete: those whose name
ends in the id of a process that is gone.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["LOCK_FILE", "HEARTBEAT_S", "STALE_AFTER_S", "RunLockedError", "run_lock",
           "writes_run_folder", "pid_alive", "leftover_pid"]

logger = logging.getLogger(__name__)

#: The lock file inside a run folder.
LOCK_FILE = ".writer.lock"
#: How often the holder touches the lock file.
HEARTBEAT_S = 60.0
#: A lock from another machine not touched for this long is stale.
STALE_AFTER_S = 600.0


class RunLockedError(RuntimeError):
    """Another live process writes this run folder."""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start_ticks: str | None = None) -> bool:
    """Whether process ``pid`` of this machine runs (and, given ``start_ticks``, is the same
    process that started then, not a later one that re-uses its id)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there, not a probe
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    if start_ticks is not None:
        now = _start_ticks(pid)
        return now is None or now == start_ticks
    return True


def _windows_pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs, asked of the Windows kernel (OpenProcess and its exit
    code, STILL_ACTIVE while it runs)."""
    import ctypes

    kernel = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # access denied: it exists
    try:
        code = ctypes.c_ulong()
        return bool(kernel.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259
    finally:
        kernel.CloseHandle(handle)


def leftover_pid(name: str) -> int | None:
    """The process id a temporary name such as ``.tmp-step-00000040-1234`` ends in, else None."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "process_start": _start_ticks(os.getpid()),
            "command": " ".join(sys.argv)[:300]}


def _describe(holder: dict) -> str:
    return (f"process {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')} ({holder.get('command') or 'no command recorded'})")


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if not raw:
        return None
    try:
        holder = json.loads(raw)
    except json.JSONDecodeError:
        return {"pid": None, "host": None, "started": None, "command": f"unreadable: {raw[:80]}"}
    return holder if isinstance(holder, dict) else None


def _stale(holder: dict, kernel_lock: bool, path: Path) -> bool:
    """Whether the process that wrote ``holder`` into ``path`` is gone."""
    if holder.get("host") == socket.gethostname():
        if kernel_lock:  # the kernel let us in, so its holder is gone
            return True
        pid = holder.get("pid")
        return not isinstance(pid, int) or not pid_alive(pid, holder.get("process_start"))
    return time.time() - path.stat().st_mtime > STALE_AFTER_S


@contextmanager
def run_lock(folder: str | os.PathLike, what: str = "training") -> Iterator[dict]:
    """Hold ``folder``'s writer lock for the block; yields what it records of this process.

    Raises :class:`RunLockedError` naming the holder when another live process holds it. The
    lock of a dead process is taken over with a warning that names it. The lock file stays
    (empty) when the block ends: removing it would let a third process lock a new file while a
    second still waits on the old one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    stop = threading.Event()
    beat = None
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except (BlockingIOError, PermissionError):
            holder = _read(fd) or {}
            raise RunLockedError(
                f"{folder} is being written by {_describe(holder)}: a second {what} of one run "
                f"folder would mix their histories, models and checkpoints. Wait for it to "
                f"finish, stop it, or give this {what} another folder") from None
        except (ImportError, OSError) as exc:  # no fcntl, or a file system without flock
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP,
                                                              errno.ENOSYS, errno.EINVAL):
                raise
            kernel_lock = False
        holder = _read(fd)
        if holder is not None and holder.get("pid") != os.getpid():
            if not _stale(holder, kernel_lock, path):
                raise RunLockedError(
                    f"{folder} is being written by {_describe(holder)} (its lock file "
                    f"{path} was touched {time.time() - path.stat().st_mtime:.0f} s ago; a "
                    f"holder on another machine that stops touching it for "
                    f"{STALE_AFTER_S:.0f} s is taken over). Wait for it, stop it, or give this "
                    f"{what} another folder; if that process is gone, delete {path}")
            message = (f"{folder}: took over the writer lock of {_describe(holder)}, which is "
                       f"no longer running")
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
        mine = _me()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(mine, ensure_ascii=False).encode("utf-8"))
        os.fsync(fd)

        def heartbeat():
            while not stop.wait(HEARTBEAT_S):
                try:
                    os.utime(path)
                except OSError:
                    return

        beat = threading.Thread(target=heartbeat, name=f"run-lock {folder}", daemon=True)
        beat.start()
        try:
            yield mine
        finally:
            os.ftruncate(fd, 0)
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=5)
        os.close(fd)  # releases the flock


def writes_run_folder(what: str, param: str = "out_dir"):
    """Decorate a training function so that it runs under :func:`run_lock` of its ``param``
    argument (the run folder it writes)."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            with run_lock(bound.arguments[param], what):
                return fn(*args, **kwargs)
        return locked
    return decorate
