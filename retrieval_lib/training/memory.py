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

from ..models.base import build_encoder, parameter_count_from_config
from ..settings.config import EXPERIMENTS, ModelConfig, TrainingConfig, get_experiment
from .collator import steps_per_epoch

__all__ = ["saved_activation_bytes", "activation_bytes_per_token", "static_bytes",
           "step_activation_bytes", "training_memory_plan", "fit_step", "largest_batches", "GIB",
           "CUDA_CONTEXT_GIB", "GPUS", "UTILISATION", "training_flops", "training_plan",
           "plan_table"]

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


def step_activation_bytes(cfg: ModelConfig, training: TrainingConfig, per: dict, batch: int,
                          gradient_checkpointing: bool, chunk: int = 0,
                          seq_len: int | None = None) -> float:
    """Activation bytes one training step keeps for its backward pass (``per``: from
    :func:`activation_bytes_per_token`).

    Without GradCache (``chunk`` 0) both forward passes of the batch (``batch`` queries of
    ``max_query_length`` tokens, ``batch·(1+K)`` passages of ``seq_len``) stay alive. With
    GradCache only one chunk of ``chunk`` texts has a graph at a time; the largest is a chunk of
    passages. Gradient checkpointing keeps each block's input, plus the activations of the
    block being recomputed for the largest forward pass.
    """
    seq_len = seq_len or cfg.max_passage_length
    layers = cfg.num_hidden_layers + cfg.num_new_layers
    passages = batch * (1 + training.num_hard_negatives)
    if chunk:
        tokens = passage_tokens = min(chunk, passages) * seq_len
    else:
        passage_tokens = passages * seq_len
        tokens = batch * cfg.max_query_length + passage_tokens
    if not gradient_checkpointing:
        return tokens * (per["per_layer"] * layers + per["outside_layers"])
    return tokens * (per["hidden_state"] * layers + per["outside_layers"]) \
        + passage_tokens * per["per_layer"]


def training_memory_plan(cfg: ModelConfig, training: TrainingConfig,
                         batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                         seq_len: int | None = None, measure_seq_len: int = 512,
                         per: dict | None = None) -> list[dict]:
    """GPU memory estimate (GiB) of one training step of the expanded retriever for each batch
    size, with and without gradient checkpointing, under bf16 autocast
    (:func:`step_activation_bytes`; ``per``: a measurement to reuse). Long-text passages fill
    their maximum length, so padding is not modelled.
    """
    seq_len = seq_len or cfg.max_passage_length
    per = per or activation_bytes_per_token(cfg, seq_len=min(seq_len, measure_seq_len))
    static = static_bytes(parameter_count_from_config(cfg))
    rows = []
    for batch in batch_sizes:
        tokens = batch * cfg.max_query_length + batch * (1 + training.num_hard_negatives) * seq_len
        for ckpt in (False, True):
            act = step_activation_bytes(cfg, training, per, batch, ckpt, seq_len=seq_len)
            rows.append({"batch_size": batch, "tokens_per_step": tokens,
                         "gradient_checkpointing": ckpt, "static_gib": static["total"] / GIB,
                         "activations_gib": act / GIB,
                         "total_gib": (static["total"] + act) / GIB})
    return rows


