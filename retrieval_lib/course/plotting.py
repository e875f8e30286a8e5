"""Figures of the course. CJK fonts are resolved once, here; every figure is saved under
``figures/<notebook>_<name>.png`` with a fixed name and returned so the notebook shows it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..results.runs import git_commit
from ..settings.config import project_root
from ..settings.provenance import active_preset, sources

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_FONT", "bundled_cjk_font", "CJK_FONTS", "setup_cjk_font", "figures_dir",
           "figure_title", "file_slug", "save_figure", "plot_length_distributions",
           "plot_split_counts", "plot_temperature_softmax", "plot_negative_gradients",
           "plot_optimisation_history", "plot_loss_parts", "LOSS_PART_LABELS", "moving_average",
           "log_x_axis"]

#: Fonts with Chinese glyphs, in order of preference (Linux, Colab, macOS, Windows).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC",
             "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "PingFang SC", "Heiti SC",
             "Microsoft YaHei", "SimHei", "Arial Unicode MS")
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", str(Path.home() / ".fonts"))
_INSTALL_HINT = ("no CJK font found, Chinese labels would render as boxes. `pip install mplfonts` "
                 "(a requirement of this project: it ships Noto Sans CJK SC), or install a system "
                 "font (Debian/Ubuntu `apt-get install -y fonts-noto-cjk`); then restart the "
                 "kernel.")
#: The font file that the PyPI package ``mplfonts`` ships, used when the system has no CJK font.
BUNDLED_FONT = "NotoSansCJKsc-Regular.otf"


def bundled_cjk_font() -> Path | None:
    """Path of Noto Sans CJK SC as installed by the ``mplfonts`` package (None without it)."""
    try:
        from importlib.resources import files

        path = Path(str(files("mplfonts") / "fonts" / BUNDLED_FONT))
    except ModuleNotFoundError:
        return None
    return path if path.exists() else None

_chosen_font: str | None = None


def setup_cjk_font(strict: bool = False) -> str | None:
    """Make matplotlib draw Chinese: pick the first installed font of :data:`CJK_FONTS`.

    A system font is preferred; fonts installed after matplotlib built its cache are found by
    scanning the system font folders; without any, the Noto Sans CJK SC file of the ``mplfonts``
    requirement is registered, so the Python requirements alone give readable figures (Colab
    included). Sets ``axes.unicode_minus=False`` so minus signs render. Returns the font name,
    or ``None`` with a warning (an error when ``strict``) if none exists.
    """
    global _chosen_font
    import matplotlib
    from matplotlib import font_manager

    if _chosen_font is not None:
        return _chosen_font
    available = {f.name for f in font_manager.fontManager.ttflist}
    if not any(name in available for name in CJK_FONTS):
        for folder in _FONT_DIRS:
            for path in Path(folder).rglob("*") if Path(folder).is_dir() else []:
                lower = path.name.lower()
                if path.suffix.lower() in (".ttf", ".otf", ".ttc") and (
                        "cjk" in lower or "wqy" in lower or "wenquanyi" in lower):
                    try:
                        font_manager.fontManager.addfont(str(path))
                    except (OSError, RuntimeError):  # unreadable font file: skip it
                        continue
        available = {f.name for f in font_manager.fontManager.ttflist}
    if not any(name in available for name in CJK_FONTS) and bundled_cjk_font() is not None:
        font_manager.fontManager.addfont(str(bundled_cjk_font()))
        available = {f.name for f in font_manager.fontManager.ttflist}
    chosen = next((name for name in CJK_FONTS if name in available), None)
    matplotlib.rcParams["axes.unicode_minus"] = False
    if chosen is None:
        if strict:
            raise RuntimeError(_INSTALL_HINT)
        warnings.warn(_INSTALL_HINT, stacklevel=2)
        return None
    matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["font.sans-serif"] = [chosen] + [
        f for f in matplotlib.rcParams["font.sans-serif"] if f != chosen]
    _chosen_font = chosen
    return chosen


def log_x_axis(ax) -> None:
    """Logarithmic x axis labelled with plain numbers (no 10^k, no crowded minor labels)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def figures_dir(preset: str | None = None) -> Path:
    """``figures/<preset>/`` under the project root, for ``preset`` or the one this process
    resolved (``figures/`` when none is known). The demo's folder is committed: what a reader
    sees without running anything."""
    preset = preset or active_preset()
    path = project_root() / "figures" / (preset or "")
    path.mkdir(parents=True, exist_ok=True)
    return path


