"""Capacity expansion: append (or interleave) new transformer layers and unfreeze them gradually.

``expand_layers`` grows a MiniMind/Llama or Qwen2 decoder in place:

* ``init="random"``: new layers initialised like fresh ones (as in the seed report);
* ``init="identity"``: LEMON / LLaMA-Pro style; the attention output projection and the MLP down
  projection of each new pre-norm block are zero, so the block adds nothing to the residual
  stream and the expanded model computes exactly the same function at step 0;
* ``init="copy"``: each new layer duplicates an existing one (progressive stacking).

``position="top"`` appends after the pretrained stack (the seed report); ``"interleave"`` spreads
the new layers evenly through it. Layer indices, ``config.num_hidden_layers`` and (for Qwen2)
``config.layer_types`` stay consistent, so ``save_pretrained`` / ``from_pretrained`` round-trip.

``UnfreezeSchedule`` keeps the new layers frozen at first and makes one more trainable at each
stage, bottom-up, while the pretrained layers and the projection train throughout; the stages
split the run's optimizer steps (or last ``every_epochs`` each, as the report's 2 epochs), and
the plan refuses a schedule whose last layer would never train.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["INITS", "POSITIONS", "decoder_layers", "new_layer_positions", "expand_layers",
           "UnfreezeSchedule", "UnfreezePlan"]

INITS = ("random", "identity", "copy")
POSITIONS = ("top", "interleave")


def decoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a Llama/Qwen2 base model."""
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(encoder).__name__} has no decoder layer stack; expansion supports "
                        f"MiniMind/Llama and Qwen2 decoders")
    return layers


def new_layer_positions(num_old: int, num_new: int, position: str) -> list[int]:
    """Indices the new layers take in the expanded stack of ``num_old + num_new`` layers.

    >>> new_layer_positions(4, 2, "top"), new_layer_positions(4, 2, "interleave")
    ([4, 5], [2, 5])
    """
    if position == "top":
        return list(range(num_old, num_old + num_new))
    if position == "interleave":
        # after every ceil(num_old / num_new)-th old layer, counting the ones already inserted
        step = math.ceil(num_old / num_new)
        return [min((i + 1) * step, num_old) + i for i in range(num_new)]
    raise ValueError(f"unknown position {position!r}; expected one of {', '.join(POSITIONS)}")


def _zero_residual_writes(layer: nn.Module) -> None:
    """Zero what a pre-norm block adds to the residual stream: o_proj and down_proj."""
    for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
        nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def expand_layers(encoder: nn.Module, num_new_layers: int, init: str = "random",
                  position: str = "top", seed: int | None = None) -> list[int]:
    """Insert ``num_new_layers`` blocks into ``encoder`` in place; returns their indices."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    layers = decoder_layers(encoder)
    if num_new_layers <= 0:
        return []
    config = encoder.config
    old = list(layers)
    total = len(old) + num_new_layers
    positions = new_layer_positions(len(old), num_new_layers, position)
    reference = next(old[0].parameters())
    # the config must describe the final stack before new layers read their layer type
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        kinds = iter(list(layer_types))
        config.layer_types = [("full_attention" if i in positions else next(kinds))
                              for i in range(total)]
    config.num_hidden_layers = total
    if seed is not None:
        torch.manual_seed(seed)
    stack, old_iter = [], iter(old)
    for index in range(total):
        if index not in positions:
            stack.append(next(old_iter))
            continue
        if init == "copy":
            layer = copy.deepcopy(stack[-1] if stack else old[0])
        else:
            layer = type(old[0])(config, layer_idx=index)
            layer.apply(encoder._init_weights)
            if init == "identity":
                _zero_residual_writes(layer)
        stack.append(layer.to(device=reference.device, dtype=reference.dtype))
    for index, layer in enumerate(stack):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    encoder.layers = nn.ModuleList(stack)
    return positions


@dataclass
class UnfreezeSchedule:
    """Which new layers train when: none at first, then one more at a time, bottom-up.

    With K new layers the run has K + 1 stages (0, 1, ..., K new layers trainable) while the
    pretrained layers and the projection train throughout. ``every_epochs`` > 0 gives each
    stage that many epochs (the report: 2); 0 splits the run's optimizer steps into K + 1
    equal stages, so the schedule always completes within the run's real budget and the last
    stage trains everything. :meth:`plan` binds it to a run's steps.
    """

    new_layers: list[int]  # indices of the new layers, unfrozen in this order (bottom-up)
    every_epochs: float = 0  # epochs per stage; 0: K + 1 equal stages over all steps

    def plan(self, total_steps: int, steps_per_epoch: int) -> UnfreezePlan:
        """The optimizer step at which each new layer becomes trainable; raises when the
        last layer would never train (or only in a last stage of no steps).

        >>> UnfreezeSchedule([8, 9, 10]).plan(100, 10).start_steps
        [25, 50, 75]
        >>> UnfreezeSchedule([8, 9], every_epochs=2).plan(60, 10).start_steps
        [20, 40]
        """
        k = len(self.new_layers)
        if self.every_epochs > 0:
            starts = [round(i * self.every_epochs * steps_per_epoch) for i in range(1, k + 1)]
        else:
            starts = [i * total_steps // (k + 1) for i in range(1, k + 1)]
        if starts and starts[-1] >= total_steps:
            epochs = total_steps / max(steps_per_epoch, 1)
            raise ValueError(
                f"the unfreezing schedule cannot complete: new layer {self.new_layers[-1]} "
                f"would become trainable at step {starts[-1]}, but the run has {total_steps} "
                f"steps ({epochs:g} epochs); with every_epochs={self.every_epochs:g} it needs "
                f"more than {k * self.every_epochs:g} epochs. Use unfreeze_every=0 to spread "
                f"the {k + 1} stages over the run")
        return UnfreezePlan(list(self.new_layers), starts, total_steps, steps_per_epoch)


@dataclass
class UnfreezePlan:
    """An :class:`UnfreezeSchedule` bound to a run: ``start_steps[i]`` is the number of
    optimizer steps done when ``new_layers[i]`` becomes trainable."""

    new_layers: list[int]
    start_steps: list[int]
    total_steps: int
    steps_per_epoch: int

    def trainable(self, step: int) -> list[int]:
        """New layers trainable in the step taken after ``step`` steps are done.

        >>> UnfreezePlan([8, 9], [10, 20], 30, 10).trainable(19)
        [8]
        """
        return [layer for layer, start in zip(self.new_layers, self.start_steps, strict=True)
                if step >= start]

    def complete(self, step: int) -> bool:
        """True once every new layer is trainable."""
        return not self.start_steps or step >= self.start_steps[-1]

    def apply(self, encoder: nn.Module, step: int) -> list[int]:
        """Set ``requires_grad`` of the new layers for the next step; returns the trainable."""
        layers = decoder_layers(encoder)
        trainable = set(self.trainable(step))
        for index in self.new_layers:
            for p in layers[index].parameters():
                p.requires_grad_(index in trainable)
        return sorted(trainable)

    def stages(self) -> list[dict]:
        """One row per stage: trainable new layers, first step, epoch position, length."""
        bounds = [0, *self.start_steps, self.total_steps]
        return [{"stage": i, "trainable_new_layers": self.new_layers[:i],
                 "start_step": bounds[i], "steps": bounds[i + 1] - bounds[i],
                 "start_epoch": bounds[i] / self.steps_per_epoch + 1}
                for i in range(len(bounds) - 1)]
