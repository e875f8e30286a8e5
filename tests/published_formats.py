"""Miniatures of the published checkpoints and data, built in exactly their formats, and
independent reference forwards of the MiniMind architectures (imported as
``published_formats``; see retrieval_lib/models/minimind.py for where each format was read).

The reference forwards are written from the published model code (MiniMind v1
``model/model.py``: complex interleaved RoPE with theta 1e4, causal attention, RMSNorm computed
in float32; MiniMind2 ``model/model_minimind.py``: ``rotate_half`` RoPE with the config's
theta), not from transformers, and run one unpadded text at a time.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

ZH_TEXTS = ["长江流域今年的降水比往年偏多", "国家足球队在主场赢得了比赛", "新的铁路线路明年通车",
            "音乐会在北京的剧院举行", "农业部门发布了春耕生产的指导意见", "科技创新推动经济增长",
            "法院审理了一起合同纠纷案件", "港口的吞吐量创下新的纪录", "医疗改革让看病更方便",
            "金融市场保持平稳运行", "气象台预报明天有大风降温", "教育部公布了招生计划"]

#: A v1 config.json as export_model.py writes it (LMConfig fields, auto_map to its own code).
V1_CONFIG_EXTRA = {"architectures": ["Transformer"], "model_type": "minimind",
                   "auto_map": {"AutoConfig": "LMConfig.LMConfig",
                                "AutoModelForCausalLM": "model.Transformer"},
                   "multiple_of": 64, "hidden_dim": None, "norm_eps": 1e-5, "max_seq_len": 512,
                   "dropout": 0.0, "flash_attn": True, "use_moe": False,
                   "torch_dtype": "float32", "transformers_version": "4.44.0"}

#: Code a checkpoint ships; loading must never execute it.
TRAP_CODE = 'raise RuntimeError("the checkpoint\'s own code was executed")\n'


def write_tokenizer(folder: Path, vocab_size: int = 300, pad: bool = False,
                    qwen2: bool = False) -> int:
    """MiniMind's published tokenizer layout: ``tokenizer.json`` (byte-level BPE with <unk>,
    <s>, </s> as ids 0-2) and a ``tokenizer_config.json`` naming PreTrainedTokenizerFast,
    without a pad token unless ``pad``; with ``qwen2``, Qwen2's (``Qwen2Tokenizer``,
    ``<|endoftext|>`` as EOS and padding, no BOS). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen2 else [
        "<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(ZH_TEXTS * 3, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>",
           "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 32768,
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if pad:
        cfg["pad_token"] = "<unk>"
    if qwen2:
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
               "model_max_length": 32768, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tok.get_vocab_size()


def _v1_state(dim, n_layers, n_heads, n_kv, vocab, hidden, seed):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    head = dim // n_heads
    emb = w(vocab, dim)
    state = {"tok_embeddings.weight": emb, "norm.weight": 1 + w(dim) * 0.5,
             "output.weight": emb}  # tied: the same tensor under both names
    for i in range(n_layers):
        p = f"layers.{i}."
        state.update({
            p + "attention.wq.weight": w(n_heads * head, dim),
            p + "attention.wk.weight": w(n_kv * head, dim),
            p + "attention.wv.weight": w(n_kv * head, dim),
            p + "attention.wo.weight": w(dim, n_heads * head),
            p + "attention.mask": torch.full((1, 1, 512, 512), float("-inf")).triu(1),
            p + "attention_norm.weight": 1 + w(dim) * 0.5,
            p + "ffn_norm.weight": 1 + w(dim) * 0.5,
            p + "feed_forward.w1.weight": w(hidden, dim),
            p + "feed_forward.w2.weight": w(dim, hidden),
            p + "feed_forward.w3.weight": w(hidden, dim)})
    return state


def write_minimind_v1(folder: Path, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, seed=0,
                      hidden_dim=None) -> dict:
    """A MiniMind v1 checkpoint folder (27M's layout at a tiny size): config.json, a pickled
    ``pytorch_model.bin`` with the v1 keys (tied output, causal-mask buffers), the tokenizer
    and the checkpoint's own code files (which raise if executed). Returns the state dict and
    the config."""
    vocab = write_tokenizer(folder)
    multiple_of = 64
    hidden = hidden_dim or multiple_of * ((int(2 * 4 * dim / 3) + multiple_of - 1) // multiple_of)
    state = _v1_state(dim, n_layers, n_heads, n_kv_heads, vocab, hidden, seed)
    config = {**V1_CONFIG_EXTRA, "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
              "n_kv_heads": n_kv_heads, "vocab_size": vocab, "hidden_dim": hidden_dim}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save(state, folder / "pytorch_model.bin")
    for name in ("model.py", "LMConfig.py"):
        (folder / name).write_text(TRAP_CODE, encoding="utf-8")
    return {"state": state, "config": config, "hidden": hidden}


def _v2_state(cfg, seed):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    dim, head = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    heads, kv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["intermediate_size"]
    emb = w(cfg["vocab_size"], dim)
    state = {"model.embed_tokens.weight": emb, "model.norm.weight": 1 + w(dim) * 0.5,
             "lm_head.weight": emb}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(heads * head, dim),
            p + "self_attn.k_proj.weight": w(kv * head, dim),
            p + "self_attn.v_proj.weight": w(kv * head, dim),
            p + "self_attn.o_proj.weight": w(dim, heads * head),
            p + "input_layernorm.weight": 1 + w(dim) * 0.5,
            p + "post_attention_layernorm.weight": 1 + w(dim) * 0.5,
            p + "mlp.gate_proj.weight": w(inter, dim),
            p + "mlp.up_proj.weight": w(inter, dim),
            p + "mlp.down_proj.weight": w(dim, inter)})
    return state


