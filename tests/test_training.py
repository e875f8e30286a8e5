import json
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from toy import toy_config, toy_model, toy_records

from retrieval_lib import course, training
from retrieval_lib.course import experiment
from retrieval_lib.models import DualTowerRetriever, load_encoder, losses, pretraining
from retrieval_lib.results import load_run
from retrieval_lib.settings import config
from retrieval_lib.training import batch_plan


def test_collator_layout_and_negative_fallbacks(tok):
    model = toy_model(tok)
    rows = toy_records(3, 1, k=3)
    rows[1]["negative_passages"] = rows[1]["negative_passages"][:1]  # fewer than K
    rows[2]["negative_passages"] = []  # none at all
    collator = training.RetrievalCollator(model, 2, ["备用一", "备用二", "备用三"], seed=0)
    batch = collator(rows)
    assert batch["query_inputs"]["input_ids"].shape[0] == 3
    assert batch["passage_inputs"]["input_ids"].shape[0] == 3 * (1 + 2)
    texts = tok.batch_decode(batch["passage_inputs"]["input_ids"], skip_special_tokens=True)
    assert [texts[i] for i in (0, 3, 6)] == [r["positive_passages"][0]["text"] for r in rows]
    assert texts[4] == texts[5] == rows[1]["negative_passages"][0]["text"]
    assert set(texts[7:9]) <= {"备用一", "备用二", "备用三"}
    assert (collator.short_negatives, collator.random_negatives) == (1, 1)


def test_training_learns_and_keeps_the_best_epoch(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(96, 2)), Dataset.from_list(toy_records(24, 3))
    model = toy_model(tok)
    from retrieval_lib.evaluation import evaluate_retriever

    before = evaluate_retriever(model, val, ks=(10,))["aggregate"]["ndcg@10"]["mean"]
    history = training.train_retriever(model, train, val,
                                       toy_config(), tmp_path, show_progress=False)
    assert len(history["steps"]) == history["total_steps"] == 4 * (96 // 8)
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0]
    best = history["epochs"][history["best_epoch"] - 1]
    assert best["val_ndcg@10"] == max(e["val_ndcg@10"] for e in history["epochs"]) > before
    saved = DualTowerRetriever.load(tmp_path / "best")
    after = evaluate_retriever(saved, val, ks=(10,))["aggregate"]["ndcg@10"]["mean"]
    assert after == pytest.approx(best["val_ndcg@10"], abs=1e-6)
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert on_disk["best_epoch"] == history["best_epoch"] and (tmp_path / "train.log").exists()
    # TensorBoard's copy of the history, written by the loop: every step and epoch once
    events = _read_events(tmp_path / "tensorboard")
    assert [v for _, v in events["train/loss"]] == pytest.approx(
        [s["loss"] for s in history["steps"]], rel=1e-6)
    assert events["epoch/val_ndcg@10"] == [(e["epoch"] * 12, pytest.approx(e["val_ndcg@10"],
                                                                          rel=1e-6))
                                           for e in history["epochs"]]
    # linear warm-up over ceil(10% of 48) = 5 steps, then linear decay to 0: after step s the
    # rate is 3e-3 · s/5 for s < 5, else 3e-3 · (48 - s)/43
    lrs = [s["lr"] for s in history["steps"]]
    expected = [3e-3 * (s / 5 if s < 5 else (48 - s) / 43) for s in range(1, 49)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


def _read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard log folder, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_history_once(tmp_path):
    """A hand-made history: steps (loss, learning rate, M3 loss parts), epochs at their last
    step (3 steps per epoch) and an expansion's unfreeze points; written again after a longer
    history, each step is there once; off, nothing is written."""
    from retrieval_lib.training import events

    history = {"steps_per_epoch": 3,
               "steps": [{"step": i, "epoch": 1 + (i - 1) // 3, "loss": 2.0 / i, "lr": 1e-4 * i,
                          "loss_parts": {"dense": 1.0 / i}} for i in range(1, 4)],
               "epochs": [{"epoch": 1, "train_loss": 1.2, "val_ndcg@10": 0.25, "best": True,
                           "trainable_new_layers": [0]}],
               "unfreeze": [{"stage": 0, "trainable_new_layers": [], "start_step": 0},
                            {"stage": 1, "trainable_new_layers": [4], "start_step": 2}]}
    folder = events.write_events(tmp_path, history, enabled=True)
    got = _read_events(folder)
    assert set(got) == {"train/loss", "train/lr", "train/loss_dense", "epoch/train_loss",
                        "epoch/val_ndcg@10", "unfreeze/trainable_new_layers"}
    assert got["train/loss"] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]
    assert got["train/lr"] == [(i, pytest.approx(1e-4 * i)) for i in (1, 2, 3)]
    assert got["epoch/val_ndcg@10"] == [(3, 0.25)]
    assert got["unfreeze/trainable_new_layers"] == [(0, 0.0), (2, 1.0)]
    history["steps"].append({"step": 4, "epoch": 2, "loss": 0.4, "lr": 4e-4})
    events.write_events(tmp_path, history, enabled=True)
    assert [s for s, _ in _read_events(folder)["train/loss"]] == [1, 2, 3, 4]
    assert not (tmp_path / "tensorboard.tmp").exists()
    assert events.write_events(tmp_path / "off", history, enabled=False) is None
    assert not (tmp_path / "off").exists()


