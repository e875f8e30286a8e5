from dataclasses import replace

import numpy as np
import pytest
import torch

from retrieval_lib import models
from retrieval_lib.data import tokenizer
from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.settings import config

TEXTS = ["北京举行新年音乐会", "李鹏在北京考察企业，向职工祝贺新年",
         "淮河治污第一战役告捷，沿淮工业污染源实现达标排放", "新年", "联合国会费比例的能力支付原则"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_bpe_tokenizer(TEXTS * 3, vocab_size=400)


def _tiny(arch, **kw):
    base = {"llama": config.MINIMIND_27M, "qwen2": config.QWEN2_05B}.get(arch)
    if base is None:
        base = replace(config.MINIMIND_27M, architecture=arch, pooling="cls")
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, vocab_size=400,
                 max_query_length=16, max_passage_length=48)
    shape.update(kw)
    return replace(base, **shape)


def _retriever(arch, tok, seed=0, **kw):
    torch.manual_seed(seed)
    return DualTowerRetriever.from_config(_tiny(arch, **kw), tokenizer=tok, pretrained=False)


@pytest.mark.parametrize("arch,pooling", [("llama", "mean"), ("qwen2", "last_token"),
                                          ("bert", "cls"), ("xlm-roberta", "cls")])
def test_tiny_models_encode_chinese_end_to_end(tok, arch, pooling):
    model = _retriever(arch, tok, pooling=pooling)
    assert model.pooling == pooling
    q = model.encode_queries(TEXTS)
    p = model.encode_passages(TEXTS)
    assert q.shape == p.shape == (5, 128) and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    # one shared tower: the same text within both length limits gets the same vector
    assert np.allclose(q[[0, 3]], p[[0, 3]], atol=1e-6)


def test_towers_share_every_weight_and_count_once(tok):
    shared = _retriever("llama", tok)
    separate = _retriever("llama", tok, separate_projections=True)
    enc = models.count_parameters(shared.encoder)
    proj = 32 * 128 + 128
    assert models.count_parameters(shared) == enc + proj
    assert models.count_parameters(separate) == enc + 2 * proj
    assert shared.query_projection is shared.passage_projection
    q, p = separate.encode_queries(TEXTS[:1]), separate.encode_passages(TEXTS[:1])
    assert not np.allclose(q, p)


def test_batching_and_length_sorting_do_not_change_vectors(tok):
    model = _retriever("llama", tok)
    together = model.encode_passages(TEXTS, batch_size=2)
    alone = np.stack([model.encode_passages([t])[0] for t in TEXTS])
    assert np.abs(together - alone).max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_last_token_pooling_is_padding_side_invariant_and_ends_with_eos(tok, arch):
    model = _retriever(arch, tok, pooling="last_token")
    enc = model.tokenize(TEXTS, "passage")
    lengths = enc["attention_mask"].sum(1)
    for row, n in zip(enc["input_ids"], lengths, strict=True):
        assert row[n - 1].item() == tok.eos_token_id
    tok.padding_side = "right"
    right = model.encode_passages(TEXTS, batch_size=5)
    tok.padding_side = "left"
    try:
        enc_left = model.tokenize(TEXTS, "passage")
        assert enc_left["attention_mask"][:, -1].all()  # really left-padded
        left = model.encode_passages(TEXTS, batch_size=5)
    finally:
        tok.padding_side = "right"
    assert np.abs(right - left).max() < 1e-5


