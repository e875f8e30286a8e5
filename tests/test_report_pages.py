"""What a reader sees without running anything: the committed figures (``figures/demo/``), the
rendered chapters (``reports/notebooks/demo/``) and the results page are there, current, and
drawn from the committed results; and the pieces that keep them so (the figures' provenance,
the staleness check, the chapter renderer, the report page) do what they say."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

from retrieval_lib import course, results
from retrieval_lib.course import notebooks
from retrieval_lib.settings import config, provenance

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures" / "demo"
CHAPTERS = ROOT / "reports" / "notebooks" / "demo"
RESULTS = ROOT / "reports" / "results_demo.json"
#: Figures and rendered chapters together stay under this (the issue's bound, ~15 MB).
SIZE_LIMIT = 15 * 2**20


def _tracked() -> set[str] | None:
    """The files git tracks (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def _image_links(text: str) -> list[str]:
    """Relative targets of markdown images and HTML ``<img src>`` in ``text``."""
    found = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text) + re.findall(r'<img [^>]*src="([^"]+)"',
                                                                     text)
    return [t for t in found if not re.match(r"[a-z]+://", t)]


# --- the committed set ----------------------------------------------------------------------


def test_committed_figures_match_the_committed_results():
    figures = sorted(FIGURES.glob("*.png"))
    assert len(figures) >= 20, "figures/demo/ is incomplete: run `make demo` and commit it"
    assert provenance.stale_figures(FIGURES, RESULTS) == {}
    saved = json.loads(RESULTS.read_text(encoding="utf-8"))
    for path in figures:
        text = provenance.png_text(path)
        assert text["Preset"] == "demo" and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?",
                                                         text["Commit"]), path.name
    # the results figures name the runs of the table: each in the results with that digest
    drawn = json.loads(provenance.png_text(
        FIGURES / "05_results_and_plots_metric_bars.png")["Sources"])
    assert {k for k in saved["sources"] if k.startswith("runs/")} <= set(drawn)


def test_the_results_page_is_its_saved_table_and_shows_committed_figures():
    page = (ROOT / "reports" / "results_demo.md").read_text(encoding="utf-8")
    saved = json.loads(RESULTS.read_text(encoding="utf-8"))
    assert saved["table_markdown"] in page
    rows = [line for line in saved["table_markdown"].splitlines()[2:]]
    done = [r for r in rows if "not run" not in r]
    assert len(done) == len([k for k in saved["sources"] if k.startswith("runs/")])
    links = _image_links(page)
    assert len(links) >= 6
    assert all((ROOT / "reports" / link).resolve().parent == FIGURES for link in links)


