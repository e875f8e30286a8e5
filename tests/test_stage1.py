"""Stage 1 (retrieval-oriented pretraining): RetroMAE's masks and loss, the pair miners, the
texts they may read, the stage runs (resume, reuse, composition) and the full preset's path."""

import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch
from published_formats import write_bge_m3_data, write_minimind_v1
from toy import toy_records

from retrieval_lib import data
from retrieval_lib.course import experiment, stage1
from retrieval_lib.data import pairs
from retrieval_lib.models import DualTowerRetriever, retromae
from retrieval_lib.settings import config
from retrieval_lib.training import stage1 as loop


def _llama(arch="llama", vocab=40, hidden=32, heads=4, kv=2):
    from transformers import AutoModel, LlamaConfig, Qwen2Config

    cls = LlamaConfig if arch == "llama" else Qwen2Config
    cfg = cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
              num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=48,
              attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModel.from_config(cfg)


# -- masks ----------------------------------------------------------------------------------


def test_make_batch_masks_what_retromae_masks():
    g = torch.Generator().manual_seed(0)
    b = retromae.make_batch([[4, 5, 6, 7, 8, 9, 2], [1, 10, 11, 2]], pad_id=0, mask_id=3,
                            special_ids={1, 2}, encoder_ratio=0.3, decoder_ratio=0.5,
                            generator=g)
    # maskable: real tokens after position 0 (its key slot holds the embedding, special or
    # not) that are not special -> 5 and 2 tokens;
    # the encoder masks round(0.3 * 5) = 2 and max(1, round(0.3 * 2)) = 1 of them
    assert (b.encoder_labels != -100).sum(1).tolist() == [2, 1]
    masked = b.encoder_labels != -100
    assert (b.encoder_input_ids[masked] == 3).all()
    assert (b.encoder_labels[masked] == b.input_ids[masked]).all()
    assert (b.encoder_input_ids[~masked] == b.input_ids[~masked]).all()
    assert b.decoder_labels.tolist() == [[-100, 5, 6, 7, 8, 9, -100],
                                         [-100, 10, 11, -100, -100, -100, -100]]
    assert b.attention_mask.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]


