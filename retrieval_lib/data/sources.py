"""The Chinese part of BGE-M3's fine-tuning data: found in a local folder, or downloaded
from the hub and extracted, and read into unified records with a count of what was dropped."""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ..settings.config import DataConfig, cache_path
from .records import (
    DataUnavailableError,
    LoadReport,
    from_flag_embedding,
    read_jsonl,
)

__all__ = ["extract_matching", "find_source_files", "load_bge_m3_zh", "download_bge_m3_zh",
           "download_location", "storage_plan"]



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
                if link in extracted:  # its folder may be one no earlier member created
                    out.parent.mkdir(parents=True, exist_ok=True)
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
