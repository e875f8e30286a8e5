"""`make demo`'s runner: the cells' output streams as they run, and the end says where the
figures and the results table are and shows the table."""

import json

import nbformat
import pytest

from retrieval_lib.course import notebooks

pytestmark = pytest.mark.notebook  # starts Jupyter kernels


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell('preset = "demo"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path


def test_make_demo_streams_the_cells_and_ends_with_the_figures_and_the_table(
        tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("RETRIEVAL_HOME", str(home))
    first = _notebook(tmp_path / "01_first.ipynb",
                      "from retrieval_lib.settings.config import project_root\n"
                      "figures = project_root() / 'figures' / 'demo'\n"
                      "figures.mkdir(parents=True, exist_ok=True)\n"
                      "(figures / 'a.png').write_bytes(b'png')\n"
                      "print(f'epoch 1: preset {preset}')")
    last = _notebook(tmp_path / "05_last.ipynb",
                     "from retrieval_lib.settings.config import project_root\n"
                     "table = project_root() / 'reports' / 'results_demo.md'\n"
                     "table.parent.mkdir(parents=True, exist_ok=True)\n"
                     "table.write_text('| system | ndcg@5 |\\n| BM25 | 0.770 |\\n')")
    (home / "figures" / "demo").mkdir(parents=True)
    (home / "figures" / "demo" / "old.png").write_bytes(b"made before this run")
    out = tmp_path / "executed"
    assert notebooks.main(["--out", str(out), str(first), str(last)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: preset demo" in printed  # the cell's print, streamed
    assert printed.index("epoch 1: preset demo") < printed.index("[2/2] running 05_last")
    assert f"figures: 1 written to {home / 'figures' / 'demo'}" in printed  # not the older one
    assert f"results table: {home / 'reports' / 'results_demo.md'}" in printed
    assert printed.rstrip().endswith("| system | ndcg@5 |\n| BM25 | 0.770 |")
    chapter = nbformat.read(home / "reports" / "notebooks" / "demo" / "01_first.ipynb", 4)
    assert chapter.metadata["parameters"] == {"preset": "demo"}  # rendered to read, no timings
    assert "papermill" not in chapter.metadata
    assert chapter.cells[-1].outputs[0]["text"] == "epoch 1: preset demo\n"
    walls = json.loads((out / notebooks.WALL_TIMES).read_text(encoding="utf-8"))
    assert set(walls) == {"01_first", "05_last"} and all(s > 0 for s in walls.values())

    assert notebooks.main(["--out", str(out), "--quiet", str(first)]) == 0
    printed = capsys.readouterr().out
    assert f"[1/1] running 01_first.ipynb with preset=demo; {walls['01_first']:.0f} s last " \
           f"time here ..." in printed
    assert "epoch 1" not in printed  # --quiet
    assert "results table: not written by this run" in printed
