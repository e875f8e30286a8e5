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


def _static(cfg):
    """Bytes of weights, gradients, AdamW state and the bf16 copy of ``cfg``'s parameters."""
    return memory.static_bytes(models.parameter_count_from_config(cfg))["total"]


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
    static = _static(cfg)
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
    static = _static(cfg)
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


def test_saved_bytes_skip_the_excluded_parameters_that_autograd_does_save():
    # with x trainable, x @ W also saves W (3x5 fp32 = 60 B) for x's gradient: counted only
    # when it is not excluded; x (48 B) and relu's output (80 B) are counted either way
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, 5))
    assert memory.saved_activation_bytes(lambda: (x @ w).relu().sum(), exclude=[w]) == 128
    assert memory.saved_activation_bytes(lambda: (x @ w).relu().sum()) == 188


def _saved_slope(cfg, blocks, dtype, short=16, long=32):
    """Bytes per token a forward of ``blocks`` blocks saves, measured directly on a model the
    function under test never builds (another seed, no new layers, the full vocabulary)."""
    encoder = models.build_encoder(replace(cfg, num_hidden_layers=blocks, num_new_layers=0),
                                   seed=7)
    encoder.train()
    saved = []
    for length in (short, long):
        ids = torch.randint(0, cfg.vocab_size, (1, length))

        def forward(ids=ids):
            with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu",
                                                                                 enabled=False):
                encoder(input_ids=ids).last_hidden_state.sum()

        saved.append(memory.saved_activation_bytes(forward, exclude=encoder.parameters()))
    return (saved[1] - saved[0]) / (long - short)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_per_token_figures_predict_a_deeper_model(dtype):
    """per_layer and outside_layers come from 1- and 2-block models; a 3-block model (measured
    on its own) must save 3·per_layer + outside_layers bytes per token. The new layers of the
    configuration play no part (the figures are per block), and the figures are those of the
    precision asked for."""
    cfg = _tiny()  # 2 blocks + 1 new
    per = memory.activation_bytes_per_token(cfg, seq_len=32, dtype=dtype)
    assert per == memory.activation_bytes_per_token(replace(cfg, num_new_layers=0), seq_len=32,
                                                    dtype=dtype)
    assert 3 * per["per_layer"] + per["outside_layers"] == _saved_slope(cfg, 3, dtype)
    assert per["per_layer"] + per["outside_layers"] == _saved_slope(cfg, 1, dtype)
    element = 4 if dtype is None else 2
    assert (per["hidden_state"], per["seq_len"], per["dtype"]) == (
        32 * element, 32, "float32" if dtype is None else "bfloat16")


def test_the_per_token_figures_are_measured_at_512_tokens_unless_told():
    assert memory.activation_bytes_per_token(_tiny())["seq_len"] == 512


def test_the_memory_plan_rows_by_hand():
    """Batch 2, 3 hard negatives, passages of 64 tokens (not the configuration's 32): 2·8 +
    8·64 = 528 tokens; plain 528·(3·100 + 10) = 163,680 bytes; checkpointing 528·(3·8 + 10) +
    512·100 = 69,152."""
    cfg = _tiny()
    training = config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=3)
    static = _static(cfg)
    rows = memory.training_memory_plan(cfg, training, batch_sizes=(2,), seq_len=64, per=PER)
    expected = [(False, 163_680), (True, 69_152)]
    assert len(rows) == 2
    for row, (ckpt, act) in zip(rows, expected, strict=True):
        assert row == {"batch_size": 2, "tokens_per_step": 528, "gradient_checkpointing": ckpt,
                       "static_gib": pytest.approx(static / memory.GIB),
                       "activations_gib": pytest.approx(act / memory.GIB),
                       "total_gib": pytest.approx((static + act) / memory.GIB)}