def figure_title(fig) -> str:
    """The figure's title (its suptitle, else the first axes title), as a reader sees it."""
    if fig._suptitle is not None and fig._suptitle.get_text():
        return fig._suptitle.get_text()
    return next((ax.get_title() for ax in fig.axes if ax.get_title()), "")


def file_slug(text: str) -> str:
    """``text`` as a file-name part: lower case, runs of other characters as one ``-``.

    >>> file_slug("MiniMind-108M (demo)")
    'minimind-108m-demo'
    """
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")


def save_figure(fig, notebook: str, name: str, folder: str | Path | None = None) -> Path:
    """Save ``fig`` as ``<folder>/<notebook>_<name>.png`` (folder defaults to
    ``figures/<preset>/``) and return the path.

    The PNG's text fields say what it shows: ``Title`` (the figure's title, so a file can be
    checked against its name), ``Preset``, ``Commit`` (of the library's checkout) and ``Sources``
    (the saved runs and data this process had read, with their digests: ``settings.provenance``,
    whose ``stale_figures`` checks a figure against the results it claims). A file that already
    holds the same drawing (pixels and fields other than ``Commit``) is left as it is, so
    drawing again at a later commit changes no committed figure whose data did not change.
    """
    preset = active_preset()
    out = Path(folder) if folder is not None else figures_dir(preset)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{notebook}_{name}.png"
    fields = {"Title": figure_title(fig), "Preset": preset or "", "Commit": git_commit() or "",
              "Sources": json.dumps(sources(), sort_keys=True)}
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", metadata=fields)
    if path.exists() and _same_drawing(path, buffer.getvalue()):
        os.utime(path)  # drawn by this run all the same
    else:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)
    return path


def _same_drawing(path: Path, png: bytes) -> bool:
    """Whether the PNG file ``path`` and the PNG bytes ``png`` hold the same pixels and the same
    text fields, the commit aside."""
    from PIL import Image

    try:
        with Image.open(path) as old, Image.open(io.BytesIO(png)) as new:
            old.load()
            new.load()
            fields = [{k: v for k, v in image.text.items() if k != "Commit"}
                      for image in (old, new)]
            return (fields[0] == fields[1] and old.size == new.size and old.mode == new.mode
                    and old.tobytes() == new.tobytes())
    except OSError:  # an unreadable file is drawn again
        return False


