"""Settings and shared helpers: the ledger of saved results a figure is drawn from, presets
(every number of the report, once), memory kept for reuse, hub look-ups, atomic checksummed
checkpoints and saved folders, one writer per run folder, process groups.

Modules, each importing only those before it: ``provenance``, ``config``, ``allocator``,
``hub``, ``runlock``, ``checkpoint``, ``saved_folder``, ``distributed``.
"""

from .provenance import (
    active_preset, clear_sources, FIGURE_FIELDS, png_text, record_data, record_run,
    run_source, set_active_preset, sources, stale_figures
)
from .config import (
    BGE_M3_ZH_SOURCES, CHECKOUT, DEMO_DATA, DEMO_LENGTHS, DEMO_NEW_LAYERS,
    DEMO_PRETRAINING_STAGES, DEMO_RERANKER,
    DEMO_SHAPES, EXPERIMENTS, MINIMIND_108M, MINIMIND_27M, PRESETS, PUBLISHED_BASE_MODELS,
    QWEN2_05B, SEED, cache_path, check_unfreezing, DataConfig, ExperimentConfig, ExperimentSpec,
    get_data_config, get_experiment, get_reranker_config, get_stage1_config, ModelConfig,
    PRETRAINING_STAGES, Stage1Config, DEMO_STAGE1, project_root,
    RerankerConfig, resolve_preset, set_project_home, TrainingConfig, variant, with_defaults,
    with_overrides
)
from .allocator import (
    ENV_VAR, keep_freed_memory
)
from .hub import (
    hub_has, model_available
)
from .runlock import (
    HEARTBEAT_S, LOCK_FILE, leftover_pid, pid_alive, run_lock, RunLockedError, STALE_AFTER_S,
    writes_run_folder
)
from .checkpoint import (
    WEIGHT_LIMIT, CheckpointError, file_sha256, good_checkpoints, latest_checkpoint,
    list_checkpoints, load_checkpoint, load_optimizer_state, remove_partial, rng_state,
    save_checkpoint, set_rng_state, skip_warning, UnsafeCheckpointError, verify_checkpoint
)
from .saved_folder import (
    CHECKSUMS, atomic_folder, check_replaceable, restore_interrupted, reusable,
    unreadable_files, verify_checksums, write_checksums
)
from .distributed import (
    barrier, finish, gather_with_grad, init_from_env, is_distributed, is_main, main_first
)

__all__ = [
    "run_source", "record_run", "record_data", "sources", "clear_sources", "set_active_preset",
    "active_preset", "png_text", "stale_figures", "FIGURE_FIELDS",
    "SEED", "CHECKOUT", "project_root", "set_project_home", "cache_path", "PRESETS",
    "BGE_M3_ZH_SOURCES", "DataConfig", "ModelConfig", "TrainingConfig", "RerankerConfig",
    "DEMO_RERANKER", "get_reranker_config", "PRETRAINING_STAGES", "Stage1Config", "DEMO_STAGE1",
    "get_stage1_config", "ExperimentConfig", "MINIMIND_27M", "MINIMIND_108M",
    "QWEN2_05B", "PUBLISHED_BASE_MODELS", "DEMO_SHAPES", "DEMO_LENGTHS",
    "DEMO_PRETRAINING_STAGES", "ExperimentSpec",
    "DEMO_NEW_LAYERS", "EXPERIMENTS", "DEMO_DATA", "resolve_preset", "get_data_config",
    "get_experiment", "with_overrides", "check_unfreezing", "variant", "with_defaults",
    "ENV_VAR", "keep_freed_memory", "hub_has", "model_available", "CheckpointError",
    "WEIGHT_LIMIT", "save_checkpoint", "load_checkpoint", "load_optimizer_state",
    "latest_checkpoint", "verify_checkpoint", "list_checkpoints", "remove_partial", "rng_state",
    "set_rng_state", "good_checkpoints", "skip_warning", "UnsafeCheckpointError",
    "atomic_folder", "check_replaceable", "restore_interrupted",
    "reusable", "write_checksums", "verify_checksums", "CHECKSUMS", "file_sha256",
    "unreadable_files",
    "RunLockedError", "run_lock", "writes_run_folder", "pid_alive", "leftover_pid",
    "LOCK_FILE", "HEARTBEAT_S", "STALE_AFTER_S", "is_distributed",
    "init_from_env", "is_main", "barrier", "finish", "main_first", "gather_with_grad"
]
