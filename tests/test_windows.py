"""Documents longer than the window: windows cut where the tokens say, FirstP / MaxP / SumP
scores worked out by hand, and a document whose relevant text is in its third window."""

import numpy as np
import pytest

from retrieval_lib import evaluation
from retrieval_lib.evaluation import windows
from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.serving import PassageIndex


def char_tokenizer(alphabet, cls_sep=False):
    """A fast tokenizer with one token per character, so windows can be counted by hand;
    ``cls_sep``: every text becomes ``[CLS] characters [SEP]``, as BERT's does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="[SEP]")


ALPHABET = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥量计算机天地人和"


class CharCountRetriever:
    """An encoder anyone can check: a text's vector is its character counts over ALPHABET,
    L2-normalised; it reads at most ``max_passage_length`` characters of a passage (FirstP by
    truncation), as a real retriever reads at most that many tokens."""

    pooling = "mean"

    def __init__(self, max_passage_length, aggregation="first", stride=0):
        self.tokenizer = char_tokenizer(ALPHABET)
        self.max_passage_length = max_passage_length
        self.passage_aggregation, self.passage_stride = aggregation, stride

    def _vectors(self, texts, limit=None):
        out = np.zeros((len(texts), len(ALPHABET)), dtype=np.float32)
        for i, text in enumerate(texts):
            for c in text[:limit]:
                out[i, ALPHABET.index(c)] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def encode_queries(self, texts, batch_size=32):
        return self._vectors(texts)

    def encode_passages(self, texts, batch_size=32):
        return self._vectors(texts, self.max_passage_length)


def test_windows_start_every_stride_and_the_last_ends_at_the_text_end():
    tok = char_tokenizer(ALPHABET)
    text26 = (ALPHABET * 2)[:26]
    # 26 tokens, size 10, stride 4: starts 0, 4, 8, 12, 16 (16 + 10 = 26 reaches the end)
    w = windows.split_windows([text26], tok, size=10, stride=4)
    assert w.texts == [text26[s:s + 10] for s in (0, 4, 8, 12, 16)]
    # 25 tokens: starts 0, 4, 8, 12 stop at token 22, so one more window starts at 25 - 10 = 15
    w = windows.split_windows([text26[:25]], tok, size=10, stride=4)
    assert w.texts == [text26[s:s + 10] for s in (0, 4, 8, 12, 15)]
    # a short text is one window, itself; owners count the documents in order
    w = windows.split_windows(["甲乙", text26[:12], "丙"], tok, size=10)  # stride 5
    assert w.texts == ["甲乙", text26[:10], text26[2:12], "丙"]
    assert w.owners.tolist() == [0, 1, 1, 2] and w.documents == 3 and w.split_documents() == 1
    with pytest.raises(ValueError, match="stride"):
        windows.split_windows(["甲"], tok, size=4, stride=5)


def test_windows_of_a_byte_level_bpe_hold_size_tokens_and_cover_the_text(tok):
    from toy import FILLER, TOPICS
    text = "，".join(TOPICS) + FILLER + "。".join(reversed(TOPICS))
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    w = windows.split_windows([text], tok, size=12, stride=6)
    assert len(w.texts) == len(windows._starts(n, 12, 6)) > 3
    for piece in w.texts:  # each window is a span of the text of at most 12 tokens
        assert piece in text and len(tok(piece, add_special_tokens=False)["input_ids"]) <= 12
    assert text.startswith(w.texts[0]) and text.endswith(w.texts[-1])


@pytest.mark.parametrize("pooling, size", [("mean", 10), ("last_token", 9)])
def test_a_full_window_with_its_special_tokens_is_exactly_max_passage_length(pooling, size):
    """12 tokens a passage: [CLS] and [SEP] leave 10 for text, last-token pooling's EOS 9."""
    model = CharCountRetriever(12)
    model.tokenizer, model.pooling = char_tokenizer(ALPHABET, cls_sep=True), pooling
    assert windows.window_tokens(model) == size
    w = windows.split_windows([ALPHABET], model.tokenizer, windows.window_tokens(model))
    assert len(model.tokenizer(w.texts[0])["input_ids"]) == size + 2 and len(w.texts[0]) == size


