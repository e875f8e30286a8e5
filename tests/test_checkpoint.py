import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from toy import toy_config, toy_model, toy_records

from retrieval_lib import training
from retrieval_lib.models import losses as retrieval_losses
from retrieval_lib.settings import CheckpointError, checkpoint, saved_folder

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("resume_worker.py")


def _state(folder):
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))


def _with_dropout(model, p=0.2):
    """Attention dropout on, so that a resumed run must also restore the torch RNG."""
    for layer in model.encoder.layers:
        layer.self_attn.attention_dropout = p
    return model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data():
    return Dataset.from_list(toy_records(40, 2)), Dataset.from_list(toy_records(16, 3))


@pytest.mark.parametrize("remine_every", [0, 1], ids=["static negatives", "re-mined"])
def test_resume_from_a_mid_epoch_checkpoint_ends_bit_identical(tok, data, tmp_path,
                                                               remine_every):
    train, val = data
    cfg = toy_config(epochs=3, batch_size=8, checkpoint_steps=2, keep_checkpoints=100,
                     remine_every=remine_every, mining_negatives=3, mining_rank_range=(1, 20))
    full = _with_dropout(toy_model(tok))
    history = training.train_retriever(full, train, val, cfg, tmp_path / "a",
                                       show_progress=False)
    # 5 steps per epoch: a checkpoint every 2 steps (counted over the run) and at epoch ends
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "a" / "checkpoints")]
    assert names == [f"step-{s:08d}" for s in (2, 4, 5, 6, 8, 10, 12, 14, 15)]
    mid = tmp_path / "a" / "checkpoints" / "step-00000008"
    assert (_state(mid)["epoch"], _state(mid)["batch_in_epoch"]) == (2, 3)
    # a second run that "died" after step 8: only that checkpoint survives
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, tmp_path / "b" / "checkpoints" / mid.name)
    if remine_every:  # it had re-mined at the start of epoch 2
        (tmp_path / "b" / "negatives").mkdir()
        shutil.copy(tmp_path / "a" / "negatives" / "epoch-002.json", tmp_path / "b" / "negatives")
        assert [m["epoch"] for m in history["mining"]] == [2, 3]
    resumed = _with_dropout(toy_model(tok, seed=123))  # every weight must come from disk
    again = training.train_retriever(resumed, train, val, cfg, tmp_path / "b",
                                     show_progress=False, resume=True)
    _assert_same_weights(_weights(full), _weights(resumed))
    assert again["steps"] == history["steps"]
    strip = [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in history["epochs"]]
    assert [{k: v for k, v in e.items() if not k.endswith("time_s")}
            for e in again["epochs"]] == strip
    assert again["resumed_from"] == [{"checkpoint": str(tmp_path / "b" / "checkpoints" / mid.name),
                                      "epoch": 2, "batch_in_epoch": 3, "step": 8}]
    assert (again["pad_fraction"], again["best_epoch"]) == (history["pad_fraction"],
                                                             history["best_epoch"])


def test_two_runs_with_the_same_seed_are_identical_and_resume_false_starts_over(tok, data,
                                                                              tmp_path):
    train, val = data
    cfg = toy_config(epochs=2, batch_size=8, checkpoint_steps=3)
    a, b = toy_model(tok), toy_model(tok)
    ha = training.train_retriever(a, train, val, cfg, tmp_path / "a", show_progress=False)
    hb = training.train_retriever(b, train, val, cfg, tmp_path / "a", show_progress=False)
    _assert_same_weights(_weights(a), _weights(b))
    assert [s["loss"] for s in ha["steps"]] == [s["loss"] for s in hb["steps"]]
    assert "resumed_from" not in hb  # the old checkpoints were removed, not resumed
    # keep the last 2 and the best epoch's
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "a" / "checkpoints")]
    best_step = 5 * hb["best_epoch"]
    assert names[-2:] == ["step-00000009", "step-00000010"]
    assert set(names) == {"step-00000009", "step-00000010", f"step-{best_step:08d}"}


