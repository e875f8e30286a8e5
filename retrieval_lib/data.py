"""Data: the unified record, loaders with validation, splits, subsets, and the demo corpus.

Every source is turned into the unified record of the course::

    {"query": str,
     "positive_passages": [{"text": str}, ...],   # at least one
     "negative_passages": [{"text": str}, ...],   # hard negatives, possibly none
     "source": str}                               # which data set it came from

Loaders never lose a record silently. In strict mode a bad record raises :class:`DataError`
naming the file, the line and the field; in lenient mode it is counted under its reason in a
:class:`LoadReport`, and the report's numbers always add up: ``read == kept + sum(dropped)``.

Preparation (:func:`prepare_splits`) deduplicates queries, draws one fixed test set and one
fixed validation set shared by every experiment, and orders the remaining training pool so that
the nested subsets (10K ⊂ 96K ⊂ 288K in full) are its prefixes. Everything is reproducible from
the seed, saved with ``datasets`` (Arrow) plus a ``manifest.json`` of counts.

The offline demo corpus (People's Daily 1998) is rebuilt in :mod:`retrieval_lib.demo_corpus`.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import SEED, DataConfig, cache_path

__all__ = [
    "DataError",
    "DataUnavailableError",
    "LoadReport",
    "validate_record",
    "traditional_characters",
    "to_simplified",
    "from_flag_embedding",
    "read_jsonl",
    "find_source_files",
    "load_bge_m3_zh",
    "download_bge_m3_zh",
    "download_location",
    "storage_plan",
    "dedup_records",
    "make_splits",
    "Splits",
    "prepare_splits",
    "load_splits",
    "corpus_of",
    "check_splits",
    "prepare_data",
    "data_config_hash",
    "collect_lengths",
    "summarize_lengths",
    "manifest_table",
]

#: Bumped whenever preparation changes what it produces, so cached splits are rebuilt.
PREPARE_VERSION = 1


class DataError(ValueError):
    """A record that does not fit the schema; the message names file, line and field."""


class DataUnavailableError(FileNotFoundError):
    """The data could be found neither locally nor on the hub."""


@dataclass
class LoadReport:
    """What a loader read, kept and dropped (by reason). The numbers always add up."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    #: per-record repairs that lose no record, e.g. negatives equal to a positive removed
    repaired: Counter = field(default_factory=Counter)
    #: records kept as they are but worth knowing about, e.g. ones with Traditional characters
    flagged: Counter = field(default_factory=Counter)
    #: files that held no record at all (lenient mode; strict mode raises)
    empty_files: list[str] = field(default_factory=list)
    #: the first few problems, as "file:line: field: what", to show the user
    examples: list[str] = field(default_factory=list)
    #: records kept from each file that was read, by path
    files: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, message: str | None = None) -> None:
        self.dropped[reason] += 1
        if message and len(self.examples) < 20:
            self.examples.append(message)

    def merge(self, other: LoadReport) -> None:
        self.read += other.read
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.repaired.update(other.repaired)
        self.flagged.update(other.flagged)
        self.empty_files.extend(other.empty_files)
        self.files.update(other.files)
        self.examples.extend(other.examples[: max(0, 20 - len(self.examples))])

    def check(self) -> None:
        """Raise if the books do not balance (a loader bug, never a data problem)."""
        if self.read != self.kept + sum(self.dropped.values()):
            raise AssertionError(f"load report does not add up: {self.to_dict()}")

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "flagged": dict(sorted(self.flagged.items())),
            "empty_files": list(self.empty_files),
            "examples": list(self.examples),
            "files": dict(self.files),
        }


# ---------------------------------------------------------------------------------------------
# Schema and validation
# ---------------------------------------------------------------------------------------------


#: Longest text kept, in characters; longer ones are cut and counted (``text_truncated``).
#: The longest BGE-M3 passages (8,192 tokens) are about 12,000 Chinese characters.
MAX_TEXT_CHARS = 100_000