def test_fit_step_keeps_the_reserve_free():
    cfg, training = _tiny(), config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=3)
    # plain needs 84,320 bytes beyond the static part (see above); 0.25 GiB is kept free
    roomy = memory.fit_step(cfg, training, _budget(cfg, 84_321) + 0.25, reserve_gib=0.25,
                            per=PER)[0]
    assert not roomy.gradient_checkpointing
    short = memory.fit_step(cfg, training, _budget(cfg, 84_319) + 0.25, reserve_gib=0.25,
                            per=PER)[0]
    assert (short.gradient_checkpointing, short.grad_cache_chunk_size) == (True, 0)


def test_fit_step_tries_the_power_of_two_chunks_below_the_passages():
    """Activation bytes by hand (PER; queries 8 tokens, passages 32, 3 blocks). With
    checkpointing configured: 6 passages (batch 2, 2 hard negatives) -> chunks 4, 2, 1; a chunk
    of 4 needs 128·34 + 128·100 = 17,152, of 2 8,576. 8 passages -> 4, 2, 1, never 8 (a chunk of
    every passage would need 256·134 = 34,304, below the 34,848 of no chunks)."""
    cfg = _tiny()
    ckpt = config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=2, gradient_checkpointing=True)

    def chosen(train, activation_bytes):
        fitted, _ = memory.fit_step(cfg, train, _budget(cfg, activation_bytes), reserve_gib=0,
                                    per=PER)
        return fitted.gradient_checkpointing, fitted.grad_cache_chunk_size

    assert chosen(ckpt, 20_000) == (True, 4)
    assert chosen(replace(ckpt, num_hard_negatives=3), 34_500) == (True, 4)
    # a configured chunk size is tried first and only smaller chunks after it
    four = config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=3, grad_cache_chunk_size=4)
    assert chosen(four, 39_680) == (False, 4)  # 128·310
    assert chosen(four, 20_000) == (True, 4)
    assert chosen(four, 10_000) == (False, 1)  # chunks of 2 need 19,840, of 1 9,920


# the same shape with activations of GiB size, so the messages' one-decimal figures differ
BIG = {k: v * 2**24 for k, v in PER.items()}


def test_fit_step_says_what_it_chose_and_why():
    """Activation GiB by hand (bytes above × 2^24 / 2^30 = bytes / 64): plain 1,317.5,
    checkpointing 544.5, checkpointing with chunks of 1 67.0; the static part adds
    ~0.0005 GiB."""
    cfg = _tiny()
    training = config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=3)
    static = _static(cfg)

    def gib(activation_bytes):
        return (static + activation_bytes * 2**24) / memory.GIB

    head = "batch 2 (8 passages of up to 32 tokens) with"
    fitted, info = memory.fit_step(cfg, training, 2000, reserve_gib=0.5, per=BIG)
    assert fitted == training
    assert info == {"memory_gib": 2000, "reserve_gib": 0.5, "plan_gib": pytest.approx(gib(84_320)),
                    "gradient_checkpointing": False, "grad_cache_chunk_size": 0, "changed": [],
                    "why": f"{head} no memory savers: plan {gib(84_320):.3g} GiB of 2e+03 GiB"}
    fitted, info = memory.fit_step(cfg, training, 600, reserve_gib=0.5, per=BIG)
    assert info["changed"] == ["gradient_checkpointing"]
    assert info["why"] == (f"{head} gradient checkpointing: plan {gib(34_848):.3g} GiB of 600 "
                           f"GiB ({gib(84_320):.3g} GiB as configured)")
    fitted, info = memory.fit_step(cfg, training, 100, reserve_gib=0.5, per=BIG)
    assert info == {"memory_gib": 100, "reserve_gib": 0.5, "plan_gib": pytest.approx(gib(4_288)),
                    "gradient_checkpointing": True, "grad_cache_chunk_size": 1,
                    "changed": ["gradient_checkpointing", "grad_cache_chunk_size"],
                    "why": f"{head} gradient checkpointing and GradCache chunks of 1 texts: plan "
                           f"{gib(4_288):.3g} GiB of 100 GiB ({gib(84_320):.3g} GiB as "
                           f"configured)"}


