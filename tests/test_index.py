"""The faiss passage index: exactness, approximate recall, save/load with the id mapping."""

import json

import numpy as np
import pytest

from retrieval_lib.evaluation import exact_search
from retrieval_lib.serving import PassageIndex, recall_against_exact
from retrieval_lib.settings import CheckpointError


def _unit(rows, dim, seed):
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def corpus():
    return _unit(3000, 32, 0), [f"doc-{i}" for i in range(3000)], _unit(50, 32, 1)


def test_flat_index_is_exact_and_maps_ids(corpus):
    passages, ids, queries = corpus
    hits, scores = PassageIndex.build(passages, ids).search(queries, 5)
    ref_scores, ref_rows = exact_search(queries, passages, 5)
    assert hits == [[ids[j] for j in row] for row in ref_rows]
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    # by hand for the first query: the 5 largest dot products
    top = np.argsort(-(passages @ queries[0]))[:5]
    assert hits[0] == [ids[j] for j in top]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(corpus, kind, tmp_path):
    passages, ids, queries = corpus
    index = PassageIndex.build(passages, ids, kind=kind)
    before = index.search(queries, 10)
    loaded = PassageIndex.load(index.save(tmp_path / kind))
    after = loaded.search(queries, 10)
    assert (loaded.kind, loaded.settings, len(loaded)) == (kind, index.settings, 3000)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])


def test_approximate_indexes_report_recall_against_exact(corpus):
    passages, ids, queries = corpus
    exact = PassageIndex.build(passages, ids)
    hnsw = PassageIndex.build(passages, ids, kind="hnsw")
    assert 0.9 <= recall_against_exact(hnsw, exact, queries, 10) <= 1.0
    coarse = PassageIndex.build(passages, ids, kind="ivf", nlist=32, nprobe=1)
    full_probe = PassageIndex.build(passages, ids, kind="ivf", nlist=32, nprobe=32)
    assert recall_against_exact(full_probe, exact, queries, 10) == 1.0  # every cell searched
    assert recall_against_exact(coarse, exact, queries, 10) < 1.0


def test_bad_input_and_damaged_files_are_named(corpus, tmp_path):
    passages, ids, _ = corpus
    with pytest.raises(ValueError, match="2999 ids for 3000 embeddings"):
        PassageIndex.build(passages, ids[:-1])
    with pytest.raises(ValueError, match="must be unique; 1 repeat"):
        PassageIndex.build(passages[:3], ["a", "b", "a"])
    broken = passages[:4].copy()
    broken[2, 0] = np.nan
    with pytest.raises(ValueError, match="embeddings row 2 holds NaN"):
        PassageIndex.build(broken, list("abcd"))
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        PassageIndex.build(passages, ids, kind="lsh")
    folder = PassageIndex.build(passages[:10], ids[:10]).save(tmp_path / "idx")
    meta = json.loads((folder / "ids.json").read_text())
    meta["ids"] = meta["ids"][:9]
    (folder / "ids.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"ids.json: \d+ bytes, checksums.json says"):
        PassageIndex.load(folder)
    (folder / "checksums.json").unlink()  # an index saved before checksums: counts still checked
    with pytest.raises(ValueError, match=r"ids.json: 9 ids \(count 10\) for an index of 10"):
        PassageIndex.load(folder)
    (folder / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss is missing"):
        PassageIndex.load(folder)


def test_an_index_folder_without_count_or_with_a_cut_index_file_is_named(tmp_path):
    rng = np.random.default_rng(0)
    PassageIndex.build(rng.normal(size=(4, 3)).astype("float32"), list("abcd")).save(
        tmp_path / "idx")
    (tmp_path / "idx" / "checksums.json").unlink()  # an older index: nothing to check against
    meta_path = tmp_path / "idx" / "ids.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "count"}))
    with pytest.warns(UserWarning, match="no checksums.json"):
        with pytest.raises(ValueError, match=rf"{meta_path}: no field count: not written by "
                                             rf"PassageIndex.save"):
            PassageIndex.load(tmp_path / "idx")
    meta_path.write_text(json.dumps(meta))
    faiss_file = tmp_path / "idx" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:40])
    with pytest.warns(UserWarning, match="no checksums.json"):
        with pytest.raises(ValueError, match=rf"{faiss_file}: not a readable faiss index"):
            PassageIndex.load(tmp_path / "idx")
