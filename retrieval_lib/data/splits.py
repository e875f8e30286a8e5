"""Deduplication, the fixed splits and the nested subsets.

Preparation (:func:`prepare_splits`) deduplicates queries, draws one fixed test set and one
fixed validation set shared by every experiment, and orders the remaining training pool so that
the nested subsets (10K ⊂ 96K ⊂ 288K in full) are its prefixes. Everything is reproducible from
the seed, saved with ``datasets`` (Arrow) plus a ``manifest.json`` of counts; the offline demo
corpus (People's Daily 1998) comes from :mod:`retrieval_lib.data.demo_corpus`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..settings.config import (
    DATA_DIR_RECORD,
    SEED,
    DataConfig,
    cache_path,
    remembered_data_dir,
)
from ..settings.provenance import record_data
from .demo_corpus import load_demo_records, people_daily_path
from .records import (
    DataError,
    DataUnavailableError,
    LoadReport,
    normalise_text,
    width_forms_differ,
)
from .sources import find_source_files, load_bge_m3_zh

__all__ = ["dedup_records", "make_splits", "Splits", "prepare_splits", "load_splits", "corpus_of",
           "check_splits", "prepare_data", "data_config_hash", "prepared_dir"]

#: Bumped whenever preparation changes what it produces, so cached splits are rebuilt.
PREPARE_VERSION = 2  # 2: NFKC in the comparison form; source files read twice


def dedup_records(records: Iterable[dict], report: LoadReport | None = None) -> list[dict]:
    """Keep the first record of each query (as :func:`normalise_text` compares texts); count
    the rest, and among them (``flagged["duplicate_by_width_form"]``) those that only NFKC
    made equal to the first (a full-width and a half-width form of one query).

    A query repeated with the same positives is a ``duplicate_record``; a query repeated with
    other positives is a ``duplicate_query`` (kept once, so no query can sit in two splits).
    """
    report = report if report is not None else LoadReport()
    first_pos: dict[str, frozenset] = {}
    first_query: dict[str, str] = {}
    kept = []
    for r in records:
        report.read += 1
        key = normalise_text(r["query"])
        positives = frozenset(normalise_text(p["text"]) for p in r["positive_passages"])
        if key in first_pos:
            same = first_pos[key] == positives
            report.drop("duplicate_record" if same else "duplicate_query")
            if width_forms_differ(r["query"], first_query[key]):
                report.flagged["duplicate_by_width_form"] += 1  # e.g. ＧＤＰ？ and GDP?
            continue
        first_pos[key], first_query[key] = positives, r["query"]
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
    again = ("prepare them again: prepare_data(cfg, rebuild=True), or delete the folder and "
             "run notebooks/01_data_preprocessing.ipynb")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest_path}: not valid JSON ({exc}); {again}") from None
    parts = {}
    for name in ("train", "validation", "test"):
        try:
            parts[name] = load_from_disk(str(out / name))
        except Exception as exc:  # a cut Arrow file: OSError, ArrowInvalid, a datasets error
            raise DataError(f"{out / name}: the prepared {name} split cannot be read "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it is "
                            f"cut or damaged; {again}") from exc
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
    queries = {name: {normalise_text(q) for q in getattr(splits, name)["query"]}
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
    if cfg.data_dir:  # the folder, however it was written (relative, with a trailing slash)
        key["data_dir"] = _absolute(cfg.data_dir)
    key["prepare_version"] = PREPARE_VERSION
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def prepared_dir(cfg: DataConfig) -> Path:
    """Where :func:`prepare_data` keeps the prepared splits of ``cfg`` by default."""
    return cache_path(cfg) / f"prepared-{cfg.kind}-{data_config_hash(cfg)}"


def prepare_data(cfg: DataConfig, out_dir: str | os.PathLike | None = None,
                 rebuild: bool = False) -> Splits:
    """Load, validate, deduplicate and split the data of ``cfg``; cached by configuration.

    The prepared splits live in ``out_dir`` (default ``<cache>/prepared-<kind>-<hash>``); when
    they exist already they are loaded instead of rebuilt, so every notebook shares the same
    test set, unless a source file changed since (size, modification time or the file itself,
    recorded in the manifest): then they are prepared again, and the changed files are named.
    A source file replaced while it is read is noticed and read again.
    ``rebuild=True`` prepares them again in any case.
    """
    out = Path(out_dir) if out_dir else prepared_dir(cfg)
    before = None
    if (out / "manifest.json").exists() and not rebuild:
        changed, before = _changed_sources(cfg, out / "manifest.json")
        if not changed:
            splits = load_splits(out)
            _remember_data_dir(cfg)
            record_data(cfg.kind, splits.manifest["fingerprint"])
            return splits
        print(f"the source files changed since {out} was prepared ({'; '.join(changed)}): "
              f"preparing the splits again")
    records, reports, extra = _read_sources(cfg)
    extra["config_hash"] = data_config_hash(cfg)
    splits = prepare_splits(records, cfg, reports, out, extra)
    _remember_data_dir(cfg)
    record_data(cfg.kind, splits.manifest["fingerprint"])
    if before is not None:
        print("the records are the same as before: the splits did not change"
              if splits.manifest["fingerprint"] == before else
              "the records differ from before: runs trained on the old splits are not "
              "comparable with new ones; train them again")
    return splits


#: How often the source files are read again when one changes while it is read.
READ_ATTEMPTS = 3


def _read_sources(cfg: DataConfig) -> tuple[list[dict], dict, dict]:
    """The records of ``cfg``'s source files, their load reports and the manifest's extra
    fields, with ``source_files`` the state the records were read from: a file replaced while
    it was read (a rename-over, as editors and downloads save) is noticed by comparing the
    state before and after, and the files are read again."""
    if cfg.kind not in ("demo", "bge_m3_zh"):
        raise ValueError(f"unknown data kind {cfg.kind!r}; expected 'bge_m3_zh' or 'demo'")
    for _ in range(READ_ATTEMPTS):
        before = source_files_state(cfg)
        if cfg.kind == "demo":
            records, report, stats = load_demo_records(cfg)
            reports, extra = {"people_daily_1998": report}, {"demo_parse": stats}
        else:
            reports, extra = {}, {"data_dir": str(cfg.data_dir or cfg.hub_repo)}
            records = list(load_bge_m3_zh(cfg, reports))
        after = source_files_state(cfg)
        now = after or {}
        changed = [] if before is None else sorted(  # None: downloaded by this very read
            name for name in set(before) | set(now) if before.get(name) != now.get(name))
        if not changed:
            extra["source_files"] = after
            return records, reports, extra
        print(f"{len(changed)} source file(s) changed while they were read "
              f"({', '.join(changed[:3])}): reading them again")
    raise DataError(f"the source files keep changing while they are read ({', '.join(changed)}"
                    f"); wait until whatever writes them has finished, then prepare again")


def _absolute(folder: str) -> str:
    return os.path.abspath(os.path.expanduser(folder))


def _remember_data_dir(cfg: DataConfig) -> None:
    """Record the local folder the full data came from (:data:`DATA_DIR_RECORD`), so a later
    notebook run without ``data_dir`` prepares, and finds, the same splits."""
    if cfg.kind != "bge_m3_zh" or not cfg.data_dir:
        return
    record = cache_path(cfg) / DATA_DIR_RECORD
    folder = _absolute(cfg.data_dir)
    if remembered_data_dir(cfg) != folder:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"data_dir": folder}, ensure_ascii=False), encoding="utf-8")


def source_files_state(cfg: DataConfig) -> dict[str, list[int]] | None:
    """``{file: [bytes, mtime_ns, inode]}`` of every file the data of ``cfg`` is read from, relative
    to its folder; ``None`` while the files are not on this machine (before a download)."""
    if cfg.kind == "demo":
        path = people_daily_path()
        root, paths = path.parent, [path]
    else:
        root = Path(cfg.data_dir) if cfg.data_dir else cache_path(cfg) / "extracted"
        try:
            paths = [p for found in find_source_files(root, cfg.sources).values() for p in found]
        except DataUnavailableError:
            return None
    states = {}
    for path in sorted(paths):
        stat = path.stat()  # the inode too: a file renamed over another of equal size and time
        states[path.relative_to(root).as_posix()] = [stat.st_size, stat.st_mtime_ns,
                                                     stat.st_ino]
    return states


def _changed_sources(cfg: DataConfig, manifest_path: Path) -> tuple[list[str], str | None]:
    """What differs between the source files now and when the splits were prepared (nothing
    when either side is unknown: prepared before this was recorded, or files not here), and
    the records' fingerprint then."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{manifest_path} is not valid JSON ({exc})"], None
    then, now = manifest.get("source_files"), source_files_state(cfg)
    if then is None or now is None:
        return [], manifest.get("fingerprint")
    changed = [f"{name}: {'new' if name not in then else 'size or time changed'}"
               for name, state in now.items() if then.get(name) != state]
    return changed + [f"{name}: gone" for name in then if name not in now], \
        manifest.get("fingerprint")


