"""Published MiniMind checkpoints -> a standard ``transformers`` ``LlamaModel``, without their code.

MiniMind (github.com/jingyaogong/minimind) is published in three formats; what each holds was
read from the project's own files (``model/model.py`` and ``model/LMConfig.py`` of the v1
releases, ``model/model_minimind.py`` and ``scripts/convert_model.py`` of MiniMind2):

``minimind-v1`` (``jingyaogong/minimind-v1-small`` = 27M, ``jingyaogong/minimind-v1`` = 108M)
    ``config.json`` with ``model_type "minimind"``, ``architectures ["Transformer"]`` and an
    ``auto_map`` to the checkpoint's own code; fields ``dim``, ``n_layers``, ``n_heads``,
    ``n_kv_heads``, ``vocab_size``, ``hidden_dim`` (None: ``multiple_of`` rounding of 8/3·dim),
    ``norm_eps`` (1e-5), ``max_seq_len`` (512). Weights ``pytorch_model.bin`` (a pickle; read
    here with ``torch.load(weights_only=True)``), keys ``tok_embeddings.weight``,
    ``layers.N.attention.{wq,wk,wv,wo}.weight``, ``layers.N.attention_norm.weight``,
    ``layers.N.ffn_norm.weight``, ``layers.N.feed_forward.{w1,w2,w3}.weight``, ``norm.weight``,
    ``output.weight`` (tied to the embedding) and a persistent causal-mask buffer
    ``layers.N.attention.mask`` (dropped). RoPE rotates **interleaved** pairs
    ``(x[2i], x[2i+1])`` (``view_as_complex`` over ``(..., -1, 2)``) with θ = 10,000 fixed in
    ``precompute_pos_cis`` (not a config field) in the published releases; the v1 code of
    2025-02 (before MiniMind2's) reads ``rope_theta`` (1e6) from the config, so a config that
    has the field is followed. Its forward reads ``attention_mask`` as LM
    targets and returns logits only, so it cannot be used as an encoder as it is.
``minimind2`` (custom code)
    ``model_type "minimind"``, ``architectures ["MiniMindForCausalLM"]``, fields
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``rope_theta`` (1e6), ``rms_norm_eps``, ``max_position_embeddings``; keys already in the
    transformers layout (``model.layers.N.self_attn.q_proj.weight`` ...), ``rotate_half`` RoPE.
``llama``
    MiniMind2 converted by the project's ``convert_torch2transformers_llama``: an ordinary
    ``LlamaForCausalLM`` that ``AutoModel`` loads as it is (no conversion needed).
``*.pth`` (``out/pretrain_512.pth``, ``full_sft_768.pth``)
    what the repository's training scripts save: the tensors alone, in half precision, of
    either key layout; :func:`stage_training_file` recognises the release from the tensors
    and gives them its config and the tokenizer of ``model/``
    (:mod:`retrieval_lib.models.minimind_scripts`).

:func:`convert_checkpoint` maps the keys to ``LlamaModel``'s, permutes the rows of the query
and key projections of v1 so that transformers' ``rotate_half`` RoPE pairs the same dimensions
that v1's interleaved RoPE paired (within each head: new row ``i`` <- old row ``2i``, new row
``i + d/2`` <- old row ``2i + 1``; the attention scores are unchanged because queries and keys
get the same permutation), takes θ and ε from the checkpoint, and writes a safetensors
``LlamaModel`` folder with the tokenizer and a ``conversion.json`` that says what was done.
The tests check the converted model against independent reference forwards of both
architectures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..settings.checkpoint import file_sha256
from ..settings.saved_folder import reusable, write_checksums
from .shape_check import TRANSFORMERS_FIELDS, ConversionError, check_shape

__all__ = ["MINIMIND_V1", "MINIMIND2", "V1_ROPE_THETA", "checkpoint_format",
           "SHAPE_FIELDS_BY_FORMAT", "llama_config", "rope_theta_of", "interleaved_to_half",
           "convert_state_dict", "read_state_dict", "weight_files", "convert_checkpoint",
           "TOKENIZER_FILES"]

MINIMIND_V1 = "minimind-v1"
MINIMIND2 = "minimind2"

#: v1's RoPE base: ``precompute_pos_cis(dim, end, theta=10000.0)`` is called without theta.
V1_ROPE_THETA = 10_000.0

#: v1 ``LMConfig`` defaults, used for fields a config.json leaves out.
_V1_DEFAULTS = {"dim": 512, "n_layers": 8, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 6400,
                "hidden_dim": None, "multiple_of": 64, "norm_eps": 1e-5, "max_seq_len": 512}
#: MiniMind2 ``MiniMindConfig`` defaults (the release that ``scripts/convert_model.py`` names).
_V2_DEFAULTS = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                "num_key_value_heads": 2, "vocab_size": 6400, "rope_theta": 1e6,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "hidden_act": "silu"}

#: Tokenizer files copied next to a converted model (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def checkpoint_format(config: dict) -> str | None:
    """``"minimind-v1"``, ``"minimind2"`` or None (not a MiniMind custom-code checkpoint).

    >>> checkpoint_format({"model_type": "minimind", "dim": 512, "n_layers": 8})
    'minimind-v1'
    >>> checkpoint_format({"model_type": "minimind", "hidden_size": 512}), checkpoint_format(
    ...     {"model_type": "llama"})
    ('minimind2', None)
    """
    if config.get("model_type") != "minimind":
        return None
    if "dim" in config or "n_layers" in config or "Transformer" in config.get("architectures",
                                                                            []):
        return MINIMIND_V1
    return MINIMIND2


def _v1_intermediate_size(dim: int, hidden_dim: int | None, multiple_of: int) -> int:
    """v1's ``FeedForward`` width: ``hidden_dim``, else 2/3 of 4·dim rounded up to
    ``multiple_of``.

    >>> _v1_intermediate_size(512, None, 64), _v1_intermediate_size(768, None, 64)
    (1408, 2048)
    """
    if hidden_dim:
        return int(hidden_dim)
    width = int(2 * (4 * dim) / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


#: role -> field name in (MiniMind v1, MiniMind2 and transformers) config.json files.
SHAPE_FIELDS_BY_FORMAT = {
    MINIMIND_V1: {"hidden": "dim", "layers": "n_layers", "heads": "n_heads",
                  "kv_heads": "n_kv_heads", "vocab": "vocab_size", "positions": "max_seq_len",
                  "intermediate": "hidden_dim"},
    MINIMIND2: TRANSFORMERS_FIELDS,
}


def llama_config(config: dict, fmt: str, source: str = "config.json"):
    """The ``LlamaConfig`` that computes what the MiniMind checkpoint computes."""
    from transformers import LlamaConfig

    if config.get("use_moe"):
        raise ConversionError(f"{source}: MiniMind mixture-of-experts checkpoints (use_moe=true) "
                              f"have no Llama equivalent; use a dense MiniMind checkpoint")
    common = dict(hidden_act="silu", tie_word_embeddings=True, attention_bias=False,
                  mlp_bias=False, bos_token_id=1, eos_token_id=2)
    if fmt not in SHAPE_FIELDS_BY_FORMAT:
        raise ValueError(f"unknown MiniMind format {fmt!r}")
    c = {**(_V1_DEFAULTS if fmt == MINIMIND_V1 else _V2_DEFAULTS),
         **{k: v for k, v in config.items() if v is not None}}
    check_shape(c, SHAPE_FIELDS_BY_FORMAT[fmt], source)  # before anything is built
    if fmt == MINIMIND_V1:
        return LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=c["dim"], num_hidden_layers=c["n_layers"],
            num_attention_heads=c["n_heads"],
            num_key_value_heads=c["n_kv_heads"] or c["n_heads"],
            intermediate_size=_v1_intermediate_size(c["dim"], config.get("hidden_dim"),
                                                    c["multiple_of"]),
            rms_norm_eps=c["norm_eps"], rope_theta=c.get("rope_theta", V1_ROPE_THETA),
            max_position_embeddings=c["max_seq_len"], **common)
    if c.get("rope_scaling") or c.get("inference_rope_scaling"):  # MiniMind2's YaRN
        raise ConversionError(f"{source}: YaRN rope scaling is set; convert a checkpoint "
                              f"without inference_rope_scaling")
    size = c.get("intermediate_size") or 64 * ((int(c["hidden_size"] * 8 / 3) + 63) // 64)
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], intermediate_size=size,
        rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"], **common)


def rope_theta_of(config) -> float:
    """The RoPE base of a transformers config: ``rope_parameters["rope_theta"]`` in
    transformers 5, the ``rope_theta`` attribute in 4.x."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else config.rope_theta)


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from interleaved RoPE pairs
    ``(2i, 2i+1)`` to transformers' half-split pairs ``(i, i + d/2)``, head by head.

    >>> w = torch.arange(8.).unsqueeze(1)  # one head of dimension 8, rows 0..7
    >>> interleaved_to_half(w, 1).squeeze(1).tolist()
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2)
            .reshape(rows, cols))


