"""One writer per run folder, clean-up of dead processes' leftovers only, and saves killed
between their two renames: real processes, really killed (SIGKILL), on this machine."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from toy import toy_config, toy_model, toy_records

from retrieval_lib import training
from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.settings import checkpoint, runlock, saved_folder

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["长江新闻", "足球与音乐。今天本报记者报道了有关情况"]

HOLDER = """
import sys, time
from retrieval_lib.settings import runlock
with runlock.run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(folder):
    """A process that holds ``folder``'s writer lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_second_training_of_a_run_folder_is_refused_naming_the_first(tok, tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        train, val = Dataset.from_list(toy_records(8, 2)), Dataset.from_list(toy_records(4, 3))
        with pytest.raises(runlock.RunLockedError) as caught:
            training.train_retriever(toy_model(tok), train, val, toy_config(epochs=1), run,
                                     show_progress=False)
        message = str(caught.value)
        assert f"process {holder.pid} on host {socket.gethostname()}, started 20" in message
        assert str(run) in message and "HOLDER" not in message
        # refused before it wrote anything: no log, no history, no checkpoints
        assert sorted(p.name for p in run.iterdir()) == [runlock.LOCK_FILE]
    finally:
        _kill(holder)


def test_the_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path):
    holder = _hold(tmp_path)
    _kill(holder)
    with pytest.warns(UserWarning, match=rf"took over the writer lock of process {holder.pid} "
                                         rf"on host .*no longer running"):
        with runlock.run_lock(tmp_path) as mine:
            assert json.loads((tmp_path / runlock.LOCK_FILE).read_text()) == mine
            assert mine["pid"] == os.getpid()
    assert (tmp_path / runlock.LOCK_FILE).read_text() == ""  # released: nothing to take over
    with runlock.run_lock(tmp_path):  # and a clean release leaves nothing to warn about
        pass


def test_without_kernel_locks_a_live_holder_is_known_by_its_process(tmp_path, monkeypatch):
    """On a file system without flock the process id and its start time decide: a live holder
    refuses, a dead one or a re-used id (another start time) is taken over."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    holder = _hold(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    try:
        with pytest.raises(runlock.RunLockedError, match=f"process {holder.pid} on host"):
            with runlock.run_lock(tmp_path):
                pass
    finally:
        _kill(holder)
    lock = tmp_path / runlock.LOCK_FILE
    with pytest.warns(UserWarning, match=f"process {holder.pid} .*no longer running"):
        with runlock.run_lock(tmp_path):
            pass
    reused = {"pid": os.getppid(), "host": socket.gethostname(), "started": "then",
              "process_start": "1", "command": "an earlier process with this id"}
    lock.write_text(json.dumps(reused))
    with pytest.warns(UserWarning, match="an earlier process with this id"):
        with runlock.run_lock(tmp_path):
            pass
    live = {**reused, "process_start": runlock._start_ticks(os.getppid())}
    lock.write_text(json.dumps(live))
    with pytest.raises(runlock.RunLockedError, match=f"process {os.getppid()} on host"):
        with runlock.run_lock(tmp_path):
            pass


def test_a_lock_from_another_machine_is_stale_only_without_a_heartbeat(tmp_path):
    lock = tmp_path / runlock.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1234, "host": "colab-runtime-a", "started": "then"}))
    with pytest.raises(runlock.RunLockedError, match="colab-runtime-a, .*touched [0-9] s ago"):
        with runlock.run_lock(tmp_path):
            pass
    old = time.time() - runlock.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="process 1234 on host colab-runtime-a"):
        with runlock.run_lock(tmp_path):
            pass


def test_the_holder_touches_its_lock_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with runlock.run_lock(tmp_path):
        lock = tmp_path / runlock.LOCK_FILE
        os.utime(lock, (0, 0))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5


