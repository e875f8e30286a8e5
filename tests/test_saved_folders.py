"""Saved folders (retrievers, sentence-transformers exports, faiss indexes, run folders) are
written whole or not at all, carry checksums that loading verifies, and a broken one is named
(file and fault) without stopping the others from loading."""

import json
import struct

import numpy as np
import pytest
import toy

from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.results import runs
from retrieval_lib.serving import PassageIndex, export_sentence_transformer
from retrieval_lib.settings import CheckpointError, saved_folder

TEXTS = ["长江新闻", "足球与音乐。今天本报记者报道了有关情况"]


@pytest.fixture(scope="module")
def tok():
    return toy.toy_tokenizer()


def _listing(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def _fail_after_first_file(monkeypatch, owner, name):
    """Make ``owner.name`` (a writer) write its first file, then fail as a full disk would."""
    original = getattr(owner, name)

    def failing(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(owner, name, failing)


def test_a_save_that_fails_part_way_leaves_the_previous_retriever(tok, tmp_path, monkeypatch):
    old, new = toy.toy_model(tok, seed=0), toy.toy_model(tok, seed=1)
    old.save(tmp_path / "r")
    before = _listing(tmp_path / "r")
    _fail_after_first_file(monkeypatch, DualTowerRetriever, "_write")
    with pytest.raises(OSError, match="No space left"):
        new.save(tmp_path / "r")
    assert _listing(tmp_path / "r") == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary folder left over
    loaded = DualTowerRetriever.load(tmp_path / "r")
    assert np.array_equal(loaded.encode_passages(TEXTS), old.encode_passages(TEXTS))


def test_a_reexport_that_fails_part_way_leaves_the_previous_export(tok, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    old, new = toy.toy_model(tok, seed=0), toy.toy_model(tok, seed=1)
    export_sentence_transformer(old, tmp_path / "st")
    before = _listing(tmp_path / "st")
    assert saved_folder.verify_checksums(tmp_path / "st")
    _fail_after_first_file(monkeypatch, SentenceTransformer, "save")
    with pytest.raises(OSError, match="No space left"):
        export_sentence_transformer(new, tmp_path / "st")
    assert _listing(tmp_path / "st") == before  # the old model, not a mix of the two


def test_an_index_save_that_fails_part_way_leaves_the_previous_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    old = PassageIndex.build(rng.normal(size=(5, 4)), list("abcde"))
    old.save(tmp_path / "idx")
    before = _listing(tmp_path / "idx")

    def full_disk(*args, **kwargs):  # the ids are written after the vectors
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dumps", full_disk)
    with pytest.raises(OSError):
        PassageIndex.build(rng.normal(size=(3, 4)), list("xyz")).save(tmp_path / "idx")
    assert _listing(tmp_path / "idx") == before


def _savers(tok):
    """Every save that replaces a folder, as ``name -> save(path, overwrite)``."""
    from test_reranker import _tiny

    from retrieval_lib.serving import export, onnx_runtime

    model, reranker = toy.toy_model(tok), _tiny(tok, max_length=24)
    index = PassageIndex.build(np.random.default_rng(0).normal(size=(3, 4)), list("abc"))
    return {
        "retriever": lambda p, o: model.save(p, overwrite=o),
        "reranker": lambda p, o: reranker.save(p, overwrite=o),
        "index": lambda p, o: index.save(p, overwrite=o),
        "sentence-transformers": lambda p, o: export.export_sentence_transformer(model, p, o),
        "cross-encoder": lambda p, o: export.export_cross_encoder(reranker, p, o),
        "onnx retriever": lambda p, o: onnx_runtime.export_retriever_onnx(model, p,
                                                                          overwrite=o),
        "onnx reranker": lambda p, o: onnx_runtime.export_reranker_onnx(reranker, p,
                                                                        overwrite=o),
    }


@pytest.mark.parametrize("kind", ["retriever", "reranker", "index", "sentence-transformers",
                                  "cross-encoder", "onnx retriever", "onnx reranker"])
def test_a_save_never_deletes_what_it_does_not_own(tok, tmp_path, kind):
    """Given a run folder (or any folder of other files) instead of a folder of its own, a
    save refuses before writing, names the folder and what it holds, and deletes nothing; it
    replaces an earlier save of its own kind, and anything when asked to overwrite."""
    save = _savers(tok)[kind]
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    for name in ("history.json", "metrics.json", "notes.txt"):
        (run / name).write_text("{}")
    before = _listing(run)
    with pytest.raises(FileExistsError, match=rf"{run}.* holds 4 entries \(checkpoints, "
                                              rf"history.json, metrics.json, notes.txt\)"):
        save(run, False)
    assert _listing(run) == before and not list(tmp_path.glob(".tmp-*"))
    save(tmp_path / "own", False)  # a new folder, then its own earlier save: replaced
    save(tmp_path / "own", False)
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", False)  # an empty folder is nobody's
    save(run, True)  # asked for: the folder is replaced whole
    assert not (run / "history.json").exists()


def _flip_exponent_bit(path, offset_from_end=64):
    """Flip the top exponent bit of a float32 near the end of a safetensors file (its data)."""
    data = bytearray(path.read_bytes())
    i = len(data) - offset_from_end
    value = struct.unpack_from("<f", data, i)[0]
    data[i + 3] ^= 0x40  # bit 30: the highest exponent bit
    path.write_bytes(bytes(data))
    return value, struct.unpack_from("<f", data, i)[0]


def test_a_flipped_bit_in_a_saved_retriever_is_refused_by_name(tok, tmp_path):
    toy.toy_model(tok).save(tmp_path / "r")
    weights = next((tmp_path / "r" / "encoder").glob("*.safetensors"))
    before, after = _flip_exponent_bit(weights)
    assert abs(after) > 1e30 or abs(after) < 1e-30, (before, after)  # a wild weight
    with pytest.raises(CheckpointError, match=f"{weights.name}: checksum differs"):
        DualTowerRetriever.load(tmp_path / "r")


def test_a_truncated_head_is_refused_by_name(tok, tmp_path):
    toy.toy_model(tok).save(tmp_path / "r")
    head = tmp_path / "r" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"head\.safetensors: \d+ bytes, checksums\.json "
                                              r"says \d+ \(truncated"):
        DualTowerRetriever.load(tmp_path / "r")


def test_a_folder_saved_before_checksums_still_loads(tok, tmp_path):
    model = toy.toy_model(tok)
    model.save(tmp_path / "r")
    (tmp_path / "r" / saved_folder.CHECKSUMS).unlink()
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'r'} has no checksums.json: its files "
                                         rf"load unchecked"):  # a documented choice, said aloud
        loaded = DualTowerRetriever.load(tmp_path / "r")
    assert np.array_equal(loaded.encode_queries(TEXTS), model.encode_queries(TEXTS))


