"""The dual-tower retriever: a shared pretrained encoder, pooling, projection, L2 normalisation.

Both towers share every weight of the encoder (so the retriever has the parameters of one
tower); the 128-d projection is shared too, or separate per tower (experiment 4.1.1 variant).

Base models are ``transformers`` models: MiniMind (Llama-shaped decoder), Qwen2 and BERT/XLM-R
style encoders, loaded with ``from_pretrained`` from a hub id or a local folder, or built from a
config at any size (the tiny twins of the demo and the tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .allocator import keep_freed_memory
from .checkpoint import atomic_folder, unreadable_files, verify_checksums, write_checksums
from .config import ModelConfig, project_root
from .m3 import M3Heads
from .minimind import ConversionError, checkpoint_format, convert_checkpoint, llama_config
from .tokenizer import load_pretrained_tokenizer
from .windows import AGGREGATIONS

__all__ = ["POOLINGS", "hf_config_from_shape", "build_encoder", "how_to_supply",
           "check_base_model", "resolve_base_model", "dtype_kwarg", "load_encoder",
           "count_parameters", "parameter_count_from_config", "pool", "text_token_ids",
           "pad_token_ids", "PRECISIONS",
           "cpu_has_native_bf16", "choose_precision", "autocast_for", "DualTowerRetriever"]

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
    by :func:`retrieval_lib.minimind.convert_checkpoint`, without running their code; the
    report says what was converted. Every other model (Qwen2, Llama-format MiniMind2,
    BERT/XLM-R) is returned as given, with ``None``.
    """
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
    cache = Path(cache_dir) if cache_dir else project_root() / "data_cache" / "models"
    hub_id = None if os.path.isdir(name_or_path) else name_or_path
    target, report = convert_checkpoint(folder, cache, label=hub_id)
    return str(target), report


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


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` into one vector per text ``(B, H)``.

    ``mean`` averages the non-padding tokens; ``cls`` takes the first token (BERT-like encoders,
    right padding); ``last_token`` takes the last non-padding token, wherever the padding is
    (left or right), which for a causal decoder is the only state that has seen the whole text.

    >>> h = torch.arange(12.).reshape(2, 3, 2); m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    >>> pool(h, m, "mean").tolist(), pool(h, m, "last_token").tolist()
    ([[1.0, 2.0], [9.0, 10.0]], [[2.0, 3.0], [10.0, 11.0]])
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if method == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if method == "cls":
        return hidden[:, 0]
    if method == "last_token":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {method!r}; expected one of {', '.join(POOLINGS)}")


def text_token_ids(tokenizer, texts: Sequence[str], max_length: int, append_eos: bool,
                   instruction: str = "") -> list[list[int]]:
    """The ids a retriever reads for ``texts``: ``instruction`` in front (its tokens count
    towards ``max_length``), truncated to ``max_length``; with ``append_eos`` (last-token
    pooling) every text ends with EOS, within ``max_length``."""
    if instruction:
        texts = [instruction + t for t in texts]
    if not append_eos:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("last_token pooling needs a tokenizer with an EOS token")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length - 1)
    return [x if x and x[-1] == tokenizer.eos_token_id else x + [tokenizer.eos_token_id]
            for x in enc["input_ids"]]


def pad_token_ids(ids: list[list[int]], pad_id: int, left: bool = False,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` as a tokenizer's ``pad`` makes them: every row
    padded with ``pad_id`` to the longest (rounded up to ``pad_to_multiple_of``), on the left
    or the right."""
    longest = max((len(x) for x in ids), default=0)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        span = slice(longest - len(x), longest) if left else slice(0, len(x))
        input_ids[row, span] = torch.tensor(x, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class DualTowerRetriever(nn.Module):
    """Query tower == passage tower: one encoder, pooling, projection, L2 normalisation."""

    def __init__(self, encoder: nn.Module, tokenizer, pooling: str = "mean",
                 projection_dim: int = 128, separate_projections: bool = False,
                 max_query_length: int = 64, max_passage_length: int = 512,
                 architecture: str | None = None, m3_heads: bool = False,
                 query_instruction: str = "", passage_aggregation: str = "first",
                 passage_stride: int = 0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        if passage_aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown passage_aggregation {passage_aggregation!r}; expected "
                             f"one of {', '.join(AGGREGATIONS)}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.projection_dim = projection_dim
        self.separate_projections = separate_projections
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length
        self.architecture = architecture or getattr(encoder.config, "model_type", "unknown")
        hidden = encoder.config.hidden_size
        self.query_projection = nn.Linear(hidden, projection_dim)
        self.passage_projection = (nn.Linear(hidden, projection_dim) if separate_projections
                                   else self.query_projection)
        if tokenizer.pad_token is None:  # decoder tokenizers often have none
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.query_instruction = query_instruction
        #: how evaluation scores a passage longer than the window (:mod:`.windows`), and the
        #: tokens between its windows' starts (0: half a window)
        self.passage_aggregation = passage_aggregation
        self.passage_stride = passage_stride
        #: precision of encode_* (:func:`choose_precision`): ``auto`` encodes as training
        #: computes, half precision on a GPU and fp32 on the CPU
        self.precision = "auto"
        self.m3 = None
        if m3_heads:  # sparse + multi-vector heads (retrieval_lib.m3)
            self.m3 = M3Heads(hidden, projection_dim, tokenizer.all_special_ids,
                              skip_first_token=pooling == "cls")

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer=None, pretrained: bool = True,
                    dtype: torch.dtype | None = torch.float32) -> DualTowerRetriever:
        """Build the retriever of ``cfg``: pretrained weights (``pretrained``, in ``dtype``:
        float32 master weights by default, see :func:`load_encoder`) or a fresh model of the
        configured shape (demo twins, tests); the tokenizer defaults to the model's own.
        """
        if pretrained:
            path, _ = resolve_base_model(cfg.base_model)  # MiniMind: the converted folder
            encoder = load_encoder(path, cfg.trust_remote_code, dtype)
            if tokenizer is None:
                tokenizer = load_pretrained_tokenizer(path, cfg.trust_remote_code)
        else:
            if tokenizer is None:
                raise ValueError("a model built from a config needs a tokenizer")
            encoder = build_encoder(cfg)
        return cls(encoder, tokenizer, pooling=cfg.pooling, projection_dim=cfg.projection_dim,
                   separate_projections=cfg.separate_projections,
                   max_query_length=cfg.max_query_length,
                   max_passage_length=cfg.max_passage_length, architecture=cfg.architecture,
                   m3_heads=cfg.m3_heads, query_instruction=cfg.query_instruction,
                   passage_aggregation=cfg.passage_aggregation,
                   passage_stride=cfg.passage_stride)

    # -- tokenisation ---------------------------------------------------------------------------

    #: Texts whose token ids a retriever keeps (see :meth:`tokenize`); beyond it the cache
    #: starts again empty, so memory stays bounded on large training sets.
    TOKEN_CACHE_SIZE = 200_000

    def tokenize(self, texts: Sequence[str], tower: str = "query",
                 pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise with truncation, padding to the longest text (rounded up to
        ``pad_to_multiple_of``) on the tokenizer's padding side; for ``last_token`` pooling
        every text ends with EOS. Queries get ``query_instruction`` in front (its tokens count
        towards the query length).

        The truncated ids of each text are kept (:data:`TOKEN_CACHE_SIZE` texts): evaluation
        encodes the same corpus every epoch and training sees its texts every epoch, and
        tokenising long texts costs more than the small models' forward pass on the CPU."""
        max_length = self.max_query_length if tower == "query" else self.max_passage_length
        signature = (id(self.tokenizer), self.max_query_length, self.max_passage_length,
                     self.query_instruction, self.pooling)
        cache = getattr(self, "_token_cache", None)
        if cache is None or cache[0] != signature or len(cache[1]) > self.TOKEN_CACHE_SIZE:
            cache = self._token_cache = (signature, {})
        known = cache[1]
        missing = list(dict.fromkeys(t for t in texts if (tower, t) not in known))
        if missing:
            for text, ids in zip(missing, self._token_ids(missing, tower, max_length),
                                 strict=True):
                known[tower, text] = ids
        return self._pad([known[tower, t] for t in texts], pad_to_multiple_of)

    def clear_token_cache(self) -> None:
        """Forget the token ids :meth:`tokenize` kept: the next encoding tokenises afresh, as
        texts never seen before are (what a benchmark of serving new texts must time)."""
        self._token_cache = None

    def _token_ids(self, texts: list[str], tower: str, max_length: int) -> list[list[int]]:
        return text_token_ids(self.tokenizer, texts, max_length, self.pooling == "last_token",
                              self.query_instruction if tower == "query" else "")

    def _pad(self, ids: list[list[int]], pad_to_multiple_of: int | None
             ) -> dict[str, torch.Tensor]:
        return pad_token_ids(ids, self.tokenizer.pad_token_id,
                             self.tokenizer.padding_side == "left", pad_to_multiple_of)

    # -- forward --------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              tower: str = "query") -> torch.Tensor:
        """L2-normalised embeddings ``(B, projection_dim)`` of one tower, with gradients."""
        # Rotary position encodings (MiniMind, Qwen2) depend only on relative positions, so
        # left padding needs no position-id shift; the padding test checks this.
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden, attention_mask, tower)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             tower: str) -> torch.Tensor:
        """The tower's embedding of the encoder's token states: pooling, projection, L2
        normalisation (in at least float32)."""
        pooled = pool(hidden, attention_mask, self.pooling)
        projection = self.query_projection if tower == "query" else self.passage_projection
        out = projection(pooled)
        if out.dtype in (torch.float16, torch.bfloat16):  # normalise at least in fp32
            out = out.float()
        return nn.functional.normalize(out, dim=-1)

    def embed_m3(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tower: str = "query") -> dict[str, torch.Tensor]:
        """One encoder pass, three representations (needs ``m3_heads``): ``dense``
        ``(B, projection_dim)``, ``sparse`` ``(B, vocab)`` token weights and ``colbert``
        ``(B, L, projection_dim)`` token vectors with their ``colbert_mask``."""
        if self.m3 is None:
            raise ValueError("this retriever has no sparse/multi-vector heads (m3_heads=False)")
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = self.m3.token_mask(input_ids, attention_mask)
        return {"dense": self.head(hidden, attention_mask, tower),
                "sparse": self.m3.sparse(hidden, input_ids, mask, len(self.tokenizer)),
                "colbert": self.m3.colbert(hidden, mask), "colbert_mask": mask}

    def forward(self, query_inputs: dict, passage_inputs: dict
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(query_inputs["input_ids"], query_inputs["attention_mask"], "query")
        p = self.embed(passage_inputs["input_ids"], passage_inputs["attention_mask"], "passage")
        return q, p

    # -- inference ------------------------------------------------------------------------------

    def _batches(self, texts: Sequence[str], tower: str, batch_size: int,
                 show_progress: bool | None = False):
        """Eval-mode batches of ``texts``, longest first (less padding): yields the indices of
        the batch in ``texts`` and its ``input_ids`` / ``attention_mask`` on the model's device;
        the training mode is restored afterwards."""
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode_* takes a list of texts, not one string")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        if device.type == "cpu":
            keep_freed_memory()  # large activations reuse mapped pages (see allocator)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        if show_progress is None:
            show_progress = len(texts) > 10 * batch_size
        try:
            for start in tqdm(range(0, len(texts), batch_size), disable=not show_progress,
                              desc=f"encode {tower}"):
                idx = order[start:start + batch_size]
                enc = self.tokenize([texts[i] for i in idx], tower)
                yield idx, enc["input_ids"].to(device), enc["attention_mask"].to(device)
        finally:
            self.train(was_training)

    def _autocast(self):
        """The autocast of :attr:`precision` on the model's device (encoding)."""
        device = next(self.parameters()).device
        return autocast_for(device, choose_precision(device, self.precision)[0])

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], tower: str, batch_size: int,
                show_progress: bool | None) -> np.ndarray:
        out = np.zeros((len(texts), self.projection_dim), dtype=np.float32)
        for idx, ids, mask in self._batches(texts, tower, batch_size, show_progress):
            with self._autocast():
                out[idx] = self.embed(ids, mask, tower).float().cpu().numpy()
        return out

    @torch.no_grad()
    def encode_m3(self, texts: Sequence[str], tower: str = "passage", batch_size: int = 32
                  ) -> dict:
        """``dense`` (N x projection_dim), ``sparse`` (per text ``{token id: weight}``, weights
        > 0) and ``colbert`` (per text its ``(tokens, dim)`` vectors), the inputs of
        :func:`retrieval_lib.m3.evaluate_reranked`."""
        dense = np.zeros((len(texts), self.projection_dim), dtype=np.float32)
        sparse, colbert = [None] * len(texts), [None] * len(texts)
        for idx, ids, mask in self._batches(texts, tower, batch_size):
            with self._autocast():
                out = self.embed_m3(ids, mask, tower)
            dense[idx] = out["dense"].cpu().numpy()
            weights = out["sparse"].float().cpu()
            for row, i in enumerate(idx):
                nonzero = weights[row].nonzero().squeeze(-1)
                sparse[i] = dict(zip(nonzero.tolist(), weights[row, nonzero].tolist(),
                                     strict=True))
                keep = out["colbert_mask"][row].cpu()
                colbert[i] = out["colbert"][row].float().cpu()[keep].numpy()
        return {"dense": dense, "sparse": sparse, "colbert": colbert}

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64,
                       show_progress: bool | None = None) -> np.ndarray:
        """Query embeddings ``(len(texts), projection_dim)``, float32, unit norm."""
        return self._encode(texts, "query", batch_size, show_progress)

    def encode_passages(self, texts: Sequence[str], batch_size: int = 32,
                        show_progress: bool | None = None) -> np.ndarray:
        """Passage embeddings ``(len(texts), projection_dim)``, float32, unit norm."""
        return self._encode(texts, "passage", batch_size, show_progress)

    # -- persistence ----------------------------------------------------------------------------

    def retriever_config(self) -> dict:
        return {"pooling": self.pooling, "projection_dim": self.projection_dim,
                "separate_projections": self.separate_projections,
                "max_query_length": self.max_query_length,
                "max_passage_length": self.max_passage_length,
                "architecture": self.architecture,
                "hidden_size": self.encoder.config.hidden_size,
                "m3_heads": self.m3 is not None,
                "query_instruction": self.query_instruction,
                "passage_aggregation": self.passage_aggregation,
                "passage_stride": self.passage_stride}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``encoder/`` (weights as safetensors, config, tokenizer), ``head.safetensors``
        (the projection), ``retriever_config.json`` and ``checksums.json`` (size and SHA-256 of
        each, checked by :meth:`load`). The folder is written whole or not at all: a save that
        fails part-way leaves the previous one at ``path`` as it was. ``path`` is replaced
        whole, so give the retriever a folder of its own."""
        path = Path(path)
        with atomic_folder(path) as tmp:
            self._write(tmp)
            write_checksums(tmp)
        return path

    def _write(self, path: Path) -> None:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(str(path / "encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path / "encoder"))
        head = {f"query_projection.{k}": v.detach().cpu().contiguous()
                for k, v in self.query_projection.state_dict().items()}
        if self.separate_projections:
            head.update({f"passage_projection.{k}": v.detach().cpu().contiguous()
                         for k, v in self.passage_projection.state_dict().items()})
        if self.m3 is not None:
            head.update({f"m3.{k}": v.detach().cpu().contiguous()
                         for k, v in self.m3.state_dict().items()})
        save_file(head, str(path / "head.safetensors"))
        (path / "retriever_config.json").write_text(
            json.dumps(self.retriever_config(), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             trust_remote_code: bool = False) -> DualTowerRetriever:
        """Load a retriever written by :meth:`save` (safetensors only, no pickle), after
        checking every file against its ``checksums.json`` (:class:`CheckpointError` names a
        truncated, edited or missing file; folders saved before checksums load unchecked)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        config_path = path / "retriever_config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{path} is not a saved retriever (no retriever_config.json)")
        verify_checksums(path)
        rc = json.loads(config_path.read_text(encoding="utf-8"))
        encoder = AutoModel.from_pretrained(str(path / "encoder"),
                                            trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "encoder"),
                                                  trust_remote_code=trust_remote_code)
        model = cls(encoder, tokenizer, pooling=rc["pooling"], projection_dim=rc["projection_dim"],
                    separate_projections=rc["separate_projections"],
                    max_query_length=rc["max_query_length"],
                    max_passage_length=rc["max_passage_length"],
                    architecture=rc["architecture"], m3_heads=rc.get("m3_heads", False),
                    query_instruction=rc.get("query_instruction", ""),
                    passage_aggregation=rc.get("passage_aggregation", "first"),
                    passage_stride=rc.get("passage_stride", 0))
        head = load_file(str(path / "head.safetensors"))
        model.query_projection.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in head.items() if k.startswith("query_projection.")})
        if rc["separate_projections"]:
            model.passage_projection.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in head.items()
                 if k.startswith("passage_projection.")})
        if model.m3 is not None:
            model.m3.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()
                                      if k.startswith("m3.")})
        return model.to(device)