def test_finished_run_resumed_changes_nothing(tok, data, tmp_path):
    train, val = data
    cfg = toy_config(epochs=2, batch_size=8)
    model = toy_model(tok)
    history = training.train_retriever(model, train, val, cfg, tmp_path, show_progress=False)
    before = _weights(model)
    again = training.train_retriever(toy_model(tok, seed=5), train, val, cfg, tmp_path,
                                     show_progress=False, resume=True)
    assert again["steps"] == history["steps"] and len(again["epochs"]) == 2
    after = training.train_retriever(model, train, val, cfg, tmp_path, show_progress=False,
                                     resume=True)
    _assert_same_weights(before, _weights(model))
    assert after["steps"] == history["steps"]


def test_resume_refuses_a_checkpoint_of_other_settings(tok, data, tmp_path):
    train, val = data
    training.train_retriever(toy_model(tok), train, val,
                             toy_config(epochs=1, batch_size=8), tmp_path,
                             show_progress=False)
    with pytest.raises(CheckpointError, match=r"learning_rate: 0.003 -> 0.001"):
        training.train_retriever(toy_model(tok), train, val,
                                 toy_config(epochs=1, batch_size=8, learning_rate=1e-3), tmp_path,
                                 show_progress=False, resume=True)
    # how often to checkpoint may change, and so may what saves memory without changing the
    # mathematics of a step (what a user reaches for after an out-of-memory error); recorded
    history = training.train_retriever(
        toy_model(tok), train, val,
        toy_config(epochs=1, batch_size=8, checkpoint_steps=1, gradient_checkpointing=True,
                   grad_cache_chunk_size=4), tmp_path, show_progress=False, resume=True)
    assert history["resumed_from"][-1]["changed_settings"] == {
        "checkpoint_steps": [500, 1], "gradient_checkpointing": [False, True],
        "grad_cache_chunk_size": [0, 4]}


def test_resume_refuses_other_training_data_of_the_same_size(tok, data, tmp_path):
    train, val = data
    training.train_retriever(toy_model(tok), train, val, toy_config(epochs=1, batch_size=8),
                             tmp_path, show_progress=False)
    other = Dataset.from_list(toy_records(40, 99))  # 40 records as before, other texts
    with pytest.raises(CheckpointError, match=r"training data: 40 records, but not the same"):
        training.train_retriever(toy_model(tok), other, val, toy_config(epochs=1, batch_size=8),
                                 tmp_path, show_progress=False, resume=True)
    assert training.data_fingerprint(train) == training.data_fingerprint(list(train))
    assert training.data_fingerprint(train) != training.data_fingerprint(other)


def test_resume_into_a_model_of_another_width_names_the_tensor(tok, data, tmp_path):
    train, val = data
    training.train_retriever(toy_model(tok), train, val, toy_config(epochs=1, batch_size=8),
                             tmp_path, show_progress=False)
    wider = toy_model(tok, hidden_size=48)
    with pytest.raises(CheckpointError, match=r"model\.safetensors was written for a model of "
                                              r"another shape: .* is \(\d+, 32\) there and "
                                              r"\(\d+, 48\) in this model"):
        training.train_retriever(wider, train, val, toy_config(epochs=1, batch_size=8),
                                 tmp_path, show_progress=False, resume=True)


def test_resume_never_deletes_checkpoints_it_cannot_read(tok, data, tmp_path):
    """Every checkpoint unreadable (no manifest): resume stops, names each folder and its fault,
    and leaves them all in place instead of starting over on top of them."""
    folders = _two_checkpoints(tok, data, tmp_path)
    for folder in folders:
        (folder / checkpoint.MANIFEST).unlink()
    before = sorted(p.name for f in folders for p in f.iterdir())
    train, val = data
    with pytest.raises(CheckpointError) as err:
        training.train_retriever(toy_model(tok), train, val,
                                 toy_config(epochs=1, batch_size=8, checkpoint_steps=2), tmp_path,
                                 show_progress=False, resume=True)
    message = str(err.value)
    assert "nothing was deleted" in message
    assert all(f"{folder}: no {checkpoint.MANIFEST}" in message for folder in folders)
    assert sorted(p.name for f in folders for p in f.iterdir()) == before