@functools.cache
def _traditional_table() -> dict[int, str]:
    """Traditional -> Simplified for single characters: snownlp's table, restricted to
    characters outside GB 2312 (the Simplified standard set). Its phrase entries rewrite
    regional vocabulary (的士 -> 出租车) and some of its characters are ordinary Simplified ones
    (余, 著, 乾), so neither counts as Traditional here."""
    from snownlp.normal.zh import zh2hans

    def in_gb2312(ch: str) -> bool:
        try:
            ch.encode("gb2312")
        except UnicodeEncodeError:
            return False
        return True

    return {ord(k): v for k, v in zh2hans.items()
            if len(k) == 1 and len(v) == 1 and k != v and not in_gb2312(k)}


def traditional_characters(text: str) -> int:
    """How many characters of ``text`` are Traditional forms with a Simplified counterpart.

    >>> traditional_characters("漢字与简体")
    1
    """
    table = _traditional_table()
    return sum(1 for ch in text if ord(ch) in table)


def to_simplified(text: str) -> str:
    """``text`` with every Traditional character replaced by its Simplified form.

    >>> to_simplified("檢索與漢字")
    '检索与汉字'
    """
    return text.translate(_traditional_table())


def _check_text(value, where: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field_name}': expected a string, got "
                        f"{type(value).__name__}")
    if "\x00" in value:
        raise DataError(f"{where}: field '{field_name}': contains a NUL byte")
    if not value.strip():
        raise DataError(f"{where}: field '{field_name}': empty or whitespace-only text")
    return value


def _check_passages(value, where: str, field_name: str, required: bool) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field_name}': expected a list, got "
                        f"{type(value).__name__}")
    if required and not value:
        raise DataError(f"{where}: field '{field_name}': empty list (a record needs at least "
                        f"one positive passage)")
    passages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "text" not in item:
            raise DataError(f"{where}: field '{field_name}[{i}]': expected an object with a "
                            f"'text' field, got {type(item).__name__}")
        passages.append({"text": _check_text(item["text"], where, f"{field_name}[{i}].text")})
    return passages


