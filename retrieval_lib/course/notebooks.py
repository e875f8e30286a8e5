"""Run the course notebooks headless with papermill, in their narrative order.

``python -m retrieval_lib notebooks --preset demo`` executes every notebook of
``notebooks/`` into ``outputs/notebooks/<preset>/`` (executed copies never go back into
``notebooks/``, which stays free of outputs and parameterised) and writes each as a chapter to
read into ``reports/notebooks/<preset>/`` (:func:`render_chapter`; the demo's are committed,
with the figures of ``figures/demo/`` and the results page, which the notebooks write in the
same run). ``make demo`` calls it: what the notebooks print
(devices, epochs, reused runs) streams to the terminal as they run, with the training progress
bars and their ETA where the terminal shows them; each notebook's line gives the wall time of
its last run here as an estimate; at the end come the wall time per notebook, where the figures
and the results table are, and the table itself. The notebook tests call :func:`run_notebook`
and then read the summary each notebook writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..settings.config import CHECKOUT, project_root

__all__ = ["notebook_paths", "run_notebook", "main", "chapters_dir", "render_chapter"]


#: The narrative order of the experiments inside the ``03_*`` group (model size, then data).
COURSE_ORDER = ("03_stage1_pretraining", "03_train_minimind27", "03_train_minimind38",
                "03_train_minimind108", "03_train_minimind186", "03_train_qwen2_613",
                "03_beyond_the_report")


def notebook_paths(folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks in course order: by number, and the ``03_*`` experiments in
    :data:`COURSE_ORDER` (the stage chapter, then 27M -> 38M -> 108M -> 186M -> 613M, then the
    options beyond the report) rather than alphabetically."""
    # the checkout's notebooks, also when RETRIEVAL_HOME puts caches and runs elsewhere
    if folder is None:
        folder = CHECKOUT / "notebooks"
    folder = Path(folder)

    def key(path: Path):
        rank = COURSE_ORDER.index(path.stem) if path.stem in COURSE_ORDER else len(COURSE_ORDER)
        return (path.stem[:2], rank, path.stem)

    return sorted(folder.glob("[0-9][0-9]_*.ipynb"), key=key)


def run_notebook(path: str | Path, out_dir: str | Path, parameters: dict | None = None,
                 kernel_name: str | None = None, stdout=None, stderr=None) -> Path:
    """Execute one notebook with papermill; returns the executed copy's path.

    Runs with the notebook's folder as working directory, so it behaves as when opened in
    Jupyter; what its cells print goes to the ``stdout`` / ``stderr`` streams as it comes, where
    given. Raises papermill's ``PapermillExecutionError`` naming the failing cell.
    """
    import papermill as pm

    path = Path(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / path.name
    pm.execute_notebook(str(path), str(target), parameters=parameters or {},
                        cwd=str(path.parent), kernel_name=kernel_name, progress_bar=False,
                        stdout_file=stdout, stderr_file=stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=["demo", "full", "auto"])
    parser.add_argument("--out", default=None, help="folder for executed copies")
    parser.add_argument("--quiet", action="store_true", help="do not stream the cells' output")
    parser.add_argument("notebooks", nargs="*", help="notebook paths (default: all, in order)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.notebooks] or notebook_paths()
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else project_root() / "outputs" / "notebooks" / args.preset
    record = out / WALL_TIMES
    last = json.loads(record.read_text(encoding="utf-8")) if record.exists() else {}
    started, walls = time.time(), {}
    # progress bars (carriage returns) only where a terminal draws them, not into a log file
    stderr = None if args.quiet or not sys.stderr.isatty() else sys.stderr
    for i, path in enumerate(paths, 1):
        start = time.perf_counter()
        estimate = (f"; {last[path.stem]:.0f} s last time here" if path.stem in last else "")
        print(f"[{i}/{len(paths)}] running {path.name} with preset={args.preset}{estimate} ...",
              flush=True)
        target = run_notebook(path, out, {"preset": args.preset},
                              stdout=None if args.quiet else sys.stdout, stderr=stderr)
        walls[path.stem] = time.perf_counter() - start
        chapter = render_chapter(target, chapters_dir(args.preset))
        print(f"  done in {walls[path.stem]:.1f} s -> {target} (to read: {chapter})", flush=True)
        record.write_text(json.dumps({**last, **walls}, indent=2), encoding="utf-8")
    print(f"\nwall time per notebook (preset {args.preset}):")
    for name, seconds in walls.items():
        print(f"  {name:28s} {seconds:7.1f} s")
    print(f"  {'total':28s} {sum(walls.values()):7.1f} s")
    print(where_results_are(args.preset, started))
    return 0


#: Wall time of each notebook's last run, in the folder of the executed copies.
WALL_TIMES = "wall_times.json"

#: Output types a reader of a rendered chapter cannot see: live progress bars (widget views
#: have no state once the kernel is gone).
_WIDGET = "application/vnd.jupyter.widget-view+json"


def chapters_dir(preset: str) -> Path:
    """``reports/notebooks/<preset>/``: the chapters as the notebooks ran, to read without running
    them (the demo's are committed)."""
    return project_root() / "reports" / "notebooks" / preset


def render_chapter(executed: str | Path, out_dir: str | Path) -> Path:
    """Write the executed notebook ``executed`` into ``out_dir`` as a chapter to read: its
    outputs kept (text, tables, figures), what changes from run to run without telling the
    reader anything removed, so that a re-run's diff shows what changed in the results.

    Removed: papermill's and the kernel's timings (notebook and cell metadata; the notebook
    keeps the parameters it ran with), the random id of papermill's parameters cell,
    progress-bar widgets and the widget state, and the project root's absolute path in text
    outputs (shown relative to the project root, as
    ``runs/demo/...``). Returns the chapter's path.
    """
    import nbformat

    executed = Path(executed)
    nb = nbformat.read(str(executed), as_version=4)
    ran = nb.metadata.get("papermill", {}).get("parameters", {})
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    nb.metadata["parameters"] = ran
    root = str(project_root())
    for cell in nb.cells:
        for key in ("execution", "papermill"):
            cell.metadata.pop(key, None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill draws a new random id every run
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if _WIDGET in output.get("data", {}):
                continue
            if "text" in output:
                output["text"] = _relative(output["text"], root)
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    output["data"][mime] = _relative(value, root)
            kept.append(output)
        cell.outputs = kept
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / executed.name
    nbformat.write(nb, str(target))
    return target


def _relative(text: str, root: str) -> str:
    return text.replace(root + "/", "").replace(root, ".")


def where_results_are(preset: str, since: float) -> str:
    """Where the figures and the results table are (what changed since ``since``, a
    ``time.time()``), followed by the table itself."""
    root = project_root()
    folder = root / "figures" / preset
    figures = sorted(p for p in folder.glob("*.png") if p.stat().st_mtime >= since)
    table = root / "reports" / f"results_{preset}.md"
    lines = [f"\nfigures: {len(figures)} written to {folder}"]
    if table.exists() and table.stat().st_mtime >= since:
        lines += [f"results table: {table}", "", table.read_text(encoding="utf-8")]
    else:
        lines.append(f"results table: not written by this run ({table} is made by "
                     f"05_results_and_plots)")
    return "\n".join(lines)

