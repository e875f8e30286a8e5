"""The full preset end to end on miniatures of the published checkpoints and data: what a Colab
or RTX 3060 user runs, with tiny shapes and a few records, in seconds."""

import json
from dataclasses import replace

import pytest
from published_formats import (
    write_bge_m3_data,
    write_minimind2,
    write_minimind_v1,
    write_qwen2,
)

from retrieval_lib import course, data
from retrieval_lib.course import experiment
from retrieval_lib.models import (
    DualTowerRetriever,
    UnfreezeSchedule,
    check_base_model,
    new_layer_positions,
)
from retrieval_lib.results import load_run
from retrieval_lib.settings import config
from retrieval_lib.training import memory, steps_per_epoch

EXPANSIONS = ("minimind38_96k", "minimind186_288k", "qwen2_613_288k")


def _full(name, tmp_path, model_dir, **training):
    exp = config.with_overrides(config.get_experiment(name, "full"), model_path=str(model_dir),
                                data_dir=str(tmp_path / "bge-m3-data"), **training)
    small = replace(exp.data, val_size=8, test_size=10,
                    subset_sizes={"10k": 20, "96k": 40, "288k": 42})
    return replace(exp, data=small, model=replace(exp.model, max_passage_length=64,
                                                  max_query_length=16))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    write_bge_m3_data(tmp_path / "bge-m3-data")
    return tmp_path


def test_27m_base_and_38m_expansion_run_on_a_minimind_v1_checkpoint(home):
    write_minimind_v1(home / "minimind-v1-small")
    base = _full("minimind27_10k", home, home / "minimind-v1-small", epochs=2, batch_size=4)
    course.check_full_inputs(base)  # everything there: passes
    splits = data.prepare_data(base.data)
    load = splits.manifest["load"]
    assert {s: r["kept"] for s, r in load.items()} == {s: 12 for s in config.BGE_M3_ZH_SOURCES}
    assert all(len(r["files"]) == 1 for r in load.values())  # the English file was not read
    with pytest.raises(ValueError, match="demo's own pretraining"):  # not silently dropped
        experiment.prepare_base_model(base, splits, extra_texts=["另一份语料"])
    base, info = experiment.prepare_base_model(base, splits)
    assert info["conversion"]["format"] == "minimind-v1"
    assert info["conversion"]["q_k_rows_permuted"] and not info["conversion"][
        "checkpoint_code_run"]
    run = experiment.run_experiment(base, splits, info, show_progress=False)
    saved = json.loads((run["out_dir"] / "metrics.json").read_text())
    assert saved["preset"] == "full" and 0 <= saved["test"]["aggregate"]["ndcg@5"]["mean"] <= 1
    assert run["parameters"] == load_run(run["out_dir"])["config"]["parameters"]
    # the 38M notebook's base is 27M with its notebook's defaults (5 epochs, batch 32): the
    # user's run above (2 epochs, batch 4) is reused and the differences named, not retrained
    _, held = course.expansion_experiments("minimind38_96k", "full",
                                           model_path=str(home / "minimind-v1-small"),
                                           data_dir=str(home / "bge-m3-data"))
    held = replace(held, data=base.data, model=replace(held.model, max_passage_length=64,
                                                       max_query_length=16))
    reused = experiment.ensure_run(held, splits, allow_training=False)
    assert reused["out_dir"] == run["out_dir"]
    assert reused["differs"] == {"training.batch_size": (4, 32), "training.epochs": (2, 5)}

    grown = _full("minimind38_96k", home, home / "minimind-v1-small", epochs=1, batch_size=4)
    grown, info = experiment.prepare_base_model(grown, splits)
    run = experiment.run_experiment(grown, splits, info, show_progress=False)
    history = run["history"]
    # 2 pretrained layers + 4 new, 10 steps: 5 stages of 2 steps, the last trains all four
    assert run["expansion"]["new_layers"] == [2, 3, 4, 5]
    assert [s["start_step"] for s in history["unfreeze"]] == [0, 2, 4, 6, 8]
    assert history["epochs"][-1]["trainable_new_layers"] == [2, 3, 4, 5]
    table = course.unfreeze_plan(grown, train_records=len(splits.subset("96k")))
    assert list(table["起始步"]) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("writer,name", [
    (lambda p: write_minimind2(p), "minimind27_10k"),
    (lambda p: write_minimind2(p, llama_format=True), "minimind108_10k"),
    (write_qwen2, "qwen2_613_288k")], ids=["minimind2", "minimind2-llama", "qwen2"])
