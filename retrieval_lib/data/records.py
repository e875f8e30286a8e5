"""Records: the unified record of the course, its validation, and the JSON-lines reader.

Every source is turned into the unified record::

    {"query": str,
     "positive_passages": [{"text": str}, ...],   # at least one
     "negative_passages": [{"text": str}, ...],   # hard negatives, possibly none
     "source": str}                               # which data set it came from

Loaders never lose a record silently. In strict mode a bad record raises :class:`DataError`
naming the file, the line and the field; in lenient mode it is counted under its reason in a
:class:`LoadReport`, and the report's numbers always add up: ``read == kept + sum(dropped)``.
The sources that produce records (:mod:`retrieval_lib.data.demo_corpus`, the BGE-M3 files in
:mod:`retrieval_lib.data`) and the splits built from them sit above this module.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataError", "DataUnavailableError", "LoadReport", "MAX_TEXT_CHARS",
           "normalise_text", "width_forms_differ", "validate_record", "traditional_characters",
           "to_simplified", "from_flag_embedding", "read_jsonl", "query_passage_pairs"]


class DataError(ValueError):
    """A record that does not fit the schema; the message names file, line and field."""


class DataUnavailableError(FileNotFoundError):
    """The data could be found neither locally nor on the hub."""


@dataclass
class LoadReport:
    """What a loader read, kept and dropped (by reason). The numbers always add up."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    #: per-record repairs that lose no record, e.g. negatives equal to a positive removed
    repaired: Counter = field(default_factory=Counter)
    #: records kept as they are but worth knowing about, e.g. ones with Traditional characters
    flagged: Counter = field(default_factory=Counter)
    #: files that held no record at all (lenient mode; strict mode raises)
    empty_files: list[str] = field(default_factory=list)
    #: the first few problems, as "file:line: field: what", to show the user
    examples: list[str] = field(default_factory=list)
    #: records kept from each file that was read, by path
    files: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, message: str | None = None) -> None:
        self.dropped[reason] += 1
        if message and len(self.examples) < 20:
            self.examples.append(message)

    def merge(self, other: LoadReport) -> None:
        self.read += other.read
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.repaired.update(other.repaired)
        self.flagged.update(other.flagged)
        self.empty_files.extend(other.empty_files)
        self.files.update(other.files)
        self.examples.extend(other.examples[: max(0, 20 - len(self.examples))])

    def check(self) -> None:
        """Raise if the books do not balance (a loader bug, never a data problem)."""
        if self.read != self.kept + sum(self.dropped.values()):
            raise AssertionError(f"load report does not add up: {self.to_dict()}")

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "flagged": dict(sorted(self.flagged.items())),
            "empty_files": list(self.empty_files),
            "examples": list(self.examples),
            "files": dict(self.files),
        }


# ---------------------------------------------------------------------------------------------
# Schema and validation
# ---------------------------------------------------------------------------------------------


#: Characters that show nothing: zero-width space, non-joiner and joiner, word joiner, BOM.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")


def normalise_text(text: str) -> str:
    """Unicode NFKC (full-width and half-width forms of one text are one text: ＧＤＰ and GDP,
    ？ and ?, the ideographic space and a space), invisible characters removed, whitespace runs
    collapsed to one space, ends stripped: the form in which texts are compared (duplicates,
    the split-overlap guard, a positive equal to its query, a negative equal to a positive).
    Only comparisons use it; the texts themselves are kept as written.

    >>> normalise_text("  北京 \t \u200b 上海  ")
    '北京 上海'
    >>> normalise_text("ＧＤＰ增长了多少？") == normalise_text("GDP增长了多少?")
    True
    """
    return _collapsed(unicodedata.normalize("NFKC", text))


def _collapsed(text: str) -> str:
    """Invisible characters removed, whitespace runs collapsed to one space, ends stripped."""
    return re.sub(r"\s+", " ", _INVISIBLE.sub("", text)).strip()


def width_forms_differ(a: str, b: str) -> bool:
    """Whether two texts that :func:`normalise_text` makes equal differ by more than
    whitespace and invisible characters (a full-width / half-width merge, counted as such)."""
    return _collapsed(a) != _collapsed(b)


#: Longest text kept, in characters; longer ones are cut and counted (``text_truncated``).
#: The longest BGE-M3 passages (8,192 tokens) are about 12,000 Chinese characters.
MAX_TEXT_CHARS = 100_000


@functools.cache
def _traditional_table() -> dict[int, str]:
    """Traditional -> Simplified for single characters: snownlp's table, restricted to
    characters outside GB 2312 (the Simplified standard set). Its phrase entries rewrite
    regional vocabulary (的士 -> 出租车) and some of its characters are ordinary Simplified ones
    (余, 著, 乾), so neither counts as Traditional here."""
    from snownlp.normal.zh import zh2hans

    def in_gb2312(ch: str) -> bool:
        try:
            ch.encode("gb2312")
        except UnicodeEncodeError:
            return False
        return True

    return {ord(k): v for k, v in zh2hans.items()
            if len(k) == 1 and len(v) == 1 and k != v and not in_gb2312(k)}


