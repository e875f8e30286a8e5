from dataclasses import replace

import numpy as np
import pytest
import torch

from retrieval_lib import models
from retrieval_lib.data import tokenizer
from retrieval_lib.models import DualTowerRetriever, expansion
from retrieval_lib.settings import config

TEXTS = ["北京举行新年音乐会", "李鹏在北京考察企业，向职工祝贺新年", "淮河治污第一战役告捷"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_bpe_tokenizer(TEXTS * 3, vocab_size=300)


def _retriever(tok, base):
    cfg = replace(base, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, vocab_size=300,
                  max_query_length=16, max_passage_length=32)
    torch.manual_seed(0)
    return DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)


BASES = [config.MINIMIND_27M, config.QWEN2_05B]


@pytest.mark.parametrize("base", BASES, ids=["llama", "qwen2"])
@pytest.mark.parametrize("position", ["top", "interleave"])
def test_identity_init_keeps_the_function(tok, base, position):
    model = _retriever(tok, base)
    before = model.encode_passages(TEXTS)
    new = expansion.expand_layers(model.encoder, 2, init="identity", position=position)
    assert len(model.encoder.layers) == model.encoder.config.num_hidden_layers == 5
    assert new == ([3, 4] if position == "top" else [2, 4])
    after = model.encode_passages(TEXTS)
    assert np.abs(after - before).max() <= 1e-5
    for i, layer in enumerate(model.encoder.layers):
        assert layer.self_attn.layer_idx == i
    layer_types = getattr(model.encoder.config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 5


@pytest.mark.parametrize("base", BASES, ids=["llama", "qwen2"])
def test_random_and_copy_inits(tok, base):
    model = _retriever(tok, base)
    before = model.encode_passages(TEXTS)
    expansion.expand_layers(model.encoder, 1, init="random", seed=1)
    assert np.abs(model.encode_passages(TEXTS) - before).max() > 1e-3
    copied = _retriever(tok, base)
    expansion.expand_layers(copied.encoder, 2, init="copy")
    layers = copied.encoder.layers
    for new in (3, 4):
        assert torch.equal(layers[new].mlp.down_proj.weight, layers[2].mlp.down_proj.weight)
        source, clone = layers[2].mlp.down_proj.weight, layers[new].mlp.down_proj.weight
        assert clone.data_ptr() != source.data_ptr()  # a copy, not a shared tensor


def test_expanded_model_round_trips_and_counts_match_the_config(tok, tmp_path):
    model = _retriever(tok, config.QWEN2_05B)
    expansion.expand_layers(model.encoder, 2, init="random", position="interleave", seed=3)
    model.save(tmp_path / "r")
    loaded = DualTowerRetriever.load(tmp_path / "r")
    assert len(loaded.encoder.layers) == 5
    assert np.array_equal(model.encode_queries(TEXTS), loaded.encode_queries(TEXTS))
    cfg = replace(config.QWEN2_05B, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, vocab_size=300, num_new_layers=2)
    assert models.count_parameters(model) == models.parameter_count_from_config(cfg)


def test_unfreeze_schedule_boundaries_and_application(tok):
    # the report's 2 epochs per stage, 10 steps per epoch: layer i joins at step 20·i
    plan = expansion.UnfreezeSchedule([3, 4, 5], every_epochs=2).plan(80, 10)
    assert [plan.trainable(s) for s in (0, 19, 20, 39, 40, 59, 60, 79)] == [
        [], [], [3], [3], [3, 4], [3, 4], [3, 4, 5], [3, 4, 5]]
    assert not plan.complete(59) and plan.complete(60)
    # spread: 4 stages of 25 steps
    spread = expansion.UnfreezeSchedule([3, 4, 5]).plan(100, 10)
    assert [(r["start_step"], r["steps"]) for r in spread.stages()] == [
        (0, 25), (25, 25), (50, 25), (75, 25)]
    with pytest.raises(ValueError, match="cannot complete"):
        expansion.UnfreezeSchedule([3, 4, 5], every_epochs=2).plan(60, 10)
    model = _retriever(tok, config.MINIMIND_27M)
    expansion.expand_layers(model.encoder, 3, init="identity")
    assert plan.apply(model.encoder, 20) == [3]
    grads = [all(p.requires_grad for p in layer.parameters()) for layer in model.encoder.layers]
    assert grads == [True, True, True, True, False, False]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown position"):
        expansion.new_layer_positions(4, 2, "bottom")
    with pytest.raises(TypeError, match="no decoder layer stack"):
        expansion.decoder_layers(torch.nn.Linear(2, 2))