def validate_record(obj, where: str = "<record>", source: str | None = None,
                    report: LoadReport | None = None, max_chars: int | None = MAX_TEXT_CHARS,
                    simplify: bool = False) -> dict:
    """Check one unified record and return a clean copy.

    Raises :class:`DataError` naming ``where`` (``file:line``) and the field at fault. Within a
    valid record, duplicate positives are merged, positives identical to the query and
    negatives identical to a positive are removed, texts longer than ``max_chars`` are cut;
    each is counted in ``report.repaired`` when a report is given. A record whose only positive
    is its query is an error (nothing to learn). Records with Traditional characters are counted
    in ``report.flagged``; ``simplify=True`` converts them to Simplified (counted as repaired).

    >>> validate_record({"query": "q", "positive_passages": [{"text": "p"}, {"text": "p"}],
    ...                  "negative_passages": [{"text": "p"}, {"text": "n"}]})["negative_passages"]
    [{'text': 'n'}]
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("query", "positive_passages"):
        if name not in obj:
            raise DataError(f"{where}: field '{name}': missing")
    query = _check_text(obj["query"], where, "query")
    positives = _check_passages(obj["positive_passages"], where, "positive_passages", True)
    negatives = _check_passages(obj.get("negative_passages", []), where, "negative_passages",
                                False)
    seen, unique_pos = set(), []
    for p in positives:
        if p["text"] not in seen:
            seen.add(p["text"])
            unique_pos.append(p)
    clean_neg, neg_seen = [], set()
    for n in negatives:
        if n["text"] in seen:
            if report is not None:
                report.repaired["negative_equal_to_positive"] += 1
            continue
        if n["text"] in neg_seen:
            if report is not None:
                report.repaired["duplicate_negative"] += 1
            continue
        neg_seen.add(n["text"])
        clean_neg.append(n)
    if report is not None and len(unique_pos) < len(positives):
        report.repaired["duplicate_positive"] += len(positives) - len(unique_pos)
    same_as_query = [p for p in unique_pos if _normalise(p["text"]) == _normalise(query)]
    if same_as_query:
        if len(same_as_query) == len(unique_pos):
            raise DataError(f"{where}: field 'positive_passages[0].text': identical to the "
                            f"query (a record needs a positive other than its query)")
        unique_pos = [p for p in unique_pos if p not in same_as_query]
        if report is not None:
            report.repaired["positive_equal_to_query"] += len(same_as_query)
    query, unique_pos, clean_neg = _clean_texts(query, unique_pos, clean_neg, max_chars,
                                                simplify, report)
    record_source = source if source is not None else obj.get("source", "unknown")
    if not isinstance(record_source, str):
        raise DataError(f"{where}: field 'source': expected a string, got "
                        f"{type(record_source).__name__}")
    return {"query": query, "positive_passages": unique_pos, "negative_passages": clean_neg,
            "source": record_source}


def _clean_texts(query: str, positives: list[dict], negatives: list[dict],
                 max_chars: int | None, simplify: bool, report: LoadReport | None):
    """Cut over-long texts and detect (or convert) Traditional characters, counting both."""
    texts = [query] + [p["text"] for p in positives] + [n["text"] for n in negatives]
    if max_chars is not None:
        cut = sum(len(t) > max_chars for t in texts)
        if cut:
            texts = [t[:max_chars] for t in texts]
            if report is not None:
                report.repaired["text_truncated"] += cut
    if any(traditional_characters(t) for t in texts):
        if simplify:
            texts = [to_simplified(t) for t in texts]
        if report is not None:
            (report.repaired if simplify else report.flagged)["traditional_characters"] += 1
    n_pos = len(positives)
    return (texts[0], [{"text": t} for t in texts[1:1 + n_pos]],
            [{"text": t} for t in texts[1 + n_pos:]])


def from_flag_embedding(obj, where: str = "<record>") -> dict:
    """Convert FlagEmbedding's training format to the unified record.

    FlagEmbedding (and ``Shitao/bge-m3-data``) store ``{"query": str, "pos": [str],
    "neg": [str]}`` with optional ``pos_scores``, ``neg_scores``, ``prompt`` and ``type``, which
    the retriever does not use.

    >>> from_flag_embedding({"query": "q", "pos": ["a"], "neg": ["b", "c"]})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'query': 'q', 'positive_passages': [{'text': 'a'}],
     'negative_passages': [{'text': 'b'}, {'text': 'c'}]}
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "pos" not in obj:
        raise DataError(f"{where}: field 'pos': missing")
    pos, neg = obj["pos"], obj.get("neg", [])
    for name, value in (("pos", pos), ("neg", neg)):
        if not isinstance(value, list):
            raise DataError(f"{where}: field '{name}': expected a list of strings, got "
                            f"{type(value).__name__}")
    return {
        "query": obj.get("query"),
        "positive_passages": [{"text": t} for t in pos],
        "negative_passages": [{"text": t} for t in neg],
    }


