"""Published MiniMind checkpoints load as a standard LlamaModel that computes what the
published architectures compute (checked against independent reference forwards)."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from published_formats import (
    minimind2_reference,
    v1_reference,
    write_minimind2,
    write_minimind_v1,
    write_qwen2,
)

from retrieval_lib import models
from retrieval_lib.models import DualTowerRetriever, minimind, minimind_scripts
from retrieval_lib.settings import config

TEXTS = ["长江流域今年的降水", "国家足球队在主场赢得了比赛，球迷们欢呼", "新",
         "音乐会在北京的剧院举行"]


def _max_error(encoder, tokenizer, reference) -> float:
    """Largest |converted - reference| over the real tokens of a padded batch."""
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding
    with torch.no_grad():
        # the two inputs by name: transformers 4.x tokenizers also return token_type_ids
        hidden = encoder(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    worst = 0.0
    for row, ids in enumerate(tokenizer(TEXTS)["input_ids"]):
        expected = reference(ids)
        worst = max(worst, (hidden[row, : len(ids)] - expected).abs().max().item())
    return worst


def _converted(folder, tmp_path):
    path, report = models.resolve_base_model(str(folder), cache_dir=tmp_path / "converted")
    return models.load_encoder(path).eval(), path, report


def test_minimind_v1_converts_to_a_llama_model_equal_to_the_reference(tmp_path):
    made = write_minimind_v1(tmp_path / "v1")
    encoder, path, report = _converted(tmp_path / "v1", tmp_path)
    tok = models.DualTowerRetriever(encoder, _tok(path)).tokenizer
    assert type(encoder).__name__ == "LlamaModel"
    assert report["format"] == "minimind-v1" and report["q_k_rows_permuted"]
    assert (report["rope_theta"], report["rms_norm_eps"]) == (1e4, 1e-5)
    assert not report["checkpoint_code_run"] and "pytorch_model.bin" in report["source_files"]
    assert encoder.config.intermediate_size == made["hidden"] == 192  # 2/3·4·64 -> 64s
    error = _max_error(encoder, tok, lambda ids: v1_reference(made["state"], made["config"],
                                                                   ids))
    assert error < 1e-5


def _tok(path):
    from retrieval_lib.data import load_pretrained_tokenizer

    return load_pretrained_tokenizer(path)


def test_v1_without_the_permutation_or_with_another_theta_is_wrong(tmp_path):
    """The two facts the conversion rests on: measured errors when either is dropped."""
    made = write_minimind_v1(tmp_path / "v1")
    cfg = minimind.llama_config(made["config"], minimind.MINIMIND_V1)
    tok = _tok(str(tmp_path / "v1"))
    tok.pad_token = tok.eos_token
    errors = {}
    for label, permute, theta in (("right", True, 1e4), ("unpermuted", False, 1e4),
                                  ("theta 1e6", True, 1e6)):
        from transformers import LlamaModel

        c = minimind.llama_config(made["config"], minimind.MINIMIND_V1)
        c.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        c.rope_theta = theta
        model = LlamaModel(c).eval()
        model.load_state_dict(minimind.convert_state_dict(made["state"], "minimind-v1", cfg,
                                                          permute=permute), strict=False)
        errors[label] = _max_error(model, tok, lambda ids: v1_reference(
            made["state"], made["config"], ids))
    print("conversion errors", errors)
    assert errors["right"] < 1e-5
    assert errors["unpermuted"] > 1e-2 and errors["theta 1e6"] > 1e-3, errors


@pytest.mark.parametrize("llama_format", [False, True], ids=["custom-code", "llama"])
def test_minimind2_both_formats_equal_the_reference(tmp_path, llama_format):
    made = write_minimind2(tmp_path / "m2", llama_format=llama_format)
    encoder, path, report = _converted(tmp_path / "m2", tmp_path)
    assert type(encoder).__name__ == "LlamaModel"
    assert (report is None) == llama_format  # the Llama format loads as it is
    if report:
        assert report["format"] == "minimind2" and not report["q_k_rows_permuted"]
        assert report["rope_theta"] == 1e6
    error = _max_error(encoder, _tok(path), lambda ids: minimind2_reference(
        made["state"], made["config"], ids))
    assert error < 1e-5


def test_conversion_is_cached_and_never_runs_the_checkpoint_code(tmp_path):
    write_minimind_v1(tmp_path / "v1")
    first, _ = models.resolve_base_model(str(tmp_path / "v1"), tmp_path / "c")
    stamp = (tmp_path / "c").joinpath(first.split("/")[-1], "model.safetensors").stat()
    again, _ = models.resolve_base_model(str(tmp_path / "v1"), tmp_path / "c")
    assert again == first
    assert (tmp_path / "c" / first.split("/")[-1] / "model.safetensors").stat() == stamp
    # trust_remote_code=True changes nothing: the trap in model.py would raise if imported
    models.load_encoder(first, trust_remote_code=True)



def _weights_of(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def test_the_conversion_cache_cannot_serve_a_stale_or_damaged_conversion(tmp_path):
    source, cache = tmp_path / "v1", tmp_path / "c"
    write_minimind_v1(source, seed=0)
    first, _ = models.resolve_base_model(str(source), cache)
    # other weights of equal size and modification time: another conversion
    stamps = {f: f.stat() for f in source.iterdir()}
    write_minimind_v1(source, seed=1)
    for f, stamp in stamps.items():
        os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert f.stat().st_size == stamp.st_size
    other, _ = models.resolve_base_model(str(source), cache)
    assert other != first
    a, b = _weights_of(first), _weights_of(other)
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"],
                           b["layers.0.self_attn.q_proj.weight"])
    # a changed tokenizer in the source: another conversion, with that tokenizer
    tokenizer = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "pad_token": "</s>"}))
    retokenized, _ = models.resolve_base_model(str(source), cache)
    assert retokenized != other
    assert json.loads((Path(retokenized) / "tokenizer_config.json").read_text())[
        "pad_token"] == "</s>"
    # a cached conversion with a flipped byte is converted again, with a warning naming it
    weights = Path(retokenized) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"model.safetensors: checksum differs"):
        again, _ = models.resolve_base_model(str(source), cache)
    assert again == retokenized
    for name, tensor in _weights_of(again).items():
        assert torch.equal(tensor, b[name]), name


CONVERTER = """
import sys, time
from pathlib import Path
import safetensors.torch
from retrieval_lib import models