def test_fit_step_names_the_smallest_step_when_nothing_fits():
    cfg = _tiny()
    training = config.TrainingConfig(1, 2, 1e-4, num_hard_negatives=3)
    static = _static(cfg)
    alone = f"(weights, gradients and AdamW alone: {static / memory.GIB:.1f} GiB)"
    with pytest.raises(MemoryError) as error:
        memory.fit_step(cfg, training, 50, reserve_gib=0.5, per=BIG)
    assert str(error.value).startswith(
        "one step of batch 2 does not fit 50.0 GiB even with gradient checkpointing and "
        f"GradCache chunks of 1: the plan needs 67.0 GiB plus 0.5 GiB kept free {alone}")
    with pytest.raises(MemoryError) as error:  # no GradCache: checkpointing is the smallest
        memory.fit_step(cfg, training, 500, reserve_gib=0.5, per=BIG, grad_cache=False)
    assert str(error.value).startswith(
        "one step of batch 2 does not fit 500.0 GiB even with gradient checkpointing: the plan "
        f"needs 544.5 GiB plus 0.5 GiB kept free {alone}")


def test_training_flops_by_hand():
    """MiniMind-27M per token at 512 tokens (dense: 23,667,328 parameters without the
    embedding; attention 2·factor·8·512·512): checkpointing factor 8: 189,338,624 + 33,554,432;
    with GradCache too, 10: 236,673,280 + 41,943,040. Four new layers of 2,950,144 parameters
    each: 6·35,467,904 + 12·12·512·512. The M3 heads are not in the encoder's FLOPs."""
    m27 = config.MINIMIND_27M
    assert memory.training_flops(m27, 1, 512, True) == 222_893_056
    assert memory.training_flops(m27, 3, 512, True, grad_cache=True) == 3 * 278_616_320
    assert memory.training_flops(replace(m27, num_new_layers=4), 1, 512, False) == 250_556_160
    assert memory.training_flops(m27, 1, 256, False) == 6 * 23_667_328 + 12 * 8 * 512 * 256
    assert memory.training_flops(replace(m27, m3_heads=True), 1, 512, True) == 222_893_056


def test_training_plan_composes_the_steps_the_memory_fit_and_the_hours():
    """Batch 2 with 3 hard negatives, 11 records, 3 epochs: 5 steps an epoch, 15 in all, 2·(8 +
    4·32) = 272 tokens a step. Three GPUs: one holds the step as configured, one only with
    checkpointing, one nothing; with M3 heads (no GradCache) a GPU that needs chunks holds
    nothing."""
    cfg = _tiny()
    training = config.TrainingConfig(3, 2, 1e-4, num_hard_negatives=3)
    per = memory.activation_bytes_per_token(cfg, seq_len=32)  # bf16, as the plan measures
    layer, outside, hidden = per["per_layer"], per["outside_layers"], per["hidden_state"]
    plain = 272 * (3 * layer + outside)
    ckpt = 272 * (3 * hidden + outside) + 256 * layer
    chunk1 = 32 * (3 * hidden + outside) + 32 * layer
    assert chunk1 < ckpt < plain

    def gib(cfg, activation_bytes):
        return (_static(cfg)
                + activation_bytes) / memory.GIB

    gpus = {"roomy": {"memory_gib": gib(cfg, plain) + 0.5, "peak_tflops": 2.0},
            "none": {"memory_gib": 0.5, "peak_tflops": 8.0},  # the GPUs after it still count
            "tight": {"memory_gib": gib(cfg, ckpt) + 0.5, "peak_tflops": 4.0},
            "chunks": {"memory_gib": gib(cfg, chunk1) + 0.5, "peak_tflops": 4.0}}
    plan = memory.training_plan(cfg, training, 11, gpus=gpus, utilisation=0.5)
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["tokens_per_step"]) == (5, 15, 272)
    assert plan["utilisation"] == 0.5
    assert plan["memory_gib"] == {"plain": pytest.approx(gib(cfg, plain)),
                                  "checkpointing": pytest.approx(gib(cfg, ckpt))}

    def hours(ckpt, chunk, peak):
        return 15 * memory.training_flops(cfg, 272, 32, ckpt, chunk) / (peak * 1e12 * 0.5) / 3600

    g = plan["gpus"]
    assert g["roomy"] == {"fits": True, "plan_gib": pytest.approx(gib(cfg, plain)),
                          "gradient_checkpointing": False, "grad_cache_chunk_size": 0,
                          "hours": pytest.approx(hours(False, False, 2.0))}
    assert g["tight"] == {"fits": True, "plan_gib": pytest.approx(gib(cfg, ckpt)),
                          "gradient_checkpointing": True, "grad_cache_chunk_size": 0,
                          "hours": pytest.approx(hours(True, False, 4.0))}
    assert g["chunks"]["grad_cache_chunk_size"] == 1 and g["chunks"]["gradient_checkpointing"]
    assert g["chunks"]["hours"] == pytest.approx(hours(True, True, 4.0))
    assert g["none"] == {"fits": False, "gradient_checkpointing": None,
                         "grad_cache_chunk_size": None, "hours": None}
    m3 = replace(cfg, m3_heads=True)
    m3_gpu = {"memory_gib": gib(m3, chunk1) + 0.5, "peak_tflops": 4.0}
    assert not memory.training_plan(m3, training, 11, gpus={"chunks": m3_gpu})["gpus"][
        "chunks"]["fits"]