def fit_step(cfg: ModelConfig, training: TrainingConfig, memory_gib: float,
             reserve_gib: float = CUDA_CONTEXT_GIB, per: dict | None = None,
             grad_cache: bool = True) -> tuple[TrainingConfig, dict]:
    """``training`` with the memory savers that let one step fit ``memory_gib`` (free GPU
    memory), and what was chosen and why.

    The batch is never changed, so the in-batch negatives and the mathematics of the step stay
    those of the report; only how the step is computed changes. Tried in order of extra
    compute, keeping what ``training`` already turns on: as configured; gradient checkpointing
    (one more forward pass); GradCache (:mod:`retrieval_lib.models.gradcache`) with the largest
    power-of-two chunk that fits (one more forward pass, without a graph); both.
    ``grad_cache=False`` (the unified M3 loss has no GradCache) leaves checkpointing only.
    Raises ``MemoryError`` naming the figures when even the smallest step does not fit.
    The plan is a lower bound (:mod:`retrieval_lib.training.memory`), hence ``reserve_gib`` kept
    free.
    """
    per = per or activation_bytes_per_token(cfg, seq_len=min(cfg.max_passage_length, 512))
    static = static_bytes(parameter_count_from_config(cfg))["total"]
    budget = memory_gib - reserve_gib
    passages = training.batch_size * (1 + training.num_hard_negatives)
    chunks = [2**k for k in range(passages.bit_length() - 1, -1, -1) if 2**k < passages]
    if training.grad_cache_chunk_size:
        chunks = [c for c in chunks if c < training.grad_cache_chunk_size]
    ckpt_options = [True] if training.gradient_checkpointing else [False, True]
    options = [(ckpt, training.grad_cache_chunk_size) for ckpt in ckpt_options]
    if grad_cache:
        options += [(ckpt, c) for ckpt in ckpt_options for c in chunks]

    def need(ckpt, chunk):
        act = step_activation_bytes(cfg, training, per, training.batch_size, ckpt, chunk)
        return (static + act) / GIB

    for ckpt, chunk in options:
        if need(ckpt, chunk) <= budget:
            break
    else:
        ckpt, chunk = options[-1]
        smallest = f" and GradCache chunks of {chunk}" if chunk else ""
        raise MemoryError(
            f"one step of batch {training.batch_size} does not fit {memory_gib:.1f} GiB even "
            f"with gradient checkpointing{smallest}: the plan needs {need(ckpt, chunk):.1f} GiB "
            f"plus {reserve_gib} GiB kept free "
            f"(weights, gradients and AdamW alone: {static / GIB:.1f} GiB); use a GPU with more "
            f"memory or train on several (torchrun)")
    fitted = replace(training, gradient_checkpointing=ckpt, grad_cache_chunk_size=chunk)
    changed = [k for k in ("gradient_checkpointing", "grad_cache_chunk_size")
               if getattr(fitted, k) != getattr(training, k)]
    savers = ([["gradient checkpointing"], []][not ckpt]
              + ([f"GradCache chunks of {chunk} texts"] if chunk else []))
    why = (f"batch {training.batch_size} ({passages} passages of up to "
           f"{cfg.max_passage_length} tokens) with {' and '.join(savers) or 'no memory savers'}: "
           f"plan {need(ckpt, chunk):.3g} GiB of {memory_gib:.3g} GiB"
           + (f" ({need(*options[0]):.3g} GiB as configured)" if changed else ""))
    return fitted, {"memory_gib": memory_gib, "reserve_gib": reserve_gib,
                    "plan_gib": need(ckpt, chunk), "gradient_checkpointing": ckpt,
                    "grad_cache_chunk_size": chunk, "changed": changed, "why": why}


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
                   gradient_checkpointing: bool, grad_cache: bool = False) -> float:
    """FLOPs of one training step over ``tokens`` tokens: 6 per non-embedding parameter and
    token (forward 2, backward 4; +2 with checkpointing, which repeats the forward, and +2 with
    GradCache, whose first pass embeds without a graph) plus the attention scores,
    2·factor·layers·width·seq_len per token.

    MiniMind-27M: 26,944,128 parameters - 3,276,800 embedding = 23,667,328; per token
    6·23,667,328 + 12·8·512·512 = 167,169,792, so 1,000 tokens:

    >>> from retrieval_lib.settings.config import MINIMIND_27M
    >>> training_flops(MINIMIND_27M, 1000, 512, False)
    167169792000
    """
    layers = cfg.num_hidden_layers + cfg.num_new_layers
    embedding = cfg.vocab_size * cfg.hidden_size
    dense = parameter_count_from_config(replace(cfg, m3_heads=False)) - embedding
    factor = 6 + 2 * gradient_checkpointing + 2 * grad_cache
    attention = (factor * 2) * layers * cfg.hidden_size * seq_len
    return tokens * (factor * dense + attention)


