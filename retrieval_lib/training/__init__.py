"""Training: batching, the collator, hard-negative mining, the optimizer step, resuming, the
loop, and memory and time plans.

Modules, each importing only those before it: ``batching``, ``collator``, ``events``,
``mining``, ``optim``, ``resume``, ``loop``, ``memory``, ``stage1``.
"""

from .batching import (
    batch_plan, BucketBatchSampler, equal_count_edges, passage_token_lengths
)
from .collator import (
    draw_negatives, RetrievalCollator, set_seed, steps_per_epoch
)
from .events import (
    EVENTS_DIR, TENSORBOARD, write_events
)
from .mining import (
    RANK_RANGE, DenseSearcher, mine_hard_negatives, remine_epoch
)
from .optim import (
    enable_checkpointing, make_loss, make_optimizer, mixed_precision, optimizer_step,
    training_device
)
from .resume import (
    CHECKPOINTS, data_fingerprint, resume_state
)
from .loop import (
    train_retriever
)
from .memory import (
    CUDA_CONTEXT_GIB, GIB, GPUS, UTILISATION, activation_bytes_per_token, fit_step,
    largest_batches, plan_table, saved_activation_bytes, static_bytes, step_activation_bytes,
    training_flops, training_memory_plan, training_plan
)
from .stage1 import (
    LOGIT_BYTES, stage1_plan, stage1_table, token_windows, train_retromae
)

__all__ = [
    "BucketBatchSampler", "batch_plan", "equal_count_edges", "passage_token_lengths",
    "set_seed", "draw_negatives", "RetrievalCollator", "steps_per_epoch", "TENSORBOARD",
    "EVENTS_DIR", "write_events", "DenseSearcher",
    "mine_hard_negatives", "RANK_RANGE", "remine_epoch", "make_optimizer", "make_loss",
    "training_device", "mixed_precision", "enable_checkpointing", "optimizer_step",
    "CHECKPOINTS", "data_fingerprint", "resume_state", "train_retriever",
    "saved_activation_bytes", "activation_bytes_per_token", "static_bytes",
    "step_activation_bytes", "training_memory_plan", "fit_step", "largest_batches", "GIB",
    "CUDA_CONTEXT_GIB", "GPUS", "UTILISATION", "training_flops", "training_plan", "plan_table",
    "token_windows", "train_retromae", "LOGIT_BYTES", "stage1_plan", "stage1_table"
]