def test_aggregations_by_hand():
    scores = np.array([[0.1, 0.5, 0.2, 0.9, 0.3],
                       [0.4, -0.2, 0.0, 0.1, 0.8]])
    owners = np.array([0, 0, 0, 1, 2])  # document 0 has three windows
    np.testing.assert_allclose(windows.aggregate_scores(scores, owners, "first"),
                               [[0.1, 0.9, 0.3], [0.4, 0.1, 0.8]])
    np.testing.assert_allclose(windows.aggregate_scores(scores, owners, "max"),
                               [[0.5, 0.9, 0.3], [0.4, 0.1, 0.8]])
    np.testing.assert_allclose(windows.aggregate_scores(scores, owners, "sum"),
                               [[0.8, 0.9, 0.3], [0.2, 0.1, 0.8]])
    with pytest.raises(ValueError, match="consecutive"):
        windows.aggregate_scores(scores, np.array([0, 1, 0, 2, 3]), "max")
    with pytest.raises(ValueError, match="unknown aggregation"):
        windows.aggregate_scores(scores, owners, "mean")


@pytest.mark.parametrize("how", ["first", "max", "sum"])
def test_search_documents_equals_a_loop_over_documents(how):
    rng = np.random.default_rng(0)
    owners = np.repeat(np.arange(30), rng.integers(1, 5, size=30))
    q, w = rng.normal(size=(7, 8)), rng.normal(size=(len(owners), 8))
    scores, indices = windows.search_documents(q, w, owners, how, k=5, block=3 * len(w))
    for i in range(len(q)):  # independent: a plain loop over each document's windows
        per_doc = []
        for d in range(30):
            s = [float(q[i] @ w[j]) for j in np.flatnonzero(owners == d)]
            per_doc.append({"first": s[0], "max": max(s), "sum": sum(s)}[how])
        expected = np.argsort(per_doc)[::-1][:5]
        assert indices[i].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[i], np.array(per_doc)[expected], rtol=1e-5)


def _split(target_text):
    """One query, its positive ``target_text``, and three negatives that share one character
    with the query in their first ten characters."""
    return [{"query": "量子计算机", "source": "t",
             "positive_passages": [{"text": target_text}],
             "negative_passages": [{"text": "量甲乙丙丁戊己庚辛壬"},
                                   {"text": "计甲乙丙丁戊己庚辛壬"},
                                   {"text": "算甲乙丙丁戊己庚辛壬"}]}]


def test_maxp_finds_the_document_whose_relevant_text_is_in_its_third_window():
    # 30 characters: windows of 10 every 10 -> the query's characters are only in the third
    target = "甲乙丙丁戊己庚辛壬癸" + "子丑寅卯辰巳午未申酉" + "量子计算机天地人和亥"
    split = _split(target)
    first = evaluation.evaluate_retriever(CharCountRetriever(10), split)
    maxp = evaluation.evaluate_retriever(CharCountRetriever(10, "max", stride=10), split)
    # FirstP: the target's first window shares nothing (score 0); the three negatives share a
    # character each (score 1/sqrt(5) / sqrt(10) > 0), so the target is 4th: MRR 1/4
    assert first["per_query"]["mrr"]["q0"] == pytest.approx(0.25)
    assert first["per_query"]["recall@5"]["q0"] == 1.0 and "windows" not in first
    # MaxP: the third window holds all five query characters, far above every negative
    assert maxp["per_query"]["mrr"]["q0"] == 1.0 and maxp["per_query"]["ndcg@5"]["q0"] == 1.0
    assert maxp["windows"] == {"aggregation": "max", "size": 10, "stride": 10, "windows": 6,
                               "split_documents": 1}
    # SumP adds the two empty windows' zeros: the same order as MaxP here
    assert evaluation.evaluate_retriever(CharCountRetriever(10), split, aggregation="sum",
                                         stride=10)["per_query"]["mrr"]["q0"] == 1.0


def test_maxp_equals_firstp_when_no_document_is_longer_than_the_window(tok):
    from toy import toy_model, toy_records
    model = toy_model(tok)
    split = toy_records(12, seed=3)
    first = evaluation.evaluate_retriever(model, split)
    maxp = evaluation.evaluate_retriever(model, split, aggregation="max")
    assert maxp["windows"]["split_documents"] == 0
    for metric, values in first["per_query"].items():
        assert maxp["per_query"][metric] == pytest.approx(values, abs=1e-6), metric


