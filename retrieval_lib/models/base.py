"""Base models: precision, shapes built from configs, published checkpoints checked,
resolved (MiniMind converted) and loaded with ``from_pretrained``, and parameter counts.

Base models are ``transformers`` models: MiniMind (Llama-shaped decoder), Qwen2 and BERT/XLM-R
style encoders, loaded from a hub id or a local folder, or built from a config at any size (the
tiny twins of the demo and the tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..settings.checkpoint import unreadable_files
from ..settings.config import ModelConfig, project_root
from .minimind import (
    ConversionError,
    checkpoint_format,
    convert_checkpoint,
    llama_config,
)
from .minimind_scripts import stage_training_file

__all__ = ["POOLINGS", "hf_config_from_shape", "build_encoder", "how_to_supply",
           "check_base_model", "resolve_base_model", "dtype_kwarg", "load_encoder",
           "count_parameters", "parameter_count_from_config", "PRECISIONS", "cpu_has_native_bf16",
           "choose_precision", "autocast_for"]

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
    hint = (" (this CPU has native bf16: precision='bf16' trains real-size models faster)"
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


#: Files fetched from the hub for a checkpoint that must be converted (never its code).
_CHECKPOINT_PATTERNS = ["config.json", "*.safetensors", "*.bin", "*.index.json",
                        "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt",
                        "added_tokens.json"]


def how_to_supply(name_or_path: str, hub_id: str | None = None) -> str:
    """What a user does when ``name_or_path`` cannot be loaded: for a local folder, which hub
    repository to download into it; for a hub id, download it or use a mirror."""
    if os.path.isabs(name_or_path) or os.path.exists(name_or_path) or hub_id:
        repo = hub_id or "<the model's hub id>"
        return (f"download it on a machine with access (`huggingface-cli download {repo} "
                f"--local-dir {name_or_path}`) and copy that folder here")
    return (f"download it (`huggingface-cli download {name_or_path} --local-dir DIR`) and pass "
            f"DIR as the model path (notebook parameter `model_path`, CLI `--model-path`), or "
            f"set HF_ENDPOINT to a reachable mirror (e.g. https://hf-mirror.com)")


def _read_config(name_or_path: str) -> tuple[dict, Path | None]:
    """The raw ``config.json`` of a local folder or hub id, and the local folder (or None)."""
    folder = None
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path)
        path = folder / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{name_or_path}: no config.json; "
                                    f"{how_to_supply(name_or_path)}")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name_or_path, "config.json"))
        except Exception as exc:  # offline, no such repo, auth
            raise OSError(f"cannot read config.json of {name_or_path!r} "
                          f"({type(exc).__name__}); {how_to_supply(name_or_path)}") from exc
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OSError(f"{path}: not valid JSON ({exc}); cut or edited. "
                      f"{how_to_supply(name_or_path)}") from None
    if not isinstance(config, dict):
        raise OSError(f"{path}: a JSON {type(config).__name__}, not a model configuration")
    return config, folder


#: File names that hold a tokenizer (any one is enough).
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "sentencepiece.bpe.model")


def _problems_in_files(names: set[str], config: dict | None, where: str,
                       trust_remote_code: bool) -> list[str]:
    """What a checkpoint with files ``names`` (and config.json ``config``) lacks."""
    problems = []
    if config is None:
        return [f"{where}: no config.json"]
    has_weights = any(n.endswith((".safetensors", ".bin")) and not n.startswith("training_")
                      for n in names)
    if not has_weights:
        problems.append(f"{where}: no weights (model.safetensors or pytorch_model.bin)")
    if not any(n in names for n in _TOKENIZER_NAMES):
        problems.append(f"{where}: no tokenizer (one of {', '.join(_TOKENIZER_NAMES)})")
    fmt = checkpoint_format(config)
    if fmt is not None:
        try:
            llama_config(config, fmt, f"{where}/config.json")
        except ConversionError as exc:
            problems.append(str(exc))
    elif "auto_map" in config and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            problems.append(
                f"{where}: model_type {config.get('model_type')!r} exists only in the "
                f"checkpoint's own code; pass trust_remote_code=True (notebook parameter "
                f"`trust_remote_code`, CLI `--trust-remote-code`) if you trust it")
    return problems


def _models_cache() -> Path:
    return project_root() / "data_cache" / "models"


def _problems_of_file(path: Path) -> list[str]:
    """A file given as the model: a state dict of MiniMind's training scripts can be staged
    as a checkpoint folder (:func:`~retrieval_lib.models.minimind.stage_training_file`);
    anything else is named for what it is."""
    if path.suffix not in (".pth", ".pt", ".bin"):
        return [f"{path} is a file, not a model folder; pass the folder that holds its "
                f"config.json, weights and tokenizer"]
    try:
        folder, _ = stage_training_file(path, _models_cache())
    except ConversionError as exc:
        return [str(exc)]
    names = {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return _problems_in_files(names, config, str(path), False)


def check_base_model(name_or_path: str, trust_remote_code: bool = False,
                     hub_id: str | None = None) -> list[str]:
    """What is missing to load ``name_or_path``, checked without downloading weights: the
    folder or hub repository, its config.json, weights and tokenizer, and for MiniMind
    checkpoints whether they can be converted. Empty when everything is there. Each problem
    says how to supply it; ``hub_id`` is the repository a local folder should hold."""
    local = os.path.isabs(name_or_path) or os.path.exists(name_or_path) or \
        name_or_path.startswith((".", "~"))
    if local:
        folder = Path(name_or_path).expanduser()
        if folder.is_file():
            return _problems_of_file(folder)
        if not folder.is_dir():
            return [f"model folder {folder} does not exist; "
                    f"{how_to_supply(str(folder), hub_id)}"]
        names = {p.name for p in folder.iterdir() if p.is_file()}
        config = (json.loads((folder / "config.json").read_text(encoding="utf-8"))
                  if "config.json" in names else None)
        problems = _problems_in_files(names, config, str(folder), trust_remote_code)
        return [f"{p}; {how_to_supply(str(folder), hub_id)}" for p in problems]
    import huggingface_hub
    from huggingface_hub import constants

    names: set[str] | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            names = set(huggingface_hub.HfApi().list_repo_files(name_or_path))
        except Exception:  # offline, DNS, 404, auth: not reachable from here
            names = None
    config = None
    cached = huggingface_hub.try_to_load_from_cache(name_or_path, "config.json")
    if names is None and not isinstance(cached, str):
        return [f"model {name_or_path!r}: not a local folder, not in the hub cache, and the "
                f"hub does not answer; {how_to_supply(name_or_path)}"]
    if isinstance(cached, str):
        config = json.loads(Path(cached).read_text(encoding="utf-8"))
        if names is None:  # offline with a cache: trust what the cache holds
            return []
    elif "config.json" in names:
        try:
            config = json.loads(Path(huggingface_hub.hf_hub_download(
                name_or_path, "config.json")).read_text(encoding="utf-8"))
        except Exception as exc:
            return [f"model {name_or_path!r}: config.json cannot be read "
                    f"({type(exc).__name__}); {how_to_supply(name_or_path)}"]
    problems = _problems_in_files(names, config, name_or_path, trust_remote_code)
    return [f"{p}; {how_to_supply(name_or_path)}" for p in problems]


def resolve_base_model(name_or_path: str, cache_dir: str | os.PathLike | None = None
                       ) -> tuple[str, dict | None]:
    """Where ``from_pretrained`` should load the base model from, and the conversion report.

    MiniMind checkpoints in their own format (v1 or MiniMind2 custom code) are converted once
    to a standard ``LlamaModel`` under ``cache_dir`` (default ``<project>/data_cache/models``)
    by :func:`retrieval_lib.models.minimind.convert_checkpoint`, without running their code; the
    report says what was converted. A ``.pth`` state dict of MiniMind's training scripts is
    staged as a checkpoint folder first, with the config of the release that wrote it
    (:func:`~retrieval_lib.models.minimind.stage_training_file`; the report names it). Every
    other model (Qwen2, Llama-format MiniMind2, BERT/XLM-R) is returned as given, with ``None``.
    """
    staged = None
    if os.path.isfile(os.path.expanduser(name_or_path)):  # MiniMind's out/pretrain_512.pth
        folder, release = stage_training_file(name_or_path, cache_dir or _models_cache())
        staged = {"state_dict_file": str(Path(name_or_path).expanduser().resolve()),
                  "release_assumed": release}
        print(f"{name_or_path}: a state dict written by MiniMind's training scripts, read with "
              f"the config of {release} (recognised from its tensors); to use another config, "
              f"put it as pytorch_model.bin in a folder with its config.json")
        name_or_path = str(folder)
    raw, folder = _read_config(name_or_path)
    if checkpoint_format(raw) is None:
        return name_or_path, None
    if folder is None:  # a hub id: fetch the weights and tokenizer files, never the code
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name_or_path, allow_patterns=_CHECKPOINT_PATTERNS))
        except Exception as exc:
            raise OSError(f"cannot download the weights of {name_or_path!r} "
                          f"({type(exc).__name__}); {how_to_supply(name_or_path)}") from exc
    cache = Path(cache_dir) if cache_dir else _models_cache()
    hub_id = None if os.path.isdir(name_or_path) else name_or_path
    target, report = convert_checkpoint(folder, cache, label=hub_id)
    return str(target), {**report, **(staged or {})}


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


