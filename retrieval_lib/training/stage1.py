"""The loop of stage 1a, RetroMAE auto-encoding (:mod:`retrieval_lib.models.retromae`).

Texts are cut into windows of the fine-tuning passage length, so every token of a long passage
is read; a small share of the texts is held out, and its loss (with masks fixed once) is
measured every ``eval_every`` steps; the encoder of the lowest held-out loss is the result, as
the demo LMs' pretraining keeps its lowest perplexity. Each step's batch and masks come from a
generator seeded with ``(seed, step)``, so a run resumed from a checkpoint draws exactly what
the uninterrupted run would have drawn: resume is bit-identical.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..models.base import parameter_count_from_config
from ..models.retromae import RetroMAE, make_batch, mask_token_id
from ..settings.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..settings.config import ModelConfig, Stage1Config, TrainingConfig
from ..settings.runlock import writes_run_folder
from ..settings.saved_folder import atomic_folder, write_checksums
from .memory import (
    CUDA_CONTEXT_GIB,
    GIB,
    GPUS,
    UTILISATION,
    activation_bytes_per_token,
    static_bytes,
    training_flops,
    training_plan,
)
from .optim import make_optimizer, mixed_precision, optimizer_step, training_device

__all__ = ["token_windows", "train_retromae", "LOGIT_BYTES", "stage1_plan", "stage1_table"]

#: What every saved encoder folder holds (``save_pretrained`` of a model in safetensors).
ENCODER_FILES = ("config.json", "model.safetensors")

#: Windows shorter than this many tokens (the tail of a passage) are left out and counted.
MIN_WINDOW_TOKENS = 8


def token_windows(tokenizer, texts: Sequence[str], max_length: int, append_eos: bool
                  ) -> tuple[list[list[int]], int]:
    """Consecutive windows of at most ``max_length`` tokens of each text (with ``append_eos``
    each window ends with EOS, within the length, as the retriever reads a passage), and how
    many tails shorter than :data:`MIN_WINDOW_TOKENS` were left out."""
    room = max_length - 1 if append_eos else max_length
    windows, short = [], 0
    for start in range(0, len(texts), 256):
        for ids in tokenizer(list(texts[start:start + 256]), add_special_tokens=False
                             )["input_ids"]:
            for at in range(0, len(ids), room):
                piece = ids[at:at + room]
                if len(piece) < MIN_WINDOW_TOKENS:
                    short += 1
                    continue
                windows.append(piece + [tokenizer.eos_token_id] if append_eos else piece)
    return windows, short


def _batch(model: RetroMAE, windows, rows, tokenizer, cfg: Stage1Config, generator):
    special = set(tokenizer.all_special_ids)
    return make_batch([windows[i] for i in rows], tokenizer.pad_token_id,
                      mask_token_id(tokenizer), special, cfg.encoder_mask_ratio,
                      cfg.decoder_mask_ratio, generator)


def _to(batch, device: torch.device):
    """``batch`` (a :class:`RetroMAEBatch`) with every tensor on ``device``."""
    if device.type == "cpu":
        return batch
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


@torch.no_grad()
def _heldout_loss(model: RetroMAE, batches, device: torch.device, autocast) -> dict[str, float]:
    model.eval()
    totals = {"loss": 0.0, "encoder_loss": 0.0, "decoder_loss": 0.0}
    for batch in batches:
        with autocast:
            out = model(_to(batch, device))
        for key in totals:
            totals[key] += out[key].item() / len(batches)
    model.train()
    return totals


@writes_run_folder("RetroMAE training")
def train_retromae(encoder, tokenizer, texts: Sequence[str], heldout: Sequence[str],
                   cfg: Stage1Config, out_dir: str | Path, pooling: str = "mean",
                   resume: bool = True, show_progress: bool = True,
                   device: str | torch.device | None = None, precision: str = "auto") -> dict:
    """Train ``encoder`` (an ``AutoModel`` decoder LM, changed in place) with RetroMAE on
    ``texts``; returns the history and writes ``out_dir/encoder`` (the encoder of the lowest
    held-out loss, with the tokenizer and ``checksums.json``) and ``out_dir/history.json``.

    Checkpoints (model, decoder, optimizer, schedule, history) go to ``out_dir/checkpoints``
    every ``cfg.checkpoint_steps`` steps; ``resume`` continues from the newest good one.
    It trains on ``device`` (default: the GPU when there is one) in ``precision``
    (:func:`~retrieval_lib.training.optim.mixed_precision`: ``auto`` is bf16 or fp16 with loss
    scaling on a GPU, fp32 on the CPU); both go into the history.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    out = Path(out_dir)
    append_eos = pooling == "last_token"
    windows, short = token_windows(tokenizer, texts, cfg.retromae_max_length, append_eos)
    held, held_short = token_windows(tokenizer, heldout, cfg.retromae_max_length, append_eos)
    if not windows or not held:
        raise ValueError(f"RetroMAE needs training and held-out windows of at least "
                         f"{MIN_WINDOW_TOKENS} tokens: {len(windows)} and {len(held)} were cut "
                         f"from {len(texts)} and {len(heldout)} texts")
    model = RetroMAE(encoder, pooling, seed=cfg.seed)
    device = training_device(device)
    model.to(device).train()
    autocast, scaler, chosen, why = mixed_precision(device, precision)
    optimizer = make_optimizer(model, TrainingConfig(
        epochs=1, batch_size=cfg.retromae_batch_size,
        learning_rate=cfg.retromae_learning_rate))
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * cfg.retromae_steps),
                                               cfg.retromae_steps)
    fixed = torch.Generator().manual_seed(cfg.seed)  # the held-out masks, drawn once
    heldout_batches = [_batch(model, held, range(i, min(i + cfg.retromae_batch_size,
                                                        len(held))), tokenizer, cfg, fixed)
                       for i in range(0, len(held), cfg.retromae_batch_size)]
    history = {"steps": [], "heldout": [], "best_step": 0, "best_loss": None,
               "windows": len(windows), "heldout_windows": len(held),
               "short_tails_left_out": short + held_short, "texts": len(texts),
               "heldout_texts": len(heldout), "mask_token_id": mask_token_id(tokenizer),
               "resumed_from": [], "wall_time_s": 0.0, "device": str(device),
               "precision": chosen, "precision_reason": why}
    done = 0
    if not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    folder = latest_checkpoint(out / "checkpoints") if resume else None
    if folder is not None:
        state = load_checkpoint(folder, model, optimizer, schedule, scaler)
        done, history = state["step"], state["history"]
        history["resumed_from"].append(done)
    if done == 0:
        history["heldout"].append([0, _heldout_loss(model, heldout_batches, device, autocast)])
    started = time.perf_counter() - history["wall_time_s"]
    for step in tqdm(range(done + 1, cfg.retromae_steps + 1), desc="RetroMAE",
                     disable=not show_progress, initial=done, total=cfg.retromae_steps):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(len(windows), (cfg.retromae_batch_size,), generator=generator)
        with autocast:
            out_step = model(_to(_batch(model, windows, rows.tolist(), tokenizer, cfg,
                                        generator), device))
        (scaler.scale(out_step["loss"]) if scaler is not None else out_step["loss"]).backward()
        optimizer_step(model, optimizer, schedule, scaler, 1.0)
        history["steps"].append([step, out_step["encoder_loss"].item(),
                                 out_step["decoder_loss"].item()])
        if step % cfg.eval_every == 0 or step == cfg.retromae_steps:
            loss = _heldout_loss(model, heldout_batches, device, autocast)
            history["heldout"].append([step, loss])
            if history["best_loss"] is None or loss["loss"] < history["best_loss"]:
                history["best_step"], history["best_loss"] = step, loss["loss"]
                with atomic_folder(out / "best", owns=ENCODER_FILES) as tmp:
                    encoder.save_pretrained(str(tmp), safe_serialization=True)
        if step % cfg.checkpoint_steps == 0 and step < cfg.retromae_steps:
            history["wall_time_s"] = time.perf_counter() - started
            save_checkpoint(out / "checkpoints", step, model, optimizer, schedule, scaler,
                            {"step": step, "history": history})
    history["wall_time_s"] = time.perf_counter() - started
    with atomic_folder(out / "encoder", owns=ENCODER_FILES) as tmp:
        for path in (out / "best").iterdir():
            (tmp / path.name).write_bytes(path.read_bytes())
        tokenizer.save_pretrained(str(tmp))
        write_checksums(tmp)
    (out / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    return history


#: Bytes a predicted token's logits keep per vocabulary entry: the bf16 output of the LM head
#: and the fp32 log-softmax that cross-entropy saves for the backward pass.
LOGIT_BYTES = 6


def stage1_plan(cfg: ModelConfig, stage1: Stage1Config, texts: int, pairs: int | None = None,
                gpus: dict | None = None, utilisation: float = UTILISATION) -> dict:
    """What stage 1 (:mod:`retrieval_lib.course.stage1`) will cost on the base model of ``cfg``
    before it runs; estimates, as :func:`training_plan`.

    ``retromae`` (1a): steps, tokens per step, the memory of a step (weights, gradients and
    AdamW of the encoder and the one-block decoder; the encoder's activations; the decoder's
    two streams, counted as two blocks; the logits of every predicted token, the encoder's
    masked ones and all of the decoder's, at :data:`LOGIT_BYTES` per vocabulary entry, which
    dominates for Qwen2's 151,936-token vocabulary) and, per GPU, whether the batch fits, the
    largest power-of-two batch that does, and hours. ``contrastive`` (1b): :func:`training_plan`
    of :meth:`~retrieval_lib.settings.config.Stage1Config.contrastive_training` on ``pairs``
    mined pairs (default, ``pairs_estimated``: ``texts`` × ``pairs_per_text`` for crops and
    ICT; titles add pairs only where passages have titles).
    """
    base = replace(cfg, num_new_layers=0, m3_heads=False, separate_projections=False)
    batch, length = stage1.retromae_batch_size, stage1.retromae_max_length
    per = activation_bytes_per_token(base, seq_len=min(length, 512))
    one, two = (parameter_count_from_config(replace(base, num_hidden_layers=n)) for n in (1, 2))
    projection = base.hidden_size * base.projection_dim + base.projection_dim  # not in 1a
    params = parameter_count_from_config(base) - projection + (two - one) + base.hidden_size
    static = static_bytes(params)["total"]
    predicted_share = 1 + stage1.encoder_mask_ratio

    def need_gib(rows: int) -> float:
        tokens = rows * length
        act = tokens * (per["per_layer"] * (base.num_hidden_layers + 2) + per["outside_layers"])
        return (static + act + tokens * predicted_share * base.vocab_size * LOGIT_BYTES) / GIB

    tokens = batch * length
    flops = (training_flops(base, tokens, length, False) + 2 * 6 * (two - one) * tokens
             + 6 * base.vocab_size * base.hidden_size * tokens * predicted_share)
    retromae = {"steps": stage1.retromae_steps, "batch_size": batch, "tokens_per_step": tokens,
                "parameters": params, "static_gib": static / GIB, "flops_per_step": flops,
                "memory_gib": need_gib(batch), "utilisation": utilisation, "gpus": {}}
    for name, spec in (gpus or GPUS).items():
        room = spec["memory_gib"] - CUDA_CONTEXT_GIB
        fitting = [b for b in (batch, *(2**k for k in range(batch.bit_length(), -1, -1)))
                   if b <= batch and need_gib(b) <= room]
        retromae["gpus"][name] = {
            "fits": need_gib(batch) <= room, "plan_gib": need_gib(batch),
            "largest_batch": max(fitting, default=0),
            "hours": flops * stage1.retromae_steps / (spec["peak_tflops"] * 1e12 * utilisation)
            / 3600}
    kinds = [k for k in stage1.pair_kinds if k != "title"]
    estimated = pairs is None
    pairs = texts * stage1.pairs_per_text * len(kinds) if estimated else pairs
    return {"retromae": retromae, "pairs": pairs, "pairs_estimated": estimated,
            "contrastive": training_plan(base, stage1.contrastive_training(), pairs, gpus,
                                         utilisation)}


def stage1_table(plan: dict):
    """:func:`stage1_plan` per GPU as a pandas table with Chinese headers (estimates)."""
    import pandas as pd

    rows = {}
    for name, g in plan["retromae"]["gpus"].items():
        c = plan["contrastive"]["gpus"][name]
        rows[name] = {
            "1a 估计显存 GiB": round(g["plan_gib"], 1),
            "1a 能放下的批量": g["largest_batch"] if g["largest_batch"] else "放不下",
            "1a 估计小时数": round(g["hours"], 2),
            "1b 估计显存 GiB（所选省显存方法下）": round(c["plan_gib"], 1) if c["fits"]
            else "放不下",
            "1b 估计小时数": round(c["hours"], 2) if c["fits"] else None}
    return pd.DataFrame.from_dict(rows, orient="index")
