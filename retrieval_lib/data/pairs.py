"""Pairs mined from unlabeled text for unsupervised contrastive pretraining (stage 1b).

No query and no relevance label is read: each pair is two views of one training passage,

* ``crop`` (Contriever, Izacard et al. 2022): two independent random spans of the passage,
  each 10%-50% of its length (``ratio_min`` / ``ratio_max`` of Contriever's training script);
  characters stand for tokens, as one Chinese character is about one token;
* ``ict`` (Inverse Cloze Task, Lee et al. 2019): one sentence of the passage, and the passage
  without it (the sentence is left in 10% of the time, as ICT does, so that word overlap stays
  a useful but not a sufficient signal);
* ``title``: a passage's own ``title`` field -> its text, where the records carry one.

Which texts feed it is :func:`unlabeled_texts`: the positives of the training split only,
minus every article of the validation and test splits (their queries and positive passages)
and every query; what it drops is counted. The demo's headlines are its queries,
so they never appear; its passages have no title field, so ``title`` mines nothing there (the
report says so).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from .records import normalise_text

__all__ = ["PAIR_KINDS", "unlabeled_texts", "sentences", "crop_pair", "ict_pair", "mine_pairs"]

PAIR_KINDS = ("crop", "ict", "title")

#: A sentence: text up to a Chinese or Latin full stop, question or exclamation mark or
#: semicolon (with the closing quotes after it), or up to a line break.
_SENTENCE = re.compile(r"[^。！？!?；\n]*[。！？!?；]+[”’」』\"']*|[^。！？!?；\n]+")


def _articles_of(split) -> Iterable[str]:
    """What belongs to a split's queries: the queries and their positive passages (titles
    included)."""
    for row in split:
        yield row["query"]
        for p in row["positive_passages"]:
            yield p["text"]
            if p.get("title"):
                yield p["title"]


def unlabeled_texts(train, held_out: Sequence) -> tuple[list[dict], dict]:
    """The training split's positive passages that stage 1 may read, and a report.

    ``held_out`` are the splits whose articles no stage-1 pair may touch (validation, test). A
    passage is dropped when its normalised text is a query or a positive passage (or title) of
    one of them, or a query of the training split; repeats are kept once. A training article
    that the held-out splits list among their *negatives* stays: it is training text (the demo
    LM was pretrained on it, BM25 indexes it), and it is counted (``held_out_negatives``).
    Returns ``[{"text", "title"?}]`` and the counts ``{"passages", "held_out_articles",
    "queries", "repeats", "kept", "held_out_negatives"}``.
    """
    forbidden = {normalise_text(t) for split in held_out for t in _articles_of(split)}
    negatives = {normalise_text(p["text"]) for split in held_out for row in split
                 for p in row["negative_passages"]}
    queries = {normalise_text(row["query"]) for row in train}
    kept, seen, counts = [], set(), Counter()
    for row in train:
        for p in row["positive_passages"]:
            counts["passages"] += 1
            key = normalise_text(p["text"])
            if key in forbidden:
                counts["held_out_articles"] += 1
            elif key in queries:
                counts["queries"] += 1
            elif key in seen:
                counts["repeats"] += 1
            else:
                seen.add(key)
                counts["held_out_negatives"] += key in negatives
                kept.append({"text": p["text"], **({"title": p["title"]}
                                                   if p.get("title") else {})})
    report = {k: counts[k] for k in ("passages", "held_out_articles", "queries", "repeats")}
    return kept, {**report, "kept": len(kept), "held_out_negatives": counts["held_out_negatives"]}


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see ``_SENTENCE``), stripped, empty ones left out.

    >>> sentences("今天下雨。明天呢？“好！”\\n结束")
    ['今天下雨。', '明天呢？', '“好！”', '结束']
    """
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def crop_pair(text: str, rng: random.Random, ratio: tuple[float, float] = (0.1, 0.5),
              min_chars: int = 4) -> tuple[str, str] | None:
    """Two independent random spans of ``text``, each ``ratio`` (uniform in the range) of its
    length, at least ``min_chars``; None when the text is shorter than ``2 * min_chars``."""
    n = len(text)
    if n < 2 * min_chars:
        return None
    spans = []
    for _ in range(2):
        length = max(min_chars, int(rng.uniform(*ratio) * n))
        start = rng.randint(0, n - length)
        spans.append(text[start:start + length])
    return spans[0], spans[1]


def ict_pair(text: str, rng: random.Random, keep_sentence: float = 0.1
             ) -> tuple[str, str] | None:
    """One sentence of ``text`` and its context: the other sentences, joined, with the
    sentence left in place with probability ``keep_sentence``; None with fewer than two
    sentences."""
    parts = sentences(text)
    if len(parts) < 2:
        return None
    i = rng.randrange(len(parts))
    context = parts if rng.random() < keep_sentence else parts[:i] + parts[i + 1:]
    return parts[i], "".join(context)


def mine_pairs(passages: Sequence[dict], kinds: Sequence[str] = PAIR_KINDS,
               pairs_per_text: int = 1, seed: int = 0, ratio: tuple[float, float] = (0.1, 0.5),
               keep_sentence: float = 0.1) -> tuple[list[dict], dict]:
    """Training records ``{"query", "positive_passages", "negative_passages": [], "source"}``
    (``source`` = the kind) mined from ``passages`` (:func:`unlabeled_texts`), ``pairs_per_text``
    per passage and kind (``title``: one, the title is one text), and per kind the pairs made
    and the passages that gave none (``too_short`` for crops, ``one_sentence`` for ICT,
    ``no_title``)."""
    unknown = set(kinds) - set(PAIR_KINDS)
    if unknown:
        raise ValueError(f"unknown pair kind(s) {sorted(unknown)}; choose from {PAIR_KINDS}")
    rng = random.Random(seed)
    records, report = [], {k: Counter() for k in kinds}
    why = {"crop": "too_short", "ict": "one_sentence", "title": "no_title"}
    for passage in passages:
        text = passage["text"]
        for kind in kinds:
            if kind == "title":
                made = [(passage["title"], text)] if passage.get("title") else []
            else:
                made = []
                for _ in range(pairs_per_text):
                    pair = (crop_pair(text, rng, ratio) if kind == "crop"
                            else ict_pair(text, rng, keep_sentence))
                    if pair is None:
                        break
                    made.append(pair)
            if not made:
                report[kind][why[kind]] += 1
            for query, positive in made:
                report[kind]["pairs"] += 1
                records.append({"query": query, "positive_passages": [{"text": positive}],
                                "negative_passages": [], "source": kind})
    return records, {k: {"pairs": c["pairs"], why[k]: c[why[k]]} for k, c in report.items()}