# ---------------------------------------------------------------------------------------------
# Reading JSON lines
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, *, source: str | None = None,
               converter: Callable[[dict, str], dict] | None = None, strict: bool = True,
               max_negatives: int | None = None, report: LoadReport | None = None,
               max_chars: int | None = MAX_TEXT_CHARS, simplify: bool = False
               ) -> Iterator[dict]:
    """Yield validated unified records from a JSON-lines file.

    ``converter`` maps each parsed object to the unified layout first (e.g.
    :func:`from_flag_embedding`). Blank lines are skipped without counting; a UTF-8 byte-order
    mark at the start of the file is ignored. Any other problem (undecodable bytes, invalid JSON,
    schema errors) raises :class:`DataError` in strict mode, or is counted in ``report`` under
    ``invalid_utf8``, ``invalid_json`` or ``invalid_record`` in lenient mode.
    ``max_negatives`` keeps the first K hard negatives and counts the rest as repaired;
    ``max_chars`` and ``simplify`` are passed to :func:`validate_record`. A file without any
    record is an error in strict mode and listed in ``report.empty_files`` otherwise.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    lines_seen = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            report.read += 1
            lines_seen += 1
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: undecodable byte at column {exc.start + 1} "
                                    f"(not UTF-8)") from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column "
                                    f"{exc.colno})") from None
                if converter is not None:
                    obj = converter(obj, where)
                record = validate_record(obj, where, source=source, report=report,
                                         max_chars=max_chars, simplify=simplify)
            except DataError as exc:
                if strict:
                    raise
                message = str(exc)
                reason = ("invalid_utf8" if "undecodable" in message else
                          "invalid_json" if "invalid JSON" in message else "invalid_record")
                report.drop(reason, message)
                continue
            if max_negatives is not None and len(record["negative_passages"]) > max_negatives:
                report.repaired["negatives_beyond_limit"] += (
                    len(record["negative_passages"]) - max_negatives)
                record["negative_passages"] = record["negative_passages"][:max_negatives]
            report.kept += 1
            yield record
    if not lines_seen:
        if strict:
            raise DataError(f"{path}: empty file (no records); a truncated download? "
                            f"Remove it or load with strict=False to skip it")
        report.empty_files.append(str(path))


# ---------------------------------------------------------------------------------------------
# The Chinese part of BGE-M3's fine-tuning data
# ---------------------------------------------------------------------------------------------

_HOW_TO_SUPPLY = (
    "Supply the data in one of two ways:\n"
    "  1. download bge-m3-data.tar.gz from https://huggingface.co/datasets/{repo}, extract it, "
    "and pass the folder as data_dir (notebook parameter `data_dir`);\n"
    "  2. make the hub reachable (set HF_ENDPOINT to a mirror, e.g. https://hf-mirror.com) and "
    "leave data_dir empty: the Chinese files are then extracted into the cache.\n"
    "Expected file names (searched recursively, case-insensitive): {patterns}"
)


def find_source_files(data_dir: str | os.PathLike, sources: dict[str, str]
                      ) -> dict[str, list[Path]]:
    """Map each source to its files under ``data_dir`` (recursive, case-insensitive globs).

    Raises :class:`DataUnavailableError` if the folder does not exist or a source has no file.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataUnavailableError(f"data folder {root} does not exist.\n" + _HOW_TO_SUPPLY.format(
            repo="Shitao/bge-m3-data", patterns=", ".join(sources.values())))
    all_files = sorted(p for p in root.rglob("*") if p.is_file()
                       and not p.name.startswith("._"))  # macOS resource forks
    found: dict[str, list[Path]] = {}
    missing = []
    for name, pattern in sources.items():
        matches = [p for p in all_files if fnmatch.fnmatch(p.name.lower(), pattern.lower())]
        if not matches:
            stem = re.sub(r"v\d+$", "", name.split("_")[0].lower())  # lecardv2 -> lecard
            near = [str(p.relative_to(root)) for p in all_files if stem in p.name.lower()]
            missing.append(f"{name} (pattern {pattern}): "
                           + (f"files whose names contain {stem!r}: {', '.join(near[:12])}"
                              f"{' ...' if len(near) > 12 else ''}" if near else
                              f"no file name contains {stem!r}"))
        found[name] = matches
    if missing:
        raise DataUnavailableError(
            f"no file matched under {root} for:\n  " + "\n  ".join(missing)
            + "\nIf a name differs only in spelling, set DataConfig.sources[<source>] to a "
              "pattern that matches it.\n"
            + _HOW_TO_SUPPLY.format(repo="Shitao/bge-m3-data",
                                    patterns=", ".join(sources.values())))
    return found


#: Size of ``bge-m3-data.tar.gz`` as the dataset's file list shows it (used when the hub
#: cannot be asked; revisions 1c2fc8f and f83a4f8 both list 24 GB).
ARCHIVE_BYTES = 24 * 10**9


