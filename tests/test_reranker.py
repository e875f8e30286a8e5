"""The cross-encoder reranker: its loss, its scores, reranking a run, its exports, training."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from datasets import Dataset
from toy import toy_records

from retrieval_lib.data import tokenizer
from retrieval_lib.results import CrossEncoderReranker, listwise_loss, rerank_run, reranker
from retrieval_lib.serving import export
from retrieval_lib.settings import CheckpointError, config


def _tiny(tok, base=config.MINIMIND_27M, max_length=40, seed=0):
    cfg = replace(base, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok))
    return CrossEncoderReranker.from_base(cfg, tokenizer=tok, pretrained=False,
                                          max_length=max_length, seed=seed)


def _pairs(n=6):
    rows = toy_records(n, 3)
    return [r["query"] for r in rows], [r["positive_passages"][0]["text"] for r in rows]


def test_listwise_loss_and_gradient_match_a_hand_computation():
    scores = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.5]], requires_grad=True)
    loss = listwise_loss(scores)
    # by hand: -log(e^s0 / sum e^sj) per row, averaged over the rows
    rows = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.5]]
    expected = sum(math.log(sum(math.exp(s) for s in r)) - r[0] for r in rows) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # 0.86064
    assert expected == pytest.approx(0.86064, abs=1e-4)
    loss.backward()
    # d loss / d s_ij = (softmax_ij - [j == 0]) / rows
    for i, r in enumerate(rows):
        z = sum(math.exp(s) for s in r)
        for j, s in enumerate(r):
            assert scores.grad[i, j].item() == pytest.approx(
                (math.exp(s) / z - (j == 0)) / 2, abs=1e-6)


class _Scripted:
    """A reranker whose score of a pair is looked up in a table."""

    def __init__(self, table):
        self.table, self.pairs = table, 0

    def score(self, queries, passages, batch_size=32):
        self.pairs += len(passages)
        return np.array([self.table[p] for p in passages], dtype=np.float32)


def test_reranking_reorders_the_top_k_and_keeps_every_other_document_in_place():
    run = {"q0": {"a": 6.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 2.0, "f": 1.0},
           "q1": {"a": 1.0, "b": 2.0}}
    docs = {d: d for d in "abcdef"}
    scripted = _Scripted({"a": 0.1, "b": 0.9, "c": 0.5, "d": 99.0, "e": -5.0, "f": 0.0})
    new = rerank_run(scripted, {"q0": "x", "q1": "y"}, docs, run, top_k=3)
    order = sorted(new["q0"], key=new["q0"].get, reverse=True)
    # by hand: the top 3 (a, b, c) by the reranker: b 0.9, c 0.5, a 0.1; then d, e, f as before
    # (d's reranker score of 99 is never asked for: it is below the top 3)
    assert order == ["b", "c", "a", "d", "e", "f"]
    assert sorted(new["q1"], key=new["q1"].get, reverse=True) == ["b", "a"]
    assert scripted.pairs == 3 + 2
    for qid in run:
        assert set(new[qid]) == set(run[qid])  # nothing dropped, nothing added


def test_scores_equal_the_classifier_on_hand_built_input(tok):
    """query EOS passage EOS, the score read off the last token's state by the score head,
    equal alone and in a padded batch."""
    model = _tiny(tok, max_length=512)
    queries, passages = _pairs()
    scores = model.score(queries, passages, batch_size=4)
    eos = tok.eos_token_id
    clf = model.model.eval()
    for q, p, s in zip(queries, passages, scores, strict=True):
        ids = tok(q, add_special_tokens=False).input_ids + [eos]
        ids += tok(p, add_special_tokens=False).input_ids + [eos]
        with torch.no_grad():
            hidden = clf.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            direct = clf.score(hidden).item()
        assert s == pytest.approx(direct, abs=1e-5)


def test_long_pairs_are_cut_to_max_length(tok):
    model = _tiny(tok, max_length=20)
    enc = model.tokenize(["长江" * 30], ["黄河" * 60])
    assert enc["input_ids"].shape[1] == 20
    assert enc["input_ids"][0, -1].item() == tok.eos_token_id  # the end survives the cut


@pytest.mark.parametrize("base", [config.MINIMIND_27M, config.QWEN2_05B],
                         ids=["llama", "qwen2"])
def test_cross_encoder_export_scores_equal_the_library(tok, tmp_path, base):
    from sentence_transformers import CrossEncoder

    model = _tiny(tok, base, max_length=24)  # the toy passages exceed 24 tokens: cut
    queries, passages = _pairs(8)
    export.export_cross_encoder(model, tmp_path / "ce")
    loaded = CrossEncoder(str(tmp_path / "ce"))
    np.testing.assert_allclose(loaded.predict(list(zip(queries, passages, strict=True))),
                               model.score(queries, passages), atol=1e-5)
    assert json.loads((tmp_path / "ce" / "checksums.json").read_text())


@pytest.fixture(scope="module")
def published_miniature(tmp_path_factory):
    """A 2-layer XLMRobertaForSequenceClassification with one label and a tokenizer with
    XLM-R's specials and pair template (<s> A </s></s> B </s>), saved like
    BAAI/bge-reranker-v2-m3."""
    from tokenizers import processors
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    folder = tmp_path_factory.mktemp("bge-reranker-tiny")
    texts = [r["query"] for r in toy_records(40, 0)] + _pairs(40)[1]
    tok = tokenizer.train_bpe_tokenizer(texts, vocab_size=300)
    tok.add_special_tokens({"cls_token": "<s>", "sep_token": "</s>"})
    tok.backend_tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tok.eos_token_id), ("<s>", tok.bos_token_id))
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=1,
                           max_position_embeddings=600, pad_token_id=tok.pad_token_id,
                           architectures=["XLMRobertaForSequenceClassification"])
    torch.manual_seed(0)
    XLMRobertaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_published_reranker_scores_as_flag_reranker_computes_them(published_miniature):
    """FlagReranker.compute_score: tokenizer(pairs, padding, truncation, max_length=512),
    logits.view(-1), no sigmoid (normalize=False)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = CrossEncoderReranker.load(str(published_miniature))
    assert model.max_length == 512 and model.tokenizer.num_special_tokens_to_add(pair=True) == 4
    queries, passages = _pairs()
    tok = AutoTokenizer.from_pretrained(str(published_miniature))
    clf = AutoModelForSequenceClassification.from_pretrained(str(published_miniature)).eval()
    enc = tok(queries, passages, padding=True, truncation=True, max_length=512,
              return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 3  # <s> q </s></s> p </s>
    with torch.no_grad():
        expected = clf(**enc).logits.view(-1).numpy()
    np.testing.assert_allclose(model.score(queries, passages), expected, atol=1e-5)


def test_training_puts_the_positive_first_and_is_reused(tok, tmp_path):
    train = Dataset.from_list(toy_records(64, 0, k=3))
    validation = Dataset.from_list(toy_records(16, 1, k=3))
    model = _tiny(tok, max_length=64)

    def positive_first(m):  # share of training queries whose positive outscores its negatives
        wins = 0
        for row in train:
            texts = [row["positive_passages"][0]["text"]] + [n["text"] for n in
                                                             row["negative_passages"]]
            s = m.score([row["query"]] * len(texts), texts)
            wins += int(np.argmax(s) == 0)
        return wins / len(train)

    before = positive_first(model)
    cfg = config.RerankerConfig(epochs=6, batch_size=8, num_negatives=3, learning_rate=3e-3,
                                max_length=64, top_k=10, gradient_checkpointing=False,
                                precision="fp32", early_stopping_patience=6)
    history = reranker.train_reranker(model, train, validation, cfg, tmp_path / "rr", base="toy")
    after = positive_first(model)
    assert before < 0.5 and after > 0.9, (before, after)  # 1 of 4 by chance
    best = max(history["epochs"], key=lambda e: e["val_ndcg@10"])["epoch"]
    assert history["best_epoch"] == best and history["group_size"] == 4
    assert reranker.reranker_is_trained(tmp_path / "rr", cfg, "toy", train)
    assert not reranker.reranker_is_trained(tmp_path / "rr", replace(cfg, epochs=7), "toy",
                                            train)
    loaded, saved = reranker.load_trained(tmp_path / "rr")
    queries, passages = _pairs()
    np.testing.assert_allclose(loaded.score(queries, passages), model.score(queries, passages),
                               atol=1e-6)
    assert saved == json.loads(json.dumps(history))


def test_a_non_finite_loss_stops_fp32_training_and_is_skipped_under_fp16(tok, tmp_path):
    train = Dataset.from_list(toy_records(16, 0, k=3))
    cfg = config.RerankerConfig(epochs=1, batch_size=8, num_negatives=3, learning_rate=1e-3,
                                max_length=48, top_k=5, gradient_checkpointing=False,
                                precision="fp32")
    broken = _tiny(tok, max_length=48)
    with torch.no_grad():
        broken.model.score.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 1 of epoch 1.*learning_rate"):
        reranker.train_reranker(broken, train, train, cfg, tmp_path / "fp32", device="cpu")
    history = reranker.train_reranker(broken, train, train, replace(cfg, precision="fp16"),
                                      tmp_path / "fp16", device="cpu")
    # both steps skipped by the scaler: no loss recorded, the NaN weights never stepped on
    assert history["skipped_steps"] == [{"epoch": 1, "step": 1}, {"epoch": 1, "step": 2}]
    assert history["steps"] == [] and history["epochs"][0]["loss"] is None


def test_fp16_training_runs_with_a_cpu_grad_scaler(tok, tmp_path):
    train = Dataset.from_list(toy_records(16, 0, k=3))
    cfg = config.RerankerConfig(epochs=1, batch_size=8, num_negatives=3, learning_rate=1e-3,
                                max_length=48, top_k=5, gradient_checkpointing=True,
                                precision="fp16")
    history = reranker.train_reranker(_tiny(tok, max_length=48), train, train, cfg,
                                      tmp_path / "rr", device="cpu")
    assert history["precision"] == "fp16" and len(history["steps"]) == 2
    assert history["skipped_steps"] == []
    assert all(math.isfinite(s["loss"]) for s in history["steps"])


def test_rerank_study_saves_the_reranked_runs_and_the_published_reranker(
        tok, tmp_path, monkeypatch, published_miniature, capsys):
    """The study end to end on toy data: a base LM saved in a folder (as the demo's and the
    converted MiniMind ones are), a dense run's ``best`` folder, and the published reranker's
    miniature; then again with a published reranker that cannot be found."""
    from toy import toy_model

    from retrieval_lib import course, data
    from retrieval_lib.models import build_encoder
    from retrieval_lib.results import collect_runs

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path / "home"))
    base = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                   vocab_size=len(tok), max_query_length=16, max_passage_length=48,
                   base_model=str(tmp_path / "lm"))
    build_encoder(base, seed=0).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    exp = replace(config.get_experiment("minimind27_10k", "demo"), model=base)
    rows = [Dataset.from_list(toy_records(n, seed, k=3)) for n, seed in ((32, 0), (12, 1),
                                                                          (12, 2))]
    splits = data.Splits(*rows, manifest={"subset_sizes": {"10k": 32}})
    toy_model(tok).save(tmp_path / "dense" / "best")
    dense_run = {"out_dir": tmp_path / "dense"}
    cfg = config.RerankerConfig(epochs=1, batch_size=8, num_negatives=2, learning_rate=1e-3,
                                max_length=48, top_k=5, gradient_checkpointing=False)
    study = course.rerank_study(exp, splits, dense_run, cfg, published=str(published_miniature),
                                 device="cpu")
    assert study["published"] == "done"
    labels = course.RERANK_LABELS
    assert set(study["results"]) == {labels[k][0] for k in labels}
    saved = collect_runs("demo")
    assert {"rerank-dense", "rerank-bm25", "rerank_published-dense",
            "rerank_published-bm25"} <= set(saved)
    # every reranked run keeps its first stage's documents (same Recall@100)
    for first, second in (("dense", "dense_rerank"), ("bm25", "bm25_rerank"),
                          ("dense", "published_dense"), ("bm25", "published_bm25")):
        a, b = (study["results"][labels[k][0]]["aggregate"]["recall@100"]["mean"]
                for k in (first, second))
        assert a == b
    capsys.readouterr()
    again = course.rerank_study(exp, splits, dense_run, cfg, published=str(tmp_path / "none"),
                                 device="cpu")
    assert "reusing the finished training" in capsys.readouterr().out
    assert "neither a local folder" in again["published"]
    assert not any(k.startswith("BM25 → bge") for k in again["results"])
    saved = collect_runs("demo")  # the first call's published numbers do not stay behind
    assert saved["rerank_published-dense"]["status"] == "not run"
    assert saved["rerank_published-bm25"]["status"] == "not run"