def test_decoder_visibility_keeps_the_embedding_hides_self_and_padding():
    maskable = torch.tensor([[False, True, True, True, False]])  # slot 0, 3 tokens, padding
    g = torch.Generator().manual_seed(0)
    none_hidden = retromae.decoder_visibility(maskable, 0.0, g)[0]
    # ratio 0: every row sees slot 0 and every other real token, never itself or padding
    assert none_hidden.int().tolist() == [[1, 1, 1, 1, 0], [1, 0, 1, 1, 0], [1, 1, 0, 1, 0],
                                          [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    all_hidden = retromae.decoder_visibility(maskable, 1.0, g)[0]
    assert all_hidden.int().tolist() == [[1, 0, 0, 0, 0]] * 5
    big = torch.ones((1, 400), dtype=torch.bool)
    share = retromae.decoder_visibility(big, 0.5, g)[0, :, 1:].float().mean().item()
    assert abs(share - 0.5) < 0.01  # each other token hidden with probability 0.5


def test_mask_token_falls_back_to_unknown_then_padding():
    class Tok:
        mask_token_id, unk_token_id, pad_token_id = None, 7, 9
    assert retromae.mask_token_id(Tok()) == 7
    Tok.unk_token_id = None
    assert retromae.mask_token_id(Tok()) == 9


# -- the loss against an independent computation --------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_equals_the_library_layer_on_a_two_stream_sequence(arch):
    """Enhanced decoding, computed independently: the architecture's own decoder layer run on
    ``[kv stream; query stream]`` with positions ``[0..L-1, 0..L-1]`` and a 4-D mask in which
    query row i sees exactly the keys ``visible[i]`` gives the decoder's states."""
    encoder = _llama(arch)
    model = retromae.RetroMAE(encoder, "mean", seed=1)
    g = torch.Generator().manual_seed(3)
    b = retromae.make_batch([[1, 5, 6, 7, 8, 9, 2], [1, 10, 11, 12, 2]], 0, 3, {1, 2}, 0.3,
                            0.5, g)
    _, emb = model.sentence_embedding(b.encoder_input_ids, b.attention_mask)
    got = model.decode(emb, b.input_ids, b.decoder_visible)
    n = b.input_ids.shape[1]
    tokens = encoder.embed_tokens(b.input_ids)
    stream = torch.cat([emb[:, None], tokens[:, 1:]], 1)
    x = torch.cat([stream, emb[:, None].expand(-1, n, -1)], 1)
    positions = torch.cat([torch.arange(n), torch.arange(n)])[None].expand(2, -1)
    allowed = torch.zeros((2, 2 * n, 2 * n), dtype=torch.bool)
    allowed[:, :n, :n] = True  # the stream rows: anything (their outputs are not read)
    allowed[:, n:, :n] = b.decoder_visible
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]
    out = model.decoder(x, attention_mask=mask, position_ids=positions,
                        position_embeddings=encoder.rotary_emb(x, positions))
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(got, model.decoder_norm(out[:, n:]), atol=1e-5, rtol=1e-5)


def test_loss_is_the_two_cross_entropies_worked_out_position_by_position():
    encoder = _llama()
    model = retromae.RetroMAE(encoder, "mean", seed=1).eval()
    g = torch.Generator().manual_seed(5)
    b = retromae.make_batch([[1, 5, 6, 7, 8, 9, 2], [1, 10, 11, 12, 2]], 0, 3, {1, 2}, 0.3,
                            0.5, g)
    out = model(b)
    hidden = encoder(input_ids=b.encoder_input_ids, attention_mask=b.attention_mask
                     ).last_hidden_state
    embed = encoder.embed_tokens.weight
    enc, dec = [], []
    for row in range(2):
        for i in range(1, b.input_ids.shape[1]):
            target = b.encoder_labels[row, i].item()
            if target != -100:  # predicted by the state before it, from the masked text
                enc.append(-torch.log_softmax(hidden[row, i - 1] @ embed.T, -1)[target])
    mask = b.attention_mask[..., None].float()
    emb = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling over real tokens
    states = model.decode(emb, b.input_ids, b.decoder_visible)
    for row in range(2):
        for i in range(b.input_ids.shape[1]):
            target = b.decoder_labels[row, i].item()
            if target != -100:
                dec.append(-torch.log_softmax(states[row, i] @ embed.T, -1)[target])
    assert len(enc) == 3 and len(dec) == 8  # 2 + 1 masked; 5 + 3 rebuilt
    torch.testing.assert_close(out["encoder_loss"], torch.stack(enc).mean())
    torch.testing.assert_close(out["decoder_loss"], torch.stack(dec).mean())
    torch.testing.assert_close(out["loss"], out["encoder_loss"] + out["decoder_loss"])


def test_the_embedding_is_the_only_way_into_the_decoder_for_a_hidden_token():
    """With every other token hidden (decoder ratio 1), the decoder's states of one text do not
    depend on its tokens at all, only on the embedding: change a token, same states."""
    model = retromae.RetroMAE(_llama(), "mean", seed=1)
    emb = torch.randn(1, 32)
    visible = retromae.decoder_visibility(torch.tensor([[False, True, True, True]]), 1.0,
                                          torch.Generator().manual_seed(0))
    a = model.decode(emb, torch.tensor([[1, 5, 6, 7]]), visible)
    b = model.decode(emb, torch.tensor([[1, 9, 9, 9]]), visible)
    torch.testing.assert_close(a, b)
    c = model.decode(emb + 1, torch.tensor([[1, 5, 6, 7]]), visible)
    assert not torch.allclose(a, c)


# -- pair miners ----------------------------------------------------------------------------


def test_sentences_and_ict_pairs_by_hand():
    text = "甲说了话。乙回答？丙笑了！“好。”\n丁"
    assert pairs.sentences(text) == ["甲说了话。", "乙回答？", "丙笑了！", "“好。”", "丁"]

    class Fixed(random.Random):
        def randrange(self, n):
            return 1

        def random(self):
            return 0.5  # above keep_sentence: the sentence is taken out

    assert pairs.ict_pair(text, Fixed(), 0.1) == ("乙回答？", "甲说了话。丙笑了！“好。”丁")
    assert pairs.ict_pair(text, Fixed(), 0.9) == ("乙回答？", "甲说了话。乙回答？丙笑了！“好。”丁")
    assert pairs.ict_pair("只有一句。", Fixed()) is None


def test_crops_are_spans_of_the_text_within_the_ratio():
    text = "".join(chr(0x4E00 + i) for i in range(200))
    rng = random.Random(0)
    for _ in range(200):
        a, b = pairs.crop_pair(text, rng, (0.1, 0.5))
        for span in (a, b):
            assert span in text and 20 <= len(span) <= 100
    assert pairs.crop_pair("短文", rng) is None  # 2 characters < 2 x 4


def test_mine_pairs_counts_what_each_kind_gave_and_dropped():
    passages = [{"text": "第一句。第二句。第三句。"}, {"text": "只有一句没有句号"},
                {"text": "标题下的正文，足够长的一段。", "title": "标题"}, {"text": "短"}]
    records, report = pairs.mine_pairs(passages, pairs_per_text=2, seed=0)
    # crops: 3 texts of >= 8 characters x 2; ICT: only the first has two sentences (a comma
    # ends none), x 2; title: the third
    assert report == {"crop": {"pairs": 6, "too_short": 1}, "ict": {"pairs": 2,
                      "one_sentence": 3}, "title": {"pairs": 1, "no_title": 3}}
    title = [r for r in records if r["source"] == "title"]
    assert title == [{"query": "标题", "positive_passages": [{"text": passages[2]["text"]}],
                      "negative_passages": [], "source": "title"}]
    with pytest.raises(ValueError, match="unknown pair kind"):
        pairs.mine_pairs(passages, ["crops"])


def test_no_validation_or_test_article_reaches_a_mined_pair():
    train, val, test = toy_records(30, 0), toy_records(6, 1), toy_records(6, 2)
    for i, row in enumerate(train):  # distinct articles, so that only the planted ones leak
        row["positive_passages"][0]["text"] += f"第{i}篇训练文章的结尾。"
    leaked = val[0]["positive_passages"][0]["text"]
    train[3]["positive_passages"][0]["text"] = "  " + leaked + "\u200b"  # same after normalising
    train[4]["positive_passages"][0]["text"] = test[1]["positive_passages"][0]["text"]
    train[5]["positive_passages"][0]["text"] = train[6]["query"]  # a query is never a text
    train[7]["positive_passages"][0]["text"] = test[2]["query"]
    test[0]["negative_passages"][0]["text"] = train[8]["positive_passages"][0]["text"]
    kept, report = pairs.unlabeled_texts(train, [val, test])
    assert report["held_out_articles"] == 3 and report["queries"] == 1
    assert report["held_out_negatives"] == 1  # a training article the test lists as negative
    assert report["kept"] + report["held_out_articles"] + report["queries"] + report[
        "repeats"] == report["passages"] == 30
    forbidden = {data.normalise_text(t) for split in (val, test) for r in split
                 for t in [r["query"], *(p["text"] for p in r["positive_passages"])]}
    assert not {data.normalise_text(p["text"]) for p in kept} & forbidden
    records, _ = pairs.mine_pairs(kept, ("crop", "ict"), pairs_per_text=3)
    texts = [p["text"] for p in kept]
    for r in records:  # each pair comes from one kept article, whole spans or sentences
        query, positive = r["query"], r["positive_passages"][0]["text"]
        parts = [positive] if r["source"] == "crop" else pairs.sentences(positive)
        assert any(query in t and all(part in t for part in parts) for t in texts), r


# -- the stage-1a loop ----------------------------------------------------------------------


_STAGE1_CONFIG = config.Stage1Config  # the tests below replace the full preset's defaults


def _stage_cfg(**kw):
    base = dict(retromae_steps=6, retromae_batch_size=4, retromae_learning_rate=1e-3,
                retromae_max_length=24, eval_every=3, checkpoint_steps=2, heldout_fraction=0.2,
                pairs_per_text=1, contrastive_epochs=1, contrastive_batch_size=4,
                contrastive_learning_rate=1e-3)
    base.update(kw)
    return _STAGE1_CONFIG(**base)


def _texts(n=20):
    return [p["text"] for r in toy_records(n, 0) for p in r["positive_passages"]]


def test_windows_cover_long_texts_and_count_short_tails(tok):
    ids = tok(["长江黄河" * 20], add_special_tokens=False)["input_ids"][0]
    windows, short = loop.token_windows(tok, ["长江黄河" * 20], 10, append_eos=True)
    assert [w[:-1] for w in windows] == [ids[i:i + 9] for i in range(0, len(ids), 9)
                                         if len(ids[i:i + 9]) >= loop.MIN_WINDOW_TOKENS]
    assert all(w[-1] == tok.eos_token_id and len(w) <= 10 for w in windows)
    assert short == sum(len(ids[i:i + 9]) < loop.MIN_WINDOW_TOKENS
                        for i in range(0, len(ids), 9))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_killed_retromae_run_resumes_bit_identically(tok, tmp_path, monkeypatch, precision):
    """fp16 is the GPU's path without native bf16 (autocast and a loss scaler, whose state
    the checkpoint carries); autocast runs it on the CPU too."""
    from transformers import AutoModel, LlamaConfig

    def encoder():
        torch.manual_seed(0)
        return AutoModel.from_config(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=48))

    class EagerScaler(torch.amp.GradScaler):  # its scale changes every step: resume must
        def __init__(self, device):             # restore it for the run to match
            super().__init__(device, growth_interval=1)

    monkeypatch.setattr(torch.amp, "GradScaler", EagerScaler)
    texts, cfg = _texts(), _stage_cfg()
    whole = loop.train_retromae(encoder(), tok, texts[:16], texts[16:], cfg, tmp_path / "a",
                                show_progress=False, precision=precision)
    assert (whole["precision"], whole["device"]) == (precision, "cpu")
    calls = {"n": 0}
    real = loop.save_checkpoint

    def killed_after_second_checkpoint(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after step 4's checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", killed_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        loop.train_retromae(encoder(), tok, texts[:16], texts[16:], cfg, tmp_path / "b",
                            show_progress=False, precision=precision)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    resumed = loop.train_retromae(encoder(), tok, texts[:16], texts[16:], cfg, tmp_path / "b",
                                  show_progress=False, precision=precision)
    assert resumed["resumed_from"] == [4]
    assert resumed["steps"] == whole["steps"] and resumed["heldout"] == whole["heldout"]
    assert (tmp_path / "a/encoder/model.safetensors").read_bytes() == (
        tmp_path / "b/encoder/model.safetensors").read_bytes()
    assert whole["heldout"][-1][1]["loss"] < whole["heldout"][0][1]["loss"]  # it learns