def test_every_image_link_of_the_readme_and_the_reports_resolves_to_a_committed_file():
    tracked = _tracked()
    pages = [ROOT / "README.md", *sorted((ROOT / "reports").glob("*.md")),
             *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for link in _image_links(page.read_text(encoding="utf-8")):
            target = (page.parent / link).resolve()
            assert target.is_file(), f"{page.name}: {link} does not exist"
            if tracked is not None:
                assert str(target.relative_to(ROOT)) in tracked, f"{page.name}: {link} untracked"
            checked += 1
    readme_figures = _image_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert 2 <= len(readme_figures) <= 4 and checked >= len(readme_figures) + 6


def test_every_notebook_has_a_current_rendered_chapter_with_its_outputs():
    sources = notebooks.notebook_paths()
    assert [p.name for p in notebooks.notebook_paths(CHAPTERS)] == [p.name for p in sources]
    for source in sources:
        nb = nbformat.read(source, as_version=4)
        chapter = nbformat.read(CHAPTERS / source.name, as_version=4)
        # the chapter is this source as executed: same cells, plus papermill's parameters cell
        ran = [c for c in chapter.cells
               if "injected-parameters" not in c.metadata.get("tags", [])]
        assert [c.source for c in ran] == [c.source for c in nb.cells], (
            f"{source.name} changed since its chapter was rendered: run `make demo`")
        assert chapter.metadata["parameters"]["preset"] == "demo"
        assert "papermill" not in chapter.metadata and "widgets" not in chapter.metadata
        outputs = [o for c in chapter.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not any(o.get("output_type") == "error" for o in outputs)
        for cell in chapter.cells:
            assert not {"execution", "papermill"} & set(cell.metadata), source.name
        text = json.dumps([o for o in outputs if "image/png" not in o.get("data", {})],
                          ensure_ascii=False)
        assert str(ROOT) not in text or str(ROOT) == "/"
        saved = sorted(FIGURES.glob(f"{source.stem}_*.png"))
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) >= len(saved), f"{source.name} shows fewer figures than it saved"


def test_figures_and_chapters_stay_small():
    size = sum(p.stat().st_size for p in [*FIGURES.glob("*.png"), *CHAPTERS.glob("*.ipynb")])
    assert 0 < size < SIZE_LIMIT, f"{size / 2**20:.1f} MB"


# --- the pieces -----------------------------------------------------------------------------


def _figure(value: float):
    course.setup_cjk_font()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(["a", "b"], [value, 1 - value])
    ax.set_title("测试图")
    return fig


def _results_json(path: Path, sources: dict, preset: str = "demo") -> Path:
    path.write_text(json.dumps({"preset": preset, "sources": sources}), encoding="utf-8")
    return path


@pytest.fixture
def ledger():
    provenance.clear_sources()
    yield
    provenance.clear_sources()


def test_a_figure_names_the_runs_it_was_drawn_from_and_a_stale_one_is_found(
        tmp_path, ledger, monkeypatch):
    runs = tmp_path / "runs" / "demo"
    for name, body in (("a", b'{"test": 1}'), ("b", b'{"test": 2}')):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_bytes(body)
        provenance.record_run(runs / name)
    provenance.record_data("demo", "31895c6c9dbe79f9")
    config.resolve_preset("demo")
    figures = tmp_path / "figures"
    path = course.save_figure(_figure(0.3), "05_x", "bars", folder=figures)
    text = provenance.png_text(path)
    digests = {"runs/demo/a": hashlib.sha256(b'{"test": 1}').hexdigest(),
               "runs/demo/b": hashlib.sha256(b'{"test": 2}').hexdigest(),
               "data/demo": "31895c6c9dbe79f9"}
    assert json.loads(text["Sources"]) == digests
    assert text["Title"] == "测试图" and text["Preset"] == "demo"

    current = _results_json(tmp_path / "results.json", digests)
    assert provenance.stale_figures(figures, current) == {}
    # run b trained again: its metrics.json differs from what the figure was drawn from
    retrained = _results_json(tmp_path / "r2.json", {**digests, "runs/demo/b": "0" * 64})
    assert list(provenance.stale_figures(figures, retrained)) == ["05_x_bars.png"]
    assert "runs/demo/b" in provenance.stale_figures(figures, retrained)["05_x_bars.png"]
    # the table no longer has run a
    dropped = _results_json(tmp_path / "r3.json", {k: v for k, v in digests.items()
                                                   if k != "runs/demo/a"})
    assert "do not have it" in provenance.stale_figures(figures, dropped)["05_x_bars.png"]
    # the full preset's results do not vouch for a demo figure
    other = _results_json(tmp_path / "r4.json", digests, preset="full")
    assert "preset" in provenance.stale_figures(figures, other)["05_x_bars.png"]
    # a figure without provenance (drawn before, or by hand) is stale too
    plt.figure().savefig(figures / "05_x_plain.png")
    assert "Preset, Commit, Sources" in provenance.stale_figures(figures, current)[
        "05_x_plain.png"]


def test_a_planted_stale_committed_figure_is_named(tmp_path):
    """The check on the committed set fails once one figure's data is not the results'."""
    folder = tmp_path / "figures"
    folder.mkdir()
    source = FIGURES / "05_results_and_plots_metric_bars.png"
    with Image.open(source) as image:
        image.load()
        fields = dict(image.text)
        drawn = json.loads(fields["Sources"])
        key = next(k for k in drawn if k.startswith("runs/"))
        drawn[key] = "f" * 64  # drawn from an older training of that run
        info = PngImagePlugin.PngInfo()
        for k, v in {**fields, "Sources": json.dumps(drawn)}.items():
            info.add_itxt(k, v)
        image.save(folder / source.name, pnginfo=info)
    stale = provenance.stale_figures(folder, RESULTS)
    assert list(stale) == [source.name] and key in stale[source.name]


def test_drawing_the_same_figure_again_keeps_the_file(tmp_path, ledger, monkeypatch):
    config.resolve_preset("demo")
    path = course.save_figure(_figure(0.3), "05_x", "bars", folder=tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(course.plotting, "git_commit", lambda: "1" * 40)
    course.save_figure(_figure(0.3), "05_x", "bars", folder=tmp_path)
    assert path.read_bytes() == before  # only the commit would differ: kept
    course.save_figure(_figure(0.4), "05_x", "bars", folder=tmp_path)
    assert provenance.png_text(path)["Commit"] == "1" * 40  # other pixels: drawn again
    provenance.record_data("demo", "abc")
    course.save_figure(_figure(0.4), "05_x", "bars", folder=tmp_path)
    assert json.loads(provenance.png_text(path)["Sources"]) == {"data/demo": "abc"}


def test_figures_go_to_the_folder_of_the_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    config.resolve_preset("full")
    try:
        path = course.save_figure(_figure(0.5), "05_x", "bars")
    finally:
        config.resolve_preset("demo")
    assert path == tmp_path / "figures" / "full" / "05_x_bars.png"
    assert provenance.png_text(path)["Preset"] == "full"
    # the library looking up another preset's settings (the expansion notebooks' table of the
    # full sizes) does not move the figures of a demo notebook
    config.get_experiment("minimind38_96k", "full")
    config.get_data_config("full")
    assert course.save_figure(_figure(0.5), "05_x", "bars").parent == tmp_path / "figures" / "demo"


def test_a_rendered_chapter_keeps_the_outputs_and_drops_what_changes_every_run(
        tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path / "home"))
    home = str(config.project_root())
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"preset": "demo"}, "duration": 3.2,
                                "input_path": "/somewhere/01_x.ipynb"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    cell = nbformat.v4.new_code_cell("train()")
    cell.metadata = {"execution": {"iopub.status.busy": "2026-12-07T05:00:06Z"},
                     "papermill": {"duration": 1.0}, "tags": ["x"]}
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "m"},
            "text/plain": "HBox(children=(...))"}),
        nbformat.v4.new_output("stream", name="stdout",
                               text=f"运行目录： {home}/runs/demo/a\nroot {home}\n"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=",
                                                     "text/plain": "<Figure>"})]
    injected = nbformat.v4.new_code_cell('preset = "demo"')
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = [injected, cell]
    executed = tmp_path / "01_x.ipynb"
    nbformat.write(nb, executed)
    chapter = nbformat.read(notebooks.render_chapter(executed, tmp_path / "out"), 4)
    assert chapter.metadata["parameters"] == {"preset": "demo"}
    assert "papermill" not in chapter.metadata and "widgets" not in chapter.metadata
    assert chapter.cells[0].id == "injected-parameters"  # the same in every run's chapter
    assert chapter.cells[1].metadata == {"tags": ["x"]}
    outputs = chapter.cells[1].outputs
    assert [o["output_type"] for o in outputs] == ["stream", "display_data"]
    assert outputs[0]["text"] == "运行目录： runs/demo/a\nroot .\n"
    assert outputs[1]["data"]["image/png"] == "iVBORw0KGgo="


