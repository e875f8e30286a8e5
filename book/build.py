"""Build the course site: static HTML of the executed chapters, the results page and the API.

    make book                  # or: .venv/bin/python book/build.py [--preset demo] [--out DIR]

Offline and without executing anything: the chapters are the notebooks as ``make demo`` ran
them (``reports/notebooks/<preset>/``), with their outputs; the results page is
``reports/results_<preset>.md`` with the figures of ``figures/<preset>/``; the API reference is
``retrieval_lib``'s docstrings, one page section per stage. The sources are staged under
``build/book/src`` and built by Sphinx (myst-nb, the book theme) into ``build/book/html``, with
every warning an error; then every link and image of the built pages is checked to resolve to a
file of the site. Open ``build/book/html/index.html``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import retrieval_lib  # noqa: E402
from retrieval_lib.course.notebooks import notebook_paths  # noqa: E402

INDEX = """# 中文长文本检索：从预训练语言模型到双塔检索器

把预训练的中文语言模型（MiniMind 27M / 108M、Qwen2-0.5B）微调成双塔稠密检索器，
逐层加入并渐进解冻新的 Transformer 层来扩容，并在同一个测试集上与 BGE-M3、BM25 比较
Recall@5、Precision@5、NDCG@5 和 MRR（均值 ± 标准差）。

这里的每一章都是课程笔记本在 `{preset}` 预设下执行后的样子（`make demo` 生成，存于仓库的
`reports/notebooks/{preset}/`）：文字、表格、图和数字都来自那次运行，不需要重新运行就能阅读。
`{preset}` 预设用离线的小模型和人民日报 1998 语料，只说明流程可以跑通；真实模型的比较需要
`full` 预设（GPU）。源笔记本（`notebooks/`）保持没有输出、可用 papermill 参数化运行。

```{{toctree}}
:caption: 章节
:maxdepth: 1

{chapters}
```

```{{toctree}}
:caption: 结果与参考
:maxdepth: 1

results
api
```
"""

API = """# API 参考：`retrieval_lib`

课程背后的共享库。每个文件夹是一个阶段，只导入它之前的阶段；每个文件夹的 `__init__`
列出它的公开 API（下面按阶段顺序，由文档字符串生成）。

```{{eval-rst}}
.. automodule:: retrieval_lib
   :no-members:
```
{packages}
"""

PACKAGE = """
## `retrieval_lib.{name}`

```{{eval-rst}}
.. automodule:: retrieval_lib.{name}
```
"""


def stage(preset: str, src: Path) -> None:
    """Copy the chapters, the results page and its figures into ``src``, with the index and the
    API page."""
    chapters = notebook_paths(ROOT / "reports" / "notebooks" / preset)
    results = ROOT / "reports" / f"results_{preset}.md"
    if not chapters or not results.exists():
        raise SystemExit(f"no rendered chapters in reports/notebooks/{preset}/ or no "
                         f"{results.relative_to(ROOT)}: run `make demo` first (it writes both)")
    if src.exists():
        shutil.rmtree(src)
    (src / "chapters").mkdir(parents=True)
    for path in chapters:
        shutil.copy2(path, src / "chapters" / path.name)
    shutil.copytree(ROOT / "figures" / preset, src / "figures")
    page = results.read_text(encoding="utf-8").replace(f"../figures/{preset}/", "figures/")
    (src / "results.md").write_text(page, encoding="utf-8")
    (src / "index.md").write_text(INDEX.format(
        preset=preset, chapters="\n".join(f"chapters/{p.stem}" for p in chapters)),
        encoding="utf-8")
    (src / "api.md").write_text(API.format(packages="".join(
        PACKAGE.format(name=name) for name in retrieval_lib.PACKAGES)), encoding="utf-8")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value and ((tag == "a" and key == "href") or (tag in ("img", "script", "link")
                                                             and key in ("src", "href"))):
                self.targets.append(value)


def broken_links(html: Path) -> list[str]:
    """Links and images of the built pages that point to no file of the site (external
    addresses and in-page anchors aside)."""
    broken = []
    for page in sorted(html.rglob("*.html")):
        if "_static" in page.relative_to(html).parts:  # the theme's template fragments
            continue
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for target in parser.targets:
            url = urlparse(target)
            if url.scheme or url.netloc or not url.path:
                continue
            path = (page.parent / unquote(url.path)).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(html)}: {target}")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--out", default=str(ROOT / "build" / "book"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    src, html = out / "src", out / "html"
    stage(args.preset, src)
    if html.exists():
        shutil.rmtree(html)
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-c", str(Path(__file__).parent), "-d", str(out / "doctrees"), str(src),
               str(html)]
    built = subprocess.run(command, cwd=ROOT)
    if built.returncode:
        print("the site did not build: every Sphinx warning above is an error", file=sys.stderr)
        return built.returncode
    broken = broken_links(html)
    if broken:
        print(f"{len(broken)} broken links in the built site:", *broken[:20], sep="\n  ",
              file=sys.stderr)
        return 1
    pages = len(list(html.rglob("*.html")))
    images = len([p for p in html.rglob("*.png") if "_static" not in p.parts])
    print(f"course site: {pages} pages, {images} images, no warning, no broken link -> "
          f"{html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
