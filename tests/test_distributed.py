"""Cross-device negatives: 2 gloo processes on the CPU equal one process on the global batch."""

import json
import os
import socket
import subprocess
import sys
from bisect import bisect_right
from pathlib import Path

import pytest
import torch
from ddp_step_worker import TAU, embed, global_batch, model  # this folder is on sys.path
from toy import worker_model

from retrieval_lib.models import cross_device_info_nce, info_nce
from retrieval_lib.settings import config, distributed
from retrieval_lib.training import batch_plan, passage_token_lengths


def _torchrun(worker: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``tests/<worker>`` under torchrun with 2 CPU processes (gloo)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), str(Path(__file__).with_name(worker)), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=timeout)


def test_two_process_step_equals_the_single_process_global_step(tmp_path):
    """Launched as users launch it (torchrun; an mp.spawn version aborted now and then inside
    gloo): loss and DDP-averaged gradients of 2 processes equal one process on both shares."""
    result, loss, grads = _two_processes_and_the_global_step(tmp_path)
    assert torch.allclose(result["loss"], loss, atol=1e-6)
    for got, want in zip(result["grads"], grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _two_processes_and_the_global_step(tmp_path, *worker_args):
    """What rank 0 of ddp_step_worker.py saved (``worker_args`` choose its loss), and the loss
    and gradients of one process on the whole global batch with the library's loss."""
    done = _torchrun("ddp_step_worker.py", str(tmp_path / "out.pt"), *worker_args)
    assert done.returncode == 0, done.stderr[-3000:]
    net = model()
    queries, passages = global_batch()
    loss = info_nce(embed(net, queries), embed(net, passages), TAU)
    loss.backward()
    return (torch.load(tmp_path / "out.pt", weights_only=True), loss.detach(),
            [p.grad for p in net.parameters()])


def test_flagembeddings_cross_device_gradient_is_one_over_world_of_the_global_step(tmp_path):
    """The difference from FlagEmbedding 1.4 under torchrun, measured with its own code: it
    gathers the queries as well, so each process's loss is the global batch's mean (the same
    value as the library's), but gradients flow through the local share only, and DDP's
    averaging leaves 1/world of the global step's gradient. The library's gradient is the global
    step's (the test above); AdamW's update is unchanged by the constant factor, up to its ε."""
    result, loss, grads = _two_processes_and_the_global_step(tmp_path, "flagembedding")
    assert torch.allclose(result["loss"], loss, atol=1e-6)
    for got, want in zip(result["grads"], grads, strict=True):
        torch.testing.assert_close(got * 2, want, atol=1e-5, rtol=1e-5)
        assert (got - want).abs().max() > 1e-4  # and the factor is not 1


def test_grad_cache_under_torchrun_chunks_on_every_process_when_one_must(tmp_path):
    """A token budget that rank 0's passages exceed and rank 1's fit: both processes chunk (one
    all-reduce decides), so their collectives match, and the averaged gradients are those of one
    process on the global batch; when both fit, neither chunks."""
    import ddp_gradcache_worker as worker

    model = worker.worker_model(worker.records())
    cells = {rank: {long: model.tokenize(worker.batch(rank, long)[1], "passage")["input_ids"]
                    .numel() for long in (True, False)} for rank in (0, 1)}
    budget = max(cells[0][False], cells[1][False])
    assert cells[0][True] > budget  # rank 0's long passages exceed it, every short batch fits
    done = _torchrun("ddp_gradcache_worker.py", str(tmp_path / "out.pt"), str(budget),
                     timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    # after step 1 both ranks have chunked once; step 2 adds nothing
    assert result["sub_batched_steps"] == [[1, 1], [1, 1]]
    for step, longs in enumerate(worker.steps()):
        shares = [worker.batch(rank, longs[rank]) for rank in (0, 1)]
        queries = [t for q, _ in shares for t in q]
        passages = [t for _, p in shares for t in p]
        model.zero_grad(set_to_none=True)
        q, p = model(model.tokenize(queries, "query"), model.tokenize(passages, "passage"))
        loss = info_nce(q, p, worker.TAU)
        loss.backward()
        assert result["losses"][step].item() == pytest.approx(loss.item(), abs=1e-5)
        for got, param in zip(result["grads"][step], model.parameters(), strict=True):
            torch.testing.assert_close(got, param.grad, atol=1e-5, rtol=1e-4)


def test_without_a_process_group_it_is_plain_info_nce():
    q, p = torch.randn(2, 4), torch.randn(6, 4)
    assert not distributed.is_distributed()
    assert distributed.gather_with_grad(p) is p
    assert torch.equal(cross_device_info_nce(q, p, TAU), info_nce(q, p, TAU))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("chunking", ["0", "3", "t40"], ids=["plain", "grad-cache",
                                                             "sub-batches"])
def test_train_retriever_under_torchrun_keeps_the_processes_in_step(tmp_path, chunking):
    from safetensors.torch import load_file

    topics = ["长江", "黄河", "足球", "音乐", "电力", "旅游", "法律", "外交", "农业", "气象"]
    records = [{"query": f"{topics[i % 10]}{topics[(i * 3) % 10]}{i}", "source": "toy",
                "positive_passages": [{"text": f"{topics[i % 10]}新闻，{topics[(i * 3) % 10]}。"
                                               + "详细报道" * (3 * (i % 4))}],
                "negative_passages": [{"text": f"{topics[(i + 1) % 10]}报道"}]} for i in range(40)]
    (tmp_path / "records.json").write_text(json.dumps(records, ensure_ascii=False))
    done = _torchrun("ddp_train_worker.py", str(tmp_path / "records.json"),
                     str(tmp_path / "run"), chunking)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    history = json.loads((run / "history.json").read_text())
    # 32 records, 4 queries per process, 2 processes: 4 steps per epoch, 2 epochs
    assert (history["world_size"], history["global_batch_size"]) == (2, 8)
    assert history["total_steps"] == 8 and len(history["steps"]) == 8
    assert [e["trainable_new_layers"] for e in history["epochs"]] == [[], [1]]
    # DDP keeps the two replicas identical: same weights, bit for bit, after training
    ranks = [load_file(str(run / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # ...and they trained: the loss of the second epoch is below the first's
    assert history["epochs"][1]["train_loss"] < history["epochs"][0]["train_loss"]
    assert (run / "best" / "head.safetensors").exists()
    assert (run / "train.log").read_text().count("training on") == 1  # one process logs
    # BGE-M3's batching under torchrun: each step, the two processes train the two halves of
    # one global batch of one length bucket, the global batches one process with batch 8 sees
    plan = history["batching"]
    assert len(plan["groups"]) > 1 and history["group_by_length"]
    assert history["sub_batched_steps"] == (8 if chunking == "t40" else 0)
    halves = [json.loads((run / f"rank{r}_batches.json").read_text()) for r in (0, 1)]
    model = worker_model(records)
    single = batch_plan(records[:32], config.TrainingConfig(
        epochs=2, batch_size=8, learning_rate=1e-3), model.tokenizer, model.max_passage_length)
    measured = passage_token_lengths(model.tokenizer, [r["positive_passages"][0]["text"]
                                                       for r in records[:32]],
                                     model.max_passage_length)
    for epoch in ("1", "2"):
        single.set_epoch(int(epoch))
        whole = list(single)
        assert [a + b for a, b in zip(halves[0][epoch], halves[1][epoch], strict=True)] == whole
        for key, batch in single.global_batches():  # None: pooled from groups' remainders
            if key is not None:
                assert {bisect_right(plan["edges"], measured[i]) for i in batch} == {key[1]}
        assert history["epochs"][int(epoch) - 1]["mixed_batches"] == single.mixed_batches() < 4


def test_main_first_under_torchrun_runs_the_main_process_alone_and_first(tmp_path):
    """``main_first`` is called before anything joined the process group (as in
    ``retrieval_lib.course.experiment.main``): rank 0 fills the caches alone, then rank 1
    follows."""
    log = tmp_path / "log.txt"
    done = _torchrun("main_first_worker.py", str(log), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert log.read_text().splitlines() == ["start 0 main=True", "end 0",
                                            "start 1 main=False", "end 1"]