def traditional_characters(text: str) -> int:
    """How many characters of ``text`` are Traditional forms with a Simplified counterpart.

    >>> traditional_characters("漢字与简体")
    1
    """
    table = _traditional_table()
    return sum(1 for ch in text if ord(ch) in table)


def to_simplified(text: str) -> str:
    """``text`` with every Traditional character replaced by its Simplified form.

    >>> to_simplified("檢索與漢字")
    '检索与汉字'
    """
    return text.translate(_traditional_table())


def _check_text(value, where: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field_name}': expected a string, got "
                        f"{type(value).__name__}")
    if "\x00" in value:
        raise DataError(f"{where}: field '{field_name}': contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a "\ud800" escape
        raise DataError(f"{where}: field '{field_name}': character {exc.start + 1} is a lone "
                        f"surrogate ({value[exc.start]!r}), not text") from None
    if not normalise_text(value):
        raise DataError(f"{where}: field '{field_name}': empty, or only whitespace and "
                        f"invisible characters")
    return value


def _check_passages(value, where: str, field_name: str, required: bool) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field_name}': expected a list, got "
                        f"{type(value).__name__}")
    if required and not value:
        raise DataError(f"{where}: field '{field_name}': empty list (a record needs at least "
                        f"one positive passage)")
    passages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "text" not in item:
            raise DataError(f"{where}: field '{field_name}[{i}]': expected an object with a "
                            f"'text' field, got {type(item).__name__}")
        passages.append({"text": _check_text(item["text"], where, f"{field_name}[{i}].text")})
    return passages


def validate_record(obj, where: str = "<record>", source: str | None = None,
                    report: LoadReport | None = None, max_chars: int | None = MAX_TEXT_CHARS,
                    simplify: bool = False) -> dict:
    """Check one unified record and return a clean copy.

    Raises :class:`DataError` naming ``where`` (``file:line``) and the field at fault. Within a
    valid record, duplicate positives are merged, positives identical to the query and
    negatives identical to a positive are removed, texts longer than ``max_chars`` are cut;
    each is counted in ``report.repaired`` when a report is given. A record whose only positive
    is its query is an error (nothing to learn). Records with Traditional characters are counted
    in ``report.flagged``; ``simplify=True`` converts them to Simplified (counted as repaired).

    >>> validate_record({"query": "q", "positive_passages": [{"text": "p"}, {"text": "p"}],
    ...                  "negative_passages": [{"text": "p"}, {"text": "n"}]})["negative_passages"]
    [{'text': 'n'}]
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("query", "positive_passages"):
        if name not in obj:
            raise DataError(f"{where}: field '{name}': missing")
    query = _check_text(obj["query"], where, "query")
    positives = _check_passages(obj["positive_passages"], where, "positive_passages", True)
    negatives = _check_passages(obj.get("negative_passages", []), where, "negative_passages",
                                False)
    seen, unique_pos = set(), []
    for p in positives:
        if p["text"] not in seen:
            seen.add(p["text"])
            unique_pos.append(p)
    # a negative that is a positive up to whitespace would teach the model to push the answer away
    positive_forms = {normalise_text(t) for t in seen}
    clean_neg, neg_seen = [], set()
    for n in negatives:
        form = normalise_text(n["text"])
        if form in positive_forms:
            if report is not None:
                report.repaired["negative_equal_to_positive"] += 1
            continue
        if form in neg_seen:
            if report is not None:
                report.repaired["duplicate_negative"] += 1
            continue
        neg_seen.add(form)
        clean_neg.append(n)
    if report is not None and len(unique_pos) < len(positives):
        report.repaired["duplicate_positive"] += len(positives) - len(unique_pos)
    same_as_query = [p for p in unique_pos if normalise_text(p["text"]) == normalise_text(query)]
    if same_as_query:
        if len(same_as_query) == len(unique_pos):
            raise DataError(f"{where}: field 'positive_passages[0].text': identical to the "
                            f"query (a record needs a positive other than its query)")
        unique_pos = [p for p in unique_pos if p not in same_as_query]
        if report is not None:
            report.repaired["positive_equal_to_query"] += len(same_as_query)
    query, unique_pos, clean_neg = _clean_texts(query, unique_pos, clean_neg, max_chars,
                                                simplify, report)
    record_source = source if source is not None else obj.get("source", "unknown")
    if not isinstance(record_source, str):
        raise DataError(f"{where}: field 'source': expected a string, got "
                        f"{type(record_source).__name__}")
    return {"query": query, "positive_passages": unique_pos, "negative_passages": clean_neg,
            "source": record_source}


def _clean_texts(query: str, positives: list[dict], negatives: list[dict],
                 max_chars: int | None, simplify: bool, report: LoadReport | None):
    """Cut over-long texts and detect (or convert) Traditional characters, counting both."""
    texts = [query] + [p["text"] for p in positives] + [n["text"] for n in negatives]
    if max_chars is not None:
        cut = sum(len(t) > max_chars for t in texts)
        if cut:
            texts = [t[:max_chars] for t in texts]
            if report is not None:
                report.repaired["text_truncated"] += cut
    if any(traditional_characters(t) for t in texts):
        if simplify:
            texts = [to_simplified(t) for t in texts]
        if report is not None:
            (report.repaired if simplify else report.flagged)["traditional_characters"] += 1
    n_pos = len(positives)
    return (texts[0], [{"text": t} for t in texts[1:1 + n_pos]],
            [{"text": t} for t in texts[1 + n_pos:]])


def from_flag_embedding(obj, where: str = "<record>") -> dict:
    """Convert FlagEmbedding's training format to the unified record.

    FlagEmbedding (and ``Shitao/bge-m3-data``) store ``{"query": str, "pos": [str],
    "neg": [str]}`` with optional ``pos_scores``, ``neg_scores``, ``prompt`` and ``type``, which
    the retriever does not use.

    >>> from_flag_embedding({"query": "q", "pos": ["a"], "neg": ["b", "c"]})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'query': 'q', 'positive_passages': [{'text': 'a'}],
     'negative_passages': [{'text': 'b'}, {'text': 'c'}]}
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "pos" not in obj:
        raise DataError(f"{where}: field 'pos': missing")
    pos, neg = obj["pos"], obj.get("neg", [])
    for name, value in (("pos", pos), ("neg", neg)):
        if not isinstance(value, list):
            raise DataError(f"{where}: field '{name}': expected a list of strings, got "
                            f"{type(value).__name__}")
    return {
        "query": obj.get("query"),
        "positive_passages": [{"text": t} for t in pos],
        "negative_passages": [{"text": t} for t in neg],
    }