def test_every_step_draws_its_own_batch_and_masks(tok, tmp_path):
    """With a learning rate of 0 the model never changes, so equal step losses would mean
    equal batches: each of the 6 steps must differ."""
    from transformers import AutoModel, LlamaConfig

    torch.manual_seed(0)
    encoder = AutoModel.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=48))
    texts = _texts()
    history = loop.train_retromae(encoder, tok, texts[:16], texts[16:],
                                  _stage_cfg(retromae_learning_rate=0.0), tmp_path,
                                  show_progress=False)
    assert len({(enc, dec) for _, enc, dec in history["steps"]}) == 6


# -- stages compose, are reused, and run on the full preset's miniature ----------------------


@pytest.fixture
def full_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    write_bge_m3_data(tmp_path / "bge-m3-data")
    write_minimind_v1(tmp_path / "minimind-v1-small")
    return tmp_path


def test_check_stages_refuses_unknown_names_repeats_and_order():
    assert stage1.check_stages(["retromae", "contrastive"]) == ("retromae", "contrastive")
    for bad in (["retroMAE"], ["contrastive", "retromae"], ["retromae", "retromae"]):
        with pytest.raises(ValueError):
            stage1.check_stages(bad)


def test_the_full_preset_runs_both_stages_then_fine_tunes_from_their_encoder(full_home,
                                                                              monkeypatch):
    monkeypatch.setattr(config, "Stage1Config", lambda: _stage_cfg(heldout_fraction=0.3))
    exp = config.with_overrides(config.get_experiment("minimind27_10k", "full"),
                                model_path=str(full_home / "minimind-v1-small"),
                                data_dir=str(full_home / "bge-m3-data"), epochs=1,
                                batch_size=4, pretraining_stages="retromae+contrastive")
    exp = replace(exp, data=replace(exp.data, val_size=8, test_size=10,
                                    subset_sizes={"10k": 20, "96k": 40, "288k": 42}),
                  model=replace(exp.model, max_passage_length=64, max_query_length=16))
    splits = data.prepare_data(exp.data)
    ready, info = experiment.prepare_base_model(exp, splits, show_progress=False)
    first, second = info["pretraining_stages"]
    assert first["stage"] == "retromae" and second["stage"] == "contrastive"
    assert second["source"] == first["folder"] + "/encoder"
    assert ready.model.base_model == second["folder"] + "/encoder"
    texts = first["texts"]
    assert texts["train"] + texts["heldout"] == texts["kept"] > 0
    assert second["pairs"]["crop"]["pairs"] > 0 and second["pairs"]["title"]["pairs"] == 0
    for stage in (first, second):
        folder = config.project_root() / "runs" / "full" / "stage1"
        assert stage["folder"].startswith(str(folder))
        assert json.loads((folder / stage["folder"].split("/")[-1] / "config.json"
                           ).read_text())["source_digest"] == stage["source_digest"]
    # the fine-tuning starts from stage 1b's encoder and projection
    model = DualTowerRetriever.from_config(ready.model)
    trained = DualTowerRetriever.load(second["folder"] + "/best")
    torch.testing.assert_close(model.query_projection.weight,
                               trained.query_projection.weight)
    run = experiment.run_experiment(ready, splits, info, show_progress=False)
    assert math.isfinite(run["test"]["aggregate"]["ndcg@5"]["mean"])
    # asked again: both reused, nothing trained
    monkeypatch.setattr(stage1, "train_retromae", None)
    monkeypatch.setattr(stage1, "train_retriever", None)
    again, info2 = experiment.prepare_base_model(exp, splits, show_progress=False)
    assert again.model.base_model == ready.model.base_model
    # another stage-1 setting is another run beside it, not the old one reused
    monkeypatch.setattr(config, "Stage1Config", lambda: _stage_cfg(retromae_steps=4))
    assert stage1.stage_folder(exp, "retromae", exp.model.base_model, splits,
                               config.get_stage1_config("full"))[0].name != first[
        "folder"].split("/")[-1]



