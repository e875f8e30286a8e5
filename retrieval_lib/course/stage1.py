"""BGE-M3's first stage for the course's LMs: retrieval-oriented pretraining before fine-tuning.

``LM -> (1a RetroMAE) -> (1b unsupervised contrastive) -> fine-tuning``: an experiment asks for
the stages with one setting, ``ModelConfig.pretraining_stages`` (``("retromae",)``,
``("contrastive",)`` or both, in that order), and :func:`ensure_stages` runs them before its
fine-tuning starts from the last stage's encoder.

Each stage is a run of its own under ``runs/<preset>/stage1/<name>``: ``config.json`` (what it
read: the upstream encoder's digest, the settings, the texts and pairs with what was dropped),
``history.json``, checkpoints while it trains (resumable), and ``encoder/`` (weights,
tokenizer, ``checksums.json``), the folder the next stage or the fine-tuning loads by path.
The name ends in a digest of every input, so a stage is reused exactly when its inputs are
unchanged and a changed input trains a new one beside it.

Only training text is read (:func:`retrieval_lib.data.pairs.unlabeled_texts`): the training
split's passages that occur nowhere in the validation or test split, a share of them held out
for the stage's own model selection.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from ..data.pairs import mine_pairs, unlabeled_texts
from ..data.splits import Splits
from ..data.tokenizer import load_pretrained_tokenizer
from ..models.base import HEAD_FILE, load_encoder
from ..models.minimind import TOKENIZER_FILES
from ..models.retriever import DualTowerRetriever
from ..results.runs import runs_root, write_json_files
from ..settings.checkpoint import file_sha256
from ..settings.config import (
    CHECKOUT,
    PRETRAINING_STAGES,
    ExperimentConfig,
    Stage1Config,
    get_stage1_config,
)
from ..settings.saved_folder import (
    atomic_folder,
    restore_interrupted,
    verify_checksums,
    write_checksums,
)
from ..training.collator import set_seed
from ..training.loop import train_retriever
from ..training.stage1 import ENCODER_FILES, train_retromae

__all__ = ["check_stages", "stage_texts", "stage_folder", "SHIPPED_STAGE1", "SHIPPED_PARTS",
           "run_stage", "ensure_stages"]


def check_stages(stages) -> tuple[str, ...]:
    """``stages`` as a tuple in :data:`PRETRAINING_STAGES` order; an unknown name, a repeat or
    another order is refused."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in PRETRAINING_STAGES]
    if unknown:
        raise ValueError(f"unknown pretraining stage(s) {unknown}; choose from "
                         f"{PRETRAINING_STAGES}, in that order")
    if list(stages) != sorted(set(stages), key=PRETRAINING_STAGES.index):
        raise ValueError(f"pretraining stages {stages} must each appear once, in the order "
                         f"{PRETRAINING_STAGES}")
    return stages


def stage_texts(splits: Splits, cfg: Stage1Config) -> tuple[list[dict], list[dict], dict]:
    """The training and held-out passages of stage 1 and the report of what was kept: the
    training split's passages outside validation and test, ``cfg.heldout_fraction`` of them
    (at least one) held out at random (seeded)."""
    passages, report = unlabeled_texts(splits.train, [splits.validation, splits.test])
    order = list(range(len(passages)))
    random.Random(cfg.seed).shuffle(order)
    n_held = max(1, math.ceil(cfg.heldout_fraction * len(passages)))
    held = set(order[:n_held])
    train = [p for i, p in enumerate(passages) if i not in held]
    heldout = [p for i, p in enumerate(passages) if i in held]
    return train, heldout, {**report, "train": len(train), "heldout": len(heldout)}