def _two_checkpoints(tok, data, tmp_path):
    train, val = data
    training.train_retriever(toy_model(tok), train, val,
                             toy_config(epochs=1, batch_size=8, checkpoint_steps=2), tmp_path,
                             show_progress=False)
    return checkpoint.list_checkpoints(tmp_path / "checkpoints")


@pytest.mark.parametrize("damage", ["truncated weights", "flipped byte", "no manifest",
                                    "missing optimizer"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tok, data, tmp_path, damage):
    folders = _two_checkpoints(tok, data, tmp_path)
    assert [f.name for f in folders] == ["step-00000004", "step-00000005"]
    newest = folders[-1]
    if damage == "truncated weights":
        path = newest / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        expected = "bytes, manifest.json says"
    elif damage == "flipped byte":
        path = newest / "optimizer.pt"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        expected = "checksum differs"
    elif damage == "no manifest":
        (newest / "manifest.json").unlink()
        expected = "no manifest.json"
    else:
        (newest / "optimizer.pt").unlink()
        expected = "optimizer.pt: missing"
    with pytest.warns(RuntimeWarning, match=expected):
        chosen = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    assert chosen == folders[0]
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.verify_checkpoint(newest)


def test_a_leftover_temporary_folder_is_ignored_and_cleaned(tok, data, tmp_path):
    folders = _two_checkpoints(tok, data, tmp_path)
    stale = tmp_path / "checkpoints" / ".tmp-step-00000009-1234"
    shutil.copytree(folders[-1], stale)
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints") == folders[-1]
    train, val = data
    training.train_retriever(toy_model(tok), train, val,
                             toy_config(epochs=1, batch_size=8, checkpoint_steps=2), tmp_path,
                             show_progress=False, resume=True)
    assert not stale.exists()


def test_no_good_checkpoint_means_none(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "nothing") is None
    (tmp_path / "step-00000003").mkdir()
    with pytest.warns(RuntimeWarning, match="no manifest.json"):
        assert checkpoint.latest_checkpoint(tmp_path) is None


def _nan_at(monkeypatch, bad_step):
    """Make the training loss NaN at one step; returns the list of the real losses."""
    real, losses = retrieval_losses.cross_device_info_nce, []

    def loss_fn(q, p, temperature):
        loss = real(q, p, temperature)
        losses.append(loss.item())
        return loss * float("nan") if len(losses) == bad_step else loss

    monkeypatch.setattr(retrieval_losses, "cross_device_info_nce", loss_fn)
    return losses


def _stopped_by_nan(tok, data, tmp_path, monkeypatch, step):
    """Train until the loss of ``step`` turns NaN; the error's message and the losses seen."""
    losses = _nan_at(monkeypatch, step)
    train, val = data
    with pytest.raises(FloatingPointError) as err:
        training.train_retriever(toy_model(tok), train, val,
                                 toy_config(epochs=1, batch_size=8, checkpoint_steps=2), tmp_path,
                                 show_progress=False)
    return str(err.value), losses


def test_nan_loss_stops_with_step_last_loss_and_keeps_the_checkpoint(tok, data, tmp_path,
                                                                     monkeypatch):
    message, losses = _stopped_by_nan(tok, data, tmp_path, monkeypatch, 4)
    assert "loss is nan at step 4 (epoch 1)" in message
    assert f"last finite loss: {losses[2]}" in message  # the loss of step 3
    good = tmp_path / "checkpoints" / "step-00000002"
    assert str(good) in message and "resume_overrides=('learning_rate',)" in message
    checkpoint.verify_checkpoint(good)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == [good.name]
    assert not (tmp_path / "history.json").exists()


def test_the_nan_advice_can_be_followed_and_the_change_is_recorded(tok, data, tmp_path,
                                                                  monkeypatch):
    """After a NaN stop the advice is to lower the learning rate and resume: that resume is
    allowed only when asked for by name, and the changed value goes into the history."""
    _stopped_by_nan(tok, data, tmp_path, monkeypatch, 4)
    train, val = data
    monkeypatch.undo()
    lower = toy_config(epochs=1, batch_size=8, checkpoint_steps=2, learning_rate=1e-4)
    with pytest.raises(CheckpointError, match="learning_rate"):
        training.train_retriever(toy_model(tok), train, val, lower, tmp_path,
                                 show_progress=False, resume=True)
    with pytest.raises(ValueError, match="names no training setting: learning_rat"):
        training.train_retriever(toy_model(tok), train, val, lower, tmp_path,
                                 show_progress=False, resume=True,
                                 resume_overrides=("learning_rat",))
    history = training.train_retriever(toy_model(tok), train, val, lower, tmp_path,
                                       show_progress=False, resume=True,
                                       resume_overrides=("learning_rate",))
    assert history["resumed_from"][-1]["step"] == 2
    assert history["resumed_from"][-1]["changed_settings"] == {"learning_rate": [0.003, 1e-4]}
    assert len(history["steps"]) == 5


def test_a_checkpoint_with_diverged_weights_is_not_good(tok, data, tmp_path):
    """Weights of 4.6e13 (a run about to produce NaN) verify as files but are not a good place
    to continue from: the previous checkpoint is used, and the message says why."""
    model = toy_model(tok)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 1, model, optimizer, schedule, None, {"step": 1})
    with torch.no_grad():
        next(model.parameters())[0, 0] = 4.6e13
    diverged = checkpoint.save_checkpoint(root, 2, model, optimizer, schedule, None, {"step": 2})
    with pytest.raises(CheckpointError, match=r"weights diverged \(largest \|w\| = 4.6e\+13"):
        checkpoint.verify_checkpoint(diverged)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step-00000002"):
        assert checkpoint.latest_checkpoint(root).name == "step-00000001"