_V1_KEYS = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj"}


def convert_state_dict(state: dict[str, torch.Tensor], fmt: str, config,
                       source: str = "weights", permute: bool = True) -> dict[str, torch.Tensor]:
    """MiniMind weights -> ``LlamaModel`` keys (no ``model.`` prefix, no LM head).

    ``config`` is the :func:`llama_config` result. v1's q/k rows are permuted for
    ``rotate_half`` RoPE (``permute=False`` only exists to show, in the tests, what goes wrong
    without it). Buffers (v1's causal mask) and the LM head (tied to the embedding) are dropped;
    every expected key must be present, and an unknown one is an error, so nothing is lost
    silently.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        name = key.removeprefix("_orig_mod.")  # torch.compile'd training checkpoints
        if fmt == MINIMIND_V1:
            if name.endswith("attention.mask") or name == "output.weight":
                continue
            if name == "tok_embeddings.weight":
                out["embed_tokens.weight"] = tensor
            elif name == "norm.weight":
                out["norm.weight"] = tensor
            elif name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                module = rest.removesuffix(".weight")
                if module not in _V1_KEYS:
                    unknown.append(key)
                    continue
                if permute and module in ("attention.wq", "attention.wk"):
                    heads = (config.num_attention_heads if module == "attention.wq"
                             else config.num_key_value_heads)
                    tensor = interleaved_to_half(tensor, heads)
                out[f"layers.{index}.{_V1_KEYS[module]}.weight"] = tensor
            else:
                unknown.append(key)
        else:
            if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                continue
            if ".q_norm." in name or ".k_norm." in name:
                raise ConversionError(
                    f"{source}: {key} is a query/key norm (a MiniMind release after MiniMind2); "
                    f"a Llama model has none, so this checkpoint cannot be converted here")
            if name.startswith("model."):
                out[name.removeprefix("model.")] = tensor
            else:
                unknown.append(key)
    if unknown:
        raise ConversionError(f"{source}: unexpected key(s) for a {fmt} checkpoint: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if "embed_tokens.weight" not in out:
        tied = "output.weight" if fmt == MINIMIND_V1 else "lm_head.weight"
        if tied in state:  # the embedding saved only as the tied head
            out["embed_tokens.weight"] = state[tied]
    expected = {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{m}.weight" for i in range(config.num_hidden_layers)
        for m in _V1_KEYS.values()}
    missing = sorted(expected - set(out))
    if missing:
        raise ConversionError(f"{source}: missing weight(s) for {config.num_hidden_layers} "
                              f"layers: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    return out


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors first, else PyTorch ``.bin``
    (sharded checkpoints through their ``*.index.json``). Empty when there are none."""
    folder = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                .values()))
            return [folder / s for s in shards]
        if (folder / single).exists():
            return [folder / single]
    return []


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``: safetensors, or ``.bin`` read with
    ``torch.load(weights_only=True)`` (tensors only; a pickle that holds code is refused)."""
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no weights (model.safetensors or pytorch_model.bin, "
                                f"or their sharded *.index.json)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"{path}: a shard named in the index is missing")
        try:
            part = (load_file(str(path)) if path.suffix == ".safetensors" else
                    torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise ConversionError(f"{path}: cannot be read as weights ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if not isinstance(part, dict):
            raise ConversionError(f"{path}: holds a {type(part).__name__}, not a state dict")
        state.update(part)
    return state


def _source_fingerprint(folder: Path) -> str:
    """Hash of everything a conversion reads: config.json, and the names and contents of the
    weight files and tokenizer files (contents, not sizes and times: other weights of equal
    size and time are another checkpoint)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in [*weight_files(folder), *(folder / f for f in TOKENIZER_FILES)]:
        if path.is_file():
            h.update(f"{path.name}:{file_sha256(path)}".encode())
    return h.hexdigest()[:12]