def download_location(cfg: DataConfig) -> Path:
    """Where the archive is downloaded: ``cfg.download_dir``, else the Hugging Face cache of
    this machine (on Colab the runtime's local disk, never Google Drive, even when the
    project home is on Drive)."""
    if cfg.download_dir:
        return Path(cfg.download_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _archive_bytes(repo: str, filename: str) -> tuple[int, str]:
    """The archive's size from the hub (and where the number came from)."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().get_paths_info(repo, [filename], repo_type="dataset")
        if info and getattr(info[0], "size", None):
            return int(info[0].size), "hub"
    except Exception:  # offline: the size the dataset page lists
        pass
    return ARCHIVE_BYTES, "dataset page"


def storage_plan(cfg: DataConfig, filename: str = "bge-m3-data.tar.gz") -> list[dict]:
    """What preparing the full data writes where, with the free space found there (GB).

    The archive goes to :func:`download_location`; only the Chinese files are extracted, to
    the project's cache (on Drive when the project home is there). Their total size is only
    known once the archive has been read, so that row gives the free space alone.
    """
    import shutil

    def free_gb(path: Path) -> float:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free / 1e9

    size, origin = _archive_bytes(cfg.hub_repo, filename)
    download, extract = download_location(cfg), cache_path(cfg) / "extracted"
    return [{"step": f"download {filename}", "where": str(download),
             "needs_gb": round(size / 1e9, 1), "size_from": origin,
             "free_gb": round(free_gb(download), 1)},
            {"step": "extract the Chinese files", "where": str(extract), "needs_gb": None,
             "size_from": "known after reading the archive", "free_gb": round(free_gb(extract), 1)}]


def download_bge_m3_zh(repo: str, sources: dict[str, str], cache_dir: str | os.PathLike,
                       filename: str = "bge-m3-data.tar.gz",
                       download_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the data archive from the hub and extract only the files of ``sources``.

    The archive (about 24 GB) holds every language; it is downloaded to ``download_dir``
    (default: this machine's Hugging Face cache, so on Colab the runtime's local disk and not
    Drive), its members are streamed and only those whose file name matches a source pattern
    are written under ``cache_dir/extracted``. Raises :class:`DataUnavailableError` with
    instructions when the hub cannot be reached.
    """
    from huggingface_hub import hf_hub_download

    target = Path(cache_dir) / "extracted"
    marker = target / ".complete"
    if marker.exists():
        return target
    try:
        archive = hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset",
                                  cache_dir=str(download_dir) if download_dir else None)
    except Exception as exc:  # offline, no such repo, auth: all mean the data is unavailable
        raise DataUnavailableError(
            f"could not download {filename} from the hub dataset {repo} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            + _HOW_TO_SUPPLY.format(repo=repo, patterns=", ".join(sources.values()))) from exc
    patterns = [p.lower() for p in sources.values()]
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            name = Path(member.name).name
            if member.isfile() and any(fnmatch.fnmatch(name.lower(), p) for p in patterns):
                fh = tar.extractfile(member)
                with open(target / name, "wb") as out:
                    while chunk := fh.read(1 << 20):
                        out.write(chunk)
    marker.touch()
    print(f"extracted the Chinese files to {target}; the archive stays at {archive} "
          f"(delete it to free {Path(archive).stat().st_size / 1e9:.1f} GB)")
    return target


def load_bge_m3_zh(cfg: DataConfig, reports: dict[str, LoadReport] | None = None
                   ) -> Iterator[dict]:
    """Yield the unified records of the Chinese BGE-M3 sources named in ``cfg.sources``.

    Reads ``cfg.data_dir`` when given; otherwise downloads and extracts from ``cfg.hub_repo``.
    ``reports`` receives one :class:`LoadReport` per source (read, kept, dropped by reason).
    The folder and its files are checked before the first record is yielded.
    """
    data_dir = cfg.data_dir
    if not data_dir:
        for row in storage_plan(cfg):
            print(f"{row['step']}: {row['where']} needs "
                  f"{row['needs_gb'] if row['needs_gb'] is not None else '?'} GB "
                  f"({row['size_from']}), {row['free_gb']} GB free")
        data_dir = download_bge_m3_zh(cfg.hub_repo, cfg.sources, cache_path(cfg),
                                      download_dir=cfg.download_dir or None)
    files = find_source_files(data_dir, cfg.sources)
    reports = reports if reports is not None else {}
    for source, paths in files.items():
        report = reports.setdefault(source, LoadReport())
        for path in paths:
            before = report.kept
            yield from read_jsonl(path, source=source, converter=from_flag_embedding,
                                  strict=cfg.strict, max_negatives=cfg.num_hard_negatives,
                                  report=report, max_chars=cfg.max_text_chars,
                                  simplify=cfg.to_simplified)
            report.files[str(Path(path).relative_to(data_dir))] = report.kept - before
        print(f"{source}: {len(paths)} file(s), {report.kept:,} records kept of "
              f"{report.read:,} read: " + ", ".join(f"{f} ({n:,})"
                                                      for f, n in report.files.items()))


# ---------------------------------------------------------------------------------------------
# Deduplication, splits and subsets
# ---------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def dedup_records(records: Iterable[dict], report: LoadReport | None = None) -> list[dict]:
    """Keep the first record of each query (whitespace-normalised); count the rest.

    A query repeated with the same positives is a ``duplicate_record``; a query repeated with
    other positives is a ``duplicate_query`` (kept once, so no query can sit in two splits).
    """
    report = report if report is not None else LoadReport()
    first_pos: dict[str, frozenset] = {}
    kept = []
    for r in records:
        report.read += 1
        key = _normalise(r["query"])
        positives = frozenset(p["text"] for p in r["positive_passages"])
        if key in first_pos:
            same = first_pos[key] == positives
            report.drop("duplicate_record" if same else "duplicate_query")
            continue
        first_pos[key] = positives
        report.kept += 1
        kept.append(r)
    return kept


def make_splits(n: int, val_size: int, test_size: int, subset_sizes: dict[str, int],
                seed: int = SEED) -> dict:
    """Indices of test, validation and the ordered training pool for ``n`` records.

    One permutation of ``range(n)`` from ``seed``: its first ``test_size`` entries are the test
    set, the next ``val_size`` the validation set, the rest the training pool, whose prefixes are
    the nested subsets. A subset larger than the pool is capped and reported.

    >>> s = make_splits(10, 2, 3, {"a": 2, "b": 4}, seed=0)
    >>> len(s["test"]), len(s["validation"]), len(s["train"]), s["subset_sizes"]
    (3, 2, 5, {'a': 2, 'b': 4})
    """
    if val_size + test_size >= n:
        raise ValueError(f"{n} records cannot hold a test set of {test_size} and a validation "
                         f"set of {val_size} and still leave training data")
    order = np.random.default_rng(seed).permutation(n)
    test = order[:test_size]
    val = order[test_size:test_size + val_size]
    train = order[test_size + val_size:]
    sizes, capped = {}, {}
    for name, size in sorted(subset_sizes.items(), key=lambda kv: kv[1]):
        sizes[name] = min(size, len(train))
        if size > len(train):
            capped[name] = {"asked": size, "available": int(len(train))}
    return {"test": test.tolist(), "validation": val.tolist(), "train": train.tolist(),
            "subset_sizes": sizes, "capped_subsets": capped}


@dataclass
class Splits:
    """The prepared data: Arrow datasets for each split plus the manifest of counts."""

    train: object  # datasets.Dataset, ordered so that subsets are prefixes
    validation: object
    test: object
    manifest: dict

    def subset(self, name: str):
        """The training subset ``name`` (e.g. ``"10k"``), a prefix of the training pool."""
        sizes = self.manifest["subset_sizes"]
        if name not in sizes:
            raise KeyError(f"unknown subset {name!r}; prepared subsets: {', '.join(sizes)}")
        return self.train.select(range(sizes[name]))


def _counts_by_source(records: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["source"] for r in records).items()))


