"""Toy data, a tiny MiniMind-shaped retriever and training settings shared by the tests
(imported as ``toy``: tests/conftest.py puts this folder on the path)."""

import random
from dataclasses import replace

import torch

from retrieval_lib.data import tokenizer
from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.settings import config

TOPICS = ["长江", "黄河", "足球", "音乐", "电力", "旅游", "法律", "外交", "农业", "气象", "铁路",
          "教育", "医疗", "科技", "金融", "港口"]
FILLER = "今天本报记者报道了有关情况，各方面表示欢迎并将继续推进工作。"


def toy_records(n, seed, k=3):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(TOPICS, 2)
        negs = [f"{rng.choice(TOPICS)}{FILLER}{rng.choice(TOPICS)}" for _ in range(k)]
        rows.append({"query": f"{a}{b}新闻{i}", "source": "toy",
                     "positive_passages": [{"text": f"{a}与{b}。{FILLER}{a}{b}"}],
                     "negative_passages": [{"text": t} for t in negs]})
    return rows


def toy_tokenizer():
    texts = [r["query"] for r in toy_records(200, 0)] + [FILLER] * 5 + TOPICS
    return tokenizer.train_bpe_tokenizer(texts, vocab_size=500)


def toy_model(tok, seed=0, hidden_size=32, base=config.MINIMIND_27M, **settings):
    """A one-layer retriever of ``base``'s architecture; ``settings`` replace any other field
    of its ``ModelConfig`` (layers, lengths, pooling, projection, instruction)."""
    cfg = replace(base, **{**dict(hidden_size=hidden_size, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=64, vocab_size=len(tok), max_query_length=16,
                                  max_passage_length=48, projection_dim=16), **settings})
    torch.manual_seed(seed)
    return DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)


def toy_config(**kw):
    base = dict(epochs=4, batch_size=8, learning_rate=3e-3, num_hard_negatives=2,
                temperature=0.05, early_stopping_patience=10)
    base.update(kw)
    return config.TrainingConfig(**base)


def worker_model(records):
    """The model of the subprocess workers (resume_worker.py, ddp_train_worker.py): a BPE
    tokenizer trained on ``records`` and a one-layer MiniMind-shaped retriever, seed 0."""
    texts = [r["query"] for r in records] + [p["text"] for r in records
                                             for p in r["positive_passages"]]
    tok = tokenizer.train_bpe_tokenizer(texts, vocab_size=300)
    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                  vocab_size=len(tok), max_query_length=12, max_passage_length=32,
                  projection_dim=16)
    torch.manual_seed(0)
    return DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