write = safetensors.torch.save_file

def slow_save(*args, **kwargs):  # widen the window in which two conversions overlap
    write(*args, **kwargs)
    time.sleep(1.5)

safetensors.torch.save_file = slow_save
print("ready", flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.02)
path, _ = models.resolve_base_model(sys.argv[1], sys.argv[2])
models.load_encoder(path)
print(path)
"""


def test_two_processes_converting_at_once_each_use_a_folder_of_their_own(tmp_path):
    """Two notebooks converting the same checkpoint at once both succeed (one shared
    temporary folder made one of them crash); a dead process's unfinished folder is removed."""
    import subprocess
    import sys

    source, cache, go = tmp_path / "v1", tmp_path / "c", tmp_path / "go"
    write_minimind_v1(source)
    name = f"v1-{minimind._source_fingerprint(source)}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (cache / f".tmp-{name}-{dead}").mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", CONVERTER, str(source), str(cache), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(cache / name)}
    assert [p.name for p in cache.iterdir()] == [name]


def test_a_tokenizer_missing_from_the_source_is_named_against_the_source(tmp_path):
    from retrieval_lib.data import load_pretrained_tokenizer

    write_minimind_v1(tmp_path / "v1")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "v1" / name).unlink()
    path, _ = models.resolve_base_model(str(tmp_path / "v1"), tmp_path / "c")
    with pytest.raises(OSError, match=rf"cannot load the tokenizer of {tmp_path / 'v1'}: that "
                                      rf"folder holds no tokenizer file"):
        load_pretrained_tokenizer(path)