def write_minimind2(folder: Path, llama_format: bool = False, seed=1, dim=64, n_layers=2,
                    n_heads=4, n_kv_heads=2) -> dict:
    """A MiniMind2 checkpoint folder: custom code (``MiniMindForCausalLM``, pickled
    ``pytorch_model.bin`` as ``convert_torch2transformers_minimind`` saves it) or, with
    ``llama_format``, the ``LlamaForCausalLM`` safetensors folder that
    ``convert_torch2transformers_llama`` writes. Returns the state dict and the config."""
    vocab = write_tokenizer(folder, pad=True)
    cfg = {"hidden_size": dim, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
           "num_key_value_heads": n_kv_heads, "vocab_size": vocab,
           "intermediate_size": 64 * ((int(dim * 8 / 3) + 63) // 64),
           "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
           "hidden_act": "silu", "dropout": 0.0, "flash_attn": True, "use_moe": False,
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}
    state = _v2_state(cfg, seed)
    if llama_format:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=dim, intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads, max_position_embeddings=32768,
            rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True))
        model.load_state_dict(state)
        model.save_pretrained(str(folder))
    else:
        config = {**cfg, "model_type": "minimind", "architectures": ["MiniMindForCausalLM"],
                  "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                               "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}}
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model_minimind.py").write_text(TRAP_CODE, encoding="utf-8")
    return {"state": state, "config": cfg}