def test_the_plan_table_in_chinese():
    plan = {"utilisation": 0.35, "gpus": {
        "A": {"fits": True, "plan_gib": 3.14159, "gradient_checkpointing": True,
              "grad_cache_chunk_size": 4, "hours": 1.2345},
        "B": {"fits": False, "gradient_checkpointing": None, "grad_cache_chunk_size": None,
              "hours": None},
        "C": {"fits": True, "plan_gib": 20.06, "gradient_checkpointing": False,
              "grad_cache_chunk_size": 0, "hours": 0.5},
        "D": {"fits": True, "plan_gib": 7.0, "gradient_checkpointing": False,
              "grad_cache_chunk_size": 8, "hours": 2.0}}}
    table = memory.plan_table(plan)
    hours = "估计小时数（利用率 35%）"
    assert list(table.columns) == ["为放进显存选用", "估计显存 GiB", hours]
    assert list(table.index) == ["A", "B", "C", "D"]
    assert table["为放进显存选用"].tolist() == [
        "梯度检查点、GradCache 每块 4 条", "放不下", "不需要", "GradCache 每块 8 条"]
    assert table.loc["A", "估计显存 GiB"] == 3.1 and table.loc["A", hours] == 1.23
    assert table.loc["C", "估计显存 GiB"] == 20.1 and table.loc["D", hours] == 2.0
    assert table.loc[["B"], ["估计显存 GiB", hours]].isna().all(axis=None)


def test_the_memory_command_prints_the_full_experiments(capsys, monkeypatch):
    # two of them keep it quick; 10,000 records in batches of 32 for 5 epochs, 14.7 GiB as the
    # test above says; 96,000 in batches of 32 for 10 epochs
    monkeypatch.setattr(memory, "EXPERIMENTS", ("minimind27_10k", "minimind38_96k"))
    assert memory.main([]) == 0
    out = capsys.readouterr().out
    assert "\nminimind27_10k: batch 32, 1,560 steps, 14.7 GiB as configured (plan, bf16)\n" in out
    assert "\nminimind38_96k: batch 32, 30,000 steps, " in out
    assert out.count("估计小时数（利用率 35%）") == 2
    with pytest.raises(SystemExit):
        memory.main(["--help"])
    assert "Memory and time plans of the full preset's experiments on each GPU." in " ".join(
        capsys.readouterr().out.split())
