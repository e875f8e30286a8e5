"""Which records train together: length buckets, one source per batch, the same bucket on every
process (BGE-M3's batching).

BGE-M3 (Chen et al. 2024, "efficient batching") groups its training data by length so that a
batch pads little, has every GPU draw from the same group with a shared seed so that their
lengths match, and splits long groups into sub-batches (:class:`~retrieval_lib.models.gradcache.
GradCacheLoss` with a token budget); FlagEmbedding's fine-tuning scripts for bge-m3 also keep
every batch within one data set (``--same_dataset_within_batch True``), so that a query's
in-batch negatives come from its own corpus instead of an easy other one.

:class:`BucketBatchSampler` is the one batch plan of training, for one process and under
``torchrun``: an epoch is a list of *global* batches (``batch_size × world`` records, all of one
length bucket and, with ``same_source``, of one source), a function of ``(seed, epoch)`` alone
and the same on every process; process ``rank`` trains slice ``rank`` of each. So the
bit-identical resume holds, the processes' sequence lengths match, and a run on two processes
sees the same global batches as one process with twice the batch size.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from ..settings.config import TrainingConfig

__all__ = ["BucketBatchSampler", "batch_plan", "equal_count_edges", "passage_token_lengths"]


def equal_count_edges(lengths: Sequence[int], buckets: int) -> tuple[int, ...]:
    """Bucket edges that cut ``lengths`` into ``buckets`` groups of about equal size (the
    ``i/buckets`` quantiles; duplicates removed, so heavily tied data gets fewer buckets).
    A length ``x`` falls in bucket ``bisect_right(edges, x)``.

    >>> equal_count_edges([1, 2, 3, 4, 5, 6, 7, 8], 4)
    (3, 5, 7)
    """
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    ordered = sorted(lengths)
    edges = [ordered[i * len(ordered) // buckets] for i in range(1, buckets)] if ordered else []
    return tuple(sorted(set(e for e in edges if e > ordered[0])))


def passage_token_lengths(tokenizer, texts: Sequence[str], max_length: int,
                          chunk: int = 1024) -> list[int]:
    """Tokens each text occupies when truncated to ``max_length`` (special tokens included),
    for bucketing. Each text is cut to ``4 · max_length`` characters first, so that a 10,000-
    character document costs no more than a window; the length is exact whenever the window's
    tokens cover fewer than four characters each on average (byte-level BPE and WordPiece on
    Chinese text: about one to two), and otherwise at most understated, which only moves a
    record to a shorter bucket."""
    out: list[int] = []
    for start in range(0, len(texts), chunk):
        cut = [t[:4 * max_length] for t in texts[start:start + chunk]]
        ids = tokenizer(cut, truncation=True, max_length=max_length)["input_ids"]
        out.extend(len(x) for x in ids)
    return out


class BucketBatchSampler(torch.utils.data.Sampler):
    """Index batches of one process: slice ``rank`` of every global batch of the epoch.

    ``lengths[i]``: the length of record i (e.g. :func:`passage_token_lengths` of its positive);
    ``None`` turns length grouping off (one bucket). ``edges``: bucket edges; empty means
    ``buckets`` equal-count buckets (:func:`equal_count_edges` of ``lengths``). ``sources[i]``:
    record i's source, given to keep every batch within one source.

    An epoch: every group (source × bucket) is shuffled and cut into global batches; what is
    left of each group (fewer than a global batch) is pooled, sorted by length and cut again,
    so that an epoch has ``n // (batch_size · world)`` batches whatever the groups' sizes and no
    record is left out of more than the last partial batch; these pooled batches may mix
    groups and are counted (:meth:`mixed_batches`). The batches are then shuffled. With one
    group (no lengths, no sources) an epoch is ``torch.randperm`` cut into batches. A training
    set smaller than one batch is one batch (one process only).
    """

    def __init__(self, n_records: int, batch_size: int, seed: int, *,
                 lengths: Sequence[int] | None = None, edges: Sequence[int] = (),
                 buckets: int = 4, sources: Sequence[str] | None = None,
                 world: int = 1, rank: int = 0):
        if lengths is not None and len(lengths) != n_records:
            raise ValueError(f"{len(lengths)} lengths for {n_records} records")
        if sources is not None and len(sources) != n_records:
            raise ValueError(f"{len(sources)} sources for {n_records} records")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.n, self.batch_size, self.seed = n_records, batch_size, seed
        self.world, self.rank = world, rank
        self.global_size = batch_size * world
        if world > 1 and n_records < self.global_size:
            raise ValueError(f"{n_records} training records make no global batch of "
                             f"{self.global_size} ({world} processes × {batch_size})")
        self.lengths = list(lengths) if lengths is not None else None
        self.edges = tuple(edges) if edges or lengths is None else \
            equal_count_edges(self.lengths, buckets)
        keys: dict[tuple, list[int]] = {}
        for i in range(n_records):
            bucket = bisect.bisect_right(self.edges, self.lengths[i]) if self.lengths else 0
            keys.setdefault((sources[i] if sources is not None else "", bucket), []).append(i)
        self.groups = dict(sorted(keys.items()))
        self.epoch = 0
        self._cache: tuple[int, list[tuple[tuple | None, list[int]]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int | None = None) -> list[tuple[tuple | None, list[int]]]:
        """``(group key, record indices)`` of every global batch of ``epoch`` in training order;
        the key is None for a batch pooled from several groups' remainders."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        size, seed = self.global_size, self.seed * 1_000_003 + epoch
        if self.n < size:  # one process, fewer records than a batch
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
            batches = [(None, perm.tolist())] if self.n else []
        elif len(self.groups) == 1:
            key = next(iter(self.groups))
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
            batches = [(key, perm[i:i + size]) for i in range(0, self.n - size + 1, size)]
        else:
            rng = random.Random(seed)
            batches, rest = [], []
            for key, members in self.groups.items():
                order = list(members)
                rng.shuffle(order)
                full = len(order) - len(order) % size
                batches += [(key, order[i:i + size]) for i in range(0, full, size)]
                rest += order[full:]
            if self.lengths is not None:
                rest.sort(key=lambda i: self.lengths[i])
            batches += [(None, rest[i:i + size]) for i in range(0, len(rest) - size + 1, size)]
            rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def mixed_batches(self, epoch: int | None = None) -> int:
        """Global batches of the epoch pooled from several groups' remainders."""
        return sum(key is None for key, _ in self.global_batches(epoch)) if len(self.groups) > 1 \
            else 0

    def __iter__(self):
        b, r = self.batch_size, self.rank
        for _, batch in self.global_batches():
            yield batch if len(batch) < self.global_size else batch[r * b:(r + 1) * b]

    def __len__(self) -> int:
        return max(self.n // self.global_size, 1 if self.n else 0)

    def describe(self) -> dict:
        """The plan in numbers: edges, records per group, batches and mixed batches of the
        current epoch, records left out of it."""
        batches = self.global_batches()
        return {"edges": list(self.edges),
                "groups": {"/".join(str(k) for k in key if k != ""): len(members)
                           for key, members in self.groups.items()},
                "global_batch_size": self.global_size, "batches_per_epoch": len(batches),
                "mixed_batches": self.mixed_batches(),
                "records_left_out": self.n - sum(len(b) for _, b in batches)}


def batch_plan(train, cfg: TrainingConfig, tokenizer=None, max_length: int = 512,
               rank: int = 0, world: int = 1) -> BucketBatchSampler:
    """The batches training draws from ``train`` (records) under ``cfg``: bucketed by the
    tokens of each record's first positive (``tokenizer``, truncated at ``max_length``) when
    ``group_by_length``, kept within their source when ``same_source_batches``."""
    lengths = None
    if cfg.group_by_length:
        if tokenizer is None:
            raise ValueError("group_by_length needs the tokenizer that measures the positives")
        lengths = passage_token_lengths(
            tokenizer, [row["positive_passages"][0]["text"] for row in train], max_length)
    sources = [row.get("source") or "" for row in train] if cfg.same_source_batches else None
    return BucketBatchSampler(len(train), cfg.batch_size, cfg.seed, lengths=lengths,
                              edges=tuple(cfg.length_edges), buckets=cfg.length_buckets,
                              sources=sources, world=world, rank=rank)