def test_a_shipped_stage_run_is_copied_for_its_exact_inputs_only(tmp_path, monkeypatch):
    """A stage trained in one project home, shipped, and asked for in another home (another
    machine: every path differs) is copied, not trained; a flipped byte in it is refused by
    name; other settings are another run that nothing shipped matches."""
    from retrieval_lib import models
    from retrieval_lib.settings import CheckpointError, saved_folder

    def prepared(home):
        write_bge_m3_data(home / "bge-m3-data")
        write_minimind_v1(home / "minimind-v1-small")
        monkeypatch.setenv("RETRIEVAL_HOME", str(home))
        exp = config.with_overrides(config.get_experiment("minimind27_10k", "full"),
                                    model_path=str(home / "minimind-v1-small"),
                                    data_dir=str(home / "bge-m3-data"))
        exp = replace(exp, data=replace(exp.data, val_size=8, test_size=10,
                                        subset_sizes={"10k": 20, "96k": 40, "288k": 42}))
        splits = data.prepare_data(exp.data)
        return exp, splits, models.resolve_base_model(exp.model.base_model)[0]

    cfg = _stage_cfg(heldout_fraction=0.3)
    exp, splits, source = prepared(tmp_path / "a")
    folder, trained = stage1.run_stage(exp, "retromae", source, splits, cfg, show_progress=False)
    shipped = tmp_path / "demo_stage1" / folder.name
    shipped.mkdir(parents=True)
    for part in stage1.SHIPPED_PARTS:
        copy = shutil.copytree if (folder / part).is_dir() else shutil.copy2
        copy(folder / part, shipped / part)
    saved_folder.write_checksums(shipped)
    monkeypatch.setattr(stage1, "SHIPPED_STAGE1", tmp_path / "demo_stage1")
    monkeypatch.setattr(stage1, "train_retromae", None)  # nothing may be trained from here on
    exp_b, splits_b, source_b = prepared(tmp_path / "b")
    assert source_b != source
    folder_b, copied = stage1.run_stage(exp_b, "retromae", source_b, splits_b, cfg,
                                        show_progress=False)
    assert folder_b.name == folder.name and folder_b != folder
    assert copied == {**json.loads(json.dumps(trained)), "source": source_b,
                      "shipped_from": f"demo_stage1/{folder.name}"}
    assert (folder_b / "encoder" / "model.safetensors").read_bytes() == (
        folder / "encoder" / "model.safetensors").read_bytes()
    weights = shipped / "encoder" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    shutil.rmtree(folder_b)
    with pytest.raises(CheckpointError, match=r"encoder/model.safetensors: checksum differs"):
        stage1.run_stage(exp_b, "retromae", source_b, splits_b, cfg, show_progress=False)
    with pytest.raises(TypeError):  # other settings: not shipped, so it would train
        stage1.run_stage(exp_b, "retromae", source_b, splits_b, _stage_cfg(retromae_steps=4),
                         show_progress=False)