def test_nan_loss_under_the_fp16_scaler_skips_the_step(tok, data, tmp_path, monkeypatch):
    from contextlib import nullcontext

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    monkeypatch.setattr("retrieval_lib.training.loop.mixed_precision",
                        lambda device, precision: (nullcontext(), scaler, "fp16", "test"))
    _nan_at(monkeypatch, 3)
    train, val = data
    history = training.train_retriever(toy_model(tok), train, val,
                                       toy_config(epochs=1, batch_size=8),
                                       tmp_path, show_progress=False)
    assert [s["step"] for s in history["skipped_steps"]] == [3]
    assert [s["step"] for s in history["steps"]] == [1, 2, 4, 5]
    assert scaler.get_scale() == 1024.0 * 0.5  # backed off once, no overflow otherwise


def test_nan_at_the_first_step_under_real_fp16_autocast_skips_it(tok, data, tmp_path,
                                                                 monkeypatch):
    """fp16 autocast and a GradScaler on the CPU, as on a T4: a non-finite loss at step 1,
    before the scaler has any scale, is skipped and backs the scale off (a manual update()
    there used to fail)."""
    _nan_at(monkeypatch, 1)
    train, val = data
    history = training.train_retriever(toy_model(tok), train, val,
                                       toy_config(epochs=1, batch_size=8), tmp_path,
                                       show_progress=False, precision="fp16")
    assert history["precision"] == "fp16"
    assert [s["step"] for s in history["skipped_steps"]] == [1]
    assert [s["step"] for s in history["steps"]] == [2, 3, 4, 5]
    assert all(math.isfinite(s["loss"]) for s in history["steps"])


def _mid_epoch_checkpoint(root: Path, epoch: int):
    """A finished checkpoint written in the middle of ``epoch``, or None."""
    for folder in checkpoint.list_checkpoints(root):
        try:
            state = _state(folder)
        except (OSError, json.JSONDecodeError):  # pruned or renamed meanwhile
            continue
        if state["epoch"] == epoch and state["batch_in_epoch"] > 0:
            return folder
    return None