def prepare_splits(records: list[dict], cfg: DataConfig, load_reports: dict[str, LoadReport],
                   out_dir: str | os.PathLike | None = None, extra: dict | None = None
                   ) -> Splits:
    """Deduplicate, split, order the training pool, save it (Arrow) and write the manifest.

    ``load_reports`` holds the loader's report per source; the manifest keeps them with the
    deduplication report, the split sizes per source and the subset sizes.
    """
    from datasets import Dataset

    dedup_report = LoadReport()
    unique = dedup_records(records, dedup_report)
    dedup_report.check()
    for report in load_reports.values():
        report.check()
    idx = make_splits(len(unique), cfg.val_size, cfg.test_size, cfg.subset_sizes, cfg.seed)
    parts = {name: [unique[i] for i in idx[name]] for name in ("train", "validation", "test")}
    datasets_ = {name: Dataset.from_list(rows) for name, rows in parts.items()}
    manifest = {
        "kind": cfg.kind,
        "seed": cfg.seed,
        "load": {name: r.to_dict() for name, r in sorted(load_reports.items())},
        "dedup": dedup_report.to_dict(),
        "records_after_dedup": len(unique),
        "splits": {name: len(rows) for name, rows in parts.items()},
        "by_source": {name: _counts_by_source(rows) for name, rows in parts.items()},
        "subset_sizes": idx["subset_sizes"],
        "capped_subsets": idx["capped_subsets"],
        "fingerprint": _fingerprint(unique),
    }
    manifest.update(extra or {})
    splits = Splits(manifest=manifest, **datasets_)
    if out_dir is not None:
        import datasets as hf_datasets

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bars_were_on = not hf_datasets.are_progress_bars_disabled()
        hf_datasets.disable_progress_bars()
        try:
            for name, ds in datasets_.items():
                ds.save_to_disk(str(out / name))
        finally:
            if bars_were_on:
                hf_datasets.enable_progress_bars()
        (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2),
                                           encoding="utf-8")
    return splits