def _weights_digest(folder: str) -> str:
    """SHA-256 of what a stage reads from a local model folder: its config, weights and
    tokenizer files, by content (not the records of where it came from, such as a conversion's
    source path, so the same weights on another machine have the same digest); a hub id is
    its own digest."""
    path = Path(folder)
    if not path.is_dir():
        return folder
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and (
            p.name == "config.json" or p.suffix in (".safetensors", ".bin")
            or p.name in TOKENIZER_FILES)):
        h.update(file.name.encode() + file_sha256(file).encode())
    return h.hexdigest()


def _stage_settings(stage: str, cfg: Stage1Config) -> dict:
    settings = asdict(cfg)
    mine = "retromae" if stage == "contrastive" else "contrastive"
    return {k: v for k, v in settings.items() if not k.startswith(mine)}


def _texts_digest(*parts: list[dict]) -> str:
    h = hashlib.sha256()
    for part in parts:
        for p in part:
            h.update(json.dumps(p, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        h.update(b"\x00")
    return h.hexdigest()


def stage_folder(exp: ExperimentConfig, stage: str, source: str, splits: Splits,
                 cfg: Stage1Config, texts: tuple | None = None) -> tuple[Path, dict]:
    """The run folder of ``stage`` on top of ``source`` for ``exp``'s model, and the inputs its
    name digests: the upstream weights, the data and the very texts the stage reads
    (:func:`stage_texts`, or ``texts`` when the caller has them), the model's retrieval
    settings and the stage's own settings."""
    m = exp.model
    train, heldout, _ = texts or stage_texts(splits, cfg)
    inputs = {"stage": stage, "source_digest": _weights_digest(source),
              "data_fingerprint": splits.manifest["fingerprint"],
              "texts_digest": _texts_digest(train, heldout),
              "model": {"architecture": m.architecture, "pooling": m.pooling,
                        "projection_dim": m.projection_dim,
                        "max_query_length": m.max_query_length,
                        "max_passage_length": m.max_passage_length},
              "settings": _stage_settings(stage, cfg)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=list).encode())
    label = f"{m.architecture}-{m.hidden_size}x{m.num_hidden_layers}-{stage}"
    # where the upstream weights lie is recorded, not digested: the same run on another
    # machine (or a shipped one) has the same name
    return (runs_root(exp.preset) / "stage1" / f"{label}-{digest.hexdigest()[:10]}",
            {**inputs, "source": source})


#: The demo's stage-1 runs, trained once by ``demo_stage1/build.py`` and shipped with the
#: repository, by run folder name (their ``config.json``, ``history.json`` and ``encoder/``).
SHIPPED_STAGE1 = CHECKOUT / "demo_stage1"
SHIPPED_PARTS = ("config.json", "history.json", "encoder")


def _copy_shipped(folder: Path, source: str) -> dict | None:
    """The shipped run of ``folder``'s name (the same digest: every input the same) copied into
    ``folder`` after checking its checksums, and its config; None when none is shipped."""
    shipped = SHIPPED_STAGE1 / folder.name
    if not (shipped / "config.json").exists():
        return None
    verify_checksums(shipped)
    config = {**json.loads((shipped / "config.json").read_text(encoding="utf-8")),
              "source": source, "shipped_from": f"demo_stage1/{folder.name}"}
    with atomic_folder(folder, owns=("config.json",), overwrite=True) as tmp:
        shutil.copy2(shipped / "history.json", tmp / "history.json")
        shutil.copytree(shipped / "encoder", tmp / "encoder")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                         encoding="utf-8")
    return config


