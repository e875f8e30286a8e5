import math

import pytest
import torch
import torch.nn.functional as F

from retrieval_lib.models import losses


def _loop_info_nce(q, p, tau):
    """Independent reference: the seed's formula with explicit sums over Python floats."""
    n, m = q.shape[0], p.shape[0]
    k1 = m // n
    total = 0.0
    for i in range(n):
        s = [float(q[i] @ p[j]) / tau for j in range(m)]
        pos = s[i * k1]
        total += -(pos - math.log(sum(math.exp(x) for x in s)))
    return total / n


def test_hand_worked_losses():
    # N=1, K=1, tau=1: s = [1, 0] -> log(1 + e^-1)
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.info_nce(q, p, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)
    # N=2, K=0, tau=0.5: scores [[2,0],[0,2]] -> each log(1 + e^-2) = 0.126928
    q2 = torch.eye(2)
    assert losses.info_nce(q2, torch.eye(2), 0.5).item() == pytest.approx(0.126928, abs=1e-6)
    # N=2, K=1, tau=1: query 0 scores [1, 0, 0, 0] -> log(1 + 3/e) = 0.741537;
    # query 1 = (0,1) against p = [(1,0), (0,1), (0,-1)... ] worked below
    p3 = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 1.0], [1.0, 0.0]])
    q3 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # query 0: s = [1, 0, 0, 1], positive col 0 -> log((2e + 2)/e) = log(2 + 2/e)
    # query 1: s = [0, -1, 1, 0], positive col 2 -> log((1 + e^-1 + e + 1)/e)
    expected = (math.log(2 + 2 / math.e) + math.log((2 + math.exp(-1) + math.e) / math.e)) / 2
    assert losses.info_nce(q3, p3, 1.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n,k,tau", [(1, 0, 0.05), (3, 2, 0.05), (4, 3, 0.2), (5, 1, 1.0)])
def test_matches_independent_implementations(n, k, tau):
    g = torch.Generator().manual_seed(n * 10 + k)
    q = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(n * (1 + k), 16, generator=g, dtype=torch.float64), dim=-1)
    ours = losses.info_nce(q, p, tau).item()
    assert ours == pytest.approx(_loop_info_nce(q, p, tau), abs=1e-6)
    # cross-entropy written out with logsumexp on the full score matrix
    s = q @ p.T / tau
    cols = torch.arange(n) * (1 + k)
    ce = (torch.logsumexp(s, 1) - s[torch.arange(n), cols]).mean().item()
    assert ours == pytest.approx(ce, abs=1e-6)


def test_analytic_gradients_equal_autograd():
    for n, k, tau in [(2, 1, 0.05), (6, 3, 0.1), (3, 0, 1.0)]:
        q, p = losses.random_batch(n, k, 8, seed=n + k)
        # autograd of the score matrix through a cross-entropy written here, not the library's
        s = (q @ p.T).requires_grad_(True)
        labels = torch.arange(n) * (1 + k)
        F.cross_entropy(s / tau, labels).backward()
        analytic = losses.info_nce_score_gradients(q, p, tau)
        assert torch.allclose(analytic, s.grad, rtol=0, atol=1e-12)
        assert torch.allclose(losses.autograd_score_gradients(q, p, tau), s.grad, rtol=0,
                              atol=1e-15)
        # the rows sum to zero: the positive's pull equals the negatives' total push
        assert torch.allclose(analytic.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-12)
        assert (analytic[torch.arange(n), labels] < 0).all()


def test_temperature_limits():
    q = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1)
    p = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    # tau -> infinity: every candidate equally likely, loss -> log(N(1+K))
    assert losses.info_nce(q, p, 1e6).item() == pytest.approx(math.log(4), abs=1e-5)
    # tau -> 0 with the positive strictly best (but tied with a duplicate): loss -> log 2
    assert losses.info_nce(q, p, 1e-4).item() == pytest.approx(math.log(2), abs=1e-5)
    # tau -> 0 with a unique best positive: loss -> 0
    p_unique = F.normalize(torch.tensor([[1.0, 0.0], [0.3, -1.0], [0.0, 1.0], [1.0, -0.3]]),
                           dim=-1)
    assert losses.info_nce(q, p_unique, 1e-3).item() < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        losses.info_nce(q, p, 0.0)


