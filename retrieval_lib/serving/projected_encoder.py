"""A base model that ends in the retriever's projection: the code a FlagEmbedding folder ships.

FlagEmbedding's embedder classes (``FlagModel``, ``FlagLLMModel``) load ``AutoModel`` from a
folder, pool its ``last_hidden_state`` and normalise; they have no place for the linear
projection a :class:`~retrieval_lib.models.retriever.DualTowerRetriever` ends in. The classes
here apply the projection to every token state instead, which gives the same vector after any
of the retriever's poolings, because each pooling is a weighted sum of token states whose
weights add up to 1 (last token, first token, mean): ``pool(W·h + b) = W·pool(h) + b``.

This file is copied into the exported folder (``transformers``' remote code: ``auto_map`` in
``config.json``), so it imports only ``torch`` and ``transformers``; loading it needs
``trust_remote_code=True``. The projection's width is ``config.projection_dim``.
"""

from __future__ import annotations

import torch
from transformers import LlamaModel, Qwen2Model

__all__ = ["ProjectedLlamaModel", "ProjectedQwen2Model", "PROJECTED_MODELS"]


class _Projected:
    """Mixed into a base model class: ``projection`` (hidden -> ``config.projection_dim``)
    applied to ``last_hidden_state``."""

    def __init__(self, config):
        super().__init__(config)
        self.projection = torch.nn.Linear(config.hidden_size, config.projection_dim)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = self.projection(out.last_hidden_state)
        return out


class ProjectedLlamaModel(_Projected, LlamaModel):
    """``LlamaModel`` (MiniMind, converted) ending in the retriever's projection."""


class ProjectedQwen2Model(_Projected, Qwen2Model):
    """``Qwen2Model`` ending in the retriever's projection."""


#: The encoder class a retriever holds -> the class that carries its projection.
PROJECTED_MODELS = {"LlamaModel": ProjectedLlamaModel, "Qwen2Model": ProjectedQwen2Model}
