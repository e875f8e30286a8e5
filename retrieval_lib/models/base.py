"""Base models: precision, shapes built from configs, loading with ``from_pretrained`` (from
the folder :mod:`~retrieval_lib.models.checkpoints` resolves), and parameter counts.

Base models are ``transformers`` models: MiniMind (Llama-shaped decoder), Qwen2 and BERT/XLM-R
style encoders, loaded from a hub id or a local folder, or built from a config at any size (the
tiny twins of the demo and the tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..settings.config import ModelConfig
from ..settings.saved_folder import unreadable_files
from .checkpoints import how_to_supply, resolve_base_model

__all__ = ["POOLINGS", "hf_config_from_shape", "build_encoder", "dtype_kwarg", "load_encoder",
           "count_parameters", "parameter_count_from_config", "PRECISIONS", "cpu_has_native_bf16",
           "choose_precision", "autocast_for", "HEAD_FILE", "load_stage_projection"]

#: The projection a retrieval-oriented pretraining stage (:mod:`retrieval_lib.course.stage1`)
#: leaves beside its encoder; a retriever built on that encoder starts from it.
HEAD_FILE = "retrieval_head.safetensors"

POOLINGS = ("mean", "last_token", "cls")

#: Precisions a model can train and encode in: ``auto`` (CUDA: bf16 where the GPU has it
#: natively, else fp16; CPU: fp32), or one of them by name (on any device).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX tiles),
    as PyTorch detects it; False where the check is missing."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    return False


def choose_precision(device: torch.device, precision: str = "auto") -> tuple[str, str]:
    """``(precision, why)`` for computing on ``device``.

    ``auto`` on CUDA asks for bf16 only on GPUs that compute it natively (compute capability
    8.0 and up: A100, RTX 30/40); ``torch.cuda.is_bf16_supported()`` also counts emulation and
    would choose bf16 on a T4, which then runs far slower than fp16. On the CPU ``auto`` is
    fp32 even where the CPU has native bf16 (:func:`cpu_has_native_bf16`): the demo's tiny
    models run no faster in bf16 (its matrices are too small), while real-size models do (see
    ``benchmarks/throughput.py``), so ``auto`` says when asking for bf16 would pay. bf16 and fp16
    can be asked for on any device (autocast runs them), so every path runs in the tests.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, f"asked for {precision}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return ("bf16" if major >= 8 else "fp16"), (
            f"compute capability {major}.{minor}: "
            + ("native bf16" if major >= 8 else "no native bf16, fp16 with loss scaling"))
    hint = (" (this CPU has native bf16, which trains real-size models faster: "
            "`python -m retrieval_lib experiment ... --precision bf16`, or "
            "run_experiment(..., precision='bf16'))"
            if device.type == "cpu" and cpu_has_native_bf16() else "")
    return "fp32", f"{device.type}: full precision by default{hint}"


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a chosen precision (``fp32``: none) on ``device``."""
    from contextlib import nullcontext

    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def hf_config_from_shape(cfg: ModelConfig, num_layers: int | None = None):
    """A ``transformers`` config with the shape held in ``cfg`` (no download); decoders get
    the checkpoint's RoPE base, RMSNorm epsilon and positions from ``cfg``."""
    from transformers import BertConfig, LlamaConfig, Qwen2Config, XLMRobertaConfig

    layers = cfg.num_hidden_layers if num_layers is None else num_layers
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=layers,
                  num_attention_heads=cfg.num_attention_heads,
                  intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size)
    decoder = dict(num_key_value_heads=cfg.num_key_value_heads,
                   tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta,
                   rms_norm_eps=cfg.rms_norm_eps,
                   max_position_embeddings=cfg.max_position_embeddings)
    if cfg.architecture == "llama":
        return LlamaConfig(**decoder, **common)
    if cfg.architecture == "qwen2":
        return Qwen2Config(**decoder, **common)
    if cfg.architecture == "bert":
        return BertConfig(max_position_embeddings=512, **common)
    if cfg.architecture == "xlm-roberta":
        return XLMRobertaConfig(max_position_embeddings=8194, pad_token_id=1, **common)
    raise ValueError(f"unknown architecture {cfg.architecture!r}; expected llama, qwen2, bert "
                     f"or xlm-roberta")