def test_clean_up_removes_only_the_temporary_folders_of_dead_processes(tmp_path):
    holder = _hold(tmp_path / "elsewhere")  # any live process of this machine
    try:
        live = tmp_path / f".tmp-step-00000004-{holder.pid}"
        dead = tmp_path / f".tmp-step-00000002-{_dead_pid()}"
        for folder in (live, dead):
            folder.mkdir()
        assert checkpoint.remove_partial(tmp_path) == [dead.name]
        assert live.is_dir() and not dead.exists()
    finally:
        _kill(holder)


KILLED_SAVE = """
import os, signal, sys
from retrieval_lib.settings import saved_folder

replace = os.replace

def killed_after_parking(src, dst):  # SIGKILL between the save's two renames
    replace(src, dst)
    if os.path.basename(dst).startswith(".old-"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = killed_after_parking
with saved_folder.atomic_folder(sys.argv[1], owns=("weights",)) as tmp:
    (tmp / "weights").write_text(sys.argv[2])
"""


def _killed_save(target, text):
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target), text], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL


def test_a_save_killed_between_its_renames_is_put_back_and_leaves_nothing_hidden(tmp_path):
    target = tmp_path / "best"
    with saved_folder.atomic_folder(target, owns=("weights",)) as tmp:
        (tmp / "weights").write_text("v1")
    _killed_save(target, "v2")
    assert not target.exists()  # what the kill left: the old copy parked, the new one unswapped
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".old", ".tmp"]
    for text in ("v3", "v4"):  # more killed saves do not pile up copies
        _killed_save(target, text)
    assert len(list(tmp_path.iterdir())) == 2
    message = saved_folder.restore_interrupted(target)  # what every load calls first
    assert "put back" in message and (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    _killed_save(target, "v5")
    with saved_folder.atomic_folder(target, owns=("weights",)) as tmp:  # the next save
        (tmp / "weights").write_text("v6")
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert (target / "weights").read_text() == "v6"


def test_a_retriever_whose_save_was_killed_between_renames_loads_the_previous_one(tok,
                                                                                  tmp_path):
    model = toy_model(tok)
    model.save(tmp_path / "best")
    parked = tmp_path / f".old-best-{_dead_pid()}"
    os.replace(tmp_path / "best", parked)  # the state a kill between the renames leaves
    loaded = DualTowerRetriever.load(tmp_path / "best")
    assert np.array_equal(loaded.encode_queries(TEXTS), model.encode_queries(TEXTS))
    assert not parked.exists()


def test_a_file_the_checksums_do_not_list_is_refused_by_name(tok, tmp_path):
    toy_model(tok).save(tmp_path / "r")
    (tmp_path / "r" / "encoder" / "extra.safetensors").write_bytes(b"planted")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"1 file\(s\) that checksums.json does not list "
                             r"\(encoder/extra.safetensors\)"):
        DualTowerRetriever.load(tmp_path / "r")



def test_on_windows_a_process_is_never_probed_with_os_kill(monkeypatch):
    """os.kill(pid, 0) sends CTRL_C_EVENT on Windows: the liveness probe asks the kernel there
    instead (OpenProcess), and never calls os.kill."""
    calls = []
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(os, "kill", lambda *a: calls.append(a))
    monkeypatch.setattr(runlock, "_windows_pid_alive", lambda pid: pid == 42)
    assert runlock.pid_alive(42) and not runlock.pid_alive(43)
    assert calls == []


def test_a_save_cancelled_with_ctrl_c_leaves_the_previous_folder_and_nothing_else(tmp_path):
    """Ctrl-C in a notebook raises KeyboardInterrupt, which is not an Exception: the unfinished
    folder must still be removed and the previous save kept."""
    target = tmp_path / "best"
    with saved_folder.atomic_folder(target, owns=("weights",)) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with saved_folder.atomic_folder(target, owns=("weights",)) as tmp:
            (tmp / "weights").write_text("half of v2")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert (target / "weights").read_text() == "v1"
