"""BGE-M3's batching: length buckets, one source per batch, one bucket on every process."""

import random

import pytest

from retrieval_lib.data import tokenizer
from retrieval_lib.training import BucketBatchSampler, equal_count_edges, passage_token_lengths


def _bucket(lengths, edges, i):
    return sum(lengths[i] >= e for e in edges)


def test_equal_count_edges_by_hand():
    assert equal_count_edges([5, 1, 8, 2, 7, 3, 6, 4], 4) == (3, 5, 7)  # 2 lengths per bucket
    assert equal_count_edges([1, 1, 1, 1, 9, 9], 3) == (9,)  # ties: 2 buckets, not 3
    assert equal_count_edges([4, 4, 4], 2) == () and equal_count_edges([], 3) == ()
    with pytest.raises(ValueError):
        equal_count_edges([1], 0)


def test_every_process_draws_its_share_of_one_bucket_from_the_same_global_batch():
    """4 buckets of 16 records, 2 processes × 4: every global batch of 8 lies in one bucket;
    rank 0 and rank 1 (built apart, as two processes build them) take its two halves; one
    process with batch 8 sees exactly these global batches; an epoch covers every record."""
    lengths = [10 * (1 + i % 4) + i % 3 for i in range(64)]  # buckets by i % 4
    ranks = [BucketBatchSampler(64, 4, seed=3, lengths=lengths, world=2, rank=r) for r in (0, 1)]
    single = BucketBatchSampler(64, 8, seed=3, lengths=lengths)
    assert ranks[0].edges == single.edges == (20, 30, 40)
    for epoch in (1, 2):
        for s in (*ranks, single):
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 8
        for a, b, whole in zip(*per_rank, list(single), strict=True):
            assert a + b == whole and len(a) == len(b) == 4
            assert len({_bucket(lengths, single.edges, i) for i in whole}) == 1
        assert sorted(i for b in single for i in b) == list(range(64))
        assert single.mixed_batches() == 0
    ranks[0].set_epoch(1)
    first = list(ranks[0])
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != first  # a new order every epoch...
    ranks[0].set_epoch(1)
    assert list(ranks[0]) == first  # ...a function of (seed, epoch) alone


def test_one_source_per_batch_on_records_from_several_sources():
    """Three sources (24, 16, 8 records; one length); with ``same_source`` no batch of 8 mixes
    them, without it random batches do."""
    sources = ["mldr"] * 24 + ["dureader"] * 16 + ["t2ranking"] * 8
    random.Random(0).shuffle(sources)
    lengths = [100] * 48
    kept = BucketBatchSampler(48, 8, seed=0, lengths=lengths, sources=sources)
    assert kept.describe()["groups"] == {"dureader/0": 16, "mldr/0": 24, "t2ranking/0": 8}
    batches = list(kept)
    assert len(batches) == 6 and all(len({sources[i] for i in b}) == 1 for b in batches)
    mixed = BucketBatchSampler(48, 8, seed=0, lengths=lengths)
    assert any(len({sources[i] for i in b}) > 1 for b in mixed)


def test_remainders_are_pooled_counted_and_the_step_count_is_n_over_the_global_batch():
    """Groups of 13, 11 and 26 records, global batch 4: 3 + 2 + 6 full batches, remainders
    1 + 3 + 2 = 6 pooled into 1 mixed batch (2 records left out of this epoch): 12 steps,
    50 // 4."""
    lengths = [1] * 13 + [5] * 11 + [9] * 26
    sampler = BucketBatchSampler(50, 4, seed=1, lengths=lengths, edges=(3, 7))
    assert sampler.describe()["groups"] == {"0": 13, "1": 11, "2": 26}
    batches = sampler.global_batches(1)
    assert len(batches) == len(sampler) == 12 == 50 // 4
    assert sampler.mixed_batches(1) == 1 and sampler.describe()["records_left_out"] == 2
    seen = [i for _, b in batches for i in b]
    assert len(seen) == len(set(seen)) == 48
    for key, batch in batches:
        if key is not None:
            assert {_bucket(lengths, (3, 7), i) for i in batch} == {key[1]}


def test_buckets_cut_padding_against_random_batches():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(256)]

    def padding(batches):  # padded positions when every batch pads to its longest record
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)

    grouped = list(BucketBatchSampler(256, 8, seed=1, lengths=lengths, buckets=16))
    plain = list(BucketBatchSampler(256, 8, seed=1))
    assert len(grouped) == len(plain) == 32
    assert padding(grouped) < padding(plain) / 3


def test_small_sets_and_bad_arguments():
    assert list(BucketBatchSampler(5, 8, seed=0)) and len(BucketBatchSampler(5, 8, seed=0)) == 1
    assert sorted(next(iter(BucketBatchSampler(5, 8, seed=0)))) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no global batch"):
        BucketBatchSampler(5, 4, seed=0, world=2)
    with pytest.raises(ValueError, match="3 lengths for 4 records"):
        BucketBatchSampler(4, 2, seed=0, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="rank 2"):
        BucketBatchSampler(8, 2, seed=0, world=2, rank=2)


def test_token_lengths_equal_the_truncated_tokenisation():
    texts = ["".join(chr(0x4E00 + (i * 7 + k) % 300) for i in range(k)) for k in (3, 20, 90, 900)]
    tok = tokenizer.train_bpe_tokenizer(texts * 3, vocab_size=300)
    full = [len(x) for x in tok(texts, truncation=True, max_length=32)["input_ids"]]
    assert passage_token_lengths(tok, texts, 32, chunk=3) == full
    assert full[-1] == 32 and full[0] < 32