def test_broken_checkpoints_name_the_file_and_the_fault(tmp_path):
    made = write_minimind_v1(tmp_path / "v1")
    state = dict(made["state"])
    del state["layers.1.feed_forward.w2.weight"]
    torch.save(state, tmp_path / "v1" / "pytorch_model.bin")
    with pytest.raises(minimind.ConversionError, match=r"pytorch_model.bin.*layers.1.mlp"):
        models.resolve_base_model(str(tmp_path / "v1"), tmp_path / "c")
    (tmp_path / "v1" / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(minimind.ConversionError, match="pytorch_model.bin: cannot be read"):
        models.resolve_base_model(str(tmp_path / "v1"), tmp_path / "c")
    moe = json.loads((tmp_path / "v1" / "config.json").read_text())
    (tmp_path / "v1" / "config.json").write_text(json.dumps({**moe, "use_moe": True}))
    with pytest.raises(minimind.ConversionError, match="use_moe"):
        models.resolve_base_model(str(tmp_path / "v1"), tmp_path / "c")


@pytest.mark.parametrize("writer,pooling", [(write_minimind_v1, "mean"),
                                            (write_minimind2, "mean"),
                                            (write_qwen2, "last_token")],
                         ids=["minimind-v1", "minimind2", "qwen2"])
def test_published_tokenizer_pads_both_towers(tmp_path, writer, pooling):
    """No pad token in the published MiniMind tokenizer: the retriever pads with EOS, masks
    the padding, and a text's embedding does not depend on its batch."""
    writer(tmp_path / "m")
    cfg = config.ModelConfig(name="m", base_model=str(tmp_path / "m"), architecture="llama",
                             hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=192, vocab_size=300,
                             pooling=pooling, projection_dim=8, max_passage_length=16)
    import os

    os.environ["RETRIEVAL_HOME"] = str(tmp_path)
    try:
        model = DualTowerRetriever.from_config(cfg).eval()
    finally:
        del os.environ["RETRIEVAL_HOME"]
    tok = model.tokenizer
    assert tok.pad_token is not None
    batch = model.tokenize(TEXTS, "passage")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() <= 16 and lengths.min() < lengths.max()
    for tower in ("query", "passage"):
        together = model._encode(TEXTS, tower, batch_size=4, show_progress=False)
        alone = model._encode(TEXTS, tower, batch_size=1, show_progress=False)
        assert abs(together - alone).max() < 1e-5


def test_configs_carry_the_checkpoints_theta_and_epsilon(tmp_path):
    """The real and the demo shapes build with the published RoPE base and RMSNorm epsilon."""
    made = write_minimind_v1(tmp_path / "v1")
    converted = minimind.llama_config(made["config"], minimind.MINIMIND_V1)
    for name in ("minimind27_10k", "minimind186_288k"):
        for preset in ("full", "demo"):
            hf = models.hf_config_from_shape(config.get_experiment(name, preset).model)
            assert minimind.rope_theta_of(hf) == minimind.rope_theta_of(converted) == 1e4
            assert hf.rms_norm_eps == converted.rms_norm_eps == 1e-5
            assert hf.max_position_embeddings == 512
    for preset in ("full", "demo"):
        hf = models.hf_config_from_shape(config.get_experiment("qwen2_613_288k", preset).model)
        assert (minimind.rope_theta_of(hf), hf.rms_norm_eps) == (1e6, 1e-6)


def test_a_bf16_saved_checkpoint_trains_with_float32_master_weights(tmp_path):
    """Qwen2-0.5B is published in bf16 and transformers 5 loads checkpoints in their saved
    dtype; the retriever must still get float32 weights (its projection is float32, and AdamW
    on bf16 weights would round small updates away) and encode end to end."""
    import json as _json

    write_qwen2(tmp_path / "q")
    cfg = _json.loads((tmp_path / "q" / "config.json").read_text())
    from transformers import AutoModel

    AutoModel.from_pretrained(str(tmp_path / "q"), **models.dtype_kwarg(torch.bfloat16)
                              ).save_pretrained(str(tmp_path / "bf16"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((tmp_path / "q" / name).read_bytes())
    saved = _json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "bfloat16" in (str(saved.get("dtype")), str(saved.get("torch_dtype")))
    mcfg = config.ModelConfig(name="q", base_model=str(tmp_path / "bf16"), architecture="qwen2",
                              hidden_size=cfg["hidden_size"], num_hidden_layers=2,
                              num_attention_heads=7, num_key_value_heads=1,
                              intermediate_size=152, vocab_size=cfg["vocab_size"],
                              pooling="last_token", projection_dim=8)
    model = DualTowerRetriever.from_config(mcfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    vectors = model.encode_queries(TEXTS)
    assert vectors.shape == (len(TEXTS), 8)


@pytest.mark.parametrize("release", ["v1-2024", "v1-2025", "minimind2"])
def test_training_script_state_dicts_load_with_their_releases_config(tmp_path, release):
    """``out/pretrain_512.pth`` as MiniMind's scripts save it (tensors only, in half precision,
    ``torch.compile`` prefixes possible), the tokenizer in the repository's ``model/``: read
    with the config of the release whose tensors it has, equal to that release's forward."""
    from published_formats import _v1_state, _v2_state, write_tokenizer

    repo = tmp_path / "minimind"
    vocab = write_tokenizer(repo / "model")
    if release == "minimind2":
        cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
               "num_key_value_heads": 2, "vocab_size": vocab, "intermediate_size": 192,
               "rope_theta": 1e6, "rms_norm_eps": 1e-5}
        state = _v2_state(cfg, seed=3)
        reference = lambda ids: minimind2_reference(state, cfg, ids)  # noqa: E731
    else:
        heads, kv, theta = (16, 8, 1e4) if release == "v1-2024" else (8, 2, 1e6)
        cfg = {"dim": 64, "n_layers": 2, "n_heads": heads, "n_kv_heads": kv, "norm_eps": 1e-5}
        state = _v1_state(64, 2, heads, kv, vocab, 192, seed=3)
        reference = lambda ids: v1_reference(state, cfg, ids, theta=theta)  # noqa: E731
    half = {f"_orig_mod.{k}": v.half() for k, v in state.items()}
    state = {k.removeprefix("_orig_mod."): v.half().float() for k, v in half.items()}
    (repo / "out").mkdir()
    pth = repo / "out" / "pretrain_64.pth"
    torch.save(half, pth)
    assert models.check_base_model(str(pth)) == []
    encoder, path, report = _converted(pth, tmp_path)
    assert report["state_dict_file"] == str(pth.resolve())
    assert report["release_assumed"].startswith(
        {"v1-2024": "v1 (2024", "v1-2025": "v1 layout (2025", "minimind2": "MiniMind2"}[release])
    tok = models.DualTowerRetriever(encoder, _tok(path)).tokenizer
    assert _max_error(encoder, tok, reference) < 1e-5


def test_state_dicts_that_fit_no_release_are_refused_with_what_they_are(tmp_path):
    from published_formats import _v1_state, write_tokenizer

    vocab = write_tokenizer(tmp_path)
    torch.save(_v1_state(64, 2, 4, 4, vocab, 192, seed=0), tmp_path / "odd.pth")  # MHA: 1:1
    problems = models.check_base_model(str(tmp_path / "odd.pth"))
    assert len(problems) == 1 and "a minimind-v1 state dict (width 64, 2 layers)" in \
        problems[0] and "config.json it was trained with" in problems[0]
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert "neither MiniMind v1 keys" in models.check_base_model(str(tmp_path / "other.pth"))[0]
    (tmp_path / "notes.txt").write_text("x")
    assert "is a file, not a model folder" in models.check_base_model(
        str(tmp_path / "notes.txt"))[0]
    no_tok = tmp_path / "bare"
    no_tok.mkdir()
    torch.save(_v1_state(64, 2, 16, 8, vocab, 192, seed=0), no_tok / "pretrain_64.pth")
    assert "no tokenizer.json next to it" in models.check_base_model(
        str(no_tok / "pretrain_64.pth"))[0]


def test_a_staged_state_dict_is_read_once(tmp_path, monkeypatch):
    """The input check, the shape and the conversion all stage the same ``.pth``: only the
    first reads the (large) file; a changed file is read again."""
    from published_formats import _v1_state, write_tokenizer

    vocab = write_tokenizer(tmp_path)
    torch.save(_v1_state(64, 2, 16, 8, vocab, 192, seed=0), tmp_path / "pretrain_64.pth")
    first = minimind_scripts.stage_training_file(tmp_path / "pretrain_64.pth", tmp_path / "c")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert minimind_scripts.stage_training_file(tmp_path / "pretrain_64.pth",
                                                tmp_path / "c") == first
    assert loads == []
    torch.save(_v1_state(64, 2, 8, 2, vocab, 192, seed=0), tmp_path / "pretrain_64.pth")
    again = minimind_scripts.stage_training_file(tmp_path / "pretrain_64.pth", tmp_path / "c")
    assert len(loads) == 1 and again[1].startswith("v1 layout (2025")


@pytest.mark.parametrize("writer, field, value, says", [
    ("v1", "n_heads", 0, "n_heads is 0; it must be from 1 to 1024"),
    ("v1", "dim", "512", "dim is '512' (str); it must be a whole number"),
    ("v1", "dim", -64, "dim is -64; it must be from 1 to 65536"),
    ("v1", "n_layers", 10 ** 8, "n_layers is 100000000; it must be from 1 to 1024"),
    ("v1", "n_kv_heads", 3, "n_heads 4 is not divisible by n_kv_heads 3"),
    ("v1", "dim", 68, "a head is 68 / 4 = 17 wide, an odd number"),
    ("v1", "dim", 66, "dim 66 is not divisible by n_heads 4"),
    ("v1", "norm_eps", -1e-5, "norm_eps is -1e-05; it must be a positive number"),
    ("v2", "num_attention_heads", 0, "num_attention_heads is 0"),
    ("v2", "num_key_value_heads", 3, "num_attention_heads 4 is not divisible by "
                                     "num_key_value_heads 3"),
    ("v2", "vocab_size", 1.5, "vocab_size is 1.5 (float)"),
    ("qwen2", "num_hidden_layers", 10 ** 8, "num_hidden_layers is 100000000"),
    ("qwen2", "hidden_size", 63, "a head is 63 / 7 = 9 wide, an odd number"),
])
def test_a_published_config_with_a_bad_shape_is_named_before_anything_is_allocated(
        tmp_path, monkeypatch, writer, field, value, says):
    folder = tmp_path / writer
    {"v1": write_minimind_v1, "v2": write_minimind2, "qwen2": write_qwen2}[writer](folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))

    def no_allocation(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    import transformers
    monkeypatch.setattr(transformers.LlamaModel, "__init__", no_allocation)
    problems = models.check_base_model(str(folder))
    assert len(problems) == 1 and problems[0].startswith(f"{folder}/config.json: {says}")
    if writer != "qwen2":  # the conversion itself refuses the same way
        with pytest.raises(models.ConversionError, match=re.escape(f"config.json: {says}")):
            models.convert_checkpoint(folder, tmp_path / "cache")


def test_a_cut_config_json_is_named_by_check_base_model(tmp_path):
    write_minimind_v1(tmp_path / "m")
    text = (tmp_path / "m" / "config.json").read_text()
    (tmp_path / "m" / "config.json").write_text(text[: len(text) // 2])
    (problem,) = models.check_base_model(str(tmp_path / "m"))
    assert problem.startswith(f"{tmp_path / 'm' / 'config.json'}: not valid JSON (")
    assert "cut or edited" in problem
