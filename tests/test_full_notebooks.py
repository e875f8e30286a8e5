"""The full preset as the README tells a user to run it: the papermill command lines of its
full-preset section, in course order, on miniatures of the published checkpoints and data.

The folders are what a user downloads (MiniMind v1 checkpoints with their own code, BGE-M3, the
extracted bge-m3-data archive), written at tiny sizes by ``published_formats``; the commands
are read from the README itself, so the README and this test cannot drift apart.
01 is the only notebook given the data folder. The data holds 1,700 records: the fixed test
and validation sets of 800 each, and a training pool of 100 that every subset is capped to.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from published_formats import write_bge_m3, write_bge_m3_data, write_minimind_v1

from retrieval_lib.settings.config import CHECKOUT

PAGE = CHECKOUT / "README.md"

#: The stand-in for each placeholder of the page's commands.
FOLDERS = {"DATA": "bge-m3-data", "MINIMIND27": "minimind-v1-small",
           "MINIMIND108": "minimind-v1", "BGE_M3": "bge-m3"}


def page_commands() -> list[str]:
    """The papermill lines of the README's full-preset block."""
    text = PAGE.read_text(encoding="utf-8")
    block = text.split("<!-- full-preset-commands -->")[1].split("```")[1]
    return [line for line in block.splitlines() if line.startswith("papermill ")]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("full-home")
    write_bge_m3_data(home / FOLDERS["DATA"], per_source=340)
    write_minimind_v1(home / FOLDERS["MINIMIND27"])
    write_minimind_v1(home / FOLDERS["MINIMIND108"], n_layers=3, seed=5)
    write_bge_m3(home / FOLDERS["BGE_M3"])
    env = {**os.environ, "RETRIEVAL_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    (home / "executed").mkdir()
    executed = {}
    for line in page_commands():
        for placeholder, folder in FOLDERS.items():
            line = line.replace(placeholder, str(home / folder))
        args = shlex.split(line)
        args[2] = str(home / "executed" / Path(args[2]).name)
        done = subprocess.run([sys.executable, "-m", *args], cwd=CHECKOUT, env=env,
                              capture_output=True, text=True, timeout=600)
        executed[Path(args[1]).stem] = Path(args[2])
        assert done.returncode == 0, f"{line}\n{(done.stdout + done.stderr)[-4000:]}"
    return home, executed


def _summary(home, notebook):
    return json.loads((home / "outputs" / notebook / "full" / "summary.json").read_text())


def _outputs(executed: Path) -> str:
    """Everything the executed notebook printed or displayed as text."""
    cells = json.loads(executed.read_text())["cells"]
    texts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")))
            texts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def test_the_page_runs_01_to_05_with_data_dir_only_in_01():
    lines = page_commands()
    stems = [Path(shlex.split(line)[1]).stem for line in lines]
    assert stems == ["01_data_preprocessing", "03_train_minimind27", "03_train_minimind108",
                     "04_bge_m3_baseline", "05_results_and_plots"]
    assert all("-p preset full" in line for line in lines)
    assert ["data_dir" in line for line in lines] == [True, False, False, False, False]
    assert "-p subsets 10k" in lines[2]  # a list parameter as papermill's -p passes it


@pytest.mark.notebook
def test_the_full_preset_runs_from_01_to_05_as_the_page_says(full_run):
    home, _ = full_run
    prepared = _summary(home, "01_data_preprocessing")
    assert prepared["preset"] == "full"
    assert prepared["splits"] == {"train": 100, "validation": 800, "test": 800}
    # the later notebooks found 01's data without data_dir: one prepared folder
    assert len(list((home / "data_cache").glob("prepared-bge_m3_zh-*"))) == 1
    for experiment, folder in (("minimind27_10k", "minimind-v1-small"),
                               ("minimind108_10k", "minimind-v1")):
        saved = json.loads((home / "runs" / "full" / experiment / "config.json").read_text())
        assert saved["preset"] == "full" and saved["train_records"] == 100
        assert saved["base_model_info"]["conversion"]["format"] == "minimind-v1"
        assert saved["model"]["base_model"] == str(home / folder)
    assert _summary(home, "04_bge_m3_baseline")["bge_m3"]["status"] == "done"
    report = (home / "reports" / "results_full.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip() for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| system")]
    assert sorted(rows) == ["bge_m3", "bge_m3-sparse", "bm25", "hybrid", "minimind108_10k",
                            "minimind27_10k"]
    titles = {p.name: _png_title(p) for p in (home / "figures" / "full").glob("*.png")}
    assert len(titles) == 12 and all("full" in t for t in titles.values()), titles
    for notebook in ("01_data_preprocessing", "03_train_minimind27", "03_train_minimind108",
                     "04_bge_m3_baseline", "05_results_and_plots"):
        assert _summary(home, notebook)["env"]["preset"] == "full", notebook


@pytest.mark.notebook
def test_what_the_full_run_shows_is_what_ran(full_run):
    """Settings, plans and labels come from the checkpoint and the prepared data: the stand-in
    is 2 layers of width 64, not MiniMind-27M's 8 of 512, and the 10k subset holds 100
    records (100 // 32 = 3 steps an epoch, 5 epochs)."""
    _, executed = full_run
    text = _outputs(executed["03_train_minimind27"])
    assert "15 个优化器步（每轮 3）" in text and "1,560" not in text
    assert "hidden_size 512 -> 64" in text and "'minimind-v1-small (0.1M)'" in text
    assert "not the 10,000 it asks for" in text
    assert "与本次 full 运行无关" in text and "snownlp" not in text  # no demo ablation
    text = _outputs(executed["03_train_minimind108"])
    assert "只运行了一个子集（10k）" in text and "3,125" not in text


def _png_title(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Title", "")


@pytest.mark.notebook
def test_auto_on_a_machine_without_gpu_refuses_the_full_inputs_it_is_given(tmp_path):
    """``preset`` left at ``auto`` with a model folder: the demo would ignore it, so the
    notebook stops at its first cell and says which preset reads it."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto chooses the full preset where a GPU is visible")
    write_minimind_v1(tmp_path / "minimind-v1-small")
    done = subprocess.run(
        [sys.executable, "-m", "papermill", "notebooks/03_train_minimind27.ipynb",
         str(tmp_path / "27.ipynb"), "-p", "model_path", str(tmp_path / "minimind-v1-small")],
        cwd=CHECKOUT, env={**os.environ, "RETRIEVAL_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "preset 'auto' would run the offline demo here" in done.stderr + done.stdout
    assert "`-p preset full`" in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists()  # nothing was trained
