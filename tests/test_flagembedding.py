"""The library's training loss against FlagEmbedding's, the code that trains BGE-M3 and turns
decoder LLMs into embedders (``FlagEmbedding.finetune.embedder.decoder_only.base``, 1.4).

Both compute InfoNCE over in-batch and hard negatives on L2-normalised embeddings, with each
query's group laid out as ``[positive, negative_1 … negative_K]`` and its label at column
``i·(1+K)``. Where they differ, the tests state it:

- the temperature: FlagEmbedding's model defaults to τ = 1 and its training arguments to 0.02;
  the library's ``TrainingConfig`` to 0.05. The tests pass the same τ to both;
- the head: the library projects the pooled state (``projection_dim``); FlagEmbedding's model
  has no head. With the projection set to the identity the two models are the same function;
- cross-device negatives (``test_distributed.py``): FlagEmbedding gathers the queries too and
  every process averages over all queries with gradients through its own share only, so after
  DDP's averaging its gradient is 1/world of the single-process gradient of the global batch;
  the library's equals it (AdamW's update is unchanged by a constant factor, up to its ε).
"""


import numpy as np
import pytest
import torch
from FlagEmbedding.finetune.embedder.decoder_only.base import modeling
from toy import toy_model, toy_records, toy_tokenizer

from retrieval_lib.models import InfoNCELoss, info_nce
from retrieval_lib.settings import config

TAU = 0.05


def flag_model(encoder, temperature=TAU, pooling="last_token"):
    """FlagEmbedding's decoder-only embedder over ``encoder``, as its runner builds it with
    ``--sentence_pooling_method last_token --normalize_embeddings True`` (one process)."""
    model = modeling.BiDecoderOnlyEmbedderModel(
        encoder, temperature=temperature, sentence_pooling_method=pooling,
        normalize_embeddings=True)
    return model.train()


def retriever(tok):
    """The tests' one-layer MiniMind-shaped retriever, pooling the last token (as FlagEmbedding
    does for decoder LLMs) into a head as wide as the model."""
    return toy_model(tok, seed=1, projection_dim=32, pooling="last_token")


def identity_head(retriever):
    """Make the retriever's projection the identity, so that it computes what a head-less
    FlagEmbedding model computes on the same encoder."""
    with torch.no_grad():
        retriever.query_projection.weight.copy_(torch.eye(retriever.projection_dim))
        retriever.query_projection.bias.zero_()
    return retriever


def batch(retriever, n=4, k=2):
    records = toy_records(n, seed=3, k=k)
    queries = [r["query"] for r in records]
    passages = [t for r in records for t in
                [r["positive_passages"][0]["text"]] + [p["text"] for p in r["negative_passages"]]]
    return retriever.tokenize(queries, "query"), retriever.tokenize(passages, "passage")


def encoder_gradients(loss, encoder):
    encoder.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_loss_and_its_gradients_equal_flagembeddings_on_one_batch(padding_side):
    """Same weights, same token ids, float32: the loss within 1e-5 and every encoder weight's
    gradient within 1e-5 (absolute; the largest are ~1e-1), for both padding sides (FlagEmbedding
    finds the last token by the attention mask's sum under right padding, by position -1 under
    left padding; the library by the last attended position)."""
    tok = toy_tokenizer()
    tok.padding_side = padding_side
    ours = identity_head(retriever(tok)).train()
    queries, passages = batch(ours)
    assert queries["attention_mask"].float().mean() < 1 and passages["attention_mask"].float(
    ).mean() < 1  # both sides padded: the pooling positions differ from -1
    theirs = flag_model(ours.encoder)

    loss_ours = InfoNCELoss(TAU)(ours, queries, passages).loss
    grads_ours = encoder_gradients(loss_ours, ours.encoder)
    loss_theirs = theirs(queries=queries, passages=passages).loss
    grads_theirs = encoder_gradients(loss_theirs, ours.encoder)

    assert loss_ours.item() == pytest.approx(loss_theirs.item(), abs=1e-5)
    assert loss_ours.item() > 0.1  # not a degenerate batch
    assert grads_ours.keys() == grads_theirs.keys()
    largest = max(g.abs().max().item() for g in grads_ours.values())
    assert largest > 1e-3
    for name, g in grads_ours.items():
        torch.testing.assert_close(g, grads_theirs[name], atol=1e-5, rtol=0, msg=name)