def test_index_ids_must_be_unique_and_match_their_checksums(tmp_path):
    rng = np.random.default_rng(0)
    PassageIndex.build(rng.normal(size=(4, 3)), list("abcd")).save(tmp_path / "idx")
    meta_path = tmp_path / "idx" / "ids.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["ids"] = meta["ids"][1:] + meta["ids"][:1]  # shifted by one: the right count
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(CheckpointError, match="ids.json: checksum differs"):
        PassageIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / saved_folder.CHECKSUMS).unlink()  # no checksums: the ids still checked
    meta["ids"] = ["a", "b", "a", "d"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ValueError, match=r"must be unique; 1 repeat \(first: 'a'\)"):
        PassageIndex.load(tmp_path / "idx")


def _run_folder(root, name, test_value=1.0):
    block = {"per_query": {"ndcg@5": {"q1": test_value, "q2": 0.0}}}
    return runs.write_run(root / "runs" / "demo" / name,
                          {"name": name, "kind": "baseline", "title": name},
                          {"test": block}, {"wall_time_s": 1.0})


def test_one_broken_run_is_named_and_the_others_still_load(tmp_path):
    _run_folder(tmp_path, "bm25")
    broken = _run_folder(tmp_path, "bge_m3")
    text = (broken / "metrics.json").read_text(encoding="utf-8")
    (broken / "metrics.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.warns(RuntimeWarning, match=r"bge_m3.*metrics\.json: not valid JSON"):
        found = runs.collect_runs("demo", tmp_path)
    assert found["bm25"]["status"] == "done"
    assert found["bm25"]["test"]["aggregate"]["ndcg@5"]["mean"] == 0.5
    assert found["bge_m3"]["status"] == "broken"
    assert str(broken / "metrics.json") in found["bge_m3"]["reason"]


def test_a_run_with_an_incomplete_metrics_block_names_file_and_block(tmp_path):
    folder = _run_folder(tmp_path, "bm25")
    (folder / "metrics.json").write_text(json.dumps({"test": {"aggregate": {}}}),
                                         encoding="utf-8")
    with pytest.raises(runs.RunError, match=r"metrics\.json: block 'test' is incomplete "
                                            r"\(KeyError: 'per_query'\)"):
        runs.load_run(folder)


def test_run_files_are_written_by_rename_metrics_last(tmp_path, monkeypatch):
    order = []
    real_replace = runs.os.replace
    monkeypatch.setattr(runs.os, "replace",
                        lambda src, dst: (order.append(runs.Path(dst).name),
                                          real_replace(src, dst)))
    folder = _run_folder(tmp_path, "bm25")
    assert order == ["config.json", "env.json", "metrics.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "env.json",
                                                        "metrics.json"]


@pytest.fixture()
def base_folder(tok, tmp_path):
    """A local base-model folder as a user downloads one: weights, config, tokenizer."""
    model = toy.toy_model(tok)
    model.encoder.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("fault,expected", [
    ("cut weights", r"model\.safetensors: not a readable safetensors file \(.*\); cut or "
                    r"corrupt"),
    ("cut config", r"config\.json: not valid JSON \(.*\); cut or edited"),
])
def test_a_cut_file_of_a_base_model_folder_is_named(base_folder, fault, expected):
    from retrieval_lib.models import load_encoder

    name = "model.safetensors" if fault == "cut weights" else "config.json"
    path = base_folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError, match=expected):
        load_encoder(str(base_folder))


def test_a_missing_or_cut_tokenizer_is_named(base_folder):
    from retrieval_lib.data import load_pretrained_tokenizer

    tokenizer_json = base_folder / "tokenizer.json"
    text = tokenizer_json.read_text(encoding="utf-8")
    tokenizer_json.write_text(text[:100], encoding="utf-8")
    with pytest.raises(OSError, match=r"tokenizer\.json: not valid JSON"):
        load_pretrained_tokenizer(str(base_folder))
    tokenizer_json.unlink()
    with pytest.raises(OSError, match=r"holds tokenizer_config\.json; a fast tokenizer needs "
                                      r"tokenizer\.json"):
        load_pretrained_tokenizer(str(base_folder))
