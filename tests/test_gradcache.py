"""GradCache: the cached step gives the plain full-batch step's loss and gradients."""

from dataclasses import replace

import pytest
import torch

from retrieval_lib.data import tokenizer
from retrieval_lib.models import DualTowerRetriever, cached_contrastive_step, info_nce, split_inputs
from retrieval_lib.settings import config

TEXTS = ["长江流域今年防汛形势严峻", "黄河下游引水灌溉", "足球联赛今天开幕", "新年音乐会在北京举行",
         "铁路春运客流创新高", "港口吞吐量稳步增长", "农业生产喜获丰收", "气象部门发布寒潮预警"]


def _model(dropout: float, separate_projections: bool = False):
    tok = tokenizer.train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok),
                  max_query_length=12, max_passage_length=24, projection_dim=16,
                  separate_projections=separate_projections)
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
    model.encoder.config.attention_dropout = dropout
    for layer in model.encoder.layers:
        layer.self_attn.attention_dropout = dropout
    return model.train()


def _assert_gradients(model, expected, factor=1):
    """Every parameter's gradient equals ``factor`` times the reference's, by name."""
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, factor * expected[name], atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_split_inputs_covers_every_row_once():
    inputs = {"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2)}
    chunks = list(split_inputs(inputs, 2))
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks]), inputs["input_ids"])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_cached_step_equals_the_full_batch_step(dropout, chunk):
    model = _model(dropout)
    qi = model.tokenize(TEXTS[:4], "query")  # 4 queries, 2 passages each (K = 1)
    pi = model.tokenize(TEXTS, "passage")

    def loss_fn(q, p):
        return info_nce(q, p, 0.05)

    torch.manual_seed(7)
    if dropout:
        # dropout masks depend on how the batch is split, so the reference embeds the same
        # chunks in the same order, with an autograd graph: the replayed masks must match them
        q = torch.cat([model.embed(c["input_ids"], c["attention_mask"], "query")
                       for c in split_inputs(qi, chunk)])
        p = torch.cat([model.embed(c["input_ids"], c["attention_mask"], "passage")
                       for c in split_inputs(pi, chunk)])
        plain = loss_fn(q, p)
    else:
        plain = loss_fn(*model(qi, pi))
    plain.backward()
    expected = {n: t.grad.clone() for n, t in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    cached = cached_contrastive_step(model, qi, pi, loss_fn, chunk_size=chunk)
    assert cached.item() == pytest.approx(plain.item(), abs=1e-6)
    _assert_gradients(model, expected)


def test_scale_is_carried_through_and_bad_chunks_refused():
    model = _model(0.0)
    qi, pi = model.tokenize(TEXTS[:2], "query"), model.tokenize(TEXTS[:4], "passage")

    def loss_fn(q, p):
        return info_nce(q, p, 0.05)

    cached_contrastive_step(model, qi, pi, loss_fn, 2)
    once = model.query_projection.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    cached_contrastive_step(model, qi, pi, loss_fn, 2, scale=lambda loss: 8 * loss)
    torch.testing.assert_close(model.query_projection.weight.grad, 8 * once)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        cached_contrastive_step(model, qi, pi, loss_fn, 0)


def test_a_token_budget_chunks_only_the_batches_that_exceed_it():
    """``GradCacheLoss(token_budget=B)``: a batch whose passages fill at most B positions runs
    whole (the inner loss, its own backward); a longer one is embedded in chunks of
    ``B // padded length`` texts, counted, with the loss and gradients of the whole batch."""
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0)
    qi, pi = model.tokenize(TEXTS[:4], "query"), model.tokenize(TEXTS, "passage")
    rows, width = pi["input_ids"].shape  # 8 passages
    fits = GradCacheLoss(InfoNCELoss(0.05), token_budget=rows * width)
    assert fits.chunk_rows(pi) is None
    out = fits(model, qi, pi)
    assert not out.backward_done and fits.sub_batched_steps == 0
    out.loss.backward()
    expected = {n: t.grad.clone() for n, t in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    budget = 3 * width + width // 2  # three passages fit, not four
    tight = GradCacheLoss(InfoNCELoss(0.05), token_budget=budget)
    assert tight.chunk_rows(pi) == 3
    chunked = tight(model, qi, pi)
    assert chunked.backward_done and tight.sub_batched_steps == 1
    assert chunked.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    _assert_gradients(model, expected)
    assert GradCacheLoss(InfoNCELoss(0.05), token_budget=1).chunk_rows(pi) == 1
    with pytest.raises(ValueError, match="must be positive"):
        GradCacheLoss(InfoNCELoss(0.05))


def _plain_step(model, qi, pi):
    """Loss and gradients of the inner loss on the whole batch (its own backward)."""
    from retrieval_lib.models import InfoNCELoss

    model.zero_grad(set_to_none=True)
    out = InfoNCELoss(0.05)(model, qi, pi)
    out.loss.backward()
    grads = {n: t.grad.clone() for n, t in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


class _Entered:
    """A context manager that counts how often it is entered (autocast's and no_sync's place)."""

    def __init__(self):
        self.times = 0

    def __enter__(self):
        self.times += 1

    def __exit__(self, *exc):
        return False


def test_a_chunk_size_chunks_every_batch_and_is_not_sub_batching():
    """``chunk_size`` fixes the chunks (GradCache as configured), whatever the batch; only the
    token budget's chunking is BGE-M3's sub-batching, counted in ``sub_batched_steps``."""
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0)
    qi, pi = model.tokenize(TEXTS[:4], "query"), model.tokenize(TEXTS, "passage")
    loss, expected = _plain_step(model, qi, pi)
    fixed = GradCacheLoss(InfoNCELoss(0.05), chunk_size=3, token_budget=10**6)
    assert fixed.chunk_rows(pi) == 3
    out = fixed(model, qi, pi)
    assert out.backward_done and fixed.sub_batched_steps == 0
    assert out.loss.item() == pytest.approx(loss, abs=1e-6)
    _assert_gradients(model, expected)


def test_the_token_budget_boundary_and_bad_settings():
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0)
    pi = model.tokenize(TEXTS, "passage")
    rows, width = pi["input_ids"].shape
    assert GradCacheLoss(InfoNCELoss(0.05), token_budget=rows * width).chunk_rows(pi) is None
    # one position short: as many whole texts as the budget holds
    assert GradCacheLoss(InfoNCELoss(0.05),
                         token_budget=rows * width - 1).chunk_rows(pi) == rows - 1
    for chunk_size, budget in ((-1, 5), (5, -1), (0, 0)):
        with pytest.raises(ValueError, match=f"got {chunk_size} and {budget}"):
            GradCacheLoss(InfoNCELoss(0.05), chunk_size=chunk_size, token_budget=budget)


