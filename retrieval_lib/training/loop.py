"""The training loop of the retriever: InfoNCE over in-batch and hard negatives.

AdamW with weight decay (not on biases and norms), linear warm-up then linear decay, gradient
clipping, mixed precision on GPU (bf16 where supported, else fp16 with a gradient scaler),
optional gradient checkpointing, seeds. Every step's loss and every epoch's validation
Recall@10 / NDCG@10 go into the returned history; the best epoch by validation NDCG@10 is saved
to ``<out_dir>/best``; training stops early after ``early_stopping_patience`` epochs without
improvement.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..evaluation.search import evaluate_retriever
from ..settings.allocator import keep_freed_memory
from ..settings.checkpoint import (
    WEIGHT_LIMIT,
    latest_checkpoint,
    remove_partial,
    save_checkpoint,
)
from ..settings.config import TrainingConfig
from ..settings.distributed import barrier, init_from_env, is_main
from ..settings.runlock import run_lock
from .batching import BucketBatchSampler, batch_plan
from .collator import RetrievalCollator, set_seed
from .events import write_events
from .mining import remine_epoch
from .optim import (
    enable_checkpointing,
    make_loss,
    make_optimizer,
    mixed_precision,
    optimizer_step,
    training_device,
)
from .resume import CHECKPOINTS, data_fingerprint, resume_state

__all__ = ["train_retriever"]

#: The validation metric that picks the best epoch.
VALIDATION_METRIC = "ndcg@10"

logger = logging.getLogger(__name__)


def _file_logger(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@dataclass
class _Run:
    """Everything one training run carries from step to step (what a checkpoint saves)."""

    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its DDP wrapper
    cfg: TrainingConfig
    out: Path
    device: torch.device
    autocast: object
    scaler: object
    loss_fn: object
    collator: RetrievalCollator
    sampler: BucketBatchSampler  # this process's index batches of every epoch
    optimizer: torch.optim.Optimizer
    schedule: object
    plan: object  # UnfreezePlan or None
    history: dict
    n_train: int
    main: bool
    fingerprint: str = ""
    step: int = 0
    best: float = -math.inf
    best_step: int | None = None
    patience_left: int = 0

    def checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        """Save a resumable checkpoint (main process only)."""
        if not self.main:
            return
        save_checkpoint(self.out / CHECKPOINTS, self.step, self.model, self.optimizer,
                        self.schedule, self.scaler, {
                            "config": asdict(self.cfg), "train_records": self.n_train,
                            "train_fingerprint": self.fingerprint,
                            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.step,
                            "best": None if self.best == -math.inf else self.best,
                            "best_step": self.best_step, "patience_left": self.patience_left,
                            "history": self.history,
                            "collator": {"rng": list(self.collator.rng.getstate()),
                                         **{k: getattr(self.collator, k)
                                            for k in self.collator.COUNTERS}}},
                        keep=self.cfg.keep_checkpoints, protect=self.best_step)


def _setup(model, train, cfg: TrainingConfig, out: Path, device, unfreeze,
           precision: str = "auto") -> _Run:
    """Device, precision, loss, batches, DDP, optimizer and schedule of a fresh run."""
    from transformers import get_linear_schedule_with_warmup  # heavy: only when training

    rank, world, local_rank = init_from_env()
    set_seed(cfg.seed)
    device = training_device(device)
    allocator = keep_freed_memory() if device.type == "cpu" else None  # see allocator
    model.to(device)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model.encoder)
    autocast, scaler, chosen, why = mixed_precision(device, precision)
    loss_fn = make_loss(cfg, model, world)
    fallback = [p["text"] for row in train for p in row["positive_passages"]]
    collator = RetrievalCollator(model, cfg.num_hard_negatives, fallback, cfg.seed + rank,
                                 positive_window=cfg.positive_window)
    sampler = batch_plan(train, cfg, model.tokenizer, model.max_passage_length, rank, world)
    # under DDP every parameter is registered trainable; layers the schedule freezes later
    # simply send no gradient
    step_model = DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None,
        find_unused_parameters=unfreeze is not None) if world > 1 else model
    per_epoch = len(sampler)
    total = cfg.epochs * per_epoch
    plan = unfreeze.plan(total, per_epoch) if unfreeze else None
    optimizer = make_optimizer(model, cfg)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total),
                                               total)
    history = {"steps": [], "epochs": [], "best_epoch": None, "stopped_early": False,
               "validation_metric": VALIDATION_METRIC, "total_steps": total,
               "device": str(device), "cpu_allocator": allocator, "world_size": world,
               "global_batch_size": cfg.batch_size * world, "skipped_steps": [],
               "steps_per_epoch": per_epoch, "unfreeze": plan.stages() if plan else None,
               "precision": chosen, "precision_reason": why,
               "gradient_checkpointing": cfg.gradient_checkpointing,
               "grad_cache_chunk_size": cfg.grad_cache_chunk_size,
               "sub_batch_tokens": cfg.sub_batch_tokens, "batching": sampler.describe()}
    return _Run(model, step_model, cfg, out, device, autocast, scaler, loss_fn, collator,
                sampler, optimizer, schedule, plan, history, len(train), is_main(),
                fingerprint=data_fingerprint(train), patience_left=cfg.early_stopping_patience)


def _resume_or_start(run: _Run, resume: bool, show_progress: bool,
                     overrides: Sequence[str] = ()) -> tuple[int, int, bool]:
    """Restore the newest good checkpoint when resuming (returns its epoch, the batches of it
    already done and True), else clear what an earlier run left (``(1, 0, False)``)."""
    ckpt_root = run.out / CHECKPOINTS
    state = resume_state(run.out, run.cfg, run.n_train, run.model, run.optimizer,
                          run.schedule, run.scaler, run.collator, run.fingerprint,
                          run.history["world_size"], overrides) if resume else None
    if run.main:
        removed = remove_partial(ckpt_root)
        if removed:
            logger.warning("removed unfinished checkpoint folders %s", removed)
    first_epoch, skip = 1, 0
    if state is not None:
        run.history, run.step = state["history"], state["step"]
        first_epoch, skip = state["epoch"], state["batch_in_epoch"]
        run.best = state["best"] if state["best"] is not None else -math.inf
        run.patience_left, run.best_step = state["patience_left"], state["best_step"]
        run.history.setdefault("resumed_from", []).append(
            {"checkpoint": state["folder"], "epoch": first_epoch, "batch_in_epoch": skip,
             "step": run.step,
             **({"changed_settings": state["changed"]} if state["changed"] else {})})
        logger.info("resumed from %s: epoch %d, %d batches done, step %d", state["folder"],
                    first_epoch, skip, run.step)
        if show_progress:
            print(f"resuming from {state['folder']} (epoch {first_epoch}, step {run.step})")
    else:
        if resume and show_progress:
            print(f"no checkpoint in {ckpt_root}; training from the start")
        for old in (ckpt_root, run.out / "negatives"):  # a fresh run never resumes old state
            if run.main and old.exists():
                shutil.rmtree(old)
    barrier()
    return first_epoch, skip, state is not None


def _epoch_records(run: _Run, train, epoch: int, resuming: bool, skip: int):
    """Records with negatives mined by the model being trained (ANCE) when this epoch
    re-mines, or reloaded after a resume (``resuming``); None: keep the current records."""
    if not run.cfg.remine_every:
        return None
    due = [e for e in range(2, epoch + 1) if (e - 1) % run.cfg.remine_every == 0]
    if not due or not (due[-1] == epoch or resuming):
        return None
    rows, report = remine_epoch(run.model, train, run.cfg, due[-1], run.out / "negatives",
                                reuse=resuming)
    if due[-1] == epoch and not skip:  # a resumed epoch has its report already
        run.history.setdefault("mining", []).append({"epoch": epoch, **report})
        logger.info("epoch %d: negatives re-mined: %s", epoch, report)
    return rows


def _train_step(run: _Run, batch: dict, epoch: int) -> float | None:
    """One optimizer step on ``batch``; returns its loss, or None for a step the fp16 scaler
    skipped. A non-finite loss without a scaler stops the run (FloatingPointError)."""
    qi = {k: v.to(run.device) for k, v in batch["query_inputs"].items()}
    pi = {k: v.to(run.device) for k, v in batch["passage_inputs"].items()}
    scaler = run.scaler
    out = run.loss_fn(run.step_model, qi, pi, autocast=run.autocast,
                      scale=scaler.scale if scaler is not None else None)
    run.step += 1
    if not torch.isfinite(out.loss):
        last = run.history["steps"][-1]["loss"] if run.history["steps"] else None
        where = (f"loss is {out.loss.item()} at step {run.step} (epoch {epoch}); last finite "
                 f"loss: {last}")
        if scaler is None:
            good = latest_checkpoint(run.out / CHECKPOINTS)
            advice = (f"The last good checkpoint (verified, finite weights of at most "
                      f"{WEIGHT_LIMIT:g}) is {good}: lower the learning rate and continue "
                      f"from it with resume=True, resume_overrides=('learning_rate',) (shell: "
                      f"--resume --resume-override learning_rate); the change is recorded in "
                      f"the history") if good else (
                      "No checkpoint is good to continue from (none yet, or all diverged): "
                      "lower the learning rate and train again from the start with "
                      "resume=False (shell: without --resume), which deletes the diverged "
                      "checkpoints")
            raise FloatingPointError(f"{where}. {advice}")
        # the scaler sees the non-finite gradients, skips the optimizer step and backs its scale
        # off (on the first step too, before any scale exists, where a manual update() fails)
        logger.warning("%s; step skipped (fp16 loss scale %s)", where, scaler.get_scale())
        run.history["skipped_steps"].append({"step": run.step, "epoch": epoch,
                                             "loss": out.loss.item()})
        if not out.backward_done:
            scaler.scale(out.loss).backward()
        scaler.step(run.optimizer)
        scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.schedule.step()
        return None
    if not out.backward_done:
        (scaler.scale(out.loss) if scaler is not None else out.loss).backward()
    optimizer_step(run.model, run.optimizer, run.schedule, scaler, run.cfg.max_grad_norm)
    run.history["steps"].append({"step": run.step, "epoch": epoch, "loss": out.loss.item(),
                                 "lr": run.schedule.get_last_lr()[0],
                                 **({"loss_parts": out.parts} if out.parts else {})})
    return out.loss.item()
def _end_epoch(run: _Run, validation, epoch: int, losses: list[float], trainable_new,
               started: float, train_time: float, eval_batch_size: int,
               show_progress: bool) -> None:
    """Validate, keep the best model, count patience (not while new layers still wait) and
    record the epoch."""
    val = evaluate_retriever(run.model, validation, ks=(10,), batch_size=eval_batch_size)
    metrics = {m: val["aggregate"][m]["mean"] for m in ("recall@10", "ndcg@10", "mrr")}
    improved = metrics[VALIDATION_METRIC] > run.best
    if improved:
        run.best, run.patience_left = metrics[VALIDATION_METRIC], run.cfg.early_stopping_patience
        run.history["best_epoch"], run.best_step = epoch, run.step
        if run.main:
            run.model.save(run.out / "best")  # swapped in whole
        barrier()
    elif run.plan is None or run.plan.complete(run.step):
        run.patience_left -= 1
    world = run.history["world_size"]
    record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
              "trainable_new_layers": trainable_new,
              **{f"val_{k}": v for k, v in metrics.items()},
              "best": improved, "time_s": time.perf_counter() - started,
              "train_time_s": train_time,
              "train_samples": len(losses) * run.cfg.batch_size * world,
              "mixed_batches": run.sampler.mixed_batches(epoch)}
    run.history["epochs"].append(record)
    if run.main:  # TensorBoard's view of the history so far (where tensorboard is installed)
        write_events(run.out, run.history)
    logger.info("epoch %d: %s", epoch, record)
    if show_progress:
        print(f"epoch {epoch}: train loss {record['train_loss']:.4f}, "
              f"val recall@10 {metrics['recall@10']:.4f}, ndcg@10 {metrics['ndcg@10']:.4f}"
              + (" (best)" if improved else ""))
    if run.patience_left <= 0 and epoch < run.cfg.epochs:
        run.history["stopped_early"] = True
        logger.info("early stop after epoch %d", epoch)


def _finish(run: _Run) -> dict:
    """Add the sampling counts to the history and write ``history.json``."""
    c = run.collator
    run.history.update(short_negatives=c.short_negatives, random_negatives=c.random_negatives,
                       windowed_positives=c.windowed_positives,
                       pad_fraction=c.pad_fraction,
                       group_by_length=bool(run.cfg.group_by_length),
                       sub_batched_steps=getattr(run.loss_fn, "sub_batched_steps", 0))
    if run.main:
        (run.out / "history.json").write_text(json.dumps(run.history, indent=2),
                                              encoding="utf-8")
    return run.history


def train_retriever(model, train, validation, cfg: TrainingConfig, out_dir: str | Path,
                    device: str | torch.device | None = None, show_progress: bool = True,
                    eval_batch_size: int = 32, unfreeze=None, resume: bool = False,
                    precision: str = "auto", resume_overrides: Sequence[str] = ()) -> dict:
    """Train ``model`` on ``train`` (records), validate on ``validation`` each epoch.

    ``unfreeze`` (an :class:`~retrieval_lib.models.expansion.UnfreezeSchedule`) sets which new
    layers train at each optimizer step; its stages are in ``history["unfreeze"]`` and each epoch
    record names the new layers that trained in its last step. Epochs that end before the last
    new layer has become trainable do not count towards early stopping, so the schedule
    always runs to its end.

    Returns the history: ``steps`` (step, epoch, loss, lr), ``epochs`` (train loss, validation
    metrics, wall time, whether it was the best so far), ``best_epoch``, ``stopped_early`` and
    the negative-sampling counts. Writes ``history.json``, ``train.log`` and the best model to
    ``out_dir/best``.

    Checkpoints (:mod:`retrieval_lib.settings.checkpoint`) go to ``out_dir/checkpoints`` every
    ``cfg.checkpoint_steps`` steps and after every epoch. ``resume=True`` continues from the
    newest good one (model, optimizer, schedule, scaler, RNG states, position in the epoch,
    early-stopping state and history), so that a killed run ends as an uninterrupted one
    would; without a checkpoint it starts from the beginning, and with checkpoints none of
    which verifies it stops and deletes nothing. A resume refuses other settings, data or
    world size, except memory savers and the settings named in ``resume_overrides`` (e.g.
    ``("learning_rate",)`` after a divergence); each change is recorded in the history.
    ``resume=False`` deletes old checkpoints. A non-finite loss stops the run with the step,
    the last finite loss and the last good checkpoint (under the fp16 scaler the step is
    skipped and counted instead). One process at a time trains a run folder
    (:func:`~retrieval_lib.settings.runlock.run_lock`): a second is refused, naming the first.

    ``precision`` (:data:`PRECISIONS`, :func:`mixed_precision`) is recorded in the history with
    the reason it was chosen. The loss comes from :func:`make_loss`, the batches from
    :func:`~retrieval_lib.training.batching.batch_plan`. Under ``torchrun`` every process trains its
    slice of each global batch (``batch_size`` queries per process, the same length bucket on
    every process), the model is wrapped in DDP and every query meets the passages of all
    processes.
    Each process validates the same (synchronised) model, so all take the same early-stopping
    decisions; only the main process writes files and prints.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_from_env()
    with run_lock(out) if is_main() else nullcontext():  # one writer per run folder
        return _train(model, train, validation, cfg, out, device, show_progress and is_main(),
                      eval_batch_size, unfreeze, resume, precision, resume_overrides)


