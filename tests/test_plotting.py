import warnings

import matplotlib

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
        fig2 = plotting.plot_split_counts({"train": 5, "validation": 2, "test": 3}, {"10k": 1})
        plotting.save_figure(fig2, "test", "counts", folder=tmp_path)
    glyph_warnings = [str(w.message) for w in caught if "Glyph" in str(w.message)
                      or "missing from" in str(w.message)]
    assert glyph_warnings == []
    assert path.name == "test_lengths.png" and path.stat().st_size > 10_000
    assert matplotlib.rcParams["axes.unicode_minus"] is False