def test_the_stage1_plan_counts_what_retromae_holds_by_hand(monkeypatch):
    """A Llama of width 32 (4 heads, 2 key/value heads, MLP 48, vocabulary 40, one block):
    a block holds q 32·32 + k 32·16 + v 32·16 + o 32·32 + MLP 3·32·48 + two norms 2·32 = 7,744
    weights; the encoder 40·32 + 7,744 + 32 = 9,056; the decoder one block and its norm, 7,776;
    the LM head is the tied embedding. So 16,832 parameters at 18 bytes (fp32 weights,
    gradients, two AdamW moments, a bf16 copy)."""
    from dataclasses import replace

    from retrieval_lib.models.retromae import RetroMAE
    from retrieval_lib.training import memory, stage1_plan
    from retrieval_lib.training import stage1 as stage1_module

    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  vocab_size=40, max_query_length=8, max_passage_length=16)
    per = {"per_layer": 100.0, "outside_layers": 10.0, "hidden_state": 64, "seq_len": 16,
           "dtype": "bfloat16"}
    monkeypatch.setattr(stage1_module, "activation_bytes_per_token", lambda *a, **k: per)
    monkeypatch.setattr(memory, "activation_bytes_per_token", lambda *a, **k: per)
    s1 = _stage_cfg(retromae_batch_size=8, retromae_max_length=16, retromae_steps=100,
                    pairs_per_text=2)
    gib = memory.GIB
    # per row of 16 tokens: activations 16·(100·(1 + 2) + 10) = 4,960; logits of the
    # 1.3·16 predicted tokens over 40 entries at 6 bytes = 4,992
    row = 16 * (100 * 3 + 10) + 1.3 * 16 * 40 * 6
    static = 18 * 16_832
    gpus = {"small": {"memory_gib": memory.CUDA_CONTEXT_GIB + (static + 4.5 * row) / gib,
                      "peak_tflops": 1.0}}
    plan = stage1_plan(cfg, s1, texts=50, gpus=gpus, utilisation=0.5)
    r = plan["retromae"]
    assert r["parameters"] == 16_832
    from retrieval_lib.models.base import build_encoder
    assert r["parameters"] == sum(p.numel() for p in RetroMAE(build_encoder(cfg)).parameters())
    assert r["memory_gib"] * gib == pytest.approx(static + 8 * row)
    assert r["gpus"]["small"] == {"fits": False, "plan_gib": pytest.approx(r["memory_gib"]),
                                  "largest_batch": 4, "hours": pytest.approx(
                                      r["flops_per_step"] * 100 / (1e12 * 0.5) / 3600)}
    # FLOPs: the encoder as in fine-tuning, the decoder block over two streams, the LM head
    tokens = 8 * 16
    assert r["flops_per_step"] == pytest.approx(
        memory.training_flops(replace(cfg, m3_heads=False, separate_projections=False), tokens,
                              16, False)
        + 12 * 7_744 * tokens + 6 * 40 * 32 * tokens * 1.3)
    assert (plan["pairs"], plan["pairs_estimated"]) == (50 * 2 * 2, True)  # crops and ICT
    assert plan["contrastive"] == memory.training_plan(
        replace(cfg, m3_heads=False, separate_projections=False), s1.contrastive_training(), 200,
        gpus, 0.5)
    assert stage1_plan(cfg, s1, 50, pairs=77, gpus=gpus)["pairs_estimated"] is False