def convert_checkpoint(source: str | os.PathLike, cache_dir: str | os.PathLike,
                       label: str | None = None) -> tuple[Path, dict]:
    """Convert the MiniMind checkpoint folder ``source`` once; returns the folder of the
    converted ``LlamaModel`` (safetensors, config, tokenizer) and its ``conversion.json``.

    The result is cached under ``cache_dir`` by a fingerprint of all the source files it reads
    (config, weights and tokenizer, by content), written to a temporary folder of this process
    with checksums and renamed, so an interrupted conversion is never taken for a finished
    one, two processes converting at once do not share a folder, and a cached conversion is
    checked file by file before it is reused (a damaged one is converted again). The
    checkpoint's own Python files are never imported.
    """
    from safetensors.torch import save_file
    from transformers import LlamaModel

    source = Path(source)
    config_path = source / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{source}: no config.json")
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    fmt = checkpoint_format(raw)
    if fmt is None:
        raise ConversionError(f"{config_path}: model_type {raw.get('model_type')!r} is not a "
                              f"MiniMind custom-code checkpoint")
    name = (label or source.name).replace("/", "--")
    target = Path(cache_dir) / f"{name}-{_source_fingerprint(source)}"
    if reusable(target, "conversion.json"):
        return target, json.loads((target / "conversion.json").read_text(encoding="utf-8"))
    config = llama_config(raw, fmt, str(config_path))
    state = convert_state_dict(read_state_dict(source), fmt, config,
                               source=", ".join(p.name for p in weight_files(source)))
    # load into a real LlamaModel first: shapes are checked against the config here
    with torch.device("meta"):
        model = LlamaModel(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that does not fit the config
        raise ConversionError(f"{source}: the weights do not fit the shape in config.json: "
                              f"{str(exc).splitlines()[-1].strip()}") from exc
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ConversionError(f"{source}: converted weights do not fit LlamaModel (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")  # one per process
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.architectures = ["LlamaModel"]
    config.save_pretrained(str(tmp))
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copied = [f for f in TOKENIZER_FILES if (source / f).exists()]
    for f in copied:
        shutil.copy2(source / f, tmp / f)
    report = {
        "source": str(label or source), "source_folder": str(source), "format": fmt,
        "source_files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in weight_files(source)},
        "target": "LlamaModel (safetensors, float32)",
        "rope_theta": rope_theta_of(config), "rms_norm_eps": config.rms_norm_eps,
        "rope_pairs": ("interleaved (2i, 2i+1) -> half-split (i, i+d/2): q/k rows permuted"
                       if fmt == MINIMIND_V1 else "half-split in both: no permutation"),
        "q_k_rows_permuted": fmt == MINIMIND_V1,
        "dropped": ("causal-mask buffers, output.weight (tied to the embedding)"
                    if fmt == MINIMIND_V1 else "lm_head.weight (tied to the embedding)"),
        "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "tokenizer_files": copied,
        "checkpoint_code_run": False,
    }
    (tmp / "conversion.json").write_text(json.dumps(report, ensure_ascii=False, indent=2),
                                         encoding="utf-8")
    write_checksums(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first: use its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not reusable(target, "conversion.json"):
            raise
    return target, report