def _worker(records, out, resume, delay):
    return [sys.executable, str(WORKER), str(records), str(out), resume, str(delay)]


def test_a_killed_training_process_resumes_to_the_uninterrupted_result(tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps(toy_records(48, 7), ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_worker(records, tmp_path / "whole", "0", 0), check=True, env=env,
                   timeout=600)
    victim = subprocess.Popen(_worker(records, tmp_path / "killed", "0", 0.25), env=env)
    try:
        deadline = time.time() + 300
        while _mid_epoch_checkpoint(tmp_path / "killed" / "checkpoints", epoch=2) is None:
            assert victim.poll() is None, "the worker ended before it could be killed"
            assert time.time() < deadline, "no mid-epoch checkpoint appeared"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "history.json").exists()
    subprocess.run(_worker(records, tmp_path / "killed", "1", 0), check=True, env=env,
                   timeout=600)
    whole = json.loads((tmp_path / "whole" / "result.json").read_text(encoding="utf-8"))
    resumed = json.loads((tmp_path / "killed" / "result.json").read_text(encoding="utf-8"))
    (resumed_from,) = resumed.pop("resumed_from")
    assert resumed_from["epoch"] == 2 and 0 < resumed_from["batch_in_epoch"] < 8  # mid-epoch
    assert whole.pop("resumed_from") == []
    assert resumed == whole  # every loss, every validation metric, the best epoch
    from safetensors.torch import load_file

    for name in ("final.safetensors", "best/head.safetensors",
                 "best/encoder/model.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "killed" / name)
        _assert_same_weights(a, b)


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    def write(text, fail=False):
        with saved_folder.atomic_folder(target, owns=("weights",)) as folder:
            (folder / "weights").write_text(text)
            if fail:
                raise OSError("disk full")

    target = tmp_path / "best"
    write("old")
    with pytest.raises(OSError, match="disk full"):
        write("half", fail=True)
    assert (target / "weights").read_text() == "old"  # a failed save leaves the old model
    write("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # nothing left over


def test_resumed_optimizer_state_sits_where_a_fresh_optimizer_puts_it(tmp_path):
    """A checkpoint resumed on a GPU: the moments follow the parameters, AdamW's step counters
    stay on the CPU as in a fresh optimizer. The meta device stands in for the GPU."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    on_gpu = torch.nn.Linear(3, 2, device="meta")
    resumed = torch.optim.AdamW(on_gpu.parameters(), lr=0.1)
    checkpoint.load_optimizer_state(resumed, tmp_path / "optimizer.pt")
    fresh_model = torch.nn.Linear(3, 2, device="meta")
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.1)
    for param in fresh_model.parameters():
        param.grad = torch.zeros_like(param)
    fresh.step()
    placement = [(s["step"].device, s["exp_avg"].device) for s in fresh.state.values()]
    assert placement == [(torch.device("cpu"), torch.device("meta"))] * 2
    assert [(s["step"].device, s["exp_avg"].device) for s in resumed.state.values()] == placement
    states = list(resumed.state.values())
    assert len(states) == 2
    for state in states:
        assert state["exp_avg"].device.type == "meta"
        assert state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu" and state["step"].item() == 1


def test_the_fp16_loss_scale_survives_a_checkpoint(tok, tmp_path):
    """Resuming under fp16 continues with the loss scale the run had reached (and its growth
    counter), not a fresh scale of 65536."""
    model = toy_model(tok)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.scale(torch.ones(1))  # the scale exists from the first scale() on
    scaler.update(new_scale=77.0)
    saved = scaler.state_dict()
    folder = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, schedule, scaler,
                                        {"step": 1})
    fresh = torch.amp.GradScaler("cpu", growth_interval=3)
    checkpoint.load_checkpoint(folder, toy_model(tok), torch.optim.AdamW(model.parameters()),
                               torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), fresh)
    assert fresh.get_scale() == 77.0 and fresh.state_dict() == saved


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tok, data, tmp_path):
    train, val = data
    cfg = toy_config(epochs=2, batch_size=8, checkpoint_steps=2)
    training.train_retriever(toy_model(tok), train, val, cfg, tmp_path, show_progress=False)
    for folder in (tmp_path / training.CHECKPOINTS).iterdir():  # as an older version wrote them
        state = _state(folder)
        del state["config"]["positive_window"], state["collator"]["windowed_positives"]
        (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
        manifest = json.loads((folder / checkpoint.MANIFEST).read_text(encoding="utf-8"))
        manifest["files"]["trainer_state.json"] = {
            "bytes": (folder / "trainer_state.json").stat().st_size,
            "sha256": checkpoint.file_sha256(folder / "trainer_state.json")}
        (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"positive_window: 'first' -> 'random'"):
        training.train_retriever(toy_model(tok), train, val,
                                 toy_config(epochs=2, batch_size=8, checkpoint_steps=2,
                                            positive_window="random"),
                                 tmp_path, show_progress=False, resume=True)
    history = training.train_retriever(toy_model(tok), train, val, cfg, tmp_path,
                                       show_progress=False, resume=True)
    assert "changed_settings" not in history["resumed_from"][-1]


def test_random_positive_windows_resume_bit_identical_with_their_count(tok, data, tmp_path):
    train, val = data
    cfg = toy_config(epochs=3, batch_size=8, checkpoint_steps=2, keep_checkpoints=100,
                     positive_window="random")

    def model(seed):
        m = toy_model(tok, seed=seed)
        m.max_passage_length = 12  # the toy positives are longer: several windows each
        return m

    full = model(0)
    history = training.train_retriever(full, train, val, cfg, tmp_path / "a",
                                       show_progress=False)
    assert history["windowed_positives"] > 0
    mid = tmp_path / "a" / "checkpoints" / "step-00000008"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, tmp_path / "b" / "checkpoints" / mid.name)
    resumed = model(123)
    again = training.train_retriever(resumed, train, val, cfg, tmp_path / "b",
                                     show_progress=False, resume=True)
    _assert_same_weights(_weights(full), _weights(resumed))
    assert again["steps"] == history["steps"]
    assert again["windowed_positives"] == history["windowed_positives"]


class _RunsCode:
    """A pickle that would call print when loaded: what a tampered or foreign file can hold."""

    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def test_a_checkpoint_file_that_holds_code_is_never_loaded_and_resume_uses_the_previous(
        tok, data, tmp_path, capsys):
    train, val = data
    cfg = toy_config(epochs=1, batch_size=8, checkpoint_steps=2, keep_checkpoints=100)
    whole = training.train_retriever(toy_model(tok), train, val, cfg, tmp_path,
                                     show_progress=False)
    newest = checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1]
    torch.save({"state": _RunsCode()}, newest / "optimizer.pt")
    manifest = json.loads((newest / "manifest.json").read_text())  # consistent, as if written so
    manifest["files"]["optimizer.pt"] = {
        "bytes": (newest / "optimizer.pt").stat().st_size,
        "sha256": checkpoint.file_sha256(newest / "optimizer.pt")}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match=rf"skipping checkpoint {newest.name}: .*optimizer.pt: "
                                            rf"holds more than tensors"):
        again = training.train_retriever(toy_model(tok), train, val, cfg, tmp_path,
                                         show_progress=False, resume=True)
    assert "code from a checkpoint ran" not in capsys.readouterr().out
    previous = checkpoint.list_checkpoints(tmp_path / "checkpoints")[-2]
    assert again["resumed_from"][0]["checkpoint"] == str(previous)
    assert [e["val_ndcg@10"] for e in again["epochs"]] == [e["val_ndcg@10"]
                                                          for e in whole["epochs"]]


def test_the_nan_advice_without_a_good_checkpoint_is_to_start_again(tok, data, tmp_path,
                                                                      monkeypatch):
    message, _ = _stopped_by_nan(tok, data, tmp_path, monkeypatch, 1)
    assert "No checkpoint is good to continue from" in message and "resume=False" in message
    assert "resume=True" not in message