def test_the_plan_a_notebook_prints_names_the_stages_before_they_run(capsys, tmp_path):
    """Stage 1 reads the whole training pool's passages, not the subset fine-tuning trains on:
    the plan counts the pool the prepared data holds, or before preparation the largest
    subset's nominal size as a lower bound, and says which."""
    from retrieval_lib.course import expansion
    from retrieval_lib.data.splits import prepared_dir

    exp = config.with_overrides(config.get_experiment("minimind27_10k", "demo"),
                                pretraining_stages="retromae+contrastive")
    exp = replace(exp, data=replace(exp.data, cache_dir=str(tmp_path)))
    expansion.show_plan(exp, train_records=100)
    printed = capsys.readouterr().out
    assert "微调之前先做第一阶段（retromae → contrastive）：RetroMAE 1,000 步、每步 4,096 个" \
        in printed
    # 1,800 (the demo's largest subset) texts · 4 pairs · crops and ICT
    assert ("训练池（数据尚未准备，至少是最大子集的） 1,800 条记录的段落，约 14,400 对（估计）"
            in printed)
    folder = prepared_dir(exp.data)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(
        {"splits": {"train": 1869, "validation": 200, "test": 300}}), encoding="utf-8")
    table = expansion.show_plan(exp, train_records=100)
    printed = capsys.readouterr().out
    assert "训练池的 1,869 条记录的段落，约 14,952 对（估计）" in printed  # 1,869 · 4 · 2
    assert all(name in printed for name in table.index)  # the stage-1 table, per GPU
    expansion.show_plan(config.with_overrides(config.get_experiment("minimind27_10k", "demo"),
                                              pretraining_stages="none"), train_records=100)
    assert "第一阶段" not in capsys.readouterr().out  # an experiment without stages


