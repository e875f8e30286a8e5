"""Statistics of prepared splits: text lengths per source and the manifest's counts."""

from __future__ import annotations

import numpy as np

from .tokenizer import count_tokens

__all__ = ["collect_lengths", "length_percentiles", "summarize_lengths", "manifest_table"]

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def collect_lengths(split, tokenizer=None) -> dict[str, dict[str, list[int]]]:
    """Lengths of queries and positive passages per source, in characters or in tokens.

    With ``tokenizer`` (a ``transformers`` tokenizer) lengths are token counts without special
    tokens; otherwise character counts.
    """
    texts: dict[str, dict[str, list[str]]] = {}
    for row in split:
        by_kind = texts.setdefault(row["source"], {"query": [], "passage": []})
        by_kind["query"].append(row["query"])
        by_kind["passage"].extend(p["text"] for p in row["positive_passages"])
    out = {}
    for source, by_kind in sorted(texts.items()):
        out[source] = {
            kind: (count_tokens(tokenizer, values) if tokenizer is not None
                   else [len(v) for v in values])
            for kind, values in by_kind.items()
        }
    return out


def length_percentiles(lengths: dict[str, dict[str, list[int]]], kind: str = "passage",
                       step: int = 5) -> dict[str, list[float]]:
    """Per source, the 0th, ``step``-th, ..., 100th percentiles of its ``kind`` lengths (what
    ``benchmarks/batching.py --summary`` draws record lengths from).

    >>> length_percentiles({"a": {"passage": [1, 2, 3, 4, 5]}}, step=25)
    {'a': [1.0, 2.0, 3.0, 4.0, 5.0]}
    """
    return {source: [round(float(x), 1) for x in np.percentile(by_kind[kind],
                                                                range(0, 101, step))]
            for source, by_kind in lengths.items() if by_kind[kind]}


def manifest_table(manifest: dict):
    """Per-source table of the manifest: read, kept, dropped, repaired, flagged and empty
    files, then split sizes."""
    import pandas as pd

    rows = []
    for source, rep in manifest["load"].items():
        row = {"source": source, "read": rep["read"], "kept": rep["kept"],
               "dropped": sum(rep["dropped"].values()),
               "dropped_by_reason": ", ".join(f"{k}={v}" for k, v in rep["dropped"].items()),
               "repaired": ", ".join(f"{k}={v}" for k, v in rep["repaired"].items()),
               "flagged": ", ".join(f"{k}={v}" for k, v in rep.get("flagged", {}).items()),
               "empty_files": len(rep.get("empty_files", []))}
        for split, counts in manifest["by_source"].items():
            row[split] = counts.get(source, 0)
        rows.append(row)
    return pd.DataFrame(rows).set_index("source")


def summarize_lengths(lengths: dict[str, dict[str, list[int]]]):
    """A table (pandas) of count, mean, median, p90 and max length per source and kind."""
    import pandas as pd

    rows = []
    for source, by_kind in lengths.items():
        for kind, values in by_kind.items():
            v = np.asarray(values)
            rows.append({"source": source, "kind": kind, "count": len(v),
                         "mean": float(v.mean()) if len(v) else float("nan"),
                         "median": float(np.median(v)) if len(v) else float("nan"),
                         "p90": float(np.percentile(v, 90)) if len(v) else float("nan"),
                         "max": int(v.max()) if len(v) else 0})
    return pd.DataFrame(rows).set_index(["source", "kind"])