def test_the_scores_and_labels_equal_flagembeddings_for_given_embeddings():
    """The loss of given unit vectors (what GradCache differentiates): FlagEmbedding's
    in-batch-negatives loss with its group size read from the shapes, the library's with the
    positive of query i at column i·(1+K); and at τ = 1, FlagEmbedding's model default."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(15, 8, generator=g), dim=-1)
    for tau in (TAU, 1.0):
        scores, loss = flag_model(torch.nn.Identity(), tau)._compute_in_batch_neg_loss(q, p)
        assert scores.shape == (5, 15)
        assert info_nce(q, p, tau).item() == pytest.approx(loss.item(), abs=1e-6)
    # a different τ is a different loss: the comparison would notice a τ that did not reach it
    _, other = flag_model(torch.nn.Identity(), 0.02)._compute_in_batch_neg_loss(q, p)
    assert abs(info_nce(q, p, TAU).item() - other.item()) > 0.1


# -- interop: an exported retriever in FlagEmbedding's inference classes ---------------------

QUERIES = ["长江防汛", "足球联赛今天开幕了吗，观众多不多，票价多少", "新年音乐会"]
PASSAGES = ["长江流域今年防汛形势严峻，各地加强巡查。" * 3, "黄河下游引水灌溉", "足球联赛今天开幕",
            "新年音乐会在北京举行，观众反响热烈。" * 4]


def exported_pair(tmp_path, base, pooling, instruction, padding_side="right"):
    from retrieval_lib.data import tokenizer
    from retrieval_lib.serving import export_flagembedding, load_flagembedding

    tok = tokenizer.train_bpe_tokenizer((QUERIES + PASSAGES) * 5, vocab_size=300)
    tok.padding_side = padding_side
    model = toy_model(tok, base=base, num_hidden_layers=2, max_query_length=8,
                      max_passage_length=24, pooling=pooling,
                      query_instruction=instruction).eval()
    with torch.no_grad():  # a bias that matters: the projection's must reach FlagEmbedding
        model.query_projection.bias.normal_(0, 0.5)
    return model, load_flagembedding(export_flagembedding(model, tmp_path / "flag"))


@pytest.mark.parametrize("base, pooling, instruction, padding_side, flag_class", [
    (config.MINIMIND_27M, "mean", "", "right", "BaseEmbedder"),
    (config.QWEN2_05B, "last_token", "", "left", "BaseLLMEmbedder"),
    (config.QWEN2_05B, "last_token", "检索相关文章：", "right", "BaseLLMEmbedder"),
    (config.MINIMIND_27M, "cls", "检索：", "right", "BaseEmbedder")],
    ids=["llama-mean", "qwen2-last-token-left", "qwen2-instruction", "llama-cls-instruction"])
def test_flagembeddings_inference_classes_give_the_retrievers_vectors(
        tmp_path, base, pooling, instruction, padding_side, flag_class):
    """FlagModel / FlagLLMModel (whichever fits the pooling) load the exported folder and give
    the library's query and passage vectors, cosine ≥ 0.9999, with queries and passages longer
    than their maximum lengths (8 and 24 tokens) cut as the retriever cuts them."""
    model, flag = exported_pair(tmp_path, base, pooling, instruction, padding_side)
    assert type(flag).__name__ == flag_class
    assert max(len(x) for x in model.tokenize(QUERIES, "query")["input_ids"]) == 8
    assert max(len(x) for x in model.tokenize(PASSAGES, "passage")["input_ids"]) == 24
    for theirs, ours in ((flag.encode_queries(QUERIES), model.encode_queries(QUERIES)),
                         (flag.encode_corpus(PASSAGES), model.encode_passages(PASSAGES))):
        cosine = (np.asarray(theirs) * np.asarray(ours)).sum(1)
        assert cosine.min() >= 0.9999, cosine


def test_the_settings_file_is_what_makes_the_vectors_equal(tmp_path):
    """FlagLLMModel's own defaults (its instruction format "Instruct: {}\\nQuery: {}", float16
    weights) give other query vectors: the exported keyword arguments are needed."""
    import FlagEmbedding

    model, _ = exported_pair(tmp_path, config.QWEN2_05B, "last_token", "检索相关文章：")
    ours = np.asarray(model.encode_queries(QUERIES))
    default = FlagEmbedding.FlagLLMModel(
        str(tmp_path / "flag"), trust_remote_code=True, query_max_length=8,
        query_instruction_for_retrieval="检索相关文章：").encode_queries(QUERIES)
    assert (np.asarray(default) * ours).sum(1).min() < 0.999


def test_what_one_flagembedding_model_cannot_hold_is_refused(tmp_path):
    from retrieval_lib.data import tokenizer
    from retrieval_lib.serving import export_flagembedding

    tok = tokenizer.train_bpe_tokenizer(QUERIES * 5, vocab_size=200)
    model = toy_model(tok, separate_projections=True)
    with pytest.raises(ValueError, match="separate query and passage projections"):
        export_flagembedding(model, tmp_path / "flag")
    assert not (tmp_path / "flag").exists()
