from dataclasses import replace

import pytest
import torch

from retrieval_lib import models
from retrieval_lib.settings import config
from retrieval_lib.training import memory


def test_saved_bytes_of_a_hand_worked_graph():
    # x @ W saves x (4x3 fp32 = 48 B) for W's gradient; relu saves its output (4x5 = 80 B);
    # the parameter W itself is excluded, sum saves nothing
    x = torch.randn(4, 3)
    w = torch.nn.Parameter(torch.randn(3, 5))
    assert memory.saved_activation_bytes(lambda: (x @ w).relu().sum(), exclude=[w]) == 128
    # a graph built without gradients saves nothing
    with torch.no_grad():
        assert memory.saved_activation_bytes(lambda: (x @ w).relu().sum()) == 0


def test_static_bytes_by_hand():
    assert memory.static_bytes(1000) == {"weights": 4000, "gradients": 4000, "optimizer": 8000,
                                         "autocast_copy": 2000, "total": 18000}
    frozen = memory.static_bytes(1000, trainable=100, autocast=False)
    assert frozen["total"] == 4000 + 400 + 800


def _tiny():
    return config.ModelConfig(name="tiny", base_model="-", architecture="qwen2", hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=100, max_query_length=8,
                              max_passage_length=32, num_new_layers=1)


def test_activation_per_token_is_linear_in_tokens_and_checkpointing_saves_memory():
    cfg = _tiny()
    short = memory.activation_bytes_per_token(cfg, seq_len=32, dtype=None)
    long = memory.activation_bytes_per_token(cfg, seq_len=64, batch_size=2, dtype=None)
    assert short["per_layer"] == pytest.approx(long["per_layer"])
    # a block saves far more than its input (norms, q/k/v, attention output, the gated MLP)
    assert short["per_layer"] > 10 * short["hidden_state"] == 10 * 32 * 4
    plan = memory.training_memory_plan(cfg, config.TrainingConfig(1, 1, 1e-4,
                                                                   num_hard_negatives=3),
                                       batch_sizes=(1, 2))
    static = memory.static_bytes(models.parameter_count_from_config(cfg))["total"]
    for row in plan:
        assert row["tokens_per_step"] == row["batch_size"] * (8 + 4 * 32)
        assert row["static_gib"] * memory.GIB == pytest.approx(static)
    plain = {r["batch_size"]: r for r in plan if not r["gradient_checkpointing"]}
    ckpt = {r["batch_size"]: r for r in plan if r["gradient_checkpointing"]}
    assert plain[2]["activations_gib"] == pytest.approx(2 * plain[1]["activations_gib"])
    assert all(ckpt[b]["activations_gib"] < plain[b]["activations_gib"] for b in (1, 2))


def test_largest_batches_reads_the_plan():
    plan = [{"batch_size": b, "gradient_checkpointing": c, "total_gib": b * (1 if c else 3)}
            for b in (1, 2, 4) for c in (False, True)]
    fits = memory.largest_batches(plan, {"small": 2.0, "big": 12.5}, reserve_gib=0.5)
    assert fits == {"small": {"plain": 0, "checkpointing": 1},
                    "big": {"plain": 4, "checkpointing": 4}}


# activation bytes per token chosen by hand, so every option's need can be worked out below
PER = {"per_layer": 100, "outside_layers": 10, "hidden_state": 8}


def _budget(cfg, activation_bytes):
    """Free memory (GiB) that holds the static part and exactly ``activation_bytes`` more."""
    static = memory.static_bytes(models.parameter_count_from_config(cfg))["total"]
    return (static + activation_bytes) / memory.GIB


def test_fit_step_keeps_the_batch_and_picks_the_cheapest_saver_that_fits():
    """Tiny shape: 3 blocks (2 + 1 new), queries of 8 tokens, passages of 32; batch 2 with 3
    hard negatives, so 8 passages a step. Activation bytes of each option by hand:
    plain (2·8 + 8·32)·(100·3 + 10) = 84,320; checkpointing 272·(8·3 + 10) + 256·100 = 34,848;
    GradCache chunks of 4 / 2 / 1 passages: 128·310 = 39,680 / 19,840 / 9,920;
    checkpointing with chunks of 1: 32·34 + 32·100 = 4,288."""
    cfg = _tiny()
    training = config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=3)

    def fit(activation_bytes, train=training, **kw):
        return memory.fit_step(cfg, train, _budget(cfg, activation_bytes), reserve_gib=0,
                               per=PER, **kw)

    fitted, info = fit(84_320)
    assert (fitted, info["changed"]) == (training, [])
    fitted, info = fit(84_319)  # one byte short: checkpointing (34,848) is the next cheapest
    assert (fitted.gradient_checkpointing, fitted.grad_cache_chunk_size) == (True, 0)
    assert info["plan_gib"] * memory.GIB == pytest.approx(_budget(cfg, 34_848) * memory.GIB)
    fitted, info = fit(30_000)  # checkpointing 34,848 and chunks of 4 (39,680) are too much
    assert (fitted.gradient_checkpointing, fitted.grad_cache_chunk_size) == (False, 2)
    assert info["changed"] == ["grad_cache_chunk_size"] and "GradCache chunks of 2" in info["why"]
    assert fitted.batch_size == 2 and fitted.num_hard_negatives == 3
    fitted, _ = fit(5_000)
    assert (fitted.gradient_checkpointing, fitted.grad_cache_chunk_size) == (True, 1)
    with pytest.raises(MemoryError, match="does not fit"):
        fit(4_000)
    with pytest.raises(MemoryError):  # without GradCache (the M3 loss) checkpointing is all
        fit(30_000, grad_cache=False)
    # what the configuration turns on stays on: checkpointing asked for, then chunks of 2
    fitted, _ = fit(84_320, replace(training, gradient_checkpointing=True))
    assert (fitted.gradient_checkpointing, fitted.grad_cache_chunk_size) == (True, 0)
    fitted, _ = fit(10_000, replace(training, gradient_checkpointing=True))
    assert fitted.grad_cache_chunk_size == 2  # 64·34 + 64·100 = 8,576


def test_the_full_presets_fit_a_12_gb_gpu_by_the_plan():
    """The report's batches on an RTX 3060: the plan of every full experiment fits with the
    savers chosen for it, and the 27M step needs them (14.7 GiB as configured)."""
    exp = config.get_experiment("minimind27_10k", "full")
    fitted, info = memory.fit_step(exp.model, exp.training, 12.0)
    assert info["changed"] and info["plan_gib"] + memory.CUDA_CONTEXT_GIB <= 12.0
    assert fitted.batch_size == exp.training.batch_size == 32
