"""State dicts that MiniMind's training scripts write (``out/pretrain_512.pth`` ...), staged as
checkpoint folders that :func:`retrieval_lib.models.minimind.convert_checkpoint` converts like a
published one.

The scripts (``trainer/train_pretrain.py``, ``train_full_sft.py``; ``1-pretrain.py`` in v1)
save ``model.state_dict()`` in half precision as ``<weight>_<width>[_moe].pth``, with no config:
they build the model from the width and depth alone, so the head counts and the RoPE base are
those of the release's config class, read here from the repository's history.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .minimind import MINIMIND2, MINIMIND_V1, TOKENIZER_FILES, ConversionError

__all__ = ["TRAINING_CONFIGS", "stage_training_file"]

#: The configs MiniMind's training scripts built their models with, by release, as read from
#: the repository's history (``model/LMConfig.py`` and ``model/model.py``, later
#: ``model/model_minimind.py``; the scripts pass only the width and the depth). A ``.pth`` file
#: holds tensors only; the key layout and the key/value projection's height (``n_kv_heads ·
#: dim / n_heads``) tell the releases apart. Later releases (2026-06 on) add query/key norms,
#: which a Llama model does not have, and are refused by :func:`convert_state_dict`.
TRAINING_CONFIGS = {
    "v1 (2024-08 to 2025-01: LMConfig n_heads 16, n_kv_heads 8; RoPE θ 1e4 fixed in "
    "precompute_pos_cis)": (MINIMIND_V1, 2, {"n_heads": 16, "n_kv_heads": 8,
                                              "max_seq_len": 512, "norm_eps": 1e-5}),
    "v1 layout (2025-02: LMConfig n_heads 8, n_kv_heads 2, rope_theta 1e6)":
        (MINIMIND_V1, 4, {"n_heads": 8, "n_kv_heads": 2, "max_seq_len": 8192,
                          "norm_eps": 1e-5, "rope_theta": 1e6}),
    "MiniMind2 (2025-04 to 2026-02: MiniMindConfig num_attention_heads 8, "
    "num_key_value_heads 2, rope_theta 1e6, rms_norm_eps 1e-5)":
        (MINIMIND2, 4, {"num_attention_heads": 8, "num_key_value_heads": 2,
                        "rope_theta": 1e6, "rms_norm_eps": 1e-5,
                        "max_position_embeddings": 32768}),
}


def _training_config(state: dict[str, torch.Tensor], source: Path) -> tuple[str, dict]:
    """Which release wrote ``state``, and the config.json that describes it."""
    keys = {k.removeprefix("_orig_mod.") for k in state}
    if "tok_embeddings.weight" in keys:
        fmt, emb, kproj = MINIMIND_V1, "tok_embeddings.weight", "layers.0.attention.wk.weight"
    elif "model.embed_tokens.weight" in keys:
        fmt, emb, kproj = (MINIMIND2, "model.embed_tokens.weight",
                            "model.layers.0.self_attn.k_proj.weight")
    else:
        raise ConversionError(f"{source}: neither MiniMind v1 keys (tok_embeddings.weight ...) "
                              f"nor MiniMind2 keys (model.embed_tokens.weight ...); first keys: "
                              f"{', '.join(sorted(keys)[:4])}")
    if any(".experts." in k or ".gate.weight" in k for k in keys):
        raise ConversionError(f"{source}: a mixture-of-experts checkpoint (*_moe.pth) has no "
                              f"Llama equivalent; use a dense MiniMind checkpoint")
    tensors = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    vocab, dim = tensors[emb].shape
    prefix = "layers." if fmt == MINIMIND_V1 else "model.layers."
    layers = len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})
    ratio = dim / tensors[kproj].shape[0] if kproj in tensors else None
    for release, (release_fmt, kv_ratio, fields) in TRAINING_CONFIGS.items():
        if release_fmt == fmt and ratio == kv_ratio:
            if fmt == MINIMIND_V1:
                hidden = tensors["layers.0.feed_forward.w1.weight"].shape[0]
                config = {"model_type": "minimind", "architectures": ["Transformer"],
                          "dim": dim, "n_layers": layers, "vocab_size": vocab,
                          "hidden_dim": hidden, **fields}
            else:
                hidden = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
                config = {"model_type": "minimind", "architectures": ["MiniMindForCausalLM"],
                          "hidden_size": dim, "num_hidden_layers": layers, "vocab_size": vocab,
                          "intermediate_size": hidden, **fields}
            return release, config
    raise ConversionError(
        f"{source}: a {fmt} state dict (width {dim}, {layers} layers) whose key/value "
        f"projection ({kproj}: {tuple(tensors[kproj].shape) if kproj in tensors else 'absent'})"
        f" fits none of the configs MiniMind's scripts used; put it as pytorch_model.bin in a "
        f"folder with the config.json it was trained with, and pass that folder")


def stage_training_file(path: str | os.PathLike, cache_dir: str | os.PathLike
                        ) -> tuple[Path, str]:
    """A checkpoint folder for a ``.pth`` state dict written by MiniMind's training scripts
    (``pretrain_512.pth``, ``full_sft_768.pth``, ``*_resume.pth``): the config of the release
    that wrote it (:data:`TRAINING_CONFIGS`, recognised from the tensors), the file linked as
    ``pytorch_model.bin`` and the tokenizer found next to it or in the repository's ``model/``
    folder (the scripts save to ``out/``). Returns the folder and the release it assumed;
    :func:`convert_checkpoint` then converts the folder like a published one. To override the
    assumed config, put the file as ``pytorch_model.bin`` in a folder with a config.json."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"{path.stem}-pth-{key}"
    if (folder / "config.json").exists():  # staged before: the file is not read again
        staged = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return folder, staged["minimind_release_assumed"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"{path}: cannot be read as a PyTorch state dict "
                              f"({type(exc).__name__})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # lm_checkpoint's *_resume.pth: model, optimizer, step ...
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConversionError(f"{path}: not a state dict of tensors")
    release, config = _training_config(state, path)
    tokenizer_dir = next((d for d in (path.parent, path.parent.parent / "model")
                          if (d / "tokenizer.json").exists()), None)
    if tokenizer_dir is None:
        raise ConversionError(
            f"{path}: a MiniMind {release} state dict, but no tokenizer.json next to it or in "
            f"{path.parent.parent / 'model'}; copy tokenizer.json and tokenizer_config.json "
            f"from the MiniMind repository's model/ folder next to the file")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "pytorch_model.bin").symlink_to(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    (tmp / "config.json").write_text(json.dumps(
        {**config, "minimind_release_assumed": release, "state_dict_file": str(path)},
        indent=2), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder, release