def test_a_windowed_index_returns_each_document_once_by_its_best_window(tmp_path):
    # the target's second window shares 量 and 计 with the query: above every other document,
    # below the target's own third window, so the index must keep the target at its best
    target = "甲乙丙丁戊己庚辛壬癸" + "子丑寅卯辰巳午未量计" + "量子计算机天地人和亥"
    texts = [target, "量甲乙丙丁戊己庚辛壬", "计甲乙丙丁戊己庚辛壬", "天地人和甲乙丙丁"]
    model = CharCountRetriever(10, "max", stride=10)
    index = PassageIndex.encode(model, texts, ["t", "a", "b", "c"])
    assert len(index) == 6 and index.ids[:3] == ["t#0", "t#1", "t#2"]
    query = model.encode_queries(["量子计算机天"])
    hits, scores = index.search(query, k=4)
    assert hits[0][0] == "t" and sorted(hits[0]) == ["a", "b", "c", "t"]  # each once
    # the target's score is its third window's: 6 shared characters / (sqrt(6) * sqrt(10))
    assert scores[0, 0] == pytest.approx(6 / np.sqrt(6 * 10), rel=1e-6)
    exact_s, exact_i = windows.search_documents(query, model.encode_passages(
        windows.split_windows(texts, model.tokenizer, 10, 10).texts),
        np.array([0, 0, 0, 1, 2, 3]), "max", k=4)
    # the same documents in the same score order (a and b tie: one shared character each)
    assert hits[0][:2] == ["t", "c"] == [["t", "a", "b", "c"][i] for i in exact_i[0][:2]]
    np.testing.assert_allclose(scores[0], exact_s[0], rtol=1e-6)
    # more documents asked for than exist: every document once, the rest -inf
    hits, scores = index.search(query, k=10)
    assert len(hits[0]) == 4 and scores.shape == (1, 4)
    loaded = PassageIndex.load(index.save(tmp_path / "idx"))
    assert loaded.documents == index.documents and loaded.search(query, 2)[0] == [["t", "c"]]
    with pytest.raises(ValueError, match="sum"):
        PassageIndex.encode(CharCountRetriever(10, "sum"), texts, ["t", "a", "b", "c"])


def test_a_saved_retriever_keeps_its_passage_aggregation(tok, tmp_path):
    from toy import toy_model
    model = toy_model(tok)
    model.passage_aggregation, model.passage_stride = "max", 7
    loaded = DualTowerRetriever.load(model.save(tmp_path / "r"))
    assert (loaded.passage_aggregation, loaded.passage_stride) == ("max", 7)
    assert windows.window_tokens(loaded) == 48  # the toy BPE adds no special tokens
    with pytest.raises(ValueError, match="passage_aggregation"):
        DualTowerRetriever(model.encoder, tok, passage_aggregation="mean")


def test_window_table_by_hand():
    # passages of 5, 10, 25 tokens; window 10, stride 5: 1, 1 and 4 windows (0, 5, 10, 15);
    # one of three is longer than the window; 15 of 40 tokens lie beyond the first window
    table = windows.window_table({"a": {"query": [3], "passage": [5, 10, 25]},
                                  "b": {"query": [], "passage": []}}, size=10)
    assert list(table.index) == ["a"]  # a source without passages has no row
    row = table.loc["a"]
    assert row["passages"] == 3 and row["longer_than_window"] == pytest.approx(1 / 3)
    assert row["unread_token_share"] == pytest.approx(15 / 40)
    assert row["windows_mean"] == pytest.approx(2.0) and row["windows_max"] == 4


def test_aggregation_study_scores_one_saved_retriever_three_ways(tok, tmp_path):
    from toy import toy_model, toy_records

    from retrieval_lib import course
    model = toy_model(tok)
    model.max_passage_length = 12  # the toy passages are longer: most are cut into windows
    model.save(tmp_path / "best")
    split = toy_records(10, seed=5)
    study = course.aggregation_study({"out_dir": str(tmp_path)}, split, device="cpu")
    labels = course.AGGREGATION_LABELS
    assert list(study["results"]) == [labels["first"], labels["max"], labels["sum"]]
    direct = {how: evaluation.evaluate_retriever(model, split, aggregation=how)
              for how in ("first", "max", "sum")}
    for how, label in labels.items():
        assert study["results"][label]["per_query"] == direct[how]["per_query"]
    assert study["windows"] == direct["max"]["windows"] and study["windows"]["split_documents"] > 0
    test = study["comparisons"][f"{labels['max']} − {labels['first']} · ndcg@5"]
    assert test == evaluation.paired_test(direct["max"]["per_query"]["ndcg@5"],
                                          direct["first"]["per_query"]["ndcg@5"])
    assert len(study["comparisons"]) == 6


