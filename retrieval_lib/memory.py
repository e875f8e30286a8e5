"""Training memory of a retriever: what the GPU must hold, from parameter counts and a measurement.

Training memory has two parts:

* **static**, exact arithmetic on the parameter count ``P``: fp32 weights (4 bytes), fp32
  gradients (4) and AdamW's two moments (8), i.e. 16·P bytes, plus a 2·P bf16 copy of the
  weights that autocast keeps during the forward pass;
* **activations**, the tensors the forward pass saves for the backward pass. They grow with the
  tokens in a step. :func:`activation_bytes_per_token` *measures* them on the CPU for one
  transformer block of the real width (every tensor autograd saves is seen through
  ``torch.autograd.graph.saved_tensors_hooks``), so a plan for Qwen2-0.5B needs neither a GPU
  nor the weights. With gradient checkpointing only each block's input is kept, plus one block's
  activations while it is recomputed.

The plan is a lower bound: the CUDA context (~0.5 GB), allocator fragmentation and temporary
buffers come on top. It has not yet been compared with peaks measured on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch

from .config import ModelConfig, TrainingConfig
from .modeling import build_encoder, parameter_count_from_config
from .training import steps_per_epoch

__all__ = ["saved_activation_bytes", "activation_bytes_per_token", "static_bytes",
           "training_memory_plan", "largest_batches", "GIB", "CUDA_CONTEXT_GIB", "GPUS",
           "UTILISATION", "training_flops", "training_plan", "plan_table"]

GIB = 1024**3
#: Memory the CUDA context and kernels take before the first tensor (a rule of thumb).
CUDA_CONTEXT_GIB = 0.5


def saved_activation_bytes(fn: Callable[[], object],
                           exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    Tensors whose storage is one of ``exclude`` (the model's parameters) are not activations
    and are not counted; a storage saved by several operations is counted once.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int = 512, batch_size: int = 1,
                               dtype: torch.dtype | None = torch.bfloat16) -> dict:
    """Activation bytes per token, measured on the CPU at ``cfg``'s real width.

    Builds the encoder with 1 and with 2 blocks (a small vocabulary: the embedding table does not
    change activations), runs forward passes on ``batch_size`` texts of ``seq_len // 2`` and of
    ``seq_len`` tokens under autocast to ``dtype`` (``None``: fp32) and counts the saved
    tensors. The per-token figures are slopes between the two lengths, so what does not grow with
    the tokens (autocast's bf16 weight copies, counted in :func:`static_bytes`) drops out.
    Returns ``per_layer`` (bytes per token per block), ``outside_layers`` (embedding output,
    final norm) and ``hidden_state`` (bytes per token of one block's input, what checkpointing
    keeps).
    """
    shape = replace(cfg, vocab_size=256, num_new_layers=0)
    lengths = (seq_len // 2, seq_len)
    saved = {}
    for layers in (1, 2):
        encoder = build_encoder(replace(shape, num_hidden_layers=layers), seed=0)
        encoder.train()
        for length in lengths:
            ids = torch.randint(0, shape.vocab_size, (batch_size, length))

            def forward(encoder=encoder, ids=ids):
                context = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                           else nullcontext())
                with context:
                    encoder(input_ids=ids, attention_mask=torch.ones_like(ids)
                            ).last_hidden_state.float().mean(1)

            saved[layers, length] = saved_activation_bytes(forward, exclude=encoder.parameters())
    tokens = batch_size * (lengths[1] - lengths[0])
    one = (saved[1, lengths[1]] - saved[1, lengths[0]]) / tokens
    two = (saved[2, lengths[1]] - saved[2, lengths[0]]) / tokens
    element = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    return {"per_layer": two - one, "outside_layers": 2 * one - two,
            "hidden_state": cfg.hidden_size * element, "seq_len": seq_len,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32"}


def static_bytes(parameters: int, trainable: int | None = None, autocast: bool = True) -> dict:
    """Weights, gradients and AdamW state in bytes for ``parameters`` (``trainable`` of them
    trained): fp32 weights, fp32 gradients and two fp32 moments per trainable parameter, and a
    bf16 weight copy under autocast."""
    trainable = parameters if trainable is None else trainable
    parts = {"weights": 4 * parameters, "gradients": 4 * trainable,
             "optimizer": 8 * trainable, "autocast_copy": 2 * parameters if autocast else 0}
    return {**parts, "total": sum(parts.values())}


def training_memory_plan(cfg: ModelConfig, training: TrainingConfig,
                         batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                         seq_len: int | None = None, measure_seq_len: int = 512) -> list[dict]:
    """GPU memory estimate (GiB) of one training step of the expanded retriever for each batch
    size, with and without gradient checkpointing, under bf16 autocast.

    A step encodes ``B`` queries of ``max_query_length`` tokens and ``B·(1+K)`` passages of
    ``seq_len`` (default ``max_passage_length``) tokens; both forward passes stay alive until
    the backward pass. Long-text passages fill their maximum length, so padding is not modelled.
    """
    seq_len = seq_len or cfg.max_passage_length
    per = activation_bytes_per_token(cfg, seq_len=min(seq_len, measure_seq_len))
    layers = cfg.num_hidden_layers + cfg.num_new_layers
    static = static_bytes(parameter_count_from_config(cfg))
    rows = []
    for batch in batch_sizes:
        passage_tokens = batch * (1 + training.num_hard_negatives) * seq_len
        tokens = batch * cfg.max_query_length + passage_tokens
        full = tokens * (per["per_layer"] * layers + per["outside_layers"])
        # checkpointing keeps each block's input; the block being recomputed holds its own
        # activations for the largest forward pass (the passages)
        checkpointed = tokens * (per["hidden_state"] * layers + per["outside_layers"]) \
            + passage_tokens * per["per_layer"]
        for ckpt, act in ((False, full), (True, checkpointed)):
            rows.append({"batch_size": batch, "tokens_per_step": tokens,
                         "gradient_checkpointing": ckpt, "static_gib": static["total"] / GIB,
                         "activations_gib": act / GIB,
                         "total_gib": (static["total"] + act) / GIB})
    return rows


def largest_batches(plan: Sequence[dict], gpus: dict[str, float],
                    reserve_gib: float = CUDA_CONTEXT_GIB) -> dict[str, dict[str, int]]:
    """For each GPU (name -> GiB), the largest batch of ``plan`` that fits with ``reserve_gib``
    kept free, without (``plain``) and with gradient checkpointing; 0 when none fits."""
    def best(gib, ckpt):
        return max([r["batch_size"] for r in plan if r["gradient_checkpointing"] == ckpt
                    and r["total_gib"] + reserve_gib <= gib], default=0)

    return {name: {"plain": best(gib, False), "checkpointing": best(gib, True)}
            for name, gib in gpus.items()}


#: GPUs a course user trains on: memory (GiB) and the vendor's peak dense tensor throughput
#: (TFLOP/s) for the half precision autocast uses there (FP16 with FP32 accumulation on the T4
#: and the RTX 3060, whose GeForce Ampere chip runs that at half its FP16-accumulate rate; BF16
#: on the A100).
GPUS = {"T4 (16 GB, Colab)": {"memory_gib": 15.0, "peak_tflops": 65.0},
        "RTX 3060 (12 GB)": {"memory_gib": 12.0, "peak_tflops": 25.6},
        "A100 (40 GB, Colab)": {"memory_gib": 40.0, "peak_tflops": 312.0}}

#: Share of the peak a training step reaches (model FLOPs utilisation) in the time estimates.
UTILISATION = 0.35


def training_flops(cfg: ModelConfig, tokens: int, seq_len: int,
                   gradient_checkpointing: bool) -> float:
    """FLOPs of one training step over ``tokens`` tokens: 6 per non-embedding parameter and
    token (forward 2, backward 4; 8 with checkpointing, which repeats the forward) plus the
    attention scores, 12·layers·width·seq_len per token (16 with checkpointing).

    MiniMind-27M: 26,944,128 parameters - 3,276,800 embedding = 23,667,328; per token
    6·23,667,328 + 12·8·512·512 = 167,169,792, so 1,000 tokens:

    >>> from retrieval_lib.config import MINIMIND_27M
    >>> training_flops(MINIMIND_27M, 1000, 512, False)
    167169792000
    """
    layers = cfg.num_hidden_layers + cfg.num_new_layers
    embedding = cfg.vocab_size * cfg.hidden_size
    dense = parameter_count_from_config(replace(cfg, m3_heads=False)) - embedding
    factor = 8 if gradient_checkpointing else 6
    attention = (factor * 2) * layers * cfg.hidden_size * seq_len
    return tokens * (factor * dense + attention)


def training_plan(cfg: ModelConfig, training: TrainingConfig, train_records: int,
                  gpus: dict | None = None, utilisation: float = UTILISATION) -> dict:
    """What a run will cost before it starts: optimizer steps, tokens per step (every text at
    its maximum length: long-text data fills it), the memory plan of its batch with and without
    gradient checkpointing, and for each GPU whether the step fits and an estimate of the hours
    at ``utilisation`` of the GPU's peak. Estimates, not measurements."""
    spe = steps_per_epoch(train_records, training)
    total = spe * training.epochs
    rows = training_memory_plan(cfg, training, batch_sizes=(training.batch_size,))
    seq = cfg.max_passage_length
    tokens = rows[0]["tokens_per_step"]
    out = {"steps_per_epoch": spe, "total_steps": total, "tokens_per_step": tokens,
           "memory_gib": {("checkpointing" if r["gradient_checkpointing"] else "plain"):
                          r["total_gib"] for r in rows},
           "utilisation": utilisation, "gpus": {}}
    for name, spec in (gpus or GPUS).items():
        fits = {mode: gib + CUDA_CONTEXT_GIB <= spec["memory_gib"]
                for mode, gib in out["memory_gib"].items()}
        ckpt = training.gradient_checkpointing or not fits["plain"]
        flops = training_flops(cfg, tokens, seq, ckpt) * total
        out["gpus"][name] = {"fits_plain": fits["plain"], "fits_checkpointing":
                             fits["checkpointing"], "uses_checkpointing": ckpt,
                             "hours": flops / (spec["peak_tflops"] * 1e12 * utilisation) / 3600}
    return out


def plan_table(plan: dict):
    """:func:`training_plan` per GPU as a pandas table with Chinese headers (estimates)."""
    import pandas as pd

    hours = f"估计小时数（利用率 {plan['utilisation']:.0%}）"
    return pd.DataFrame({name: {"显存够（不用检查点）": g["fits_plain"],
                                "显存够（梯度检查点）": g["fits_checkpointing"],
                                hours: round(g["hours"], 2)}
                         for name, g in plan["gpus"].items()}).T
