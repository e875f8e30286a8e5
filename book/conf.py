"""Sphinx configuration of the course site (``make book``; ``book/build.py`` stages the sources).

The chapters are the notebooks as the demo preset executed them (``reports/notebooks/demo/``):
myst-nb shows their stored outputs and never executes them again.
"""

project = "中文长文本检索课程"
author = "retrieval-course"
language = "zh_CN"
root_doc = "index"

extensions = ["myst_nb", "sphinx.ext.autodoc"]
nb_execution_mode = "off"  # the chapters are already executed: the site is built offline
myst_enable_extensions = ["dollarmath", "amsmath"]
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"  # signatures as written; keeps the pages short
exclude_patterns = ["_build"]
suppress_warnings = []

html_theme = "sphinx_book_theme"
html_title = "中文长文本检索：从预训练语言模型到双塔检索器"
html_theme_options = {"show_toc_level": 2}
html_last_updated_fmt = None