def _contrastive(exp: ExperimentConfig, source: str, train: list[dict], heldout: list[dict],
                 cfg: Stage1Config, folder: Path, resume: bool, show_progress: bool) -> dict:
    """Stage 1b: the retriever of ``exp``'s pooling and projection on ``source``, trained with
    InfoNCE over in-batch negatives on pairs mined from ``train`` (validated on pairs of
    ``heldout``); its best encoder and projection go to ``folder/encoder``."""
    records, pairs = mine_pairs(train, cfg.pair_kinds, cfg.pairs_per_text, cfg.seed,
                                cfg.crop_ratio, cfg.ict_keep_sentence)
    validation, held_pairs = mine_pairs(heldout, cfg.pair_kinds, 1, cfg.seed + 1,
                                        cfg.crop_ratio, cfg.ict_keep_sentence)
    if not records or not validation:
        raise ValueError(f"stage 1b mined {len(records)} training and {len(validation)} "
                         f"held-out pairs ({pairs}); it needs both")
    set_seed(cfg.seed)
    model = DualTowerRetriever.from_config(replace(
        exp.model, base_model=source, m3_heads=False, separate_projections=False,
        query_instruction="", pretraining_stages=()))
    history = train_retriever(model, records, validation, cfg.contrastive_training(), folder,
                              show_progress=show_progress, resume=resume)
    best = folder / "best"
    verify_checksums(best)
    with atomic_folder(folder / "encoder", owns=ENCODER_FILES) as tmp:
        shutil.copytree(best / "encoder", tmp, dirs_exist_ok=True)
        shutil.copy2(best / "head.safetensors", tmp / HEAD_FILE)
        write_checksums(tmp)
    return {"pairs": pairs, "heldout_pairs": held_pairs, "train_records": len(records),
            "best_epoch": history["best_epoch"]}


def run_stage(exp: ExperimentConfig, stage: str, source: str, splits: Splits,
              cfg: Stage1Config | None = None, resume: bool = True,
              show_progress: bool = True) -> tuple[Path, dict]:
    """The folder of ``stage`` on top of ``source`` (reused when a finished one with the same
    inputs is there, else trained, continuing its checkpoints with ``resume``) and its
    ``config.json``."""
    cfg = cfg or get_stage1_config(exp.preset)
    train, heldout, texts = read = stage_texts(splits, cfg)
    folder, inputs = stage_folder(exp, stage, source, splits, cfg, read)
    restore_interrupted(folder / "encoder")  # a save killed between its two renames
    if (folder / "config.json").exists() and (folder / "encoder").is_dir():
        verify_checksums(folder / "encoder")
        print(f"{stage}: reusing {folder}")
        return folder, json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shipped = _copy_shipped(folder, source)
    if shipped is not None:
        print(f"{stage}: copied the shipped run {shipped['shipped_from']} (trained once with "
              f"these exact inputs)")
        return folder, shipped
    folder.mkdir(parents=True, exist_ok=True)
    if stage == "retromae":
        encoder = load_encoder(source)
        tokenizer = load_pretrained_tokenizer(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        history = train_retromae(encoder, tokenizer, [p["text"] for p in train],
                                 [p["text"] for p in heldout], cfg, folder,
                                 exp.model.pooling, resume, show_progress)
        report = {"windows": history["windows"], "heldout_windows": history["heldout_windows"],
                  "short_tails_left_out": history["short_tails_left_out"],
                  "best_step": history["best_step"], "best_heldout_loss": history["best_loss"]}
    else:
        report = _contrastive(exp, source, train, heldout, cfg, folder, resume, show_progress)
    config = {**inputs, "texts": texts, **report}
    write_json_files(folder, {"config.json": config})  # written last, whole: the run is done
    return folder, config


def ensure_stages(exp: ExperimentConfig, splits: Splits, resume: bool = True,
                  show_progress: bool = True) -> tuple[ExperimentConfig, list[dict]]:
    """``exp`` with ``base_model`` pointing at the encoder of its last pretraining stage (each
    run or reused in order, on top of the one before, from ``exp.model.base_model``), and each
    stage's config; ``exp`` unchanged when it asks for none."""
    stages = check_stages(exp.model.pretraining_stages)
    source, done = exp.model.base_model, []
    for stage in stages:
        folder, config = run_stage(exp, stage, source, splits, resume=resume,
                                   show_progress=show_progress)
        source = str(folder / "encoder")
        done.append({**config, "folder": str(folder)})
    return replace(exp, model=replace(exp.model, base_model=source)), done
