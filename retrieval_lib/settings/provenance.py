"""Where a figure's numbers come from, so a committed figure can be checked against the committed
results it claims to show: by their data, not their pixels.

This process keeps a ledger of the saved results it has read or written: each finished run or
baseline under the key ``runs/<preset>/<name>`` with the SHA-256 of its ``metrics.json`` (the
file that marks it finished and holds every test number), and the prepared data under
``data/<kind>`` with its fingerprint. ``course.save_figure`` writes the preset, the commit and
the ledger as it stands into the PNG's text fields (``Preset``, ``Commit``, ``Sources``), so a
figure names the results it was drawn from. ``results.write_markdown_report`` writes, beside
``results_<preset>.md``, ``results_<preset>.json`` with the same keys for every run of the
table. :func:`stale_figures` compares the two: a figure whose results were trained again, or
whose run the table no longer has, is stale until the notebooks draw it again.

A notebook's ledger holds what that notebook read before the figure: a figure may name a run it
did not draw (notebook 05 reads every run first), never omit one it drew.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["run_source", "record_run", "record_data", "sources", "clear_sources",
           "set_active_preset", "active_preset", "png_text", "stale_figures", "FIGURE_FIELDS"]

_LEDGER: dict[str, str] = {}
_PRESET: list[str] = []

#: The PNG text fields a committed figure must carry.
FIGURE_FIELDS = ("Title", "Preset", "Commit", "Sources")


def run_source(folder: str | Path) -> tuple[str, str] | None:
    """``(key, digest)`` of the run saved in ``folder`` (``.../runs/<preset>/<name>``): the key
    ``runs/<preset>/<name>`` and the SHA-256 of its ``metrics.json`` (None without one)."""
    folder = Path(folder)
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        return None
    return f"runs/{folder.parent.name}/{folder.name}", hashlib.sha256(
        metrics.read_bytes()).hexdigest()


def record_run(folder: str | Path) -> str | None:
    """Enter the run saved in ``folder`` in the ledger (:func:`run_source`); returns its key."""
    source = run_source(folder)
    if source is None:
        return None
    _LEDGER[source[0]] = source[1]
    return source[0]


def record_data(kind: str, fingerprint: str) -> None:
    """Enter the prepared data of ``kind`` (``demo``, ``bge_m3_zh``) by its fingerprint."""
    _LEDGER[f"data/{kind}"] = fingerprint


def sources() -> dict[str, str]:
    """The ledger: ``{key: digest}`` of every saved result this process read or wrote."""
    return dict(sorted(_LEDGER.items()))


def clear_sources() -> None:
    _LEDGER.clear()


def set_active_preset(preset: str) -> None:
    """The preset this process works under (``config.resolve_preset`` sets it): the folder and
    the ``Preset`` field of the figures it saves."""
    _PRESET[:] = [preset]


def active_preset() -> str | None:
    return _PRESET[0] if _PRESET else None


def png_text(path: str | Path) -> dict[str, str]:
    """The text fields of a PNG file (``tEXt``, ``zTXt``, ``iTXt`` chunks)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}


def stale_figures(figures: str | Path, results: str | Path) -> dict[str, str]:
    """The figures under ``figures`` (``*.png``) that do not match ``results`` (a
    ``results_<preset>.json``), each with why: a missing field, another preset, or a source whose
    digest differs from the results' or that the results do not have. Empty when all match."""
    saved = json.loads(Path(results).read_text(encoding="utf-8"))
    known, preset = saved["sources"], saved["preset"]
    stale = {}
    for path in sorted(Path(figures).glob("*.png")):
        text = png_text(path)
        missing = [f for f in FIGURE_FIELDS if f not in text]
        if missing:
            stale[path.name] = f"no {', '.join(missing)} in its metadata"
            continue
        if text["Preset"] != preset:
            stale[path.name] = f"drawn under preset {text['Preset']!r}, the results are {preset!r}"
            continue
        try:
            drawn = json.loads(text["Sources"])
        except json.JSONDecodeError as exc:
            stale[path.name] = f"its Sources field is not JSON ({exc})"
            continue
        wrong = [f"{key} (drawn {digest[:12]}, results "
                 f"{known[key][:12] if key in known else 'do not have it'})"
                 for key, digest in drawn.items() if known.get(key) != digest]
        if wrong:
            stale[path.name] = "drawn from other results: " + "; ".join(wrong)
    return stale
