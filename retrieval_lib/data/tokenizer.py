"""Tokenizers: the pretrained model's own (full preset) or a BPE trained on the demo corpus.

MiniMind trains its own 6400-token byte-level BPE; the demo does the same on the training
texts of the demo corpus, so token counts and models of the demo behave like the real ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..settings.config import MINIMIND_108M
from ..settings.hub import model_available
from ..settings.saved_folder import unreadable_files

__all__ = ["SPECIAL_TOKENS", "train_bpe_tokenizer", "load_pretrained_tokenizer",
           "demo_tokenizer", "count_tokens", "tokenizer_for_preset", "with_eos_template"]

#: Special tokens of the demo tokenizer: unknown, begin and end of text, padding.
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<pad>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | Path | None = None):
    """Train a byte-level BPE tokenizer (as MiniMind does) and wrap it for ``transformers``.

    Returns a ``PreTrainedTokenizerFast`` whose special tokens are :data:`SPECIAL_TOKENS`;
    saved with ``save_pretrained`` when ``save_dir`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def load_pretrained_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a message that says how to supply missing files."""
    from transformers import AutoTokenizer

    how = (f"Download the model (huggingface-cli download {name_or_path} --local-dir DIR) and "
           f"pass DIR as the model path, or set HF_ENDPOINT to a reachable mirror.")
    if not model_available(name_or_path):  # one quick probe instead of ~25 s of retries
        raise OSError(f"cannot load the tokenizer of {name_or_path!r}: not a local folder, not "
                      f"in the Hugging Face cache, and the hub is not reachable\n{how}")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        folder = Path(name_or_path)
        broken = unreadable_files(folder)
        source = _converted_from(folder)
        if source is not None:  # a MiniMind conversion copies the tokenizer of its source
            raise OSError(
                f"cannot load the tokenizer of {source}: that folder holds no tokenizer file "
                f"(tokenizer.json, tokenizer.model, vocab.json ...), so its conversion "
                f"{folder} has none either. Put the tokenizer files of the checkpoint into "
                f"{source} (the conversion is then made again), or give the tokenizer "
                f"separately (notebook parameter `tokenizer_name`)") from exc
        if folder.is_dir() and not broken:
            present = sorted(p.name for p in folder.iterdir() if "token" in p.name
                             or p.suffix in (".model", ".txt"))
            broken = [f"{folder} holds {', '.join(present) or 'no tokenizer file'}; a fast "
                      f"tokenizer needs tokenizer.json (or the files it is built from)"]
        raise OSError(
            f"cannot load the tokenizer of {name_or_path!r}: "
            f"{'; '.join(broken) if broken else str(exc).splitlines()[0]}\n{how}") from exc


def _converted_from(folder: Path) -> str | None:
    """The source folder of a converted MiniMind checkpoint that copied no tokenizer file
    (``conversion.json``, written by ``models.minimind.convert_checkpoint``), else None."""
    try:
        report = json.loads((folder / "conversion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if report.get("tokenizer_files") else report.get("source_folder")


def demo_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str | Path):
    """The demo tokenizer for ``texts``, trained once and cached by corpus hash and size."""
    from transformers import PreTrainedTokenizerFast

    h = hashlib.sha256(str(vocab_size).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    path = Path(cache_dir) / f"demo-bpe-{vocab_size}-{h.hexdigest()[:12]}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return train_bpe_tokenizer(texts, vocab_size, save_dir=path)


def count_tokens(tokenizer, texts: Sequence[str], batch_size: int = 256) -> list[int]:
    """Number of tokens of each text (no special tokens, no truncation)."""
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False,
                        truncation=False)["input_ids"]
        counts.extend(len(ids) for ids in enc)
    return counts


def tokenizer_for_preset(preset: str, train_split, cache_dir: str | Path,
                         name_or_path: str | None = None, vocab_size: int = 6400,
                         trust_remote_code: bool = False):
    """The tokenizer a preset measures and trains with.

    ``full``: the pretrained tokenizer of ``name_or_path`` (default: MiniMind 108M's).
    ``demo``: a byte-level BPE of ``vocab_size`` trained on the queries and positive passages of
    ``train_split`` (training data only, so the test set never shapes the vocabulary), cached.
    """
    if name_or_path:
        return load_pretrained_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if preset == "full":
        default = MINIMIND_108M.base_model
        try:
            return load_pretrained_tokenizer(default, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise OSError(
                f"the full preset measures token lengths with MiniMind's tokenizer ({default}), "
                f"which is neither in the local Hugging Face cache nor reachable "
                f"({str(exc).splitlines()[0]}).\nPass the local folder of a MiniMind checkpoint "
                f"you downloaded (the one you give the training notebooks as model_path): "
                f"`-p tokenizer_name DIR`; or set HF_ENDPOINT to a reachable mirror "
                f"(e.g. HF_ENDPOINT=https://hf-mirror.com).") from exc
    texts = [row["query"] for row in train_split]
    texts += [p["text"] for row in train_split for p in row["positive_passages"]]
    return demo_tokenizer(texts, vocab_size, cache_dir)


def with_eos_template(tokenizer):
    """A copy of a fast tokenizer whose encodings always end with EOS: ``text EOS`` for one
    text, ``a EOS b EOS`` for a pair. Decoder LMs (MiniMind, Qwen2) add no special tokens of
    their own; a last-token representation (retriever pooling, a reranker's score) then reads
    a state that has seen the whole input and its end, and a pair gets a separator. Saved
    with the tokenizer (``tokenizer.json``), so a folder written from the copy tokenizes the
    same way wherever it is loaded (sentence-transformers, ONNX serving)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    eos, eos_id = tok.eos_token, tok.eos_token_id
    if eos is None or not tok.is_fast:
        raise ValueError("appending EOS needs a fast tokenizer with an EOS token")
    template = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                             special_tokens=[(eos, eos_id)])
    backend = tok.backend_tokenizer
    existing = backend.post_processor
    backend.post_processor = (processors.Sequence([existing, template]) if existing is not None
                              else template)
    return tok