# ---------------------------------------------------------------------------------------------
# Reading JSON lines
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, *, source: str | None = None,
               converter: Callable[[dict, str], dict] | None = None, strict: bool = True,
               max_negatives: int | None = None, report: LoadReport | None = None,
               max_chars: int | None = MAX_TEXT_CHARS, simplify: bool = False
               ) -> Iterator[dict]:
    """Yield validated unified records from a JSON-lines file.

    ``converter`` maps each parsed object to the unified layout first (e.g.
    :func:`from_flag_embedding`). Blank lines are skipped without counting; a UTF-8 byte-order
    mark at the start of the file is ignored. Any other problem (undecodable bytes, invalid JSON,
    schema errors) raises :class:`DataError` in strict mode, or is counted in ``report`` under
    ``invalid_utf8``, ``invalid_json`` or ``invalid_record`` in lenient mode.
    ``max_negatives`` keeps the first K hard negatives and counts the rest as repaired;
    ``max_chars`` and ``simplify`` are passed to :func:`validate_record`. A file without any
    record is an error in strict mode and listed in ``report.empty_files`` otherwise.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    lines_seen = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            report.read += 1
            lines_seen += 1
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: undecodable byte at column {exc.start + 1} "
                                    f"(not UTF-8)") from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column "
                                    f"{exc.colno})") from None
                except RecursionError:  # e.g. a line of 200,000 nested "["
                    raise DataError(f"{where}: invalid JSON (nested too deeply to "
                                    f"parse)") from None
                if converter is not None:
                    obj = converter(obj, where)
                record = validate_record(obj, where, source=source, report=report,
                                         max_chars=max_chars, simplify=simplify)
            except DataError as exc:
                if strict:
                    raise
                message = str(exc)
                reason = ("invalid_utf8" if "undecodable" in message else
                          "invalid_json" if "invalid JSON" in message else "invalid_record")
                report.drop(reason, message)
                continue
            if max_negatives is not None and len(record["negative_passages"]) > max_negatives:
                report.repaired["negatives_beyond_limit"] += (
                    len(record["negative_passages"]) - max_negatives)
                record["negative_passages"] = record["negative_passages"][:max_negatives]
            report.kept += 1
            yield record
    if not lines_seen:
        if strict:
            raise DataError(f"{path}: empty file (no records); a truncated download? "
                            f"Remove it or load with strict=False to skip it")
        report.empty_files.append(str(path))


def query_passage_pairs(records, n: int | None = None) -> tuple[list[str], list[str]]:
    """The first ``n`` (all when None) ``(query, passage)`` pairs of ``records``: each record's
    query with its positive passages, then its hard negatives, record after record."""
    queries, passages = [], []
    for r in records:
        for p in [*r["positive_passages"], *r["negative_passages"]]:
            if n is not None and len(queries) == n:
                return queries, passages
            queries.append(r["query"])
            passages.append(p["text"])
    return queries, passages