def test_the_cached_step_runs_every_pass_under_autocast_and_carries_the_scale():
    """Queries 4 in chunks of 3 (2 chunks), passages 8 (3 chunks): 5 embeddings without a graph
    and the same 5 again with one, each inside the autocast context; the scale multiplies every
    gradient."""
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0)
    qi, pi = model.tokenize(TEXTS[:4], "query"), model.tokenize(TEXTS, "passage")
    _, expected = _plain_step(model, qi, pi)
    autocast = _Entered()
    GradCacheLoss(InfoNCELoss(0.05), chunk_size=3)(model, qi, pi, autocast=autocast,
                                                   scale=lambda loss: 4 * loss)
    assert autocast.times == 10
    _assert_gradients(model, expected, factor=4)


def test_under_a_ddp_wrapper_the_chunks_run_without_its_hooks_on_the_wrapped_model():
    """A DDP-wrapped model (here a stand-in with ``module`` and ``no_sync``, no process group):
    the chunked passes run on the wrapped module inside one ``no_sync`` (DDP's hooks would
    all-reduce after every chunk's backward); without a process group nothing is averaged."""
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0)
    qi, pi = model.tokenize(TEXTS[:4], "query"), model.tokenize(TEXTS, "passage")
    loss, expected = _plain_step(model, qi, pi)
    sync = _Entered()

    class Wrapper:
        module = model

        def no_sync(self):
            return sync

    out = GradCacheLoss(InfoNCELoss(0.05), chunk_size=3)(Wrapper(), qi, pi)
    assert sync.times == 1 and out.backward_done
    assert out.loss.item() == pytest.approx(loss, abs=1e-6)
    _assert_gradients(model, expected)


def test_each_tower_keeps_its_projection_in_both_passes():
    """With one projection per tower, queries and passages must be embedded by their own tower
    in the graph-free pass and in the replay, or the loss and gradients change."""
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0, separate_projections=True)
    qi, pi = model.tokenize(TEXTS[:4], "query"), model.tokenize(TEXTS, "passage")
    loss, expected = _plain_step(model, qi, pi)
    out = GradCacheLoss(InfoNCELoss(0.05), chunk_size=3)(model, qi, pi)
    assert out.loss.item() == pytest.approx(loss, abs=1e-6)
    _assert_gradients(model, expected)
    assert model.passage_projection.weight.grad.abs().sum() > 0


def test_a_batch_within_the_budget_runs_whole_under_autocast_and_chunked_steps_add_up():
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    model = _model(0.0)
    qi, pi = model.tokenize(TEXTS[:4], "query"), model.tokenize(TEXTS, "passage")
    rows, width = pi["input_ids"].shape
    autocast = _Entered()
    whole = GradCacheLoss(InfoNCELoss(0.05), token_budget=rows * width)
    assert not whole(model, qi, pi, autocast=autocast).backward_done
    assert autocast.times == 1  # the inner loss's one forward pass
    tight = GradCacheLoss(InfoNCELoss(0.05), token_budget=width)
    for _ in range(2):
        tight(model, qi, pi)
    assert tight.sub_batched_steps == 2


def test_one_token_passages_are_chunked_by_the_budget_itself():
    from retrieval_lib.models import GradCacheLoss, InfoNCELoss

    one_token = {"input_ids": torch.zeros(8, 1, dtype=torch.long)}
    assert GradCacheLoss(InfoNCELoss(0.05), token_budget=3).chunk_rows(one_token) == 3


def test_the_random_state_helpers_carry_the_cuda_generator_of_a_cuda_device(monkeypatch):
    """GPU-only: on a CUDA device the CUDA generator's state is saved and restored with the
    CPU's, for that device (CUDA stand-ins record the calls; no GPU is needed)."""
    from retrieval_lib.models import gradcache

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: ("cuda state", device))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append((state, device)))
    gpu = torch.device("cuda", 1)
    cpu_state, cuda_state = gradcache._rng_state(gpu)
    assert torch.equal(cpu_state, torch.get_rng_state()) and cuda_state == ("cuda state", gpu)
    assert gradcache._rng_state(torch.device("cpu"))[1] is None
    torch.manual_seed(3)
    saved = torch.get_rng_state()
    torch.rand(5)
    gradcache._set_rng_state((saved, "saved cuda state"), gpu)
    assert torch.equal(torch.get_rng_state(), saved) and calls == [("saved cuda state", gpu)]
    gradcache._set_rng_state((saved, None), torch.device("cpu"))
    assert len(calls) == 1
