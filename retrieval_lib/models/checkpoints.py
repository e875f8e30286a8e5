"""Base checkpoints found, checked and read before anything loads them: a local folder, a hub
id or a ``.pth`` of MiniMind's scripts; what is missing (with how to supply it); where
``from_pretrained`` loads from (MiniMind converted once to a ``LlamaModel``); and the shape a
checkpoint's config.json declares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..settings.config import project_root
from ..settings.hub import hub_has
from .minimind import (
    ConversionError,
    checkpoint_format,
    convert_checkpoint,
    llama_config,
    rope_theta_of,
)
from .minimind_scripts import stage_training_file
from .shape_check import TRANSFORMERS_FIELDS, check_shape

__all__ = ["how_to_supply", "check_base_model", "resolve_base_model", "SHAPE_FIELDS",
           "checkpoint_shape"]


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
    elif os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        folder = os.path.abspath(os.path.expanduser(name_or_path))
        raise OSError(f"model folder {folder} does not exist; {how_to_supply(folder)}")
    else:
        import huggingface_hub

        try:
            cached = huggingface_hub.try_to_load_from_cache(name_or_path, "config.json")
        except ValueError as exc:  # not a repository id either
            raise OSError(f"{name_or_path!r} is neither a model folder nor a hub id ({exc}); "
                          f"{how_to_supply(name_or_path)}") from exc
        if isinstance(cached, str):  # no network round trip (offline: ~25 s of retries)
            path = Path(cached)
        elif not hub_has(name_or_path, "model"):
            raise OSError(f"cannot read config.json of {name_or_path!r}: not in the Hugging "
                          f"Face cache and the hub is not reachable; "
                          f"{how_to_supply(name_or_path)}")
        else:
            try:
                path = Path(huggingface_hub.hf_hub_download(name_or_path, "config.json"))
            except Exception as exc:  # no such repo, auth
                raise OSError(f"cannot read config.json of {name_or_path!r} "
                              f"({type(exc).__name__}); {how_to_supply(name_or_path)}") from exc
    config = _parse_config(path)
    if isinstance(config, str):
        raise OSError(f"{config}; {how_to_supply(name_or_path)}")
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
    try:  # the shape is checked before anything is downloaded or allocated
        if fmt is not None:
            llama_config(config, fmt, f"{where}/config.json")
        elif config.get("model_type") in ("llama", "qwen2"):
            check_shape(config, TRANSFORMERS_FIELDS, f"{where}/config.json")
    except ConversionError as exc:
        problems.append(str(exc))
    if fmt is None and "auto_map" in config and not trust_remote_code:
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


#: ``ModelConfig`` fields that describe a checkpoint's shape (what :func:`checkpoint_shape` reads).
SHAPE_FIELDS = ("architecture", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size", "rope_theta",
                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")

#: transformers ``model_type`` -> ``ModelConfig.architecture``.
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "bert": "bert",
                  "xlm-roberta": "xlm-roberta"}


def checkpoint_shape(name_or_path: str) -> dict:
    """The shape of the checkpoint at ``name_or_path`` as :data:`SHAPE_FIELDS` values, read
    from its config.json alone (no weights loaded): a MiniMind checkpoint through the config it
    is converted with, a ``.pth`` of MiniMind's scripts through the release it was recognised
    as, any other through ``transformers``' config class of its ``model_type``."""
    from transformers import AutoConfig

    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        path = str(stage_training_file(path, _models_cache())[0])
    raw, folder = _read_config(path)
    fmt = checkpoint_format(raw)
    if fmt is not None:
        config = llama_config(raw, fmt, f"{name_or_path}/config.json")
    else:
        kind = raw.get("model_type")
        if kind not in _ARCHITECTURES:
            raise ValueError(f"{name_or_path}: model_type {kind!r} is none of the course's "
                             f"architectures ({', '.join(_ARCHITECTURES)})")
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
        config = AutoConfig.for_model(kind, **fields)
    shape = {"architecture": _ARCHITECTURES[config.model_type]}
    for name in SHAPE_FIELDS[1:]:
        if name == "rope_theta":
            if config.model_type in ("llama", "qwen2"):
                shape[name] = rope_theta_of(config)
        elif name == "num_key_value_heads":
            shape[name] = getattr(config, name, None) or config.num_attention_heads
        elif name == "rms_norm_eps":
            if hasattr(config, name):
                shape[name] = config.rms_norm_eps
        elif hasattr(config, name):
            shape[name] = getattr(config, name)
    return shape


def _parse_config(path: Path) -> dict | str:
    """The configuration in ``path``, or what is wrong with the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{path}: not valid JSON ({exc}); cut or edited"
    if not isinstance(config, dict):
        return f"{path}: a JSON {type(config).__name__}, not a model configuration"
    return config


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
        config = None
        if "config.json" in names:
            config = _parse_config(folder / "config.json")
            if isinstance(config, str):
                return [f"{config}; {how_to_supply(str(folder), hub_id)}"]
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
        config = _parse_config(Path(cached))
        if isinstance(config, str):
            return [f"{config}; {how_to_supply(name_or_path)}"]
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
