"""Stage 1a: RetroMAE-style auto-encoding for a causal LM (BGE-M3's first stage, adapted).

RetroMAE (Xiao et al. 2022; FlagEmbedding ``research/old-examples/pretrain/retromae_pretrain``)
pretrains an encoder for retrieval by making its sentence embedding carry the text:

* the **encoder** reads the text with 30% of its tokens masked (FlagEmbedding's
  ``encoder_mlm_probability`` 0.3) and is trained on its own objective at the masked tokens;
* its **sentence embedding** conditions a **one-layer decoder** that must rebuild every token
  of the text while seeing only the embedding and a heavily masked copy (``decoder_mlm_probability``
  0.5);
* **enhanced decoding**: the decoder's query at position ``i`` is the sentence embedding
  alone (with position ``i``), its keys and values are ``[embedding, token embeddings]``, and
  each row ``i`` attends to the embedding plus its own random half of the other tokens, never
  to token ``i`` itself. Every token is a reconstruction target, and each is predicted from a
  different context, so the embedding is what all of them share.

The loss is the sum of the encoder's and the decoder's cross-entropies (as FlagEmbedding's
``RetroMAEForPretraining``: ``loss + lm_out.loss``).

How a causal LM (MiniMind, Qwen2) is adapted, since RetroMAE was written for BERT:

* **Sentence embedding**: the retriever's own pooling of the encoder's last states (``mean``,
  or ``last_token`` on the EOS the retriever appends) instead of BERT's ``[CLS]``, so the
  vector trained here is the one fine-tuning starts from.
* **Encoder objective**: a causal LM cannot see a token's right context, so masked-language
  modelling becomes masked next-token prediction: the state at ``i - 1`` predicts the original
  token at each masked position ``i``. The masked tokens are replaced by the tokenizer's mask
  token, or its unknown or padding token when it has none (decoder tokenizers have no
  ``[MASK]``); the encoder still attends causally, as it will when it retrieves.
* **Positions**: MiniMind and Qwen2 have no position embeddings to add to the query; the
  decoder applies the model's rotary embedding to queries and keys at their positions, so the
  embedding in key slot 0 sits at position 0 as ``[CLS]`` does in RetroMAE.
* **Decoder**: one freshly initialised transformer layer of the encoder's own architecture
  (RetroMAE's ``c_head``), its own final norm, and the LM head tied to the encoder's input
  embeddings (MiniMind and Qwen2-0.5B tie theirs). Only the encoder is kept afterwards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from .retriever import pool

__all__ = ["RetroMAEBatch", "mask_token_id", "make_batch", "decoder_visibility", "RetroMAE"]


def mask_token_id(tokenizer) -> int:
    """The id the encoder's masked tokens are replaced by: the tokenizer's mask token, else its
    unknown token, else its padding token (decoder tokenizers have no ``[MASK]``)."""
    for name in ("mask_token_id", "unk_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no mask, unknown or padding token to mask with")


@dataclass
class RetroMAEBatch:
    """One batch: the original ids (right-padded), the encoder's masked copy and its labels
    (``-100`` except at masked positions), the decoder's labels (every maskable token) and
    its per-row visibility ``(B, L, L)`` (True: row ``i`` may attend to key ``j``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    encoder_input_ids: torch.Tensor
    encoder_labels: torch.Tensor
    decoder_labels: torch.Tensor
    decoder_visible: torch.Tensor


def decoder_visibility(maskable: torch.Tensor, ratio: float, generator: torch.Generator
                       ) -> torch.Tensor:
    """``(B, L, L)`` bool: may the decoder's row ``i`` see key ``j``?

    Key 0 (the sentence embedding) is always visible; every other real token (``maskable``)
    is hidden from each row independently with probability ``ratio``; a row never sees its own
    token; padding is never seen. RetroMAE draws each row's mask from a cache of at most 256
    whole-word masks of the text; independent draws per row have the same distribution
    without the cache.
    """
    b, n = maskable.shape
    keep = torch.rand((b, n, n), generator=generator) >= ratio
    visible = keep & maskable.unsqueeze(1)
    visible &= ~torch.eye(n, dtype=torch.bool).unsqueeze(0)
    visible[:, :, 0] = True
    return visible


def make_batch(ids: list[list[int]], pad_id: int, mask_id: int, special_ids: set[int],
               encoder_ratio: float, decoder_ratio: float, generator: torch.Generator
               ) -> RetroMAEBatch:
    """Mask a batch of token id lists for RetroMAE (see the module's docstring).

    Maskable tokens are all real tokens except position 0 (the embedding takes its key slot in
    the decoder, as ``[CLS]`` does) and special tokens (the EOS last-token pooling reads). The
    encoder masks ``round(encoder_ratio * maskable)`` of them per text (at least one), chosen
    uniformly; the decoder rebuilds every maskable token.
    """
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        attention[row, :len(x)] = 1
    maskable = attention.bool().clone()
    maskable[:, 0] = False
    for special in special_ids:
        maskable &= input_ids != special
    encoder_ids = input_ids.clone()
    encoder_labels = torch.full_like(input_ids, -100)
    for row in range(len(ids)):
        candidates = maskable[row].nonzero().squeeze(-1)
        if len(candidates) == 0:
            continue
        count = max(1, round(encoder_ratio * len(candidates)))
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        encoder_labels[row, chosen] = input_ids[row, chosen]
        encoder_ids[row, chosen] = mask_id
    decoder_labels = torch.where(maskable, input_ids, torch.full_like(input_ids, -100))
    return RetroMAEBatch(input_ids, attention, encoder_ids, encoder_labels, decoder_labels,
                         decoder_visibility(maskable, decoder_ratio, generator))


class RetroMAE(nn.Module):
    """A causal LM encoder (``AutoModel``: ``LlamaModel``, ``Qwen2Model``) with RetroMAE's
    one-layer decoder; :meth:`forward` returns the encoder's and the decoder's losses."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", seed: int = 0):
        super().__init__()
        layers = getattr(encoder, "layers", None)
        if layers is None or not hasattr(encoder, "rotary_emb"):
            raise ValueError(f"RetroMAE here needs a rotary decoder LM (MiniMind, Qwen2), not "
                             f"{type(encoder).__name__}")
        self.encoder = encoder
        self.pooling = pooling
        config = encoder.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.decoder = type(layers[0])(config, layer_idx=0)
            self.decoder.apply(encoder._init_weights)
        self.decoder_norm = type(encoder.norm)(config.hidden_size, eps=config.rms_norm_eps)
        self._rope = sys.modules[type(self.decoder.self_attn).__module__].apply_rotary_pos_emb

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits through the LM head tied to the input embeddings."""
        return hidden @ self.encoder.get_input_embeddings().weight.T

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's last states and their pooled sentence embedding."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask
                              ).last_hidden_state
        return hidden, pool(hidden, attention_mask, self.pooling)

    def decode(self, embedding: torch.Tensor, input_ids: torch.Tensor, visible: torch.Tensor
               ) -> torch.Tensor:
        """Enhanced decoding: one layer whose queries are the embedding at each position and
        whose keys/values are ``[embedding, token embeddings of input_ids[1:]]``; returns the
        normalised states ``(B, L, H)``."""
        b, n = input_ids.shape
        tokens = self.encoder.get_input_embeddings()(input_ids)
        stream = torch.cat([embedding.unsqueeze(1), tokens[:, 1:]], dim=1)
        query = embedding.unsqueeze(1).expand(b, n, -1)
        positions = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(b, n)
        cos, sin = self.encoder.rotary_emb(stream, positions)
        layer, attn = self.decoder, self.decoder.self_attn
        q_in, kv_in = layer.input_layernorm(query), layer.input_layernorm(stream)
        shape = (b, n, -1, attn.head_dim)
        q = attn.q_proj(q_in).view(shape).transpose(1, 2)
        k = attn.k_proj(kv_in).view(shape).transpose(1, 2)
        v = attn.v_proj(kv_in).view(shape).transpose(1, 2)
        q, k = self._rope(q, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible.unsqueeze(1), scale=attn.scaling)
        h = query + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.decoder_norm(h)

    def forward(self, batch: RetroMAEBatch) -> dict[str, torch.Tensor]:
        """``{"loss", "encoder_loss", "decoder_loss"}`` of one batch (mean cross-entropies)."""
        hidden, embedding = self.sentence_embedding(batch.encoder_input_ids,
                                                    batch.attention_mask)
        # logits only where there is a label (a fifth of the cost at the encoder's 30%)
        # masked next-token prediction: the state before each masked token predicts it
        labels = batch.encoder_labels[:, 1:]
        chosen = labels != -100
        encoder_loss = nn.functional.cross_entropy(
            self.lm_logits(hidden[:, :-1][chosen]).float(), labels[chosen])
        decoded = self.decode(embedding, batch.input_ids, batch.decoder_visible)
        chosen = batch.decoder_labels != -100
        decoder_loss = nn.functional.cross_entropy(
            self.lm_logits(decoded[chosen]).float(), batch.decoder_labels[chosen])
        return {"loss": encoder_loss + decoder_loss, "encoder_loss": encoder_loss,
                "decoder_loss": decoder_loss}