@pytest.mark.parametrize("cut", ["tokenizer.json", "model.safetensors"])
def test_a_reranker_folder_without_checksums_names_a_cut_file(tok, tmp_path, cut):
    _tiny(tok).save(tmp_path / "r")
    (tmp_path / "r" / "checksums.json").unlink()
    path = tmp_path / "r" / cut
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="no checksums.json"):
        with pytest.raises(CheckpointError, match=rf"cannot load the reranker .*{path}: not "):
            CrossEncoderReranker.load(str(tmp_path / "r"))


def test_a_reranker_folder_without_its_config_says_which_length_it_uses(tok, tmp_path):
    _tiny(tok, max_length=40).save(tmp_path / "r")
    for name in ("checksums.json", "reranker_config.json"):
        (tmp_path / "r" / name).unlink()
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'r'} has no reranker_config.json: "
                                         rf"scoring with max_length 512"):
        assert CrossEncoderReranker.load(str(tmp_path / "r")).max_length == 512
    assert CrossEncoderReranker.load(str(tmp_path / "r"), max_length=40).max_length == 40


def test_a_cut_reranker_history_is_named(tok, tmp_path):
    _tiny(tok).save(tmp_path / "run" / "best")
    (tmp_path / "run" / "history.json").write_text('{"epochs": [')
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'run' / 'history.json'}: cannot "
                                              rf"be read"):
        reranker.load_trained(tmp_path / "run")