def test_the_report_page_embeds_the_drawn_key_figures_and_saves_its_sources(tmp_path, ledger):
    runs = tmp_path / "runs" / "demo"
    for name, body in (("minimind27_10k", b"1"), ("bm25", b"22")):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_bytes(body)
    collected = {
        "minimind27_10k": {"status": "done", "out_dir": runs / "minimind27_10k",
                           "config": {"data": {"kind": "demo"},
                                      "data_manifest": {"fingerprint": "f1"}}},
        "bm25": {"status": "done", "out_dir": runs / "bm25", "config": {}},
        "bge_m3": {"status": "not run"}}
    figures = tmp_path / "figures" / "demo"
    figures.mkdir(parents=True)
    config.resolve_preset("demo")
    course.save_figure(_figure(0.2), "05_results_and_plots", "metric_bars", folder=figures)
    course.save_figure(_figure(0.2), "05_results_and_plots", "data_scaling_m-108m",
                       folder=figures)
    course.save_figure(_figure(0.2), "05_results_and_plots", "not_a_key_figure", folder=figures)
    row = {"status": "done", "train_records": 600, "parameters": 1e6}
    for metric in results.tables.HEADLINE_METRICS:
        row.update({metric: 0.3, f"{metric}_std": 0.1})
    table = pd.DataFrame([row], index=["minimind27_10k"])
    table.attrs["reference"] = "bm25"
    path = results.write_markdown_report(table, "demo", root=tmp_path, runs=collected)
    page = path.read_text(encoding="utf-8")
    assert _image_links(page) == ["../figures/demo/05_results_and_plots_metric_bars.png",
                                  "../figures/demo/05_results_and_plots_data_scaling_m-108m.png"]
    assert "![测试图](" in page
    saved = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["sources"] == {"data/demo": "f1",
                                "runs/demo/bm25": hashlib.sha256(b"22").hexdigest(),
                                "runs/demo/minimind27_10k": hashlib.sha256(b"1").hexdigest()}
    assert saved["table_markdown"] in page


def test_the_commit_is_dirty_for_a_changed_source_not_for_the_notebooks_outputs(tmp_path,
                                                                                 monkeypatch):
    repo = tmp_path / "checkout"
    (repo / "figures").mkdir(parents=True)
    (repo / "code.py").write_text("a = 1\n")
    (repo / "figures" / "f.png").write_bytes(b"1")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=repo, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    head = git("rev-parse", "HEAD").strip()
    monkeypatch.setattr(results.runs, "CHECKOUT", repo)
    (repo / "figures" / "f.png").write_bytes(b"2")  # make demo redrew a figure
    assert results.git_commit() == head
    (repo / "code.py").write_text("a = 2\n")
    assert results.git_commit() == head + "+dirty"