def build_encoder(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """A randomly initialised base model (``AutoModel``, no LM head) with ``cfg``'s shape."""
    from transformers import AutoModel

    if seed is not None:
        torch.manual_seed(seed)
    return AutoModel.from_config(hf_config_from_shape(cfg))


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s keyword for the weights' dtype: ``dtype`` from transformers 4.56
    on, ``torch_dtype`` before (the declared lower bound, 4.45, knows only that one)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_encoder(name_or_path: str, trust_remote_code: bool = False,
                 dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """The pretrained base model (no LM head) from a hub id or a local folder.

    The weights are loaded in ``dtype``, float32 by default, whatever dtype the checkpoint was
    saved in (Qwen2-0.5B is saved in bf16, and transformers 5 would keep that): training keeps
    float32 master weights and computes in half precision under autocast; AdamW on bf16 weights
    would round most updates of a 1e-5 learning rate away. ``None`` keeps the saved dtype.

    MiniMind checkpoints in their own format are converted to ``LlamaModel`` first
    (:func:`resolve_base_model`), so ``trust_remote_code`` is never needed for them; other
    checkpoints that ship their own code load only with ``trust_remote_code=True``, which the
    user must ask for. A missing model stops with a message on how to supply it.
    """
    from transformers import AutoModel

    path, _ = resolve_base_model(name_or_path)
    try:
        kwargs = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs.update(dtype_kwarg(dtype))
        return AutoModel.from_pretrained(path, **kwargs)
    except Exception as exc:
        broken = unreadable_files(path)
        if broken:  # a cut file: name it (the library's own error does not)
            raise OSError(f"cannot load the base model {name_or_path!r}: "
                          + "; ".join(broken)) from exc
        if not isinstance(exc, (OSError, ValueError)):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = ("" if trust_remote_code or "trust_remote_code" not in str(exc) else
                " This checkpoint ships its own model code: pass trust_remote_code=True "
                "(notebook parameter `trust_remote_code`, CLI `--trust-remote-code`) if you "
                "trust it.")
        raise OSError(f"cannot load the base model {name_or_path!r}: {first}.{hint}\n"
                      f"{how_to_supply(name_or_path)[0].upper()}"
                      f"{how_to_supply(name_or_path)[1:]}.") from exc


def load_stage_projection(projections, folder: str) -> None:
    """Load each of ``projections`` (linear layers) from ``folder``'s :data:`HEAD_FILE` when
    it has one (a pretraining stage's encoder folder); a projection of another size is named
    with the file."""
    from safetensors.torch import load_file

    head = Path(folder) / HEAD_FILE
    if not head.exists():
        return
    weights = {k.split(".", 1)[1]: v for k, v in load_file(str(head)).items()}
    for projection in projections:
        try:
            projection.load_state_dict(weights)
        except RuntimeError as exc:
            raise ValueError(f"{head} does not fit this retriever's projection "
                             f"({projection}): {str(exc).splitlines()[-1].strip()}") from exc


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def parameter_count_from_config(cfg: ModelConfig, include_new_layers: bool = True) -> int:
    """Parameters of the retriever for ``cfg`` counted on the meta device (nothing downloaded).

    Encoder (with ``cfg.num_new_layers`` appended when ``include_new_layers``) plus the
    projection(s) and the M3 heads when configured.
    """
    from transformers import AutoModel

    layers = cfg.num_hidden_layers + (cfg.num_new_layers if include_new_layers else 0)
    with torch.device("meta"):
        encoder = AutoModel.from_config(hf_config_from_shape(cfg, num_layers=layers))
    projection = cfg.hidden_size * cfg.projection_dim + cfg.projection_dim
    heads = (cfg.hidden_size + 1) + projection if cfg.m3_heads else 0  # W_lex, W_mul
    return count_parameters(encoder) + projection * (2 if cfg.separate_projections else 1) + heads