def load_splits(out_dir: str | os.PathLike) -> Splits:
    """Load splits saved by :func:`prepare_splits`."""
    from datasets import load_from_disk

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no prepared data at {out} (missing manifest.json); run "
                                f"notebooks/01_data_preprocessing.ipynb first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    parts = {name: load_from_disk(str(out / name)) for name in ("train", "validation", "test")}
    return Splits(manifest=manifest, **parts)


def _fingerprint(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r["query"].encode("utf-8"))
        h.update(b"\x00")
        for p in r["positive_passages"]:
            h.update(p["text"].encode("utf-8"))
            h.update(b"\x01")
    return h.hexdigest()[:16]


def check_splits(splits: Splits) -> dict:
    """Verify what every experiment relies on; raise ``AssertionError`` if any fails.

    Checks that no query sits in two splits, that the subsets are nested prefixes of the training
    pool with the sizes of the manifest, and that the split sizes match the manifest.
    Returns the numbers it checked.
    """
    queries = {name: {_normalise(q) for q in getattr(splits, name)["query"]}
               for name in ("train", "validation", "test")}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        overlap = queries[a] & queries[b]
        assert not overlap, f"{len(overlap)} queries are in both {a} and {b}"
    for name in ("train", "validation", "test"):
        n = len(getattr(splits, name))
        assert n == splits.manifest["splits"][name], f"{name}: {n} rows, manifest says otherwise"
    sizes = splits.manifest["subset_sizes"]
    ordered = sorted(sizes.items(), key=lambda kv: kv[1])
    previous: list[str] = []
    for name, size in ordered:
        current = splits.subset(name)["query"]
        assert len(current) == size, f"subset {name}: {len(current)} rows, expected {size}"
        assert current[: len(previous)] == previous, f"subset {name} does not contain the smaller"
        previous = current
    return {"split_sizes": dict(splits.manifest["splits"]), "subset_sizes": dict(sizes),
            "disjoint": True, "nested": True}


