"""Models: losses, GradCache, M3 heads, published checkpoints converted, base models, the
dual-tower retriever, expansion with new layers, the demo LMs' pretraining, and RetroMAE
auto-encoding for decoder LMs (stage 1a).

Modules, each importing only those before it: ``losses``, ``gradcache``, ``m3``,
``shape_check``, ``minimind``,
``minimind_scripts``, ``checkpoints``, ``base``, ``retriever``, ``expansion``, ``pretraining``,
``retromae``.
"""

from .losses import (
    autograd_score_gradients, cross_device_info_nce, info_nce, info_nce_embedding_gradients,
    info_nce_score_gradients, InfoNCELoss, LossOutput, normalisation_backward,
    optimise_embeddings, positive_columns, random_batch, similarity_matrix
)
from .gradcache import (
    cached_contrastive_step, GradCacheLoss, split_inputs
)
from .m3 import (
    LOSS_WEIGHTS, MODES, SCORE_WEIGHTS, colbert_score, colbert_scores, evaluate_m3,
    evaluate_reranked, lexical_score, M3Heads, sparse_scores, unified_loss, UnifiedM3Loss
)
from .shape_check import (
    check_shape, ConversionError, SHAPE_LIMITS, TRANSFORMERS_FIELDS
)
from .minimind import (
    MINIMIND2, MINIMIND_V1, SHAPE_FIELDS_BY_FORMAT, TOKENIZER_FILES, V1_ROPE_THETA,
    checkpoint_format, convert_checkpoint, convert_state_dict, interleaved_to_half, llama_config,
    read_state_dict, rope_theta_of, weight_files
)
from .minimind_scripts import (
    stage_training_file, TRAINING_CONFIGS
)
from .checkpoints import (
    SHAPE_FIELDS, check_base_model, checkpoint_shape, how_to_supply, resolve_base_model
)
from .base import (
    HEAD_FILE, POOLINGS, PRECISIONS, autocast_for, build_encoder, choose_precision,
    count_parameters, cpu_has_native_bf16, dtype_kwarg, hf_config_from_shape, load_encoder,
    load_stage_projection, parameter_count_from_config
)
from .retriever import (
    DualTowerRetriever, pad_token_ids, pool, text_token_ids
)
from .expansion import (
    INITS, POSITIONS, decoder_layers, expand_layers, new_layer_positions, UnfreezePlan,
    UnfreezeSchedule
)
from .pretraining import (
    SHIPPED_DEMO_LMS, perplexity, pretrain_demo_lm, PretrainConfig, token_blocks
)
from .retromae import (
    RetroMAEBatch, mask_token_id, make_batch, decoder_visibility, RetroMAE
)

__all__ = [
    "positive_columns", "similarity_matrix", "info_nce", "cross_device_info_nce",
    "normalisation_backward", "info_nce_embedding_gradients", "LossOutput", "InfoNCELoss",
    "info_nce_score_gradients", "autograd_score_gradients", "random_batch",
    "optimise_embeddings", "split_inputs", "cached_contrastive_step", "GradCacheLoss",
    "SCORE_WEIGHTS", "LOSS_WEIGHTS", "MODES", "M3Heads", "sparse_scores", "colbert_scores",
    "lexical_score", "colbert_score", "unified_loss", "UnifiedM3Loss", "evaluate_reranked",
    "evaluate_m3", "MINIMIND_V1", "MINIMIND2", "V1_ROPE_THETA", "ConversionError",
    "check_shape", "SHAPE_LIMITS", "TRANSFORMERS_FIELDS", "SHAPE_FIELDS_BY_FORMAT",
    "checkpoint_format", "llama_config", "rope_theta_of", "interleaved_to_half",
    "convert_state_dict", "read_state_dict", "weight_files", "convert_checkpoint",
    "TOKENIZER_FILES", "TRAINING_CONFIGS", "stage_training_file", "how_to_supply",
    "check_base_model", "resolve_base_model", "SHAPE_FIELDS", "checkpoint_shape", "POOLINGS",
    "hf_config_from_shape", "build_encoder", "dtype_kwarg", "load_encoder", "count_parameters",
    "parameter_count_from_config", "PRECISIONS", "cpu_has_native_bf16", "choose_precision",
    "autocast_for", "HEAD_FILE", "load_stage_projection", "pool", "text_token_ids",
    "pad_token_ids", "DualTowerRetriever", "INITS",
    "POSITIONS", "decoder_layers", "new_layer_positions", "expand_layers", "UnfreezeSchedule",
    "UnfreezePlan", "PretrainConfig", "SHIPPED_DEMO_LMS", "token_blocks", "perplexity",
    "pretrain_demo_lm",
    "RetroMAEBatch", "mask_token_id", "make_batch", "decoder_visibility", "RetroMAE"
]