def plot_length_distributions(lengths: Mapping[str, Mapping[str, Sequence[int]]], unit: str,
                              title: str | None = None):
    """Histograms of query and passage lengths, one curve per source.

    ``lengths[source]["query"]`` and ``lengths[source]["passage"]`` hold lengths in ``unit``
    (e.g. "字符" or "token"). Passage lengths use a logarithmic axis: long-text data spans
    three orders of magnitude.
    """
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind, label in ((axes[0], "query", "查询"), (axes[1], "passage", "段落（正例）")):
        values_all = [np.asarray(v[kind]) for v in lengths.values() if len(v[kind])]
        if not values_all:
            continue
        lo = max(1, min(int(v.min()) for v in values_all))
        hi = max(int(v.max()) for v in values_all) + 1
        bins = np.geomspace(lo, hi, 40) if kind == "passage" else np.linspace(0, hi, 40)
        for source, v in lengths.items():
            if len(v[kind]):
                med = float(np.median(v[kind]))
                ax.hist(v[kind], bins=bins, histtype="step", linewidth=1.5,
                        label=f"{source}（中位数 {med:.0f}）")
        if kind == "passage":
            log_x_axis(ax)
        ax.set_xlabel(f"{label}长度（{unit}）")
        ax.set_ylabel("样本数")
        ax.set_title(f"{label}长度分布")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_split_counts(split_counts: Mapping[str, int], subset_sizes: Mapping[str, int],
                      title: str | None = None):
    """Bar charts: queries per split, and the nested training subsets."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = {"train": "训练池", "validation": "验证集", "test": "测试集"}
    for ax, data, xlabel, ttl in (
            (axes[0], {names.get(k, k): v for k, v in split_counts.items()}, "数据划分",
             "各划分的查询数"),
            (axes[1], {f"子集 {k}": v for k, v in subset_sizes.items()}, "嵌套训练子集",
             "训练子集大小（前缀嵌套）")):
        bars = ax.bar(list(data), list(data.values()), color="#4C72B0")
        ax.bar_label(bars, labels=[f"{v:,}" for v in data.values()])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("查询数")
        ax.set_title(ttl)
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_temperature_softmax(probabilities: Mapping[float, Sequence[float]],
                             similarities: Sequence[float], labels: Sequence[str],
                             title: str | None = None):
    """Bars of one query's candidate probabilities ``softmax(s/τ)``, one colour per τ."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    taus = list(probabilities)
    width = 0.8 / len(taus)
    x = np.arange(len(similarities))
    for i, tau in enumerate(taus):
        ax.bar(x + (i - (len(taus) - 1) / 2) * width, np.asarray(probabilities[tau]), width,
               label=f"τ = {tau:g}")
    ax.set_xticks(x, [f"{lab}\ns={v:.2f}" for lab, v in zip(labels, similarities, strict=True)],
                  fontsize=8)
    ax.set_ylabel("softmax 概率 P")
    ax.set_title(title or "温度 τ 越小，概率越集中到相似度最高的候选上")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_negative_gradients(similarities: Mapping[float, np.ndarray],
                            gradients: Mapping[float, np.ndarray], hard_mask: np.ndarray,
                            title: str | None = None):
    """Gradient each negative receives, ``∂L/∂s_ij``, against its similarity, per temperature.

    ``similarities[τ]`` and ``gradients[τ]`` are flat arrays over the negatives of a batch;
    ``hard_mask`` marks the hard negatives (the others are in-batch negatives).
    """
    import matplotlib.pyplot as plt

    setup_cjk_font()
    taus = list(similarities)
    fig, axes = plt.subplots(1, len(taus), figsize=(5 * len(taus), 3.8), squeeze=False)
    for ax, tau in zip(axes[0], taus, strict=True):
        s, g = similarities[tau], gradients[tau]
        ax.scatter(s[~hard_mask], g[~hard_mask], s=14, alpha=0.6, label="批内负例")
        ax.scatter(s[hard_mask], g[hard_mask], s=14, alpha=0.8, label="难负例")
        ax.set_yscale("log")
        ax.set_xlabel("负例与查询的相似度 $s_{ij}$")
        ax.set_ylabel(r"梯度 $\partial L/\partial s_{ij}$（对数轴）")
        ax.set_title(f"τ = {tau:g}")
        ax.legend()
    fig.suptitle(title or "每个负例得到的梯度：相似度越高、τ 越小，梯度越集中")
    fig.tight_layout()
    return fig


def plot_optimisation_history(history: Sequence[Mapping[str, float]], title: str | None = None):
    """Loss and mean positive / negative similarity over gradient-descent steps."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(steps, [h["loss"] for h in history], marker="o", markersize=3)
    ax1.set_xlabel("梯度下降步数")
    ax1.set_ylabel("InfoNCE 损失")
    ax1.set_title("损失下降")
    ax2.plot(steps, [h["mean_positive_similarity"] for h in history], marker="o", markersize=3,
             label="正例平均相似度 $s^+$")
    ax2.plot(steps, [h["mean_negative_similarity"] for h in history], marker="o", markersize=3,
             label="负例平均相似度 $s^-$")
    ax2.set_xlabel("梯度下降步数")
    ax2.set_ylabel("余弦相似度")
    ax2.set_title("$s^+$ 上升，$s^-$ 下降")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: The parts of the unified M3 loss (retrieval_lib.models.m3), as the training history names them.
LOSS_PART_LABELS = {"dense": "稠密 InfoNCE", "sparse": "稀疏 InfoNCE", "multi": "多向量 InfoNCE",
                    "inter": "混合得分 InfoNCE", "distil": "自蒸馏 L'"}


def plot_loss_parts(parts, window: int = 10, title: str | None = None):
    """Each part of the unified loss over training steps (moving average of ``window``);
    ``parts`` maps a part name (a column of a DataFrame) to its values per step."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in parts:
        values = moving_average(list(parts[name]), window)
        steps = np.arange(len(values)) + (len(parts[name]) - len(values)) + 1
        ax.plot(steps, values, label=LOSS_PART_LABELS.get(name, name))
    ax.set_xlabel("训练步数")
    ax.set_ylabel(f"损失（{window} 步滑动平均）")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window or window <= 1:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


