"""Figures of the course. CJK fonts are resolved once, here; every figure is saved under
``figures/<notebook>_<name>.png`` with a fixed name and returned so the notebook shows it.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .config import project_root

logger = logging.getLogger(__name__)

__all__ = ["bundled_cjk_font", "CJK_FONTS", "setup_cjk_font", "figures_dir", "figure_title",
           "file_slug", "save_figure",
           "plot_length_distributions",
           "plot_split_counts", "plot_temperature_softmax", "plot_negative_gradients",
           "plot_optimisation_history", "plot_training_curves", "plot_metric_bars",
           "plot_metrics_vs_data_size", "unfreeze_epochs", "plot_unfreeze_schedule",
           "plot_memory_plan", "plot_metric_panels", "plot_efficiency_frontier",
           "plot_per_query_distributions", "plot_loss_parts", "LOSS_PART_LABELS"]

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


def _log_x_axis(ax) -> None:
    """Logarithmic x axis labelled with plain numbers (no 10^k, no crowded minor labels)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def figures_dir() -> Path:
    path = project_root() / "figures"
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
    """Save ``fig`` as ``<folder>/<notebook>_<name>.png`` (folder defaults to ``figures/``),
    with the figure's title in the PNG's ``Title`` field, so a file can be checked against
    what its name says."""
    out = Path(folder) if folder is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{notebook}_{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Title": figure_title(fig)})
    return path


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
            _log_x_axis(ax)
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


#: The parts of the unified M3 loss (retrieval_lib.m3), as the training history names them.
LOSS_PART_LABELS = {"dense": "稠密 InfoNCE", "sparse": "稀疏 InfoNCE", "multi": "多向量 InfoNCE",
                    "inter": "混合得分 InfoNCE", "distil": "自蒸馏 L'"}


def plot_loss_parts(parts, window: int = 10, title: str | None = None):
    """Each part of the unified loss over training steps (moving average of ``window``);
    ``parts`` maps a part name (a column of a DataFrame) to its values per step."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in parts:
        values = _moving_average(list(parts[name]), window)
        steps = np.arange(len(values)) + (len(parts[name]) - len(values)) + 1
        ax.plot(steps, values, label=LOSS_PART_LABELS.get(name, name))
    ax.set_xlabel("训练步数")
    ax.set_ylabel(f"损失（{window} 步滑动平均）")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window or window <= 1:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def unfreeze_epochs(history: Mapping) -> list[int]:
    """Epochs in which more new layers train than in the epoch before (expansion runs).

    >>> unfreeze_epochs({"epochs": [{"epoch": 1, "trainable_new_layers": []},
    ...                             {"epoch": 2, "trainable_new_layers": [4]},
    ...                             {"epoch": 3, "trainable_new_layers": [4]}]})
    [2]
    """
    out, before = [], 0
    for record in history["epochs"]:
        now = len(record.get("trainable_new_layers") or [])
        if now > before:
            out.append(record["epoch"])
        before = now
    return out


def plot_training_curves(histories: Mapping[str, Mapping], title: str | None = None):
    """Training loss per step (moving average) and validation metrics per epoch, per run;
    dotted lines mark the epochs where an expansion run unfroze one more new layer."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    marked = False
    for i, (label, history) in enumerate(histories.items()):
        color = f"C{i}"
        losses = [s["loss"] for s in history["steps"]]
        window = max(1, len(losses) // 30)
        smooth = _moving_average(losses, window)
        ax1.plot(np.arange(len(smooth)) + window, smooth, color=color, label=label)
        epochs = [e["epoch"] for e in history["epochs"]]
        ax2.plot(epochs, [e["val_ndcg@10"] for e in history["epochs"]], "-o", color=color,
                 label=f"{label} NDCG@10")
        ax2.plot(epochs, [e["val_recall@10"] for e in history["epochs"]], "--s", color=color,
                 alpha=0.6, label=f"{label} Recall@10")
        if history.get("best_epoch"):
            best = history["epochs"][history["best_epoch"] - 1]
            ax2.scatter([best["epoch"]], [best["val_ndcg@10"]], s=120, facecolors="none",
                        edgecolors=color)
        for epoch in unfreeze_epochs(history):
            first_step = min(s["step"] for s in history["steps"] if s["epoch"] == epoch)
            ax1.axvline(first_step, color=color, linestyle=":", alpha=0.8)
            ax2.axvline(epoch - 0.5, color=color, linestyle=":", alpha=0.8)
            marked = True
    ax1.set_xlabel("训练步数")
    ax1.set_ylabel("InfoNCE 损失（滑动平均）")
    ax1.set_title("训练损失" + ("（点线：又解冻一个新层）" if marked else ""))
    ax1.legend()
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("轮次（epoch）")
    ax2.set_ylabel("验证集指标")
    ax2.set_title("验证集 NDCG@10（实线）与 Recall@10（虚线），圆圈为最佳轮次")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18),
               ncol=min(2, 2 * len(histories)))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metric_bars(summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
                     metrics: Sequence[str], title: str | None = None):
    """Grouped bars of metric means with 95% CI error bars, one group per metric.

    ``summaries[system][metric]`` holds ``mean``, ``ci_low`` and ``ci_high`` (as in a run's
    ``metrics.json`` aggregate block).
    """
    import matplotlib.pyplot as plt

    setup_cjk_font()
    systems = list(summaries)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(metrics) * max(1, len(systems) / 2)), 4))
    width = 0.8 / len(systems)
    x = np.arange(len(metrics))
    for i, system in enumerate(systems):
        means = np.array([summaries[system][m]["mean"] for m in metrics])
        low = means - np.array([summaries[system][m]["ci_low"] for m in metrics])
        high = np.array([summaries[system][m]["ci_high"] for m in metrics]) - means
        bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, means, width, label=system,
                      yerr=[low, high], capsize=3)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in means], fontsize=7, padding=2)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("测试集均值（误差线：95% 置信区间）")
    ax.set_title(title or "测试集指标")
    ax.legend()
    ax.margins(y=0.15)
    fig.tight_layout()
    return fig