def test_layout_errors():
    with pytest.raises(ValueError, match="do not divide"):
        losses.info_nce(torch.zeros(3, 2), torch.zeros(4, 2), 0.1)


def test_gradient_descent_moves_positives_up_and_negatives_down():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 8, generator=g)
    p = torch.randn(4 * 3, 8, generator=g)
    hist = losses.optimise_embeddings(q, p, temperature=0.1, steps=15, lr=0.05)
    assert len(hist) == 16 and hist[0]["step"] == 0
    assert hist[-1]["loss"] < hist[0]["loss"] / 2
    assert hist[-1]["mean_positive_similarity"] > hist[0]["mean_positive_similarity"] + 0.2
    assert hist[-1]["mean_negative_similarity"] < hist[0]["mean_negative_similarity"]


def test_random_batch_layout_and_closeness():
    q, p = losses.random_batch(3, 2, 64, seed=0, positive_noise=0.5, hard_negative_noise=1.5)
    assert q.shape == (3, 64) and p.shape == (9, 64)
    s = q @ p.T
    for i in range(3):
        pos, hard = s[i, 3 * i], s[i, 3 * i + 1:3 * i + 3]
        others = torch.cat([s[i, :3 * i], s[i, 3 * i + 3:]])
        assert pos > hard.min() and hard.min() > others.abs().max()
    q2, p2 = losses.random_batch(3, 2, 64, seed=0)
    assert torch.equal(q, q2) and (q2 @ p2.T).abs().max() < 0.6


