import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from datasets import Dataset
from toy import toy_config, toy_records

from retrieval_lib import training
from retrieval_lib.models import DualTowerRetriever, m3
from retrieval_lib.settings import config


def _heads(special=(0,)):
    heads = m3.M3Heads(hidden_size=2, colbert_dim=2, special_token_ids=special)
    with torch.no_grad():  # w_t = ReLU(h_t[0] - h_t[1]); token vectors = h_t (normalised)
        heads.sparse_linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
        heads.sparse_linear.bias.zero_()
        heads.colbert_linear.weight.copy_(torch.eye(2))
        heads.colbert_linear.bias.zero_()
    return heads


def test_sparse_weights_take_the_max_over_repeats_and_drop_specials_and_padding():
    heads = _heads(special=(0,))
    ids = torch.tensor([[0, 5, 7, 5, 3]])  # 0 is special, 3 is padding (mask 0)
    hidden = torch.tensor([[[9.0, 0.0], [0.5, 0.0], [0.2, 0.5], [0.9, 0.1], [4.0, 0.0]]])
    mask = heads.token_mask(ids, torch.tensor([[1, 1, 1, 1, 0]]))
    assert mask.tolist() == [[False, True, True, True, False]]
    w = heads.sparse(hidden, ids, mask, vocab_size=8)
    # token 5: max(0.5, 0.8) = 0.8; token 7: ReLU(-0.3) = 0; the special and the pad: nothing
    assert w[0].tolist() == pytest.approx([0, 0, 0, 0, 0, 0.8, 0, 0])
    passage = torch.zeros(1, 8)
    passage[0, 5], passage[0, 2] = 0.5, 3.0
    assert m3.sparse_scores(w, passage).item() == pytest.approx(0.8 * 0.5)
    assert m3.lexical_score({5: 0.8}, {5: 0.5, 2: 3.0}) == pytest.approx(0.4)


def test_colbert_scores_ignore_padding_and_match_the_pairwise_numpy_score():
    rng = np.random.default_rng(0)
    q = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(2, 3, 4)),
                                                   dtype=torch.float32), dim=-1)
    p = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(3, 5, 4)),
                                                   dtype=torch.float32), dim=-1)
    q_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    p_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    p_padded = p.clone()
    p_padded[~p_mask] = 10.0  # garbage in the padding must not count
    scores = m3.colbert_scores(q, q_mask, p_padded, p_mask)
    for i in range(2):
        for j in range(3):
            expected = m3.colbert_score(q[i][q_mask[i]].numpy(), p[j][p_mask[j]].numpy())
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-6)
    empty = m3.colbert_scores(q, q_mask, p, torch.zeros_like(p_mask))
    assert torch.equal(empty, torch.zeros(2, 3))


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - math.log(np.exp(x).sum())


def test_unified_loss_equals_the_hand_computation():
    # one query, two passages (positive first); scores per function
    d, s, m = [0.9, 0.3], [2.0, 1.5], [0.7, 0.6]
    tau, w, lam = 0.5, (1.0, 0.3, 1.0), (1.0, 0.1, 1.0)
    t = torch.tensor
    loss, parts = m3.unified_loss(t([d]), t([s]), t([m]), tau, w, lam)
    scaled = [np.array(x) / tau for x in (d, s, m)]
    inter = sum(wk * x for wk, x in zip(w, scaled, strict=True))
    ce = [-_log_softmax(x)[0] for x in scaled]
    big_l = (sum(lk * c for lk, c in zip(lam, ce, strict=True)) - _log_softmax(inter)[0]) / 4
    teacher = np.exp(_log_softmax(inter))
    distil = [-(teacher * _log_softmax(x)).sum() for x in scaled]
    big_l2 = sum(lk * c for lk, c in zip(lam, distil, strict=True)) / 3
    assert loss.item() == pytest.approx((big_l + big_l2) / 2, rel=1e-6)
    assert parts["dense"] == pytest.approx(ce[0], rel=1e-6)
    assert parts["distil"] == pytest.approx(big_l2, rel=1e-6)


def test_the_distillation_teacher_sends_no_gradient():
    torch.manual_seed(0)
    w, lam, tau = (1.0, 0.3, 1.0), (1.0, 0.1, 1.0), 0.1
    scores = [torch.randn(2, 6, requires_grad=True) for _ in range(3)]
    loss, _ = m3.unified_loss(*scores, tau, w, lam)
    loss.backward()
    # the same loss with the teacher a constant tensor: equal gradients only if it is detached
    ref_scores = [s.detach().clone().requires_grad_() for s in scores]
    scaled = [s / tau for s in ref_scores]
    inter = sum(wk * s for wk, s in zip(w, scaled, strict=True))
    teacher = torch.softmax(sum(wk * s.detach() / tau
                                for wk, s in zip(w, scores, strict=True)), dim=-1)
    labels = torch.tensor([0, 3])
    ce = sum(lk * torch.nn.functional.cross_entropy(s, labels)
             for lk, s in zip(lam, scaled, strict=True))
    distil = sum(lk * -(teacher * torch.log_softmax(s, -1)).sum(-1).mean()
                 for lk, s in zip(lam, scaled, strict=True))
    ((ce + torch.nn.functional.cross_entropy(inter, labels)) / 4 / 2 + distil / 3 / 2).backward()
    for s, r in zip(scores, ref_scores, strict=True):
        assert torch.allclose(s.grad, r.grad, atol=1e-6)