def plot_metrics_vs_data_size(sizes: Mapping[str, int],
                              summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
                              metrics: Sequence[str], title: str | None = None):
    """Test metrics against the number of training records (log axis), with 95% CI bands.

    ``sizes[label]`` is the training-set size of run ``label``; ``summaries[label][metric]``
    holds ``mean``, ``ci_low`` and ``ci_high``.
    """
    import matplotlib.pyplot as plt

    setup_cjk_font()
    labels = sorted(sizes, key=sizes.get)
    xs = [sizes[label] for label in labels]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        mean = [summaries[label][metric]["mean"] for label in labels]
        low = [summaries[label][metric]["ci_low"] for label in labels]
        high = [summaries[label][metric]["ci_high"] for label in labels]
        ax.plot(xs, mean, "-o")
        ax.fill_between(xs, low, high, alpha=0.2)
        for x, m, label in zip(xs, mean, labels, strict=True):
            ax.annotate(f"{label}\n{m:.3f}", (x, m), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
        _log_x_axis(ax)
        ax.set_xticks(xs)
        ax.set_xlabel("训练样本数（对数轴）")
        ax.set_ylabel(f"测试集 {metric}")
        ax.set_title(f"{metric} 随数据规模的变化")
        ax.margins(y=0.2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_unfreeze_schedule(history: Mapping, num_layers: int, new_layers: Sequence[int],
                           title: str | None = None):
    """Which layers trained in which epoch: rows are the layers of the expanded model (bottom
    layer at the bottom), columns the epochs; pretrained layers, frozen and trainable new
    layers in three colours. A new layer that joined part-way through an epoch (stages spread
    over optimizer steps) shows the share of that epoch's steps it trained in."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    setup_cjk_font()
    epochs = [e["epoch"] for e in history["epochs"]]
    grid = np.zeros((num_layers, len(epochs)))
    starts = {row["trainable_new_layers"][-1]: row["start_step"]
              for row in history.get("unfreeze") or [] if row["trainable_new_layers"]}
    spe = history.get("steps_per_epoch")
    partial = []
    for j, record in enumerate(history["epochs"]):
        trainable = set(record.get("trainable_new_layers") or [])
        for layer in new_layers:
            grid[layer, j] = 2 if layer in trainable else 1
            if layer in trainable and layer in starts and spe:
                share = (record["epoch"] * spe - starts[layer]) / spe
                if share < 1:
                    partial.append((j, layer, share))
    colors = ["#4c72b0", "#d9d9d9", "#dd8452"]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(epochs) + 2), max(3, 0.3 * num_layers + 1)))
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=2, origin="lower", aspect="auto")
    for j, layer, share in partial:
        ax.text(j, layer, f"{share:.0%}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    step = max(1, num_layers // 16)
    ax.set_yticks(range(0, num_layers, step), [str(i) for i in range(0, num_layers, step)])
    ax.set_xticks(np.arange(-0.5, len(epochs)), minor=True)
    ax.set_yticks(np.arange(-0.5, num_layers), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("轮次（epoch）")
    ax.set_ylabel("层编号（0 = 最底层）")
    ax.set_title(title or "逐步解冻：每轮训练哪些层")
    labels = ["预训练层（始终训练）", "新层（冻结）", "新层（训练）"]
    ax.legend(handles=[Patch(color=c, label=t) for c, t in zip(colors, labels, strict=True)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def plot_memory_plan(rows: Sequence[Mapping], limits: Mapping[str, float],
                     title: str | None = None):
    """Estimated training memory (GiB) against the batch size, with and without gradient
    checkpointing, and horizontal lines at the memory of the GPUs in ``limits``
    (rows as :func:`~retrieval_lib.memory.training_memory_plan` returns them)."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, ax = plt.subplots(figsize=(7, 4))
    for ckpt, style, label in ((False, "-o", "不用梯度检查点"), (True, "-s", "梯度检查点")):
        sel = [r for r in rows if r["gradient_checkpointing"] == ckpt]
        ax.plot([r["batch_size"] for r in sel], [r["total_gib"] for r in sel], style, label=label)
    static = rows[0]["static_gib"]
    ax.axhline(static, color="gray", linestyle="--", label=f"权重+梯度+AdamW 状态 {static:.1f} GiB")
    for i, (name, gib) in enumerate(limits.items()):
        ax.axhline(gib, color=f"C{i + 2}", linestyle=":", label=f"{name}（{gib:g} GiB）")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("每步查询数（batch size）")
    ax.set_ylabel("估计显存（GiB，对数轴）")
    ax.set_title(title or "训练显存估计")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_metric_panels(summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
                       metrics: Sequence[str], reference: str | None = None,
                       title: str | None = None):
    """One panel per metric, one horizontal bar per system with its 95% CI; the reference
    system's mean is a dashed line. ``summaries[system][metric]`` holds ``mean``, ``ci_low``
    and ``ci_high``."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    systems = list(summaries)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics),
                                                       1.2 + 0.38 * len(systems)),
                             sharey=True, squeeze=False)
    y = np.arange(len(systems))
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = np.array([summaries[s][metric]["mean"] for s in systems])
        low = means - np.array([summaries[s][metric]["ci_low"] for s in systems])
        high = np.array([summaries[s][metric]["ci_high"] for s in systems]) - means
        colors = ["C3" if s == reference else "C0" for s in systems]
        ax.barh(y, means, xerr=[low, high], color=colors, capsize=2, alpha=0.85)
        for yi, m in zip(y, means, strict=True):
            ax.text(m, yi, f" {m:.3f}", va="center", fontsize=7)
        if reference in summaries:
            ax.axvline(summaries[reference][metric]["mean"], color="C3", linestyle="--",
                       linewidth=1)
        ax.set_title(metric)
        ax.margins(x=0.25)
    axes[0][0].set_yticks(y, systems)
    axes[0][0].invert_yaxis()
    fig.supxlabel("测试集均值（误差线：95% 置信区间；虚线：参照系统）")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_efficiency_frontier(points: Mapping[str, Mapping[str, float]], metric: str,
                             lines: Mapping[str, float] | None = None, title: str | None = None):
    """Parameters (log axis) against a test metric with its 95% CI, one point per model;
    systems without a parameter count (BM25) as horizontal lines. ``points[label]`` holds
    ``parameters``, ``mean``, ``ci_low``, ``ci_high``."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, p) in enumerate(points.items()):
        ax.errorbar([p["parameters"]], [p["mean"]],
                    yerr=[[p["mean"] - p["ci_low"]], [p["ci_high"] - p["mean"]]],
                    fmt="o", color=f"C{i % 10}", capsize=3, label=label)
    ordered = sorted(points.values(), key=lambda p: p["parameters"])
    frontier, best = [], -np.inf
    for p in ordered:  # the models no smaller model beats
        if p["mean"] > best:
            frontier.append(p)
            best = p["mean"]
    ax.plot([p["parameters"] for p in frontier], [p["mean"] for p in frontier], "-",
            color="gray", alpha=0.6, label="效率前沿")
    for j, (label, value) in enumerate((lines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{(len(points) + j) % 10}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("参数量（对数轴）")
    ax.set_ylabel(f"测试集 {metric}（误差线：95% 置信区间）")
    ax.set_title(title or f"参数量与 {metric}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def plot_per_query_distributions(values: Mapping[str, Sequence[float]], metric: str,
                                 title: str | None = None):
    """The distribution of a per-query metric for each system (box plot with the mean as a
    diamond) and the share of queries at exactly 0 and 1: why the std is so large."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    labels = list(values)
    data = [np.asarray(values[label], dtype=float) for label in labels]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.5))
    ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markerfacecolor": "C3",
                                                "markeredgecolor": "C3"})
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
    for i, d in enumerate(data, start=1):
        ax.annotate(f"0：{np.mean(d == 0):.0%}\n1：{np.mean(d == 1):.0%}", (i, 1.02),
                    ha="center", va="bottom", fontsize=7, annotation_clip=False)
    ax.set_ylim(-0.05, 1.18)
    ax.set_ylabel(f"每个查询的 {metric}")
    ax.set_title(title or f"逐查询 {metric} 的分布（菱形：均值；上方：取 0 / 取 1 的查询比例）")
    fig.tight_layout()
    return fig