class _Recording(CharCountRetriever):
    """CharCountRetriever that records the batch size each tower is called with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def encode_queries(self, texts, batch_size=32):
        self.batches.append(batch_size)
        return super().encode_queries(texts)

    def encode_passages(self, texts, batch_size=32):
        self.batches.append(batch_size)
        return super().encode_passages(texts)


def test_evaluate_retriever_passes_its_settings_to_the_search():
    """The batch size reaches both towers (32 unless given), a given stride overrides the
    model's, the metric cut-offs are the ones asked for, the corpus size is reported; a model
    with no passage_aggregation is read FirstP, a windowed one with no passage_stride gets half
    a window."""
    target = "甲乙丙丁戊己庚辛壬癸" + "子丑寅卯辰巳午未申酉" + "量子计算机天地人和亥"
    split = _split(target)
    model = _Recording(10, "max", stride=10)
    out = evaluation.evaluate_retriever(model, split, ks=(1,), batch_size=7, stride=5)
    assert model.batches == [7, 7] and out["windows"]["stride"] == 5 and out["corpus_size"] == 4
    assert set(out["per_query"]) == {"mrr", "precision@1", "recall@1", "ndcg@1", "mrr@1"}
    first = _Recording(10)  # FirstP: the passages are encoded whole, in batches of 7 too
    evaluation.evaluate_retriever(first, split, batch_size=7)
    assert first.batches == [7, 7]
    model.batches.clear()
    evaluation.evaluate_retriever(model, split)
    evaluation.retrieve(model, split)
    assert model.batches == [32] * 4
    bare = CharCountRetriever(10)
    del bare.passage_aggregation, bare.passage_stride
    read = evaluation.evaluate_retriever(bare, split)
    assert "windows" not in read and read["per_query"]["mrr"]["q0"] == pytest.approx(0.25)
    unstrided = CharCountRetriever(10, "max")
    del unstrided.passage_stride
    assert evaluation.evaluate_retriever(unstrided, split)["windows"]["stride"] == 5


class _AngleRetriever:
    """Passage ``p<j>`` is the unit vector at angle j/100, every query the one at angle 0:
    passage j ranks j + 1."""

    pooling, passage_aggregation = "mean", "first"

    def encode_queries(self, texts, batch_size=32):
        return np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(texts), 1))

    def encode_passages(self, texts, batch_size=32):
        angles = np.array([int(t[1:]) / 100 for t in texts])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def test_a_retriever_is_judged_on_its_top_100_unless_asked_otherwise():
    """The relevant passage at rank 101 of 150: outside the default top 100 (MRR 0), inside a
    top 101 (MRR 1/101)."""
    split = [{"query": "q", "source": "t", "positive_passages": [{"text": "p100"}],
              "negative_passages": [{"text": f"p{j}"} for j in range(150) if j != 100]}]
    model = _AngleRetriever()
    assert evaluation.evaluate_retriever(model, split)["per_query"]["mrr"]["q0"] == 0.0
    wider = evaluation.evaluate_retriever(model, split, top_k=101)["per_query"]["mrr"]["q0"]
    assert wider == pytest.approx(1 / 101)
    _, run, _ = evaluation.retrieve(model, split)
    assert len(run["q0"]) == 100


def test_a_run_from_search_refuses_ids_out_of_step_with_the_scores():
    """One id per row of scores and one index per score: a caller's mismatch is an error, not a
    silently shorter run."""
    scores, indices = np.array([[0.9, 0.5], [0.8, 0.1]]), np.array([[0, 1], [1, 0]])
    run = evaluation.run_from_search(["a", "b"], ["d0", "d1"], scores, indices)
    assert run == {"a": {"d0": 0.9, "d1": 0.5}, "b": {"d1": 0.8, "d0": 0.1}}
    with pytest.raises(ValueError):
        evaluation.run_from_search(["a"], ["d0", "d1"], scores, indices)
    with pytest.raises(ValueError):
        evaluation.run_from_search(["a", "b"], ["d0", "d1"], scores, indices[:, :1])