def _m3_model(tok, instruction=""):
    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok),
                  max_query_length=16, max_passage_length=48, projection_dim=16, m3_heads=True,
                  query_instruction=instruction)
    torch.manual_seed(0)
    return DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)


def test_encode_m3_matches_the_batched_heads_and_survives_save_and_load(tok, tmp_path):
    model = _m3_model(tok).eval()
    texts = ["长江新闻", "黄河与足球。今天本报记者报道"]
    enc = model.tokenize(texts, "passage")
    with torch.no_grad():
        batched = model.embed_m3(enc["input_ids"], enc["attention_mask"], "passage")
    out = model.encode_m3(texts, "passage")
    assert np.allclose(out["dense"], batched["dense"].numpy(), atol=1e-6)
    assert np.allclose(out["dense"], model.encode_passages(texts), atol=1e-6)
    for i in range(2):
        vec = batched["sparse"][i]
        assert out["sparse"][i] == pytest.approx({t: vec[t].item()
                                                  for t in vec.nonzero().squeeze(-1).tolist()})
        keep = batched["colbert_mask"][i]
        assert np.allclose(out["colbert"][i], batched["colbert"][i][keep].numpy(), atol=1e-6)
    model.save(tmp_path / "m")
    loaded = DualTowerRetriever.load(tmp_path / "m")
    again = loaded.encode_m3(texts, "passage")
    assert np.allclose(again["dense"], out["dense"], atol=1e-6)
    assert again["sparse"] == out["sparse"]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel()
                                                             for p in model.parameters())


def test_unified_training_logs_every_part_and_evaluates_every_mode(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(48, 2)), Dataset.from_list(toy_records(16, 3))
    model = _m3_model(tok)
    history = training.train_retriever(model, train, val, toy_config(epochs=3), tmp_path,
                                       show_progress=False)
    parts = [s["loss_parts"] for s in history["steps"]]
    assert set(parts[0]) == {"dense", "sparse", "multi", "inter", "distil"}
    first, last = history["epochs"][0]["train_loss"], history["epochs"][-1]["train_loss"]
    assert last < first
    best = DualTowerRetriever.load(tmp_path / "best")
    results = m3.evaluate_m3(best, val, ks=(5, 10), top_k=10)
    assert set(results) == set(m3.MODES)
    # the hybrid run is w·(dense, sparse, colbert) of the dense top 10: its reciprocal rank of
    # every query, recomputed here pair by pair
    from retrieval_lib.data import corpus_of

    corpus = corpus_of(val)
    q = best.encode_m3(val["query"], "query")
    p = best.encode_m3(corpus, "passage")
    w = m3.SCORE_WEIGHTS
    for i, row in enumerate(val):
        dense = p["dense"] @ q["dense"][i]
        top = np.argsort(-dense)[:10]
        hybrid = {j: w[0] * dense[j] + w[1] * m3.lexical_score(q["sparse"][i], p["sparse"][j])
                  + w[2] * m3.colbert_score(q["colbert"][i], p["colbert"][j]) for j in top}
        ranked = sorted(hybrid, key=lambda j: -hybrid[j])
        positive = corpus.index(row["positive_passages"][0]["text"])
        expected = 1 / (ranked.index(positive) + 1) if positive in ranked else 0.0
        assert results["hybrid"]["per_query"]["mrr"][f"q{i}"] == pytest.approx(expected)


def test_unified_loss_refuses_grad_cache(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(16, 2)), Dataset.from_list(toy_records(8, 3))
    with pytest.raises(ValueError, match="GradCache"):
        training.train_retriever(_m3_model(tok), train, val,
                                 toy_config(epochs=1, grad_cache_chunk_size=4), tmp_path,
                                 show_progress=False)


def test_query_instruction_is_prepended_to_queries_only_and_saved(tok, tmp_path):
    prefix = "为这个句子生成表示以用于检索相关文章："
    plain, instructed = _m3_model(tok), _m3_model(tok, instruction=prefix)
    q = instructed.tokenize(["长江新闻"], "query")["input_ids"]
    assert torch.equal(q, plain.tokenize([prefix + "长江新闻"], "query")["input_ids"])
    p = instructed.tokenize(["长江新闻"], "passage")["input_ids"]
    assert torch.equal(p, plain.tokenize(["长江新闻"], "passage")["input_ids"])
    instructed.save(tmp_path / "m")
    assert DualTowerRetriever.load(tmp_path / "m").query_instruction == prefix