def training_plan(cfg: ModelConfig, training: TrainingConfig, train_records: int,
                  gpus: dict | None = None, utilisation: float = UTILISATION) -> dict:
    """What a run will cost before it starts: optimizer steps, tokens per step (every text at
    its maximum length: long-text data fills it), the memory plan of its batch with and without
    gradient checkpointing, and for each GPU the memory savers :func:`fit_step` chooses there
    (None: it does not fit) and an estimate of the hours at ``utilisation`` of the GPU's peak.
    Estimates, not measurements."""
    spe = steps_per_epoch(train_records, training)
    total = spe * training.epochs
    per = activation_bytes_per_token(cfg, seq_len=min(cfg.max_passage_length, 512))
    rows = training_memory_plan(cfg, training, batch_sizes=(training.batch_size,), per=per)
    tokens = rows[0]["tokens_per_step"]
    out = {"steps_per_epoch": spe, "total_steps": total, "tokens_per_step": tokens,
           "memory_gib": {("checkpointing" if r["gradient_checkpointing"] else "plain"):
                          r["total_gib"] for r in rows},
           "utilisation": utilisation, "gpus": {}}
    for name, spec in (gpus or GPUS).items():
        try:
            fitted, fit = fit_step(cfg, training, spec["memory_gib"], per=per,
                                   grad_cache=not cfg.m3_heads)
        except MemoryError:
            out["gpus"][name] = {"fits": False, "gradient_checkpointing": None,
                                 "grad_cache_chunk_size": None, "hours": None}
            continue
        flops = training_flops(cfg, tokens, cfg.max_passage_length,
                               fitted.gradient_checkpointing,
                               bool(fitted.grad_cache_chunk_size)) * total
        out["gpus"][name] = {"fits": True, "plan_gib": fit["plan_gib"],
                             "gradient_checkpointing": fitted.gradient_checkpointing,
                             "grad_cache_chunk_size": fitted.grad_cache_chunk_size,
                             "hours": flops / (spec["peak_tflops"] * 1e12 * utilisation) / 3600}
    return out


def plan_table(plan: dict):
    """:func:`training_plan` per GPU as a pandas table with Chinese headers (estimates)."""
    import pandas as pd

    hours = f"估计小时数（利用率 {plan['utilisation']:.0%}）"

    def savers(g):
        if not g["fits"]:
            return "放不下"
        parts = (["梯度检查点"] if g["gradient_checkpointing"] else []) + (
            [f"GradCache 每块 {g['grad_cache_chunk_size']} 条"] if g["grad_cache_chunk_size"]
            else [])
        return "、".join(parts) or "不需要"

    return pd.DataFrame({name: {"为放进显存选用": savers(g),
                                "估计显存 GiB": round(g["plan_gib"], 1) if g["fits"] else None,
                                hours: round(g["hours"], 2) if g["fits"] else None}
                         for name, g in plan["gpus"].items()}).T


def main(argv: list[str] | None = None) -> int:
    """Print, for every experiment of the full preset, its memory plan on each GPU of
    :data:`GPUS`: ``python -m retrieval_lib memory``."""
    import argparse

    argparse.ArgumentParser(description="Memory and time plans of the full preset's "
                            "experiments on each GPU.").parse_args(argv)
    for name in EXPERIMENTS:
        exp = get_experiment(name, "full")
        plan = training_plan(exp.model, exp.training, exp.train_size)
        print(f"\n{name}: batch {exp.training.batch_size}, {plan['total_steps']:,} steps, "
              f"{plan['memory_gib']['plain']:.1f} GiB as configured (plan, bf16)")
        print(plan_table(plan).to_string())
    return 0
