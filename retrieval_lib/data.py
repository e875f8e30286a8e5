"""Data: the sources of records, the fixed splits and nested subsets, and their statistics.

Records follow the unified schema of :mod:`retrieval_lib.records`. The Chinese part of BGE-M3's
fine-tuning data is found (or downloaded and extracted) here; the offline demo corpus (People's
Daily 1998) is rebuilt in :mod:`retrieval_lib.demo_corpus`.

Preparation (:func:`prepare_splits`) deduplicates queries, draws one fixed test set and one
fixed validation set shared by every experiment, and orders the remaining training pool so that
the nested subsets (10K ⊂ 96K ⊂ 288K in full) are its prefixes. Everything is reproducible from
the seed, saved with ``datasets`` (Arrow) plus a ``manifest.json`` of counts.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .config import SEED, DataConfig, cache_path
from .demo_corpus import load_demo_records, people_daily_path
from .records import (
    DataUnavailableError,
    LoadReport,
    from_flag_embedding,
    normalise_text,
    read_jsonl,
)
from .tokenizer import count_tokens

__all__ = [
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
    "length_percentiles",
    "summarize_lengths",
    "manifest_table",
]

#: Bumped whenever preparation changes what it produces, so cached splits are rebuilt.
PREPARE_VERSION = 1


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
    are written under ``cache_dir/extracted`` (at their path in the archive, so equal names in
    two folders stay apart). Raises :class:`DataUnavailableError` with instructions when the
    hub cannot be reached, and naming the archive and the member when it is cut or damaged.
    The extraction is marked complete, with every file's size, only when the archive ended as a
    tar archive ends and every source had a file; a marked extraction whose files changed is
    extracted again.
    """
    from huggingface_hub import hf_hub_download

    target = Path(cache_dir) / "extracted"
    marker = target / ".complete"
    if marker.exists():
        problem = _extraction_problem(target, marker)
        if problem is None:
            return target
        print(f"extracting again: {problem}")
    try:
        archive = hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset",
                                  cache_dir=str(download_dir) if download_dir else None)
    except Exception as exc:  # offline, no such repo, auth: all mean the data is unavailable
        raise DataUnavailableError(
            f"could not download {filename} from the hub dataset {repo} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            + _HOW_TO_SUPPLY.format(repo=repo, patterns=", ".join(sources.values()))) from exc
    marker.unlink(missing_ok=True)
    extracted, skipped = extract_matching(Path(archive), target, sources)
    marker.write_text(json.dumps({"archive": str(archive), "files": extracted,
                                  "skipped": skipped}, indent=2), encoding="utf-8")
    print(f"extracted {len(extracted)} Chinese files to {target}"
          + (f"; skipped {len(skipped)}: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
             if skipped else "")
          + f"; the archive stays at {archive} (delete it to free "
            f"{Path(archive).stat().st_size / 1e9:.1f} GB)")
    return target


def extract_matching(archive: Path, target: Path, sources: dict[str, str]
                     ) -> tuple[dict[str, int], dict[str, str]]:
    """Stream ``archive`` and write each member whose file name matches a pattern of
    ``sources`` under ``target``; returns ``({path: bytes} extracted, {path: reason} skipped)``.

    A member is written to a partial file and renamed once all its bytes arrived. Matching
    members with an unsafe path (absolute, ``..``) or that are not files are skipped and
    reported; a hard link to a file already extracted is extracted as a copy of it. Raises
    :class:`DataUnavailableError` when the archive is cut (inside a member, or at a member
    boundary, before tar's end-of-archive blocks) or damaged, or holds no file for a source.
    """
    patterns = {source: p.lower() for source, p in sources.items()}
    extracted: dict[str, int] = {}
    skipped: dict[str, str] = {}
    last, partial = "(none)", None
    with open(archive, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    # gzip's own reader checks the stream's end, CRC and length (tarfile's stream does not)
    raw = gzip.open(archive, "rb") if gzipped else open(archive, "rb")  # noqa: SIM115
    try:
        with raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                last = member.name
                path = PurePosixPath(member.name)
                if not any(fnmatch.fnmatch(path.name.lower(), p) for p in patterns.values()):
                    continue
                if path.is_absolute() or ".." in path.parts:
                    skipped[member.name] = "unsafe path"
                    continue
                out = target.joinpath(*path.parts)
                link = PurePosixPath(member.linkname).as_posix() if member.islnk() else None
                if link in extracted:
                    shutil.copyfile(target.joinpath(*PurePosixPath(link).parts), out)
                    extracted[path.as_posix()] = extracted[link]
                    continue
                if not member.isfile():
                    skipped[member.name] = (f"a link to {member.linkname}" if member.issym()
                                            or member.islnk() else "not a regular file")
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                partial = out.with_name(f".part-{out.name}")
                written, fh = 0, tar.extractfile(member)
                with open(partial, "wb") as dst:
                    while chunk := fh.read(1 << 20):
                        dst.write(chunk)
                        written += len(chunk)
                if written != member.size:
                    raise tarfile.ReadError(f"{written} of {member.size} bytes")
                os.replace(partial, out)
                partial = None
                extracted[path.as_posix()] = written
            # an end-of-archive block was read after the last member, not the end of the file
            ended = tar.fileobj.pos > tar.offset
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise DataUnavailableError(
            f"{archive} is cut or damaged ({type(exc).__name__}: {exc}; last member read: "
            f"{last}). Delete it and download it again.") from None
    if not ended:
        raise DataUnavailableError(
            f"{archive} ends after the member {last} without tar's end-of-archive blocks: the "
            f"archive is cut. Delete it and download it again.")
    empty = [s for s, p in patterns.items()
             if not any(fnmatch.fnmatch(PurePosixPath(f).name.lower(), p) for f in extracted)]
    if empty:
        raise DataUnavailableError(f"{archive} holds no file for: " + ", ".join(
            f"{s} ({sources[s]})" for s in empty))
    return extracted, skipped


def _extraction_problem(target: Path, marker: Path) -> str | None:
    """Why a marked extraction cannot be used as it is (None when every file is there with
    its size)."""
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return f"{marker} does not list the extracted files"
    for name, size in files.items():
        path = target.joinpath(*PurePosixPath(name).parts)
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or not {size} bytes"
    return None


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
        key = normalise_text(r["query"])
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
    key["prepare_version"] = PREPARE_VERSION
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def prepare_data(cfg: DataConfig, out_dir: str | os.PathLike | None = None,
                 rebuild: bool = False) -> Splits:
    """Load, validate, deduplicate and split the data of ``cfg``; cached by configuration.

    The prepared splits live in ``out_dir`` (default ``<cache>/prepared-<kind>-<hash>``); when
    they exist already they are loaded instead of rebuilt, so every notebook shares the same
    test set, unless a source file changed since (size or modification time, recorded in the
    manifest): then they are prepared again, and the changed files are named.
    ``rebuild=True`` prepares them again in any case.
    """
    out = Path(out_dir) if out_dir else (
        cache_path(cfg) / f"prepared-{cfg.kind}-{data_config_hash(cfg)}")
    before = None
    if (out / "manifest.json").exists() and not rebuild:
        changed, before = _changed_sources(cfg, out / "manifest.json")
        if not changed:
            return load_splits(out)
        print(f"the source files changed since {out} was prepared ({'; '.join(changed)}): "
              f"preparing the splits again")
    if cfg.kind == "demo":
        records, report, stats = load_demo_records(cfg)
        reports, extra = {"people_daily_1998": report}, {"demo_parse": stats}
    elif cfg.kind == "bge_m3_zh":
        reports, extra = {}, {"data_dir": str(cfg.data_dir or cfg.hub_repo)}
        records = list(load_bge_m3_zh(cfg, reports))
    else:
        raise ValueError(f"unknown data kind {cfg.kind!r}; expected 'bge_m3_zh' or 'demo'")
    extra["config_hash"] = data_config_hash(cfg)
    extra["source_files"] = source_files_state(cfg)
    splits = prepare_splits(records, cfg, reports, out, extra)
    if before is not None:
        print("the records are the same as before: the splits did not change"
              if splits.manifest["fingerprint"] == before else
              "the records differ from before: runs trained on the old splits are not "
              "comparable with new ones; train them again")
    return splits


def source_files_state(cfg: DataConfig) -> dict[str, list[int]] | None:
    """``{file: [bytes, mtime_ns]}`` of every file the data of ``cfg`` is read from, relative
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
    return {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(paths)}


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


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def collect_lengths(split, tokenizer=None) -> dict[str, dict[str, list[int]]]:
    """Lengths of queries and positive passages per source, in characters or in tokens.

    With ``tokenizer`` (a ``transformers`` tokenizer) lengths are token counts without special
    tokens; otherwise character counts.
    """
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


def length_percentiles(lengths: dict[str, dict[str, list[int]]], kind: str = "passage",
                       step: int = 5) -> dict[str, list[float]]:
    """Per source, the 0th, ``step``-th, ..., 100th percentiles of its ``kind`` lengths (what
    ``benchmarks/batching.py --summary`` draws record lengths from).

    >>> length_percentiles({"a": {"passage": [1, 2, 3, 4, 5]}}, step=25)
    {'a': [1.0, 2.0, 3.0, 4.0, 5.0]}
    """
    return {source: [round(float(x), 1) for x in np.percentile(by_kind[kind],
                                                                range(0, 101, step))]
            for source, by_kind in lengths.items() if by_kind[kind]}


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