def test_gradients_through_the_retrievers_normalisation_equal_autograd(tok):
    """∂L/∂u for the projection outputs u of a real DualTowerRetriever (float64), through its
    L2 normalisation: the analytic chain rule equals autograd, for queries and passages."""
    from toy import toy_model

    model = toy_model(tok).double().eval()
    n, k, tau = 3, 2, 0.05
    queries = [f"长江新闻{i}" for i in range(n)]
    passages = [f"黄河报道{i}，足球。" for i in range(n * (1 + k))]
    encoded = {t: model.tokenize(texts, t) for t, texts in (("query", queries),
                                                          ("passage", passages))}
    outputs = {}

    def keep(tower):
        def hook(module, args, out):
            out.retain_grad()
            outputs[tower] = out
        return hook

    # the projection's outputs are the vectors before the normalisation inside model.embed
    handle = model.query_projection.register_forward_hook(keep("query"))
    q = model.embed(encoded["query"]["input_ids"], encoded["query"]["attention_mask"], "query")
    handle.remove()
    handle = model.passage_projection.register_forward_hook(keep("passage"))
    p = model.embed(encoded["passage"]["input_ids"], encoded["passage"]["attention_mask"],
                    "passage")
    handle.remove()
    assert q.dtype == torch.float64  # the head keeps the model's precision here
    losses.info_nce(q, p, tau).backward()
    analytic_q, analytic_p = losses.info_nce_embedding_gradients(
        outputs["query"].detach(), outputs["passage"].detach(), tau)
    torch.testing.assert_close(analytic_q, outputs["query"].grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(analytic_p, outputs["passage"].grad, atol=1e-10, rtol=0)
    # the normalisation removes the radial part: each gradient is orthogonal to its vector
    assert (analytic_q * outputs["query"].detach()).sum(-1).abs().max() < 1e-12


def test_half_precision_scores_are_divided_and_softmaxed_in_float32():
    """Under autocast the embeddings and their dot products are bf16 or fp16; the loss divides
    by τ and takes the softmax in float32 (bf16 keeps 8 bits of mantissa: at τ = 0.05 a score
    moves by up to 0.08 in logit units when rounded after the division)."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    p = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
    for half in (torch.bfloat16, torch.float16):
        qh, ph = q.to(half), p.to(half)
        loss = losses.info_nce(qh, ph, 0.05)
        assert loss.dtype == torch.float32
        scores = (qh @ ph.T).float() / 0.05  # the half product, upcast before the division
        expected = F.cross_entropy(scores, losses.positive_columns(6, 12))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_an_empty_batch_and_a_zero_temperature_are_refused_with_their_reason():
    """Zero queries is refused by name (not a ZeroDivisionError from ``% 0``), and τ = 0 (the
    boundary: s/τ would be infinite) as well as a negative τ, with the value in the message."""
    with pytest.raises(ValueError, match="do not divide into 0 groups"):
        losses.positive_columns(0, 4)
    for tau in (0.0, -0.05):
        with pytest.raises(ValueError, match=f"temperature must be positive, got {tau}"):
            losses.InfoNCELoss(tau)


def test_random_batch_draws_the_query_first_then_the_passages_and_mixes_by_the_noise():
    """The seeded draws notebook 02 rests on: ``q`` is the first (N, d) normal draw of the
    seed's generator, normalised, in float64; the passages the second, (N, 1+K, d). Without
    noise they are that draw normalised; with noise the positive (column 0) / hard negatives
    (columns 1..K) of query i are normalize(q_i + noise·normalize(draw))."""
    n, k, d, seed = 3, 2, 16, 5
    g = torch.Generator().manual_seed(seed)
    q_draw = torch.randn(n, d, generator=g, dtype=torch.float64)
    p_draw = torch.randn(n, 1 + k, d, generator=g, dtype=torch.float64)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    q, p = losses.random_batch(n, k, d, seed)
    assert q.dtype == p.dtype == torch.float64 and p.shape == (n * (1 + k), d)
    torch.testing.assert_close(q, unit(q_draw), rtol=0, atol=1e-12)
    torch.testing.assert_close(p, unit(p_draw).reshape(-1, d), rtol=0, atol=1e-12)
    q, p = losses.random_batch(n, k, d, seed, positive_noise=0.3, hard_negative_noise=2.0)
    mixed = torch.cat([unit(q_draw)[:, None] + 0.3 * unit(p_draw[:, :1]),
                       unit(q_draw)[:, None] + 2.0 * unit(p_draw[:, 1:])], dim=1)
    torch.testing.assert_close(p, unit(mixed).reshape(-1, d), rtol=0, atol=1e-12)
    # one of the two noises alone leaves the other columns as drawn
    _, p = losses.random_batch(n, k, d, seed, hard_negative_noise=2.0)
    rows = p.reshape(n, 1 + k, d)
    torch.testing.assert_close(rows[:, 0], unit(p_draw[:, 0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(rows[:, 1:], unit(mixed[:, 1:]), rtol=0, atol=1e-12)
    q32, _ = losses.random_batch(n, k, d, seed, dtype=torch.float32)
    assert q32.dtype == torch.float32


def _descent_by_hand(q, p, tau, steps, lr):
    """Plain gradient descent on raw q, p (normalised inside the loss), written from the
    definition: cross-entropy of the similarities / τ against each query's positive column."""
    q, p = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
    n, group = q.shape[0], p.shape[0] // q.shape[0]
    target = torch.arange(n) * group
    rows = []
    for step in range(steps + 1):
        s = F.normalize(q, dim=1) @ F.normalize(p, dim=1).T
        loss = F.cross_entropy(s / tau, target)
        positive = torch.zeros_like(s, dtype=torch.bool)
        positive[torch.arange(n), target] = True
        rows.append((step, loss.item(), s[positive].mean().item(), s[~positive].mean().item()))
        gq, gp = torch.autograd.grad(loss, (q, p))
        q = (q - lr * gq).detach().requires_grad_(True)
        p = (p - lr * gp).detach().requires_grad_(True)
    return rows


@pytest.mark.parametrize("kwargs", [{}, {"steps": 3, "lr": 0.05}])
def test_optimise_embeddings_equals_gradient_descent_by_hand(kwargs):
    """Every step's loss and mean positive / negative similarity, float64, with the defaults
    (20 steps, lr 0.5) and other settings; the inputs are left as they were."""
    q, p = losses.random_batch(3, 1, 8, seed=2)
    before = (q.clone(), p.clone())
    history = losses.optimise_embeddings(q, p, 0.1, **kwargs)
    expected = _descent_by_hand(q, p, 0.1, kwargs.get("steps", 20), kwargs.get("lr", 0.5))
    got = [(h["step"], h["loss"], h["mean_positive_similarity"], h["mean_negative_similarity"])
           for h in history]
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        assert row == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert torch.equal(q, before[0]) and torch.equal(p, before[1])
