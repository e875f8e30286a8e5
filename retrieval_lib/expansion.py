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

``UnfreezeSchedule`` keeps the new layers frozen at first and makes one more trainable every
``every`` epochs (2 in the report), bottom-up, while the pretrained layers and the projection
train throughout.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["INITS", "POSITIONS", "decoder_layers", "new_layer_positions", "expand_layers",
           "UnfreezeSchedule"]

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
    """Which new layers train in which epoch: none at first, one more every ``every`` epochs."""

    new_layers: list[int]  # indices of the new layers, unfrozen in this order (bottom-up)
    every: int = 2  # epochs between unfreezing one more new layer

    def trainable(self, epoch: int) -> list[int]:
        """New layers trainable in ``epoch`` (1-based).

        >>> [len(UnfreezeSchedule([8, 9, 10], every=2).trainable(e)) for e in range(1, 9)]
        [0, 0, 1, 1, 2, 2, 3, 3]
        """
        if self.every <= 0:
            return list(self.new_layers)
        return list(self.new_layers[: min(len(self.new_layers), (epoch - 1) // self.every)])

    def apply(self, encoder: nn.Module, epoch: int) -> list[int]:
        """Set ``requires_grad`` of the new layers for ``epoch``; returns the trainable ones."""
        layers = decoder_layers(encoder)
        trainable = set(self.trainable(epoch))
        for index in self.new_layers:
            for p in layers[index].parameters():
                p.requires_grad_(index in trainable)
        return sorted(trainable)
