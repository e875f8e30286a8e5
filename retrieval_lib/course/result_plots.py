"""Figures of runs and results: training curves with their unfreezing points, the unfreezing
schedule, memory plans, metric bars and panels, data scaling, the efficiency frontier and
per-query distributions; saved with :func:`~retrieval_lib.course.plotting.save_figure`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .plotting import log_x_axis, moving_average, setup_cjk_font

__all__ = ["run_styles", "plot_training_curves", "plot_metric_bars", "plot_metrics_vs_data_size",
           "unfreeze_epochs", "plot_unfreeze_schedule", "plot_memory_plan", "plot_metric_panels",
           "plot_efficiency_frontier", "plot_per_query_distributions", "plot_stage_curves"]


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


def run_styles(n: int) -> list[tuple[str, str]]:
    """``n`` distinguishable (colour, marker) pairs: matplotlib's ten default colours while
    they suffice, else the twenty of ``tab20``, with the marker changing every twenty.

    >>> run_styles(2)
    [('C0', 'o'), ('C1', 'o')]
    >>> len(set(run_styles(25))), run_styles(21)[20][1]
    (25, 's')
    """
    import matplotlib

    if n <= 10:
        return [(f"C{i}", "o") for i in range(n)]
    colours = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    markers = "osD^vP"
    return [(colours[i % 20], markers[(i // 20) % len(markers)]) for i in range(n)]


def plot_training_curves(histories: Mapping[str, Mapping], title: str | None = None):
    """Training loss per step (moving average) and validation metrics per epoch, per run;
    dotted lines mark the epochs where an expansion run unfroze one more new layer. One
    legend below both panels names the runs (one colour each, :func:`run_styles`); the line
    style tells NDCG@10 from Recall@10."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    setup_cjk_font()
    columns = 2 if len(histories) > 4 else max(1, len(histories))
    rows = -(-len(histories) // columns)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4 + 0.22 * rows), layout="constrained")
    marked = False
    for (label, history), (color, marker) in zip(histories.items(), run_styles(len(histories)),
                                                 strict=True):
        losses = [s["loss"] for s in history["steps"]]
        window = max(1, len(losses) // 30)
        smooth = moving_average(losses, window)
        ax1.plot(np.arange(len(smooth)) + window, smooth, color=color, label=label)
        epochs = [e["epoch"] for e in history["epochs"]]
        ax2.plot(epochs, [e["val_ndcg@10"] for e in history["epochs"]], "-", marker=marker,
                 color=color)
        ax2.plot(epochs, [e["val_recall@10"] for e in history["epochs"]], "--", marker=marker,
                 color=color, alpha=0.6, markersize=4)
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
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("轮次（epoch）")
    ax2.set_ylabel("验证集指标")
    ax2.set_title("验证集 NDCG@10（实线）与 Recall@10（虚线），圆圈为最佳轮次")
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside lower center", ncol=columns,
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_stage_curves(stages: Mapping[str, Mapping], title: str | None = None):
    """Stage 1's curves from its runs' ``history.json`` (``stages``: stage name -> history):
    RetroMAE's encoder and decoder reconstruction losses per step (moving average) with the
    held-out losses, and the contrastive stage's InfoNCE loss per step with the held-out pairs'
    NDCG@10 per epoch."""
    import matplotlib.pyplot as plt

    setup_cjk_font()
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False,
                             layout="constrained")
    for ax, (stage, history) in zip(axes[0], stages.items(), strict=True):
        if stage == "retromae":
            steps = np.array(history["steps"], dtype=float)  # [step, encoder, decoder]
            window = max(1, len(steps) // 30)
            for column, label, color in ((1, "编码器 MLM", "C0"), (2, "解码器重建", "C1")):
                ax.plot(steps[window - 1:, 0], moving_average(steps[:, column], window),
                        color=color, label=f"{label}（训练）")
                held = [(s, h[f"{'encoder' if column == 1 else 'decoder'}_loss"])
                        for s, h in history["heldout"]]
                ax.plot(*zip(*held, strict=True), "o--", color=color, label=f"{label}（留出）")
            ax.axvline(history["best_step"], color="grey", linestyle=":")
            ax.set_title("1a RetroMAE：交叉熵（点线：保留的步）")
            ax.set_ylabel("交叉熵")
        else:
            losses = [s["loss"] for s in history["steps"]]
            window = max(1, len(losses) // 30)
            ax.plot(np.arange(len(losses) - window + 1) + window,
                    moving_average(losses, window), color="C2", label="InfoNCE（训练）")
            ax.set_ylabel("InfoNCE 损失")
            right = ax.twinx()
            per_epoch = history["steps_per_epoch"]
            right.plot([e["epoch"] * per_epoch for e in history["epochs"]],
                       [e["val_ndcg@10"] for e in history["epochs"]], "s-", color="C3",
                       label="留出对 NDCG@10")
            right.set_ylabel("留出对 NDCG@10")
            ax.legend(*(a + b for a, b in zip(ax.get_legend_handles_labels(),
                                               right.get_legend_handles_labels(), strict=True)),
                      fontsize=8)
            ax.set_title("1b 无监督对比：训练损失与留出对上的检索")
        ax.set_xlabel("训练步数")
        if stage == "retromae":
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
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
        log_x_axis(ax)
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
    (rows as :func:`~retrieval_lib.training.memory.training_memory_plan` returns them)."""
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
        for yi, m, h in zip(y, means, high, strict=True):  # beyond the error bar, not on it
            ax.text(m + h, yi, f"  {m:.3f}", va="center", fontsize=7)
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
    styles = run_styles(len(points) + len(lines or {}))
    for (label, p), (color, marker) in zip(points.items(), styles, strict=False):
        ax.errorbar([p["parameters"]], [p["mean"]],
                    yerr=[[p["mean"] - p["ci_low"]], [p["ci_high"] - p["mean"]]],
                    fmt=marker, color=color, capsize=3, label=label)
    ordered = sorted(points.values(), key=lambda p: p["parameters"])
    frontier, best = [], -np.inf
    for p in ordered:  # the models no smaller model beats
        if p["mean"] > best:
            frontier.append(p)
            best = p["mean"]
    ax.plot([p["parameters"] for p in frontier], [p["mean"] for p in frontier], "-",
            color="gray", alpha=0.6, label="效率前沿")
    for (label, value), (color, _) in zip((lines or {}).items(), styles[len(points):],
                                          strict=True):
        ax.axhline(value, linestyle="--", color=color, label=label)
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