def corpus_of(split) -> list[str]:
    """All passage texts of a split (positives and negatives), deduplicated, in first-seen order.

    This is the retrieval corpus of evaluation: a model must find each query's positive among
    every passage of the split.
    """
    seen: dict[str, None] = {}
    for row in split:
        for p in row["positive_passages"]:
            seen.setdefault(p["text"], None)
        for p in row["negative_passages"]:
            seen.setdefault(p["text"], None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# One call for the notebooks
# ---------------------------------------------------------------------------------------------


def data_config_hash(cfg: DataConfig) -> str:
    """Short hash of everything that changes the prepared data (not where it is cached)."""
    from dataclasses import asdict

    key = {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "download_dir")}
    key["prepare_version"] = PREPARE_VERSION
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def prepare_data(cfg: DataConfig, out_dir: str | os.PathLike | None = None,
                 rebuild: bool = False) -> Splits:
    """Load, validate, deduplicate and split the data of ``cfg``; cached by configuration.

    The prepared splits live in ``out_dir`` (default ``<cache>/prepared-<kind>-<hash>``); when
    they exist already they are loaded instead of rebuilt, so every notebook shares the same
    test set. ``rebuild=True`` prepares them again.
    """
    out = Path(out_dir) if out_dir else (
        cache_path(cfg) / f"prepared-{cfg.kind}-{data_config_hash(cfg)}")
    if (out / "manifest.json").exists() and not rebuild:
        return load_splits(out)
    if cfg.kind == "demo":
        from .demo_corpus import load_demo_records

        records, report, stats = load_demo_records(cfg)
        reports, extra = {"people_daily_1998": report}, {"demo_parse": stats}
    elif cfg.kind == "bge_m3_zh":
        reports, extra = {}, {"data_dir": str(cfg.data_dir or cfg.hub_repo)}
        records = list(load_bge_m3_zh(cfg, reports))
    else:
        raise ValueError(f"unknown data kind {cfg.kind!r}; expected 'bge_m3_zh' or 'demo'")
    extra["config_hash"] = data_config_hash(cfg)
    return prepare_splits(records, cfg, reports, out, extra)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def collect_lengths(split, tokenizer=None) -> dict[str, dict[str, list[int]]]:
    """Lengths of queries and positive passages per source, in characters or in tokens.

    With ``tokenizer`` (a ``transformers`` tokenizer) lengths are token counts without special
    tokens; otherwise character counts.
    """
    from .tokenizer import count_tokens

    texts: dict[str, dict[str, list[str]]] = {}
    for row in split:
        by_kind = texts.setdefault(row["source"], {"query": [], "passage": []})
        by_kind["query"].append(row["query"])
        by_kind["passage"].extend(p["text"] for p in row["positive_passages"])
    out = {}
    for source, by_kind in sorted(texts.items()):
        out[source] = {
            kind: (count_tokens(tokenizer, values) if tokenizer is not None
                   else [len(v) for v in values])
            for kind, values in by_kind.items()
        }
    return out


def manifest_table(manifest: dict):
    """Per-source table of the manifest: read, kept, dropped, repaired, flagged and empty
    files, then split sizes."""
    import pandas as pd

    rows = []
    for source, rep in manifest["load"].items():
        row = {"source": source, "read": rep["read"], "kept": rep["kept"],
               "dropped": sum(rep["dropped"].values()),
               "dropped_by_reason": ", ".join(f"{k}={v}" for k, v in rep["dropped"].items()),
               "repaired": ", ".join(f"{k}={v}" for k, v in rep["repaired"].items()),
               "flagged": ", ".join(f"{k}={v}" for k, v in rep.get("flagged", {}).items()),
               "empty_files": len(rep.get("empty_files", []))}
        for split, counts in manifest["by_source"].items():
            row[split] = counts.get(source, 0)
        rows.append(row)
    return pd.DataFrame(rows).set_index("source")


def summarize_lengths(lengths: dict[str, dict[str, list[int]]]):
    """A table (pandas) of count, mean, median, p90 and max length per source and kind."""
    import pandas as pd

    rows = []
    for source, by_kind in lengths.items():
        for kind, values in by_kind.items():
            v = np.asarray(values)
            rows.append({"source": source, "kind": kind, "count": len(v),
                         "mean": float(v.mean()) if len(v) else float("nan"),
                         "median": float(np.median(v)) if len(v) else float("nan"),
                         "p90": float(np.percentile(v, 90)) if len(v) else float("nan"),
                         "max": int(v.max()) if len(v) else 0})
    return pd.DataFrame(rows).set_index(["source", "kind"])
