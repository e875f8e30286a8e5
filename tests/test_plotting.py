import warnings

import matplotlib
import numpy as np

matplotlib.use("Agg")

from retrieval_lib import plotting  # noqa: E402


def test_chinese_labels_render_without_missing_glyphs(tmp_path):
    font = plotting.setup_cjk_font(strict=True)
    assert font in plotting.CJK_FONTS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plotting.plot_length_distributions(
            {"人民日报": {"query": [3, 5, 8], "passage": [200, 900, 3000]}}, "字符", title="长度")
        path = plotting.save_figure(fig, "test", "lengths", folder=tmp_path)
        figs = [
            plotting.plot_split_counts({"train": 5, "validation": 2, "test": 3}, {"10k": 1}),
            plotting.plot_temperature_softmax({1.0: [0.5, 0.5], 0.1: [0.9, 0.1]}, [0.8, 0.6],
                                              ["正例", "负例"]),
            plotting.plot_negative_gradients({0.05: np.array([0.1, 0.7])},
                                             {0.05: np.array([1e-4, 1e-2])},
                                             np.array([False, True])),
            plotting.plot_optimisation_history([
                {"step": 0, "loss": 2.0, "mean_positive_similarity": 0.0,
                 "mean_negative_similarity": 0.0},
                {"step": 1, "loss": 1.0, "mean_positive_similarity": 0.3,
                 "mean_negative_similarity": -0.1}]),
        ]
        for i, f in enumerate(figs):
            plotting.save_figure(f, "test", f"fig{i}", folder=tmp_path)
    glyph_warnings = [str(w.message) for w in caught if "Glyph" in str(w.message)
                      or "missing from" in str(w.message)]
    assert glyph_warnings == []
    assert path.name == "test_lengths.png" and path.stat().st_size > 10_000
    assert matplotlib.rcParams["axes.unicode_minus"] is False