def test_pool_hand_worked():
    h = torch.tensor([[[1.0], [3.0], [100.0]], [[100.0], [2.0], [4.0]]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert models.pool(h, m, "mean").flatten().tolist() == [2.0, 3.0]
    assert models.pool(h, m, "last_token").flatten().tolist() == [3.0, 4.0]
    assert models.pool(h, m, "cls").flatten().tolist() == [1.0, 100.0]
    with pytest.raises(ValueError, match="unknown pooling"):
        models.pool(h, m, "max")


@pytest.mark.parametrize("separate", [False, True])
def test_save_load_round_trip_is_exact(tok, tmp_path, separate):
    model = _retriever("qwen2", tok, pooling="last_token", separate_projections=separate)
    with torch.no_grad():  # make the head non-trivial
        model.passage_projection.weight.add_(0.5)
    model.save(tmp_path / "r")
    assert (tmp_path / "r" / "head.safetensors").exists()
    assert list((tmp_path / "r" / "encoder").glob("*.safetensors"))
    loaded = DualTowerRetriever.load(tmp_path / "r")
    assert loaded.pooling == "last_token" and loaded.separate_projections == separate
    assert np.array_equal(model.encode_queries(TEXTS), loaded.encode_queries(TEXTS))
    assert np.array_equal(model.encode_passages(TEXTS), loaded.encode_passages(TEXTS))


def test_loads_minimind_causal_lm_weights_as_base_model(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = _tiny("llama")
    lm = LlamaForCausalLM(models.hf_config_from_shape(cfg))
    lm.save_pretrained(tmp_path / "minimind")
    encoder = models.load_encoder(str(tmp_path / "minimind"))
    assert type(encoder).__name__ == "LlamaModel"
    assert torch.equal(encoder.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(encoder.layers[1].mlp.down_proj.weight,
                       lm.model.layers[1].mlp.down_proj.weight)


def test_missing_model_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = replace(config.MINIMIND_27M, base_model=str(tmp_path / "not-downloaded"))
    with pytest.raises(OSError, match="huggingface-cli download") as err:
        DualTowerRetriever.from_config(cfg)
    assert "not-downloaded" in str(err.value)


@pytest.mark.parametrize("name,expected_m,new_expected_m", [
    ("minimind38_96k", 27, 38),      # 27M + 4 layers
    ("minimind186_288k", 108, 187),  # 108M + 12 layers
    ("qwen2_613_288k", 494, 613),    # Qwen2-0.5B + 8 layers
])
def test_parameter_counts_match_the_report(name, expected_m, new_expected_m):
    cfg = config.get_experiment(name, "full").model
    base = models.parameter_count_from_config(cfg, include_new_layers=False) / 1e6
    grown = models.parameter_count_from_config(cfg) / 1e6
    assert base == pytest.approx(expected_m, rel=0.03)
    assert grown == pytest.approx(new_expected_m, rel=0.03)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_encoding_in_half_precision_stays_close_to_fp32(tok, precision):
    """On a GPU ``auto`` encodes in the training precision; on the CPU it is fp32 unless asked.
    The half-precision embeddings (unit vectors) stay within cosine 1e-4 of fp32 (measured on
    this tiny model: bf16 7.5e-6, fp16 1.2e-7)."""
    model = _retriever("qwen2", tok, pooling="last_token")
    full = model.encode_passages(TEXTS)
    model.precision = "fp32"
    assert np.array_equal(model.encode_passages(TEXTS), full)  # auto on the CPU is fp32
    model.precision = precision
    half = model.encode_passages(TEXTS)
    assert half.dtype == np.float32
    assert not np.array_equal(half, full)  # autocast did run
    cosine = (half * full).sum(axis=1)
    assert 1 - cosine.min() < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch,pooling", [("llama", "mean"), ("qwen2", "last_token")])
def test_tokenize_equals_the_tokenizers_own_padding_and_tokenises_each_text_once(
        tok, side, arch, pooling, monkeypatch):
    model = _retriever(arch, tok, pooling=pooling, max_passage_length=12)
    model.tokenizer.padding_side = side
    model.query_instruction = "查询："
    texts = TEXTS + [TEXTS[1]]
    for tower, multiple in (("passage", 8), ("query", None)):
        got = model.tokenize(texts, tower, pad_to_multiple_of=multiple)
        # the reference: the tokenizer's own truncation and pad, as tokenize did before caching
        shown = [model.query_instruction + t for t in texts] if tower == "query" else texts
        limit = model.max_query_length if tower == "query" else 12
        if pooling == "last_token":
            ids = [x + [tok.eos_token_id] for x in
                   tok(shown, truncation=True, max_length=limit - 1)["input_ids"]]
        else:
            ids = tok(shown, truncation=True, max_length=limit)["input_ids"]
        want = tok.pad({"input_ids": ids}, padding=True, pad_to_multiple_of=multiple,
                       return_tensors="pt")
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
    calls = []
    real = type(model.tokenizer).__call__
    monkeypatch.setattr(type(model.tokenizer), "__call__",
                        lambda self, batch, **kw: calls.append(list(batch)) or real(self, batch,
                                                                                    **kw))
    model.tokenize(texts + ["新的文本"], "passage")
    assert calls == [["新的文本"]]  # the others were tokenised above, once
    model.max_passage_length = 10  # another truncation: the kept ids no longer apply
    assert model.tokenize(["新的文本"], "passage")["input_ids"].shape[1] <= 10
    assert len(calls) == 2


@pytest.fixture(scope="module")
def bert_tok():
    """A BERT-style WordPiece tokenizer built here (no download): every text becomes
    ``[CLS] characters [SEP]``, as BERT's and XLM-R's do, so the CLS paths see a real CLS."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    chars = sorted({c for t in TEXTS for c in t})
    vocab = {w: i for i, w in enumerate(specials + chars)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_cls_pooling_takes_the_real_cls_state_and_m3_heads_leave_out_cls_and_sep(bert_tok,
                                                                                  arch):
    model = _retriever(arch, bert_tok, vocab_size=len(bert_tok), pooling="cls", m3_heads=True,
                       max_passage_length=8).eval()
    texts = TEXTS[:3]
    enc = model.tokenize(texts, "passage")
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    lengths = enc["attention_mask"].sum(1)
    assert (enc["input_ids"][:, 0] == cls).all()
    assert enc["input_ids"][torch.arange(3), lengths - 1].tolist() == [sep] * 3
    assert lengths.tolist() == [8, 8, 8]  # cut at 8 with [SEP] kept last, by the tokenizer
    with torch.no_grad():
        hidden = model.encoder(**enc).last_hidden_state
        expected = torch.nn.functional.normalize(model.passage_projection(hidden[:, 0]), dim=-1)
    assert torch.allclose(torch.from_numpy(model.encode_passages(texts)), expected, atol=1e-6)
    out = model.encode_m3(texts, "passage")
    for row, ids in enumerate(enc["input_ids"].tolist()):
        assert not {cls, sep} & set(out["sparse"][row])
        assert len(out["colbert"][row]) == len(ids) - 2  # every token but [CLS] and [SEP]
