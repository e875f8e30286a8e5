"""The demo base models: tiny MiniMind- and Qwen2-shaped causal LMs pretrained on the demo corpus.

The course's pipeline is "pretrained LM -> retrieval fine-tuning -> expansion". Offline there are
no pretrained weights, so the demo pretrains its own, as MiniMind does at full size: a causal LM
of the configured shape on the training texts of the demo corpus, for a short CPU budget. The
result is saved like any checkpoint (safetensors + config + tokenizer) and loaded with the same
``from_pretrained`` code as the real weights. It is cached by shape, tokenizer, corpus and
schedule, and reports its held-out perplexity before and after pretraining; the held-out
perplexity is also measured along the way and the weights of its lowest point are kept (on a
corpus this small the larger twins start to overfit before the schedule ends).

Pretraining long enough to matter takes minutes per model on 2 cores, so the three demo LMs
are pretrained once and shipped in ``demo_models/`` (a few MB, with checksums; rebuilt by
``demo_models/build.py``, whose manifest records the corpus fingerprint, seed and schedule).
A cache miss whose key matches a shipped folder copies it after checking its checksums; any
other setting (corpus, tokenizer, shape, schedule) pretrains here as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..settings.allocator import keep_freed_memory
from ..settings.config import CHECKOUT, SEED, ModelConfig
from ..settings.saved_folder import atomic_folder, verify_checksums
from .base import hf_config_from_shape

__all__ = ["PretrainConfig", "SHIPPED_DEMO_LMS", "token_blocks", "perplexity",
           "pretrain_demo_lm"]

#: Demo LMs pretrained once and shipped with the repository, by cache folder name.
SHIPPED_DEMO_LMS = CHECKOUT / "demo_models"


@dataclass
class PretrainConfig:
    """Causal-LM pretraining of a demo base model."""

    # optimiser steps; shipped in demo_models/ (MANIFEST.json: the seconds each took). 500
    # left the demo retrievers far below BM25 (benchmarks/demo_ablation.py)
    max_steps: int = 6000
    # held-out perplexity every this many steps; the weights with the lowest are kept (early
    # stopping: at 6,000 steps the larger twins overfit the small corpus). 0: keep the last
    eval_every: int = 500
    seq_len: int = 128  # tokens per training block
    batch_size: int = 16  # blocks per step
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = SEED


def token_blocks(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate the texts (each followed by EOS) and cut the stream into ``seq_len`` blocks."""
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for row in tokenizer(list(texts[start:start + 256]), add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens make no block of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean token cross-entropy) of a causal LM over token blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.numel() - batch.shape[0]  # each block predicts seq_len - 1 tokens
        total += loss.item() * tokens
        count += tokens
    return math.exp(total / count)


def _cache_key(cfg: ModelConfig, tokenizer, texts: Sequence[str], pcfg: PretrainConfig) -> str:
    h = hashlib.sha256()
    shape = (cfg.architecture, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
             cfg.num_key_value_heads, cfg.intermediate_size, len(tokenizer))
    h.update(json.dumps([shape, pcfg.__dict__], sort_keys=True).encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:12]


def pretrain_demo_lm(cfg: ModelConfig, tokenizer, train_texts: Sequence[str],
                     heldout_texts: Sequence[str], cache_dir: str | Path,
                     pcfg: PretrainConfig | None = None, show_progress: bool = True) -> Path:
    """Pretrain (or reuse) a causal LM of ``cfg``'s shape; returns its folder.

    The folder holds the weights (safetensors), config, tokenizer and ``pretrain.json`` with the
    loss curve and the held-out perplexity before and after pretraining. With
    ``pcfg.eval_every`` the held-out perplexity is measured every so many steps
    (``heldout_curve``) and the weights of the lowest are kept (``kept_step``).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    pcfg = pcfg or PretrainConfig()
    key = _cache_key(cfg, tokenizer, train_texts, pcfg)
    path = Path(cache_dir) / f"demo-lm-{cfg.architecture}-{cfg.hidden_size}-{key}"
    if (path / "pretrain.json").exists():
        return path
    shipped = SHIPPED_DEMO_LMS / path.name
    if (shipped / "pretrain.json").exists():  # pretrained once with these exact inputs
        verify_checksums(shipped)
        with atomic_folder(path, owns=("pretrain.json",)) as tmp:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        return path
    allocator = keep_freed_memory()  # the logits are larger than malloc's mmap threshold
    torch.manual_seed(pcfg.seed)
    hf_cfg = hf_config_from_shape(cfg)
    hf_cfg.vocab_size = len(tokenizer)
    hf_cfg.eos_token_id = tokenizer.eos_token_id
    hf_cfg.bos_token_id = tokenizer.bos_token_id
    hf_cfg.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(hf_cfg)
    train = token_blocks(tokenizer, train_texts, pcfg.seq_len)
    heldout = token_blocks(tokenizer, heldout_texts, pcfg.seq_len)
    ppl_before = perplexity(model, heldout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.learning_rate,
                                  weight_decay=pcfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, pcfg.warmup_steps, pcfg.max_steps)
    generator = torch.Generator().manual_seed(pcfg.seed)
    losses, start = [], time.perf_counter()
    curve, best = [], (math.inf, None, None)  # (perplexity, step, weights)
    model.train()
    for step in tqdm(range(1, pcfg.max_steps + 1), desc="pretrain demo LM",
                     disable=not show_progress):
        batch = train[torch.randint(len(train), (pcfg.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if pcfg.eval_every and (step % pcfg.eval_every == 0 or step == pcfg.max_steps):
            curve.append([step, perplexity(model, heldout)])
            model.train()
            if curve[-1][1] < best[0]:
                best = (curve[-1][1], step, {k: v.detach().clone()
                                             for k, v in model.state_dict().items()})
    if best[2] is not None:
        model.load_state_dict(best[2])
    ppl_after = perplexity(model, heldout)
    report = {"architecture": cfg.architecture,
              "parameters": sum(p.numel() for p in model.parameters()),
              "train_tokens_seen": pcfg.max_steps * pcfg.batch_size * pcfg.seq_len,
              "train_blocks": len(train), "heldout_blocks": len(heldout),
              "heldout_perplexity_before": ppl_before, "heldout_perplexity_after": ppl_after,
              "heldout_curve": curve, "kept_step": best[1] or pcfg.max_steps,
              "loss_curve": losses, "wall_time_s": time.perf_counter() - start,
              "cpu_allocator": allocator,
              "config": pcfg.__dict__}
    with atomic_folder(path, owns=("pretrain.json",)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return path
