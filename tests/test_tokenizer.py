from retrieval_lib.data import tokenizer

TEXTS = ["北京举行新年音乐会", "李鹏在北京考察企业", "淮河治污第一战役告捷",
         "新年音乐会在北京举行"] * 5


def test_bpe_tokenizer_round_trips_chinese_and_has_special_tokens(tmp_path):
    tok = tokenizer.train_bpe_tokenizer(TEXTS, vocab_size=300, save_dir=tmp_path / "tok")
    assert len(tok) <= 300
    for text in ["北京举行新年音乐会", "没见过的字：鑫"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.eos_token_id is not None
    # merges learned on the corpus make a frequent phrase shorter than its 3 UTF-8 bytes per char
    assert len(tok.tokenize("北京")) < 6
    assert tokenizer.count_tokens(tok, ["北京", "北京举行新年音乐会"]) == [
        len(tok.tokenize("北京")), len(tok.tokenize("北京举行新年音乐会"))]


def test_demo_tokenizer_is_cached_by_corpus(tmp_path):
    a = tokenizer.demo_tokenizer(TEXTS, 300, tmp_path)
    b = tokenizer.demo_tokenizer(TEXTS, 300, tmp_path)
    assert a.get_vocab() == b.get_vocab()
    assert len(list(tmp_path.iterdir())) == 1
    tokenizer.demo_tokenizer(TEXTS[:4], 300, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_missing_pretrained_tokenizer_says_how_to_supply_it(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="huggingface-cli download"):
        tokenizer.load_pretrained_tokenizer(str(tmp_path / "no-such-model"))