def _train(model, train, validation, cfg, out, device, show_progress, eval_batch_size,
           unfreeze, resume, precision, resume_overrides) -> dict:
    handler = _file_logger(out) if is_main() else None
    try:
        run = _setup(model, train, cfg, out, device, unfreeze, precision)
        first_epoch, skip, resuming = _resume_or_start(run, resume, show_progress,
                                                       resume_overrides)
        logger.info("training on %s: %d records, %d steps, %s", run.device, len(train),
                    run.history["total_steps"], cfg)
        per_epoch, rows = run.history["steps_per_epoch"], train
        for epoch in range(first_epoch, cfg.epochs + 1):
            if run.history["stopped_early"]:
                break
            mined = _epoch_records(run, train, epoch, resuming, skip)
            rows = rows if mined is None else mined
            model.train()
            trainable_new = run.plan.apply(model.encoder, run.step) if run.plan else None
            # its own generator: a loader seeds its workers from the global torch RNG otherwise,
            # which would make the dropout of a resumed epoch differ from the uninterrupted one
            run.sampler.set_epoch(epoch)
            loader = DataLoader(rows, batch_sampler=list(run.sampler)[skip:],
                                collate_fn=run.collator,
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            started = time.perf_counter()
            losses = [s["loss"] for s in run.history["steps"] if s["epoch"] == epoch]
            for done, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}",
                                              total=per_epoch, initial=skip,
                                              disable=not show_progress), start=skip + 1):
                if run.plan and run.plan.trainable(run.step) != trainable_new:  # a new stage
                    trainable_new = run.plan.apply(model.encoder, run.step)
                    logger.info("step %d: new layers %s trainable", run.step, trainable_new)
                loss = _train_step(run, batch, epoch)
                if loss is not None:
                    losses.append(loss)
                    if cfg.checkpoint_steps and run.step % cfg.checkpoint_steps == 0 \
                            and done < per_epoch:
                        run.checkpoint(epoch, done)
            skip, resuming = 0, False
            _end_epoch(run, validation, epoch, losses, trainable_new, started,
                       time.perf_counter() - started, eval_batch_size, show_progress)
            run.checkpoint(epoch + 1, 0)
        return _finish(run)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