def test_early_stopping_and_seeded_reproducibility(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(32, 4)), Dataset.from_list(toy_records(16, 5))
    frozen = toy_config(learning_rate=0.0, early_stopping_patience=1, epochs=5)
    history = training.train_retriever(toy_model(tok), train, val, frozen, tmp_path / "a",
                                       show_progress=False)
    assert history["stopped_early"] and len(history["epochs"]) == 2  # nothing can improve
    runs = [training.train_retriever(toy_model(tok), train, val, toy_config(epochs=2), tmp_path / d,
                                     show_progress=False)["steps"] for d in ("b", "c")]
    assert [s["loss"] for s in runs[0]] == [s["loss"] for s in runs[1]]


def test_gradient_checkpointing_changes_memory_not_results(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(32, 10)), Dataset.from_list(toy_records(8, 11))
    plain = training.train_retriever(toy_model(tok), train, val,
                                     toy_config(epochs=1), tmp_path / "a",
                                     show_progress=False)
    model = toy_model(tok)
    checkpointed = training.train_retriever(model, train, val,
                                            toy_config(epochs=1, gradient_checkpointing=True),
                                            tmp_path / "b", show_progress=False)
    flag = getattr(model.encoder, "is_activation_checkpointing", None)
    assert flag if flag is not None else model.encoder.is_gradient_checkpointing
    assert [s["loss"] for s in plain["steps"]] == pytest.approx(
        [s["loss"] for s in checkpointed["steps"]], abs=1e-5)


def test_grad_cache_changes_memory_not_results(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(32, 10)), Dataset.from_list(toy_records(8, 11))
    plain = training.train_retriever(toy_model(tok), train, val,
                                     toy_config(epochs=1), tmp_path / "a",
                                     show_progress=False)
    cached = training.train_retriever(toy_model(tok), train, val,
                                      toy_config(epochs=1, grad_cache_chunk_size=5), tmp_path / "b",
                                      show_progress=False)
    assert [s["loss"] for s in plain["steps"]] == pytest.approx(
        [s["loss"] for s in cached["steps"]], abs=1e-5)
    assert plain["epochs"][0]["val_ndcg@10"] == pytest.approx(
        cached["epochs"][0]["val_ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("capability,expected", [((7, 5), ("fp16", True)),   # T4
                                                 ((8, 6), ("bf16", False)),  # RTX 3060
                                                 ((8, 0), ("bf16", False))])  # A100
def test_auto_precision_uses_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability,
                                                                    expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation too
    _, scaler, precision, why = training.mixed_precision(torch.device("cuda"), "auto")
    assert (precision, scaler is not None) == expected
    assert f"{capability[0]}.{capability[1]}" in why
    assert training.mixed_precision(torch.device("cpu"))[2] == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        training.mixed_precision(torch.device("cpu"), "fp8")


def test_checkpointing_is_non_reentrant(tok):
    """Reentrant checkpointing (transformers 4.x's default) breaks DDP with the shared encoder
    run twice per step; the kind used is asked for explicitly."""
    model = toy_model(tok)
    training.enable_checkpointing(model.encoder)
    funcs = [m._gradient_checkpointing_func for m in model.encoder.modules()
             if getattr(m, "_gradient_checkpointing_func", None) is not None]
    assert funcs and all(f.keywords == {"use_reentrant": False} for f in funcs)


def test_bf16_autocast_trains_on_the_cpu(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(16, 6)), Dataset.from_list(toy_records(8, 7))
    history = training.train_retriever(toy_model(tok), train, val, toy_config(epochs=1),
                                       tmp_path, show_progress=False, precision="bf16")
    assert (history["precision"], history["precision_reason"]) == ("bf16", "asked for bf16")
    assert all(s["loss"] == s["loss"] for s in history["steps"])  # finite, not NaN


def test_non_finite_loss_stops_with_the_step(tok, tmp_path, monkeypatch):
    train, val = Dataset.from_list(toy_records(16, 6)), Dataset.from_list(toy_records(8, 7))
    monkeypatch.setattr(losses, "cross_device_info_nce",
                        lambda q, p, t: (q.sum() + p.sum()) * float("nan"))
    with pytest.raises(FloatingPointError, match="at step 1 "):
        training.train_retriever(toy_model(tok), train, val,
                                 toy_config(), tmp_path, show_progress=False)