def write_qwen2(folder: Path, seed=2) -> None:
    """A Qwen2 checkpoint folder in the published layout (``Qwen2ForCausalLM`` safetensors,
    Qwen2-0.5B's theta and epsilon, tied embeddings) with a tokenizer that has an EOS."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = write_tokenizer(folder, qwen2=True)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=56, intermediate_size=152, num_hidden_layers=2,
        num_attention_heads=7, num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=131072, tie_word_embeddings=True)).save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Reference forwards, written from the published architectures
# ---------------------------------------------------------------------------------------------


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _attend(q, k, v, n_rep):
    """Causal attention of one text: q (L, H, d), k/v (L, Hkv, d)."""
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    length = q.shape[0]
    scores = scores + torch.full((length, length), float("-inf")).triu(1)
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, dim=-1), v).reshape(length, -1)


def v1_reference(state, config, ids: list[int], theta: float = 1e4) -> torch.Tensor:
    """Final-norm hidden states (L, dim) of MiniMind v1 for one text: RoPE on interleaved
    pairs via complex multiplication, as ``apply_rotary_emb`` does."""
    dim, heads, kv = config["dim"], config["n_heads"], config["n_kv_heads"]
    head, eps = dim // heads, config["norm_eps"]
    length = len(ids)
    freqs = 1.0 / (theta ** (torch.arange(0, head, 2)[: head // 2].float() / head))
    pos_cis = torch.polar(torch.ones(length, head // 2),
                          torch.outer(torch.arange(length).float(), freqs))

    def rope(x):  # (L, H, d)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[:, None, :]).flatten(2)

    h = state["tok_embeddings.weight"][torch.tensor(ids)]
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        x = _rms(h, state[p + "attention_norm.weight"], eps)
        q = rope((x @ state[p + "attention.wq.weight"].T).view(length, heads, head))
        k = rope((x @ state[p + "attention.wk.weight"].T).view(length, kv, head))
        v = (x @ state[p + "attention.wv.weight"].T).view(length, kv, head)
        h = h + _attend(q, k, v, heads // kv) @ state[p + "attention.wo.weight"].T
        x = _rms(h, state[p + "ffn_norm.weight"], eps)
        gate = F.silu(x @ state[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ state[p + "feed_forward.w3.weight"].T)) @ \
            state[p + "feed_forward.w2.weight"].T
    return _rms(h, state["norm.weight"], eps)


def minimind2_reference(state, config, ids: list[int]) -> torch.Tensor:
    """Final-norm hidden states (L, dim) of MiniMind2 for one text: ``rotate_half`` RoPE with
    the config's theta."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    kv, head, eps = config["num_key_value_heads"], dim // heads, config["rms_norm_eps"]
    length = len(ids)
    freqs = 1.0 / (config["rope_theta"] ** (torch.arange(0, head, 2)[: head // 2].float()
                                            / head))
    angles = torch.outer(torch.arange(length).float(), freqs)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]

    def rope(x):
        rotated = torch.cat((-x[..., head // 2:], x[..., : head // 2]), dim=-1)
        return x * cos + rotated * sin

    h = state["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, state[p + "input_layernorm.weight"], eps)
        q = rope((x @ state[p + "self_attn.q_proj.weight"].T).view(length, heads, head))
        k = rope((x @ state[p + "self_attn.k_proj.weight"].T).view(length, kv, head))
        v = (x @ state[p + "self_attn.v_proj.weight"].T).view(length, kv, head)
        h = h + _attend(q, k, v, heads // kv) @ state[p + "self_attn.o_proj.weight"].T
        x = _rms(h, state[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(x @ state[p + "mlp.gate_proj.weight"].T)
        h = h + (gate * (x @ state[p + "mlp.up_proj.weight"].T)) @ \
            state[p + "mlp.down_proj.weight"].T
    return _rms(h, state["model.norm.weight"], eps)


# ---------------------------------------------------------------------------------------------
# bge-m3-data in its published layout
# ---------------------------------------------------------------------------------------------

#: One file per source in the layout of the extracted archive: a folder per data set and
#: ``<name>_len-<lo>-<hi>.jsonl`` files (the MLDR and MIRACL names are those a public script
#: lists for the English part, with the language code swapped; the other three follow the
#: dataset card's naming rule).
BGE_M3_FILES = {"mldr_zh": "MLDR/mldr_zh_len-0-500.jsonl",
                "lecardv2": "LeCaRDv2/lecardv2_len-7000-inf.jsonl",
                "t2ranking": "T2Ranking/t2ranking_len-0-500.jsonl",
                "miracl_zh": "MIRACL/miracl_zh_len-0-500.jsonl",
                "dureader": "DuReader/dureader_len-0-500.jsonl"}


def write_bge_m3_data(root: Path, per_source: int = 12, negatives: int = 4) -> dict[str, int]:
    """A folder in the extracted bge-m3-data layout with ``{"query", "pos", "neg"}`` lines,
    plus an English file that must be ignored. Returns records written per source."""
    counts = {}
    for s, (source, rel) in enumerate(BGE_M3_FILES.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(per_source):
            a = ZH_TEXTS[(i + s) % len(ZH_TEXTS)]
            negs = [ZH_TEXTS[(i + s + j + 1) % len(ZH_TEXTS)] + f"（{source} 负例 {j}）"
                    for j in range(negatives)]
            lines.append(json.dumps({"query": f"{a[:6]}？{source}{i}",
                                     "pos": [f"{a}。这是{source}的第{i}篇文章。"], "neg": negs},
                                    ensure_ascii=False))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[source] = per_source
    english = root / "MLDR" / "mldr_en_len-0-500.jsonl"
    english.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": []}) + "\n",
                       encoding="utf-8")
    return counts


def write_bge_m3(folder: Path, seed: int = 3) -> None:
    """A BAAI/bge-m3 folder in its published layout at a tiny size: ``XLMRobertaModel`` weights
    with its config, an XLM-R tokenizer (a Unigram ``tokenizer.json`` with ``<s>``, ``<pad>``,
    ``</s>``, ``<unk>`` as ids 0-3 and ``<mask>`` last; ``XLMRobertaTokenizer`` in
    ``tokenizer_config.json``, ``model_max_length`` 8192) and the two heads the repository ships
    as state dicts, ``sparse_linear.pt`` (hidden -> 1) and ``colbert_linear.pt``
    (hidden -> hidden)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(ZH_TEXTS * 3 + [t[::-1] for t in ZH_TEXTS], trainers.UnigramTrainer(
        vocab_size=200, special_tokens=specials, unk_token="<unk>", show_progress=False))
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 8192, "bos_token": "<s>",
         "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "mask_token": "<mask>"}), encoding="utf-8")
    torch.manual_seed(seed)
    hidden = 32
    XLMRobertaModel(XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=8194,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    ).save_pretrained(str(folder))
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), folder / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), folder / "colbert_linear.pt")