def test_encode_m3_in_bf16_returns_float32_close_to_fp32(tok):
    """Encoding in the training precision of a GPU (here bf16 autocast on the CPU): the sparse
    and multi-vector outputs come back as float32 numbers next to the fp32 ones."""
    model = _m3_model(tok).eval()
    texts = ["长江新闻", "黄河与足球。今天本报记者报道"]
    full = model.encode_m3(texts, "passage")
    model.precision = "bf16"
    half = model.encode_m3(texts, "passage")
    assert not np.array_equal(half["dense"], full["dense"])  # autocast did run
    assert np.abs(half["dense"] - full["dense"]).max() < 0.02
    for i in range(2):
        assert half["colbert"][i].dtype == np.float32
        assert np.abs(half["colbert"][i] - full["colbert"][i]).max() < 0.02
        tokens = set(half["sparse"][i]) | set(full["sparse"][i])
        assert max(abs(half["sparse"][i].get(t, 0.0) - full["sparse"][i].get(t, 0.0))
                   for t in tokens) < 0.02


@pytest.mark.parametrize("pooling,skips", [("cls", True), ("mean", False)])
def test_with_cls_pooling_the_first_token_is_the_dense_vector_not_a_sparse_or_colbert_token(
        tok, pooling, skips):
    """BGE-M3 takes the dense vector from [CLS] and leaves that position out of the sparse and
    multi-vector scores; with mean pooling every non-special token counts."""
    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                  vocab_size=len(tok), projection_dim=16, m3_heads=True, pooling=pooling)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
    assert model.m3.skip_first_token is skips
    enc = model.tokenize(["长江新闻", "黄河"], "passage")
    mask = model.m3.token_mask(enc["input_ids"], enc["attention_mask"])
    # the toy tokenizer adds no special token, so position 0 is an ordinary token
    assert not torch.isin(enc["input_ids"][:, 0], torch.tensor(tok.all_special_ids)).any()
    assert (mask[:, 0] == (not skips)).all()
    out = model.encode_m3(["长江新闻"], "passage")
    first, rest = enc["input_ids"][0, 0].item(), enc["input_ids"][0, 1:].tolist()
    if skips and first not in rest:
        assert first not in out["sparse"][0]
    assert len(out["colbert"][0]) == int(mask[0].sum())


def test_every_mode_reranks_as_worked_out_by_hand():
    """One query, three passages (A relevant); dense, sparse and ColBERT each order them
    differently, and the hybrid weights decide where A lands. Worked out by hand:

    | passage | dense q·p | sparse | ColBERT | hybrid (0.4, 0.2, 0.4) |
    | A       | 0.6       | 1.0    | 0.0     | 0.24 + 0.2 + 0   = 0.44 |
    | B       | 0.8       | 0.0    | 1.0     | 0.32 + 0   + 0.4 = 0.72 |
    | C       | 1.0       | 0.0    | 0.5     | 0.40 + 0   + 0.2 = 0.60 |

    A's rank: dense 3, sparse 1, ColBERT 3, hybrid 3; with the weights (0.4, 0.4, 0.2), where a
    swap of the sparse and ColBERT weights would land: 0.64, 0.52, 0.50, A first."""
    split = Dataset.from_list([{"query": "q", "source": "toy", "positive_passages": [
        {"text": "A"}], "negative_passages": [{"text": "B"}, {"text": "C"}]}])
    vectors = {"q": ([1.0, 0.0], {1: 1.0}, [[1.0, 0.0]]),
               "A": ([0.6, 0.8], {1: 1.0}, [[0.0, 1.0]]),
               "B": ([0.8, 0.6], {}, [[1.0, 0.0]]),
               "C": ([1.0, 0.0], {}, [[0.5, 0.8660254]])}

    def encode(texts):
        return {"dense": np.array([vectors[t][0] for t in texts]),
                "sparse": [vectors[t][1] for t in texts],
                "colbert": [np.array(vectors[t][2]) for t in texts]}

    mrr = {mode: r["per_query"]["mrr"]["q0"]
           for mode, r in m3.evaluate_reranked(encode, encode, split, ks=(1,), top_k=3,
                                               weights=(0.4, 0.2, 0.4)).items()}
    assert mrr == pytest.approx({"dense": 1 / 3, "sparse": 1.0, "colbert": 1 / 3,
                                 "hybrid": 1 / 3})
    swapped = m3.evaluate_reranked(encode, encode, split, ks=(1,), top_k=3, modes=("hybrid",),
                                   weights=(0.4, 0.4, 0.2))
    assert swapped["hybrid"]["per_query"]["mrr"]["q0"] == 1.0