def test_other_published_formats_pass_the_checks_load_and_expand(home, writer, name):
    from retrieval_lib.models import expand_layers

    writer(home / "model")
    exp = _full(name, home, home / "model")
    course.check_full_inputs(exp)
    model = DualTowerRetriever.from_config(exp.model)
    new = expand_layers(model.encoder, 2, init="identity")
    assert new == [2, 3]
    vectors = model.encode_passages(["长江流域今年的降水", "国家足球队"], batch_size=2)
    assert vectors.shape == (2, 128)


def test_data_prepared_from_a_folder_is_found_again_without_it(home, monkeypatch):
    """01 runs with ``-p data_dir DIR`` (here relative, with a trailing slash); the notebooks
    after it leave data_dir empty and must find the same prepared splits."""
    monkeypatch.chdir(home)
    small = {"val_size": 8, "test_size": 10}
    first = data.prepare_data(config.get_data_config("full", data_dir="bge-m3-data/", **small))
    later = config.get_data_config("full", **small)
    assert later.data_dir == str(home / "bge-m3-data")
    assert data.data_config_hash(later) == first.manifest["config_hash"]
    exp = config.get_experiment("minimind27_10k", "full")
    assert exp.data.data_dir == str(home / "bge-m3-data")
    monkeypatch.chdir("/")  # another working directory: the same folder
    assert config.get_data_config("full").data_dir == str(home / "bge-m3-data")
    # a folder given later is the one used, and remembered
    other = home / "other-copy"
    (home / "bge-m3-data").rename(other)
    data.prepare_data(config.get_data_config("full", data_dir=str(other), **small))
    assert config.get_data_config("full").data_dir == str(other)


def test_the_full_tokenizer_says_which_parameter_to_set_when_the_hub_is_out_of_reach(
        tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as err:
        data.tokenizer_for_preset("full", None, tmp_path)
    assert "`-p tokenizer_name DIR`" in str(err.value) and "HF_ENDPOINT" in str(err.value)
    write_minimind_v1(tmp_path / "local")  # a local folder is used as it is
    tok = data.tokenizer_for_preset("full", None, tmp_path, str(tmp_path / "local"))
    assert tok("长江")["input_ids"]


def test_missing_files_are_named_before_anything_is_downloaded(home):
    folder = home / "incomplete"
    write_minimind_v1(folder)
    (folder / "tokenizer.json").unlink()
    (folder / "pytorch_model.bin").unlink()
    problems = check_base_model(str(folder), hub_id="jingyaogong/minimind-v1-small")
    assert [p.split(";")[0] for p in problems] == [
        f"{folder}: no weights (model.safetensors or pytorch_model.bin)",
        f"{folder}: no tokenizer (one of tokenizer.json, tokenizer.model, vocab.json, "
        f"vocab.txt, sentencepiece.bpe.model)"]
    assert all("huggingface-cli download jingyaogong/minimind-v1-small --local-dir "
               f"{folder}" in p for p in problems)
    # a checkpoint whose model type exists only in its own code needs the user's consent
    custom = home / "custom"
    write_qwen2(custom)
    cfg = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps(
        {**cfg, "model_type": "my_model", "auto_map": {"AutoModel": "modeling_my.MyModel"}}))
    assert "trust_remote_code=True" in check_base_model(str(custom))[0]
    assert check_base_model(str(custom), trust_remote_code=True) == []
    # the data check names near misses, and nothing was prepared
    (home / "bge-m3-data" / "DuReader" / "dureader_len-0-500.jsonl").rename(
        home / "bge-m3-data" / "DuReader" / "du_reader_len-0-500.jsonl")
    exp = _full("minimind27_10k", home, folder)
    with pytest.raises(course.MissingInputsError) as err:
        course.check_full_inputs(exp)
    message = str(err.value)
    assert "no weights" in message and "no tokenizer" in message
    assert "dureader (pattern *dureader*_len-*.jsonl): no file name contains 'dureader'" in \
        message
    assert not (home / "data_cache").exists()


def test_every_full_unfreezing_schedule_completes():
    """Each full expansion: K + 1 stages over the run's real steps, every new layer trains,
    and the last stage (all new layers) gets a full share of the steps."""
    for name in EXPANSIONS:
        exp = config.get_experiment(name, "full")
        k = exp.model.num_new_layers
        spe = steps_per_epoch(exp.train_size, exp.training)
        total = spe * exp.training.epochs
        new = new_layer_positions(exp.model.num_hidden_layers, k, "top")
        plan = UnfreezeSchedule(new, exp.model.unfreeze_every).plan(total, spe)
        stages = plan.stages()
        assert len(stages) == k + 1 and stages[-1]["trainable_new_layers"] == new
        assert sum(s["steps"] for s in stages) == total
        assert min(s["steps"] for s in stages) >= total // (k + 1)
        # the report's fixed "every 2 epochs" could not complete for two of the three
        reaches = k * 2 < exp.training.epochs
        assert reaches == (name == "minimind38_96k")


