"""One optimizer step and what it needs: AdamW without decay on biases and norms, the device
and its mixed precision, gradient checkpointing, and the loss every training run calls."""

from __future__ import annotations

import torch

from ..models.base import autocast_for, choose_precision
from ..models.gradcache import GradCacheLoss
from ..models.losses import InfoNCELoss
from ..models.m3 import UnifiedM3Loss
from ..settings.config import TrainingConfig
from ..settings.distributed import init_from_env

__all__ = ["make_optimizer", "make_loss", "training_device", "mixed_precision",
           "enable_checkpointing", "optimizer_step"]

def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over every parameter; biases and norm weights (1-D tensors) get no weight decay.

    Frozen parameters are included but receive no gradient, so AdamW neither moves nor decays
    them and creates their state only at their first gradient: a layer unfrozen later by an
    :class:`~retrieval_lib.models.expansion.UnfreezeSchedule` starts with clean optimizer state.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.learning_rate)


def enable_checkpointing(encoder) -> None:
    """Recompute activations in the backward pass (transformers 5 name, or the 4.x one), with
    non-reentrant checkpointing asked for explicitly: the reentrant kind (4.x's default) fails
    under DDP when the shared encoder runs twice per step ("Expected to mark a variable ready
    only once")."""
    kwargs = {"use_reentrant": False}
    enable = getattr(encoder, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def training_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else this process's GPU (``cuda:<local rank>`` under torchrun) when there is
    one, else the CPU."""
    if device is not None:
        return torch.device(device)
    _, world, local_rank = init_from_env()
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}" if world > 1 else "cuda")


def mixed_precision(device: torch.device, precision: str = "auto") -> tuple:
    """``(autocast context, GradScaler or None, precision, why)`` for training on ``device``
    (the choice: :func:`~retrieval_lib.models.base.choose_precision`). fp16 gets a GradScaler on
    any device (CPU included, so the scaler path runs in the tests)."""
    precision, why = choose_precision(device, precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return autocast_for(device, precision), scaler, precision, why


def make_loss(cfg: TrainingConfig, model, world: int = 1):
    """The training loss of ``model``: every one is called as ``loss(model, query_inputs,
    passage_inputs, autocast, scale) -> LossOutput``
    (:class:`~retrieval_lib.models.losses.InfoNCELoss` — cross-device under torchrun —,
    :class:`~retrieval_lib.models.m3.UnifiedM3Loss` for a model with M3 heads, wrapped in
    :class:`~retrieval_lib.models.gradcache.GradCacheLoss` when ``grad_cache_chunk_size`` or
    ``sub_batch_tokens`` is set)."""
    chunked = cfg.grad_cache_chunk_size or cfg.sub_batch_tokens
    if getattr(model, "m3", None) is not None:
        if world > 1 or chunked:
            raise ValueError("the unified M3 loss is implemented for one process without "
                             "GradCache; set grad_cache_chunk_size=0 and sub_batch_tokens=0 "
                             "and train on one GPU")
        return UnifiedM3Loss(cfg.temperature, cfg.m3_score_weights, cfg.m3_loss_weights)
    loss = InfoNCELoss(cfg.temperature)
    return GradCacheLoss(loss, cfg.grad_cache_chunk_size, cfg.sub_batch_tokens) if chunked \
        else loss


def optimizer_step(model: torch.nn.Module, optimizer, schedule, scaler,
                   max_grad_norm: float) -> None:
    """The end of a step whose gradients are in place: unscale them (fp16's GradScaler), clip
    their norm, step the optimizer (through the scaler, which skips a step whose gradients are
    not finite), advance the schedule, clear the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