def test_the_shipped_demo_stage_runs_are_todays(tmp_path, monkeypatch):
    """Every stage chain the demo runs (demo_stage1/build.py's CHAINS), as an experiment would
    name it today (default demo settings, the shipped demo LM, the demo data), is in
    demo_stage1/ with checksums that hold, and every shipped run is one of them. When this
    fails, the data, the LMs or the stage settings changed: rebuild with demo_stage1/build.py."""
    import importlib.util

    from retrieval_lib.settings import saved_folder

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    spec = importlib.util.spec_from_file_location(
        "build", stage1.SHIPPED_STAGE1 / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    cfg = config.get_stage1_config("demo")
    expected = set()
    for key in build.CHAINS:
        exp = build.chain_experiment(key)
        splits = data.prepare_data(exp.data)
        lm = config.with_overrides(exp, pretraining_stages="none")
        ready, _ = experiment.prepare_base_model(lm, splits, show_progress=False)
        source = ready.model.base_model
        for stage in exp.model.pretraining_stages:
            folder, _ = stage1.stage_folder(exp, stage, source, splits, cfg)
            shipped = stage1.SHIPPED_STAGE1 / folder.name
            assert (shipped / "config.json").exists(), f"{key}: {folder.name} is not shipped"
            assert saved_folder.verify_checksums(shipped)
            expected.add(folder.name)
            source = str(shipped / "encoder")
    shipped = {p.name for p in stage1.SHIPPED_STAGE1.iterdir() if p.is_dir()} - {"__pycache__"}
    assert shipped == expected
    manifest = json.loads((stage1.SHIPPED_STAGE1 / "MANIFEST.json").read_text(encoding="utf-8"))
    assert {r["folder"] for r in manifest["runs"]} == expected


def test_every_demo_experiment_starts_from_the_stages_validation_picked():
    """The demo default is the recipe the saved ablation picks on validation (highest
    validation NDCG@10) for every twin it measured; the full preset keeps the report's."""
    saved = json.loads((config.CHECKOUT / "benchmarks" / "stage1_ablation.json").read_text(
        encoding="utf-8"))
    picks = {tuple(max(m["recipes"].values(), key=lambda r: r["validation_ndcg@10"])["stages"])
             for m in saved["models"].values()}
    assert picks == {config.DEMO_PRETRAINING_STAGES}
    for name in config.EXPERIMENTS:
        assert config.get_experiment(name, "demo").model.pretraining_stages == \
            config.DEMO_PRETRAINING_STAGES
        assert config.get_experiment(name, "full").model.pretraining_stages == ()


def test_the_recipes_of_an_experiment_are_itself_and_variants_that_change_only_the_stages():
    from retrieval_lib.course import stage_study

    demo = config.get_experiment("minimind27_10k", "demo")
    recipes = stage_study.recipe_variants(demo)
    assert recipes["retromae_contrastive"] is demo  # the course's own run of the experiment
    assert {k: e.name for k, e in recipes.items() if e is not demo} == {
        "lm": "minimind27_10k-lm", "retromae": "minimind27_10k-retromae",
        "contrastive": "minimind27_10k-contrastive"}
    for key, e in recipes.items():
        assert e.model.pretraining_stages == stage_study.STAGE_RECIPES[key][0]
        assert replace(e.model, pretraining_stages=()) == replace(demo.model, pretraining_stages=())
        assert e.training == demo.training and e.data == demo.data
    full = config.get_experiment("minimind27_10k", "full")
    assert stage_study.recipe_variants(full)["lm"] is full


def _study_run(validation, test, untrained=0.1, name="r"):
    def agg(values):
        return {"mean": sum(values) / len(values)}

    def per_query(values):  # by query id, as metrics.json keeps them
        return {f"q{i}": v for i, v in enumerate(values)}

    return {"out_dir": f"/runs/{name}",
            "validation": {"per_query": {"ndcg@10": per_query(validation)},
                           "aggregate": {"ndcg@10": agg(validation)}},
            "test": {"per_query": {"ndcg@5": per_query(test)},
                     "aggregate": {"ndcg@5": agg(test)}},
            "untrained": {"aggregate": {"ndcg@5": {"mean": untrained}}}}


def test_the_study_picks_on_validation_and_reports_test_differences_worked_by_hand():
    """Validation decides (the recipe best on validation is named even where another is best
    on test); each row's Δ is the mean per-query difference to ``lm``, worked out by hand."""
    from retrieval_lib.course import stage_study

    n = 40
    runs = {"lm": _study_run([0.2] * n, [0.3] * n, name="lm"),
            "retromae": _study_run([0.2] * (n - 4) + [1.0] * 4, [0.3] * n, name="a"),
            "retromae_contrastive": _study_run([0.2] * (n - 10) + [1.0] * 10,
                                               [0.3] * (n - 2) + [0.0] * 2, name="ab"),
            "contrastive": _study_run([0.2] * n, [0.3] * (n - 20) + [1.0] * 20, name="b")}
    rows = {r["配方"]: r for r in stage_study.stage_study_rows(runs, reference=0.5)}
    label = stage_study.STAGE_RECIPES["retromae_contrastive"][1]
    # validation: 10 queries of 40 gain 0.8 -> +0.200; test: 2 lose 0.3 -> -0.015
    assert rows[label]["Δ 验证（vs LM）"].startswith("+0.200")
    assert rows[label]["Δ 测试（vs LM）"].startswith("-0.015")
    assert rows[label]["测试 NDCG@5"] == pytest.approx(0.3 * 38 / 40)
    assert rows[label]["占 BM25 比例"] == f"{0.3 * 38 / 40 / 0.5:.0%}"
    assert rows[stage_study.STAGE_RECIPES["lm"][1]]["Δ 验证（vs LM）"] == ""
    sentences = stage_study.stage_study_sentences(runs, reference=0.5)
    # picked on validation (0.400 against 0.200), though "contrastive" is best on test
    assert label in sentences[0] and "0.400" in sentences[0] and "0.285" in sentences[0]
    only_b = next(s for s in sentences if stage_study.STAGE_RECIPES["contrastive"][1] in s)
    # contrastive: no validation difference at all, test +0.350 on 20 of 40 queries
    assert "验证 NDCG@10 +0.000" in only_b and "差异不显著" in only_b
    assert "测试 NDCG@5 +0.350" in only_b and "显著更高" in only_b