def test_token_blocks_hand_worked(tok):
    blocks = pretraining.token_blocks(tok, ["长江", "黄河"], seq_len=2)
    ids = tok("长江", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids += tok("黄河", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.flatten().tolist() == ids[: len(ids) // 2 * 2]
    with pytest.raises(ValueError, match="no block"):
        pretraining.token_blocks(tok, ["长"], seq_len=100)


@pytest.mark.parametrize("base", [config.MINIMIND_27M, config.QWEN2_05B],
                         ids=["minimind", "qwen2"])
def test_demo_pretraining_lowers_perplexity_and_is_cached(tok, tmp_path, base):
    cfg = replace(base, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    texts = [r["positive_passages"][0]["text"] for r in toy_records(120, 8)]
    pcfg = pretraining.PretrainConfig(max_steps=60, seq_len=32, batch_size=8, warmup_steps=5)
    path = pretraining.pretrain_demo_lm(cfg, tok, texts[:100], texts[100:], tmp_path, pcfg,
                                        show_progress=False)
    report = json.loads((path / "pretrain.json").read_text())
    assert report["heldout_perplexity_after"] < report["heldout_perplexity_before"] / 3
    stamp = (path / "pretrain.json").stat().st_mtime_ns
    again = pretraining.pretrain_demo_lm(cfg, tok, texts[:100], texts[100:], tmp_path, pcfg,
                                         show_progress=False)
    assert again == path and (path / "pretrain.json").stat().st_mtime_ns == stamp
    encoder = load_encoder(str(path))  # the same loading code as the real checkpoints
    expected = {"llama": "LlamaModel", "qwen2": "Qwen2Model"}[base.architecture]
    assert type(encoder).__name__ == expected and encoder.config.vocab_size == len(tok)


def test_demo_pretraining_keeps_the_weights_of_the_lowest_heldout_perplexity(tok, tmp_path,
                                                                             monkeypatch):
    """Every ``eval_every`` steps (and at the end) the held-out perplexity is measured; the
    saved weights are those of the lowest (scripted here: step 20 of 20, 40, 60, 80), not the
    last, and the report says which step they are from."""
    from safetensors.torch import load_file

    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    texts = [r["positive_passages"][0]["text"] for r in toy_records(60, 8)]
    scripted = iter([9.0, 5.0, 7.0, 6.0, 8.0])  # before, then steps 20, 40, 60, 80
    snapshots, real = [], pretraining.perplexity

    def fake_perplexity(model, blocks, batch_size=32):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted, None) or real(model, blocks)  # the last call: the kept weights

    monkeypatch.setattr(pretraining, "perplexity", fake_perplexity)
    pcfg = pretraining.PretrainConfig(max_steps=80, seq_len=32, batch_size=4, warmup_steps=1,
                                      eval_every=20)
    path = pretraining.pretrain_demo_lm(cfg, tok, texts[:50], texts[50:], tmp_path, pcfg,
                                        show_progress=False)
    report = json.loads((path / "pretrain.json").read_text())
    assert report["heldout_curve"] == [[20, 5.0], [40, 7.0], [60, 6.0], [80, 8.0]]
    assert report["kept_step"] == 20
    saved = load_file(str(path / "model.safetensors"))
    kept = snapshots[1]  # the weights measured at step 20
    assert any(not torch.equal(kept[k], snapshots[4][k]) for k in kept)  # training moved them
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, kept[name], rtol=0, atol=0, msg=name)


def test_a_shipped_demo_lm_is_copied_only_for_its_exact_inputs(tok, tmp_path, monkeypatch):
    import shutil

    from retrieval_lib.settings import saved_folder

    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    texts = [r["positive_passages"][0]["text"] for r in toy_records(60, 8)]
    pcfg = pretraining.PretrainConfig(max_steps=5, seq_len=32, batch_size=4, warmup_steps=1)
    built = pretraining.pretrain_demo_lm(cfg, tok, texts[:50], texts[50:], tmp_path / "a", pcfg,
                                         show_progress=False)
    shipped = tmp_path / "shipped"
    shutil.copytree(built, shipped / built.name)
    saved_folder.write_checksums(shipped / built.name)
    monkeypatch.setattr(pretraining, "SHIPPED_DEMO_LMS", shipped)
    monkeypatch.setattr(pretraining.torch, "manual_seed", lambda seed: (_ for _ in ()).throw(
        AssertionError("a shipped model must be copied, not pretrained again")))
    copied = pretraining.pretrain_demo_lm(cfg, tok, texts[:50], texts[50:], tmp_path / "b", pcfg,
                                          show_progress=False)
    assert copied == tmp_path / "b" / built.name
    assert (copied / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    # another corpus is another key: not the shipped model, so it pretrains (here: refused)
    with pytest.raises(AssertionError, match="copied, not pretrained"):
        pretraining.pretrain_demo_lm(cfg, tok, texts[:49], texts[50:], tmp_path / "c", pcfg,
                                     show_progress=False)
    # a damaged shipped file is named, never used
    weights = shipped / built.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(saved_folder.CheckpointError, match="model.safetensors"):
        pretraining.pretrain_demo_lm(cfg, tok, texts[:50], texts[50:], tmp_path / "d", pcfg,
                                     show_progress=False)


def test_full_preset_without_weights_or_data_names_both(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    exp = config.get_experiment("minimind108_10k", "full")
    with pytest.raises(course.MissingInputsError) as err:
        course.check_full_inputs(exp)
    message = str(err.value)
    assert "jingyaogong/minimind-v1" in message and "Shitao/bge-m3-data" in message
    assert "model_path" in message and "data_dir" in message and "HF_ENDPOINT" in message
    local = config.with_overrides(exp, model_path=str(tmp_path), data_dir=str(tmp_path / "no"))
    with pytest.raises(course.MissingInputsError) as err:
        course.check_full_inputs(local)
    # a local folder: what it lacks, and which hub repository to download into it
    assert f"{tmp_path}: no config.json" in str(err.value)
    assert (f"huggingface-cli download jingyaogong/minimind-v1 --local-dir {tmp_path}"
            in str(err.value))
    assert "does not exist" in str(err.value)  # the data folder
    # a path the user passed is where the fix is, not the demo preset
    assert str(err.value).endswith(f"(data_dir {str(tmp_path / 'no')!r}, model_path "
                                   f"{str(tmp_path)!r}): the fix is there.")
    assert "preset demo" not in str(err.value) and "preset demo" in message
    # the command line (single process or torchrun) stops the same way, before any work
    with pytest.raises(course.MissingInputsError, match="minimind-v1"):
        experiment.main(["--experiment", "minimind108_10k", "--preset", "full"])
    with pytest.raises(SystemExit):
        experiment.main(["--experiment", "minimind999", "--preset", "demo"])


def test_the_command_line_sets_the_stages_before_fine_tuning():
    """``--pretraining-stages`` as the notebooks' parameter: '+'-joined names or 'none'; a
    misspelt or reordered list stops before any data is read."""
    demo = ["--experiment", "minimind27_10k", "--preset", "demo"]
    stages = lambda argv: experiment.parse_command_line(argv)[0].model.pretraining_stages  # noqa: E731
    assert stages(demo) == ("retromae", "contrastive")  # the demo's default
    assert stages(demo + ["--pretraining-stages", "none"]) == ()
    assert stages(demo + ["--pretraining-stages", "contrastive"]) == ("contrastive",)
    assert stages(["--experiment", "minimind108_10k", "--preset", "full"]) == ()
    assert stages(["--experiment", "minimind108_10k", "--preset", "full",
                   "--pretraining-stages", "retromae+contrastive"]) == ("retromae", "contrastive")
    for bad in ("contrastive+retromae", "retromea", "retromae+retromae"):
        with pytest.raises(ValueError, match="pretraining stage"):
            stages(demo + ["--pretraining-stages", bad])


def _toy_experiment(tok, tmp_path):
    from retrieval_lib.data import LoadReport, prepare_splits

    records = toy_records(90, 9)
    dcfg = replace(config.get_data_config("demo"), val_size=15, test_size=20,
                   subset_sizes={"10k": 40, "96k": 55})
    report = LoadReport(read=90, kept=90)
    splits = prepare_splits(records, dcfg, {"toy": report})
    model = toy_model(tok)
    model.encoder.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    exp = config.get_experiment("minimind27_10k", "demo")
    exp = replace(exp, data=dcfg, training=toy_config(epochs=2),
                  model=replace(exp.model, base_model=str(tmp_path / "base"), hidden_size=32,
                                max_query_length=16, max_passage_length=48, projection_dim=16))
    return exp, splits


def test_finished_runs_are_read_back_and_reused_only_with_the_same_setup(tok, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    exp, splits = _toy_experiment(tok, tmp_path)
    trained = experiment.ensure_run(exp, splits, show_progress=False)
    assert trained["out_dir"] == tmp_path / "runs" / "demo" / "minimind27_10k"
    loaded = load_run(trained["out_dir"])
    for part in ("test", "untrained"):
        assert loaded[part]["per_query"] == trained[part]["per_query"]
        for metric, agg in trained[part]["aggregate"].items():
            assert loaded[part]["aggregate"][metric]["mean"] == pytest.approx(agg["mean"])
    assert loaded["history"]["best_epoch"] == trained["history"]["best_epoch"]
    assert loaded["parameters"] == trained["parameters"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run with the same setup must be reused")

    monkeypatch.setattr(experiment, "run_experiment", no_training)
    capsys.readouterr()
    reused = experiment.ensure_run(exp, splits)
    assert "reusing" in capsys.readouterr().out
    assert reused["test"]["per_query"] == trained["test"]["per_query"]
    # a run saved before a setting existed is the same setup when today's value is the default
    saved = trained["out_dir"] / "config.json"
    older = json.loads(saved.read_text(encoding="utf-8"))
    del older["training"]["positive_window"], older["model"]["passage_aggregation"]
    saved.write_text(json.dumps(older), encoding="utf-8")
    assert experiment.ensure_run(exp, splits)["test"]["per_query"] == trained["test"]["per_query"]
    # a run of other training settings (a user's own, e.g. -p epochs 2) is reused, never
    # replaced, and every difference is named
    capsys.readouterr()
    other = replace(exp, training=replace(exp.training, learning_rate=1e-4, epochs=3))
    kept = experiment.ensure_run(other, splits, allow_training=False)
    assert kept["test"]["per_query"] == trained["test"]["per_query"]
    assert kept["differs"] == {"training.epochs": (exp.training.epochs, 3),
                               "training.learning_rate": (exp.training.learning_rate, 1e-4)}
    printed = capsys.readouterr().out
    assert f"training.epochs: {exp.training.epochs} in the run, 3 here" in printed
    assert "move that folder away" in printed
    # one of another model is not replaced either: it stops, naming what differs
    wider = replace(exp, model=replace(exp.model, projection_dim=8))
    with pytest.raises(RuntimeError, match="model.projection_dim: 16 in the run, 8 here"):
        experiment.ensure_run(wider, splits)
    assert load_run(trained["out_dir"])["test"]["per_query"] == trained["test"]["per_query"]
    (trained["out_dir"] / "env.json").unlink()
    with pytest.raises(FileNotFoundError, match="env.json missing"):
        load_run(trained["out_dir"])


def test_the_hybrid_fuses_the_dense_run_with_bm25_and_is_saved_as_a_baseline(tok, tmp_path,
                                                                             monkeypatch):
    from retrieval_lib.results import baselines, runs

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    exp, splits = _toy_experiment(tok, tmp_path)
    missing = baselines.hybrid_baseline(splits.test, "demo", validation=splits.validation)
    # no dense run yet: no number
    assert missing["status"] == "not run"
    assert runs.collect_runs("demo")["hybrid"]["status"] == "not run"
    trained = experiment.ensure_run(exp, splits, show_progress=False)
    with pytest.raises(ValueError, match="validation"):  # auto has nothing to choose on
        baselines.hybrid_baseline(splits.test, "demo")
    out = baselines.hybrid_baseline(splits.test, "demo", how="rrf")
    assert out["dense"] == "minimind27_10k" and out["fusion"] == "rrf"
    # its two parts are the trained run's test result and BM25's, on the same queries and corpus
    assert out["dense_result"]["per_query"] == trained["test"]["per_query"]
    assert out["bm25_result"]["per_query"] == baselines.evaluate_bm25(splits.test)["per_query"]
    # where both put the positive first, so does reciprocal-rank fusion (2/61 beats any other)
    both = [q for q, v in out["dense_result"]["per_query"]["mrr"].items()
            if v == 1.0 and out["bm25_result"]["per_query"]["mrr"][q] == 1.0]
    assert all(out["result"]["per_query"]["mrr"][q] == 1.0 for q in both)
    # and the fused run is RRF (k 60) of exactly those two runs
    from retrieval_lib import evaluation
    from retrieval_lib.models import DualTowerRetriever
    best = DualTowerRetriever.load(trained["out_dir"] / "best")
    qrels, dense_run, _ = evaluation.retrieve(best, splits.test)
    lexical = baselines.bm25_run(splits.test)[1]
    expected = evaluation.score_run(qrels, evaluation.fuse_runs([dense_run, lexical], "rrf", 60))
    assert out["result"]["per_query"] == expected["per_query"]
    assert out["result"]["per_query"] != out["dense_result"]["per_query"]
    # fusion and weights chosen on the validation split: the pair that scores best there
    tuned = baselines.hybrid_baseline(splits.test, "demo", validation=splits.validation)
    curve = tuned["validation_curve"]
    assert list(curve) == ["rrf", "minmax"]
    assert all(list(c) == list(baselines.FUSION_WEIGHTS) for c in curve.values())
    best_pair = max(((f, w) for f in curve for w in curve[f]), key=lambda fw: curve[fw[0]][fw[1]])
    assert (tuned["fusion"], tuned["weights"]) == (best_pair[0], (best_pair[1], 1.0))
    vq, vdense, _ = evaluation.retrieve(best, splits.validation)
    vlexical = baselines.bm25_run(splits.validation)[1]
    for how in ("rrf", "minmax"):
        vfused = evaluation.fuse_runs([vdense, vlexical], how, 60, (0.25, 1.0))
        assert curve[how][0.25] == pytest.approx(
            evaluation.score_run(vq, vfused)["aggregate"]["ndcg@10"]["mean"])
    expected = evaluation.score_run(qrels, evaluation.fuse_runs(
        [dense_run, lexical], tuned["fusion"], 60, tuned["weights"]))
    assert tuned["result"]["per_query"] == expected["per_query"]
    saved = runs.collect_runs("demo")["hybrid"]
    assert saved["status"] == "done" and saved["kind"] == "baseline"
    assert saved["config"]["fusion"] == tuned["fusion"]
    assert saved["config"]["fusion_chosen_on_validation"]
    assert saved["config"]["weights"] == list(tuned["weights"])
    assert saved["config"]["dense_run"] == "minimind27_10k"
    assert saved["config"]["selected_by"] == "validation ndcg@10"
    assert saved["test"]["per_query"] == tuned["result"]["per_query"]  # the latest replaces


def test_the_dense_run_of_the_hybrid_is_chosen_on_validation_at_its_best_epoch(monkeypatch):
    from retrieval_lib.results import baselines

    def run(best, values):
        return {"status": "done", "kind": "experiment", "history": {
            "best_epoch": best,
            "epochs": [{"epoch": i + 1, "val_ndcg@10": v} for i, v in enumerate(values)]}}

    fake = {"a": run(2, [0.9, 0.4, 0.2]), "b": run(1, [0.5]), "d": run(1, [0.45, 0.7]),
            "bm25": {"status": "done", "kind": "baseline"},
            "c": {"status": "not run", "kind": "experiment"}}
    monkeypatch.setattr(baselines, "collect_runs", lambda preset, root=None: fake)
    # each run counts with its best (kept) epoch: a 0.4, b 0.5, d 0.45; neither a's best-ever
    # 0.9 nor d's last 0.7 is the model that was kept
    assert baselines.best_dense_run("demo") is fake["b"]
    monkeypatch.setattr(baselines, "collect_runs", lambda preset, root=None: {})
    assert baselines.best_dense_run("demo") is None


def test_the_untrained_evaluation_runs_on_the_chosen_device(tok, tmp_path, monkeypatch):
    """The model is on the training device before its first encoding (on a GPU machine the
    untrained evaluation of a full run used to encode the whole test corpus on the CPU)."""
    exp, splits = _toy_experiment(tok, tmp_path)
    events = []
    real_to, real_eval = DualTowerRetriever.to, experiment.evaluate_retriever

    def to(self, *args, **kwargs):
        events.append(("to", str(args[0]) if args else str(kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    def evaluate(model, *args, **kwargs):
        events.append(("evaluate", str(next(model.parameters()).device)))
        return real_eval(model, *args, **kwargs)

    monkeypatch.setattr(DualTowerRetriever, "to", to)
    monkeypatch.setattr(experiment, "evaluate_retriever", evaluate)
    experiment.run_experiment(replace(exp, training=toy_config(epochs=1)), splits,
                              out_dir=tmp_path / "run", show_progress=False, device="cpu")
    first_eval = events.index(next(e for e in events if e[0] == "evaluate"))
    assert ("to", "cpu") in events[:first_eval]


def test_the_step_is_fitted_to_the_memory_and_said_before_training(tok, tmp_path, capsys):
    """Given less memory than the configured step needs, the run turns on checkpointing (same
    batch), says so with the device and the precision before training, and records it; the run
    folder keeps the settings asked for, so a finished run is still reused on another GPU."""
    from retrieval_lib.training import memory

    exp, splits = _toy_experiment(tok, tmp_path)
    exp = replace(exp, training=toy_config(epochs=1))
    as_configured = memory.fit_step(exp.model, exp.training, 1e6)[1]["plan_gib"]
    result = experiment.run_experiment(exp, splits, out_dir=tmp_path / "run", show_progress=False,
                                       device="cpu",
                                       memory_gib=as_configured + memory.CUDA_CONTEXT_GIB - 1e-6)
    said = capsys.readouterr().out
    assert f"cpu (torch {torch.__version__}), fp32 (cpu: full precision by default" in said
    assert "; batch 8 (24 passages" in said
    assert "with gradient checkpointing: plan" in said
    assert result["history"]["gradient_checkpointing"] is True
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["fitted_to_device"]["batch_plan"]["changed"] == ["gradient_checkpointing"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["training"]["gradient_checkpointing"] is False
    assert saved["training"]["batch_size"] == result["history"]["global_batch_size"] == 8


def test_run_experiment_writes_the_run_folder(tok, tmp_path):
    exp, splits = _toy_experiment(tok, tmp_path)
    result = experiment.run_experiment(exp, splits, {"note": "toy"}, out_dir=tmp_path / "run",
                                       show_progress=False)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert {"best", "config.json", "env.json", "history.json", "metrics.json",
            "train.log"} <= set(files)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]["per_query"]["recall@5"]) == {f"q{i}" for i in range(20)}
    agg = metrics["test"]["aggregate"]["ndcg@5"]
    assert agg["ci_low"] <= agg["mean"] <= agg["ci_high"] and agg["n"] == 20
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["preset"] == "demo" and env["seed"] == config.SEED and env["wall_time_s"] > 0
    cfg_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_json["train_records"] == 40 and cfg_json["base_model_info"] == {"note": "toy"}
    summary = experiment.result_summary(result)
    assert summary["trained"]["ndcg@5"] == pytest.approx(agg["mean"])


def test_progressive_unfreezing_keeps_frozen_layers_fixed(tok, tmp_path):
    """Layer 1 joins after epoch 1, layer 2 after epoch 2 (``every_epochs=1``, 3 epochs); the
    epoch-end checkpoints show each new layer bit-identical until its stage begins."""
    from safetensors.torch import load_file

    from retrieval_lib.models import UnfreezeSchedule, expand_layers

    train, val = Dataset.from_list(toy_records(32, 12)), Dataset.from_list(toy_records(8, 13))
    model = toy_model(tok)
    new = expand_layers(model.encoder, 2, init="identity")
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = training.train_retriever(
        model, train, val, toy_config(epochs=3, keep_checkpoints=5), tmp_path,
        show_progress=False, unfreeze=UnfreezeSchedule(new, every_epochs=1))
    assert [e["trainable_new_layers"] for e in history["epochs"]] == [[], [1], [1, 2]]
    spe = history["steps_per_epoch"]
    assert [s["start_step"] for s in history["unfreeze"]] == [0, spe, 2 * spe]

    def moved(state, layer):
        keys = [k for k in start if k.startswith(f"encoder.layers.{layer}.")]
        return any(not torch.equal(state[k], start[k]) for k in keys)

    after = [load_file(str(tmp_path / "checkpoints" / f"step-{spe * e:08d}" /
                           "model.safetensors")) for e in (1, 2)]
    final = model.state_dict()
    assert [moved(s, 0) for s in (*after, final)] == [True, True, True]  # pretrained: always
    assert [moved(s, 1) for s in (*after, final)] == [False, True, True]
    assert [moved(s, 2) for s in (*after, final)] == [False, False, True]


def test_a_schedule_that_cannot_complete_is_refused_and_spread_completes(tok, tmp_path):
    from retrieval_lib.models import UnfreezeSchedule, expand_layers

    train, val = Dataset.from_list(toy_records(32, 12)), Dataset.from_list(toy_records(8, 13))
    model = toy_model(tok)
    new = expand_layers(model.encoder, 2, init="identity")
    with pytest.raises(ValueError, match="cannot complete"):
        training.train_retriever(model, train, val, toy_config(epochs=2), tmp_path / "a",
                                 show_progress=False,
                                 unfreeze=UnfreezeSchedule(new, every_epochs=1))
    # spread over the steps, early stopping cannot cut the schedule short: patience 1
    history = training.train_retriever(model, train, val,
                                       toy_config(epochs=2, early_stopping_patience=1),
                                       tmp_path / "b", show_progress=False,
                                       unfreeze=UnfreezeSchedule(new))
    total = history["total_steps"]
    assert [s["start_step"] for s in history["unfreeze"]] == [0, total // 3, 2 * total // 3]
    assert history["epochs"][-1]["trainable_new_layers"] == [1, 2]


def test_frozen_parameters_get_no_optimizer_state_until_unfrozen(tok):
    model = toy_model(tok)
    optimizer = training.make_optimizer(model, toy_config())
    frozen = model.query_projection.weight
    frozen.requires_grad_(False)
    loss = model.embed(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).sum()
    loss.backward()
    optimizer.step()
    assert frozen not in optimizer.state and model.encoder.embed_tokens.weight in optimizer.state


def test_expansion_gaps_and_comparisons_by_hand():
    def run(untrained, test):
        return {"untrained": {"per_query": {"ndcg@10": untrained}},
                "test": {"per_query": {"ndcg@10": test, "recall@100": test}}}

    base = run({"q0": 0.5, "q1": 1.0}, {"q0": 0.5, "q1": 0.5})
    runs = {"random": run({"q0": 0.4, "q1": 1.0}, {"q0": 1.0, "q1": 0.5}),
            "identity": run({"q0": 0.5, "q1": 1.0}, {"q0": 1.0, "q1": 1.0})}
    gaps = course.untrained_gaps(base, runs)
    assert gaps["identity"] == 0.0 and gaps["random"] == pytest.approx(0.1)
    assert course.untrained_gaps(None, runs) == {}
    tests = course.expansion_comparisons(base, runs)
    assert tests["扩容（random）− 对照 · ndcg@10"]["mean_difference"] == pytest.approx(0.25)
    assert tests["扩容（identity）− 对照 · recall@100"]["mean_difference"] == pytest.approx(0.5)
    assert tests["identity − random · ndcg@10"]["mean_difference"] == pytest.approx(0.25)
    assert set(course.expansion_comparisons(None, runs)) == {
        "identity − random · ndcg@10", "identity − random · recall@100"}


def test_collator_pads_to_a_multiple_of_eight_and_counts_padding(tok):
    model = toy_model(tok)
    collator = training.RetrievalCollator(model, 1, [], seed=0)
    batch = collator(toy_records(3, 2, k=2))
    for part in ("query_inputs", "passage_inputs"):
        assert batch[part]["input_ids"].shape[1] % 8 == 0
    masks = [batch[p]["attention_mask"] for p in ("query_inputs", "passage_inputs")]
    total = sum(m.numel() for m in masks)
    assert collator.pad_fraction == pytest.approx(sum(int((m == 0).sum()) for m in masks) / total)
    assert 0 < collator.pad_fraction < 1


def test_weight_decay_applies_to_matrices_only(tok):
    """AdamW's groups: every parameter of two or more dimensions decays, biases and norm
    weights (one dimension) do not; together they are all the parameters, each once."""
    model = toy_model(tok)
    optimizer = training.make_optimizer(model, toy_config(weight_decay=0.01))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1
                                                            for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"encoder.norm.weight",
                                                          "query_projection.bias"}
    assert "query_projection.weight" in {names[id(p)] for p in decay["params"]}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("limit", [0.01, 1e9])
def test_the_optimizer_sees_gradients_clipped_to_max_grad_norm(tok, tmp_path, limit):
    """Every optimizer step's gradient norm, read in a step pre-hook: at most ``max_grad_norm``
    when that binds (0.01 here), the raw norms (above 0.01) when it does not."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        training.train_retriever(toy_model(tok), Dataset.from_list(toy_records(24, 1)),
                                 Dataset.from_list(toy_records(8, 2)),
                                 toy_config(epochs=1, batch_size=8, max_grad_norm=limit),
                                 tmp_path, show_progress=False)
    finally:
        handle.remove()
    assert len(norms) == 3
    if limit < 1:
        assert max(norms) <= limit * (1 + 1e-5), norms
    else:
        assert min(norms) > 0.01, norms  # so the 0.01 limit really binds


def test_without_length_grouping_an_epoch_is_a_seeded_permutation_cut_into_batches(tok):
    """``group_by_length=False``: epoch e is torch's permutation from seed·1000003 + e, cut into
    batches (the last short one dropped), a function of seed and epoch alone (resume relies
    on it); grouping by the positives' token lengths is another plan."""
    rows = toy_records(30, 5)
    cfg = toy_config(batch_size=8, group_by_length=False)
    sampler = batch_plan(rows, cfg)

    def batches(epoch, plan=sampler):
        plan.set_epoch(epoch)
        return list(plan)

    for epoch in (1, 2):
        order = torch.randperm(30, generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + epoch)).tolist()
        assert batches(epoch) == [order[i:i + 8] for i in (0, 8, 16)]  # 30 = 3·8 + 6 dropped
    assert batches(1) != batches(2)
    assert batches(1) == batches(1, batch_plan(rows, cfg))
    model = toy_model(tok)
    for i, row in enumerate(rows):  # three lengths of positive
        row["positive_passages"][0]["text"] += "新闻" * (5 * (i % 3))
    grouped = batch_plan(rows, replace(cfg, group_by_length=True), model.tokenizer,
                         model.max_passage_length)
    assert batches(1, grouped) != batches(1)  # the other policy really is another one
    with pytest.raises(ValueError, match="needs the tokenizer"):
        batch_plan(rows, replace(cfg, group_by_length=True))


def _collated_positives(model, collator, rows, k):
    """The passage texts the collator tokenised for the positives of ``rows``."""
    seen = []
    tokenize = model.tokenize
    model.tokenize = lambda texts, tower, **kw: (seen.append(list(texts)) if tower == "passage"
                                                 else None) or tokenize(texts, tower, **kw)
    try:
        collator(rows)
    finally:
        model.tokenize = tokenize
    return seen[-1][::1 + k]


def test_a_long_positive_trains_as_a_random_window_drawn_from_its_windows(tok):
    from retrieval_lib.evaluation import windows

    model = toy_model(tok)
    model.max_passage_length = 10  # the toy positives are longer: 2-4 windows each
    rows = toy_records(4, 1, k=1)
    cut = {r["query"]: windows.split_windows([r["positive_passages"][0]["text"]], tok, 10).texts
           for r in rows}
    assert all(len(w) > 1 for w in cut.values())
    collator = training.RetrievalCollator(model, 1, [], seed=0, positive_window="random")
    drawn = {r["query"]: set() for r in rows}
    later = 0
    for _ in range(30):
        for row, text in zip(rows, _collated_positives(model, collator, rows, 1), strict=True):
            assert text in cut[row["query"]]  # always one of its windows
            drawn[row["query"]].add(text)
            later += text != cut[row["query"]][0]
    assert all(drawn[q] == set(cut[q]) for q in cut)  # every window gets its turn
    assert collator.windowed_positives == later > 0
    first = training.RetrievalCollator(model, 1, [], seed=0)  # the default reads the whole text
    assert _collated_positives(model, first, rows, 1) == [r["positive_passages"][0]["text"]
                                                          for r in rows]


def test_the_best_window_is_the_one_the_current_model_scores_highest(tok):
    import numpy as np

    from retrieval_lib.evaluation import windows

    model = toy_model(tok, seed=3)
    model.max_passage_length = 10
    model.train()
    rows = toy_records(5, 2, k=1)
    collator = training.RetrievalCollator(model, 1, [], seed=0, positive_window="best")
    chosen = _collated_positives(model, collator, rows, 1)
    assert model.training  # encoding the windows left the model in training mode
    for row, text in zip(rows, chosen, strict=True):  # one text at a time, independently
        cut = windows.split_windows([row["positive_passages"][0]["text"]], tok, 10).texts
        q = model.encode_queries([row["query"]])[0]
        scores = [float(model.encode_passages([w])[0] @ q) for w in cut]
        assert text == cut[int(np.argmax(scores))]
    with pytest.raises(ValueError, match="positive_window"):
        training.RetrievalCollator(model, 1, [], seed=0, positive_window="last")
