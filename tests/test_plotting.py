import warnings

import matplotlib
import numpy as np

matplotlib.use("Agg")

from retrieval_lib import course  # noqa: E402


def _expansion_history():
    """Three epochs of a run with new layers 2 and 3, unfrozen one per epoch."""
    epochs = [{"epoch": e, "train_loss": 1.0 / e, "val_ndcg@10": 0.1 * e, "val_recall@10": 0.2,
               "trainable_new_layers": [2, 3][: e - 1]} for e in (1, 2, 3)]
    steps = [{"step": i + 1, "epoch": i // 4 + 1, "loss": 2.0 - 0.1 * i} for i in range(12)]
    return {"epochs": epochs, "steps": steps, "best_epoch": 3}


def test_unfreeze_epochs_are_the_epochs_where_a_layer_joins():
    assert course.unfreeze_epochs(_expansion_history()) == [2, 3]
    assert course.unfreeze_epochs({"epochs": [{"epoch": 1, "trainable_new_layers": None}]}) == []


def _has_glyphs(font_path, text: str) -> bool:
    from matplotlib.ft2font import FT2Font

    font = FT2Font(str(font_path))
    return all(font.get_char_index(ord(ch)) != 0 for ch in text)


def test_the_pip_installed_font_has_the_glyphs_of_the_labels():
    """The requirements alone give Chinese figures: mplfonts ships Noto Sans CJK SC, and its
    file holds the glyphs of the course's labels (a Latin-only font does not)."""
    from matplotlib import font_manager

    path = course.bundled_cjk_font()
    assert path is not None and path.name == course.BUNDLED_FONT
    labels = "逐步解冻：每轮训练哪些层 训练曲线 测试集指标 长度分布（字符）"
    assert _has_glyphs(path, labels.replace(" ", ""))
    assert not _has_glyphs(font_manager.findfont("DejaVu Sans"), "检索")


def test_without_a_system_font_the_bundled_one_is_registered(monkeypatch):
    from matplotlib import font_manager

    system = [f for f in font_manager.fontManager.ttflist if f.name not in course.CJK_FONTS]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", system)  # no CJK font at all
    monkeypatch.setattr("retrieval_lib.course.plotting._FONT_DIRS", ())
    monkeypatch.setattr("retrieval_lib.course.plotting._chosen_font", None)
    assert course.setup_cjk_font(strict=True) == "Noto Sans CJK SC"
    registered = [f.fname for f in font_manager.fontManager.ttflist
                  if f.name == "Noto Sans CJK SC"]
    assert registered == [str(course.bundled_cjk_font())]
    # the next test picks again
    monkeypatch.setattr("retrieval_lib.course.plotting._chosen_font", None)


def test_chinese_labels_render_without_missing_glyphs(tmp_path):
    history = _expansion_history()
    font = course.setup_cjk_font(strict=True)
    assert font in course.CJK_FONTS
    from matplotlib import font_manager

    chosen = font_manager.findfont(font_manager.FontProperties(family=font),
                                   fallback_to_default=False)
    assert _has_glyphs(chosen, "逐步解冻时间表训练曲线")  # the chosen file really draws Chinese
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = course.plot_length_distributions(
            {"人民日报": {"query": [3, 5, 8], "passage": [200, 900, 3000]}}, "字符", title="长度")
        path = course.save_figure(fig, "test", "lengths", folder=tmp_path)
        figs = [
            course.plot_split_counts({"train": 5, "validation": 2, "test": 3}, {"10k": 1}),
            course.plot_temperature_softmax({1.0: [0.5, 0.5], 0.1: [0.9, 0.1]}, [0.8, 0.6],
                                              ["正例", "负例"]),
            course.plot_negative_gradients({0.05: np.array([0.1, 0.7])},
                                             {0.05: np.array([1e-4, 1e-2])},
                                             np.array([False, True])),
            course.plot_optimisation_history([
                {"step": 0, "loss": 2.0, "mean_positive_similarity": 0.0,
                 "mean_negative_similarity": 0.0},
                {"step": 1, "loss": 1.0, "mean_positive_similarity": 0.3,
                 "mean_negative_similarity": -0.1}]),
            course.plot_training_curves({"扩展": history}),
            course.plot_unfreeze_schedule(history, num_layers=4, new_layers=[2, 3]),
            course.plot_memory_plan(
                [{"batch_size": b, "gradient_checkpointing": c, "static_gib": 1.0,
                  "total_gib": 1.0 + b * (0.1 if c else 1.0)} for b in (1, 2) for c in (0, 1)],
                {"RTX 3060": 12}),
            course.plot_metric_panels(
                {"模型": {"ndcg@5": {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4}},
                 "BM25": {"ndcg@5": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}}},
                ["ndcg@5"], reference="BM25"),
            course.plot_efficiency_frontier(
                {"小": {"parameters": 1e6, "mean": 0.3, "ci_low": 0.2, "ci_high": 0.4},
                 "大": {"parameters": 1e7, "mean": 0.2, "ci_low": 0.1, "ci_high": 0.3}},
                "ndcg@5", lines={"BM25": 0.5}),
            course.plot_per_query_distributions({"模型": [0.0, 1.0, 0.5]}, "ndcg@5"),
            course.plot_loss_parts({name: [1.0, 0.8, 0.5] for name in course.LOSS_PART_LABELS},
                                     window=2),
        ]
        for i, f in enumerate(figs):
            course.save_figure(f, "test", f"fig{i}", folder=tmp_path)
    glyph_warnings = [str(w.message) for w in caught if "Glyph" in str(w.message)
                      or "missing from" in str(w.message)]
    assert glyph_warnings == []
    assert path.name == "test_lengths.png" and path.stat().st_size > 10_000
    assert matplotlib.rcParams["axes.unicode_minus"] is False


def _histories(n):
    steps = [{"step": s, "epoch": 1 + s // 5, "loss": 3.0 - 0.1 * s} for s in range(10)]
    epochs = [{"epoch": e, "val_ndcg@10": 0.1 * e, "val_recall@10": 0.2 * e,
               "trainable_new_layers": []} for e in (1, 2)]
    return {f"run {i}": {"steps": steps, "epochs": epochs, "best_epoch": 2} for i in range(n)}


def test_many_runs_get_their_own_colours_and_a_legend_that_covers_no_panel():
    """05 draws every run of a preset (15 in the demo): each needs its own colour, and the
    legend must sit below both panels, not over curves or axis labels."""
    fig = course.plot_training_curves(_histories(15), title="所有训练运行")
    fig.canvas.draw()
    (legend,) = fig.legends
    colours = {line.get_color() for line in legend.get_lines()}
    assert len(legend.get_texts()) == 15 and len(colours) == 15
    renderer = fig.canvas.get_renderer()
    top = legend.get_window_extent(renderer).y1
    for ax in fig.axes:  # the whole panel, its tick and axis labels included
        assert ax.get_tightbbox(renderer).y0 >= top
    points = {f"s{i}": {"parameters": 10.0 ** (i / 3 + 5), "mean": 0.1, "ci_low": 0.05,
                        "ci_high": 0.15} for i in range(15)}
    fig = course.plot_efficiency_frontier(points, "ndcg@5", lines={"bm25": 0.3})
    handles, labels = fig.axes[0].get_legend_handles_labels()
    colours = {str(h.lines[0].get_color() if hasattr(h, "lines") else h.get_color())
               for h, label in zip(handles, labels, strict=True) if label != "效率前沿"}
    assert len(colours) == 16  # 15 systems and the BM25 line