def test_the_plan_before_training_has_steps_tokens_memory_and_hours():
    exp = config.get_experiment("minimind27_10k", "full")
    plan = memory.training_plan(exp.model, exp.training, exp.train_size)
    # 10,000 records, batch 32, length groups of 512: 19·16 + 272 // 32 = 312 steps an epoch
    assert (plan["steps_per_epoch"], plan["total_steps"]) == (312, 312 * 5)
    assert plan["tokens_per_step"] == 32 * 64 + 32 * 4 * 512
    t4, a100 = plan["gpus"]["T4 (16 GB, Colab)"], plan["gpus"]["A100 (40 GB, Colab)"]
    # the step needs checkpointing on the T4 (14.7 GiB + context > 15) and not on the A100, so
    # the T4 also repeats the forward: 8 instead of 6 FLOPs per parameter and token
    assert (t4["gradient_checkpointing"], a100["gradient_checkpointing"]) == (True, False)
    assert t4["grad_cache_chunk_size"] == a100["grad_cache_chunk_size"] == 0
    assert t4["hours"] / a100["hours"] == pytest.approx(312 / 65 * 8 / 6)
    assert plan["memory_gib"]["checkpointing"] < plan["memory_gib"]["plain"]


def test_compared_runs_say_what_else_differs():
    exps = {s: config.get_experiment(f"minimind108_{s}", "full") for s in ("10k", "96k", "288k")}
    table = course.run_differences(exps, ("subset", "train_records"))
    assert list(table.loc["training.epochs"])[1:] == [5, 3, 2]
    assert list(table.loc["optimizer_steps"])[1:] == [625 * 5, 6000 * 3, 18000 * 2]
    note = course.differences_note(table, "训练数据量")
    assert "training.epochs（5 / 3 / 2）" in note and "3,125 / 18,000 / 36,000" in note
    pair = {"108M": config.get_experiment("minimind108_288k", "full"),
            "186M": config.get_experiment("minimind186_288k", "full")}
    table = course.run_differences(pair, ("model.num_new_layers",))
    assert bool(table.loc["training.gradient_checkpointing", "intended"])  # same maths
    assert "gradient_checkpointing" not in course.differences_note(table, "新增层数")


def test_auto_refuses_to_drop_the_full_inputs_it_was_given(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    given = {"preset": "auto", "project_home": "", "data_dir": "/data/bge-m3-data",
             "model_path": ""}
    with pytest.raises(ValueError) as err:
        course.start_experiments(["minimind27_10k"], given)
    assert "data_dir='/data/bge-m3-data'" in str(err.value) and "model_path" not in str(
        err.value) and "`-p preset full`" in str(err.value)
    # without them auto still chooses the demo, and an explicit demo is what was asked for
    assert course.start_experiments(["minimind27_10k"], {**given, "data_dir": ""})[0] == "demo"
    assert course.start_experiments(["minimind27_10k"], {**given, "preset": "demo"})[0] == "demo"


def test_an_unreachable_hub_id_fails_at_once_without_retrying_downloads(monkeypatch):
    """Offline, each download retries for ~25 s: a hub id that is neither cached nor reachable
    is refused after one probe, with the way to supply it."""
    import huggingface_hub

    from retrieval_lib.models import checkpoints

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(checkpoints, "hub_has", lambda repo, kind: False)
    with pytest.raises(OSError, match="not in the Hugging Face cache and the hub is not "
                                      "reachable; download it"):
        checkpoints.checkpoint_shape("jingyaogong/minimind-v1-small")


def test_the_bf16_hint_names_a_setting_that_exists(monkeypatch):
    import inspect

    import torch

    from retrieval_lib.models import base

    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: True)
    precision, why = base.choose_precision(torch.device("cpu"))
    assert precision == "fp32" and "--precision bf16" in why and "precision='bf16'" in why
    # what it names exists: the command line's choices and run_experiment's keyword
    assert "bf16" in base.PRECISIONS
    _, options = experiment.parse_command_line(["--experiment", "minimind27_10k", "--preset",
                                                "demo", "--precision", "bf16"])
    assert options.precision == "bf16"
    assert "precision" in inspect.signature(course.run_experiment).parameters
