import pytest
import torch

from retrieval_lib import config, memory, modeling


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
    static = memory.static_bytes(modeling.parameter_count_from_config(cfg))["total"]
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
