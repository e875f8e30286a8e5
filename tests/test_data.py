import io
import json
import os
import tarfile

import pytest

from retrieval_lib import data
from retrieval_lib.data import DataError, DataUnavailableError, LoadReport, records
from retrieval_lib.settings import config


def _write(path, lines, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "wb":
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _flag(query, pos, neg=()):
    return json.dumps({"query": query, "pos": list(pos), "neg": list(neg)}, ensure_ascii=False)


GOOD = {"query": "什么是检索", "positive_passages": [{"text": "检索是查找信息。"}],
        "negative_passages": [{"text": "今天天气很好。"}]}

# (description, JSON line or raw bytes, expected field in the error message)
BAD_LINES = [
    ("truncated JSON", b'{"query": "q", "positive_passages": [', "invalid JSON"),
    ("not an object", b'["q", "p"]', "expected a JSON object"),
    ("missing query", json.dumps({"positive_passages": [{"text": "p"}]}).encode(), "'query'"),
    ("missing positives", json.dumps({"query": "q"}).encode(), "'positive_passages'"),
    ("empty positives", json.dumps({"query": "q", "positive_passages": []}).encode(),
     "'positive_passages': empty list"),
    ("query not a string", json.dumps({"query": 3, "positive_passages": [{"text": "p"}]}).encode(),
     "'query': expected a string, got int"),
    ("empty query", json.dumps({"query": "", "positive_passages": [{"text": "p"}]}).encode(),
     "'query': empty"),
    ("whitespace query", json.dumps({"query": " \u3000\t", "positive_passages": [{"text": "p"}]}
                                    ).encode(), "'query': empty"),
    ("passage text null", json.dumps({"query": "q", "positive_passages": [{"text": None}]}
                                     ).encode(), "'positive_passages[0].text': expected a string"),
    ("passage without text", json.dumps({"query": "q", "positive_passages": [{"body": "p"}]}
                                        ).encode(), "'positive_passages[0]'"),
    ("passage is a bare string", json.dumps({"query": "q", "positive_passages": ["p"]}).encode(),
     "'positive_passages[0]'"),
    ("negatives not a list", json.dumps({"query": "q", "positive_passages": [{"text": "p"}],
                                         "negative_passages": "n"}).encode(),
     "'negative_passages': expected a list"),
    ("negative empty text", json.dumps({"query": "q", "positive_passages": [{"text": "p"}],
                                        "negative_passages": [{"text": "ok"}, {"text": " "}]}
                                       ).encode(), "'negative_passages[1].text': empty"),
    ("NUL byte", json.dumps({"query": "q\u0000", "positive_passages": [{"text": "p"}]}).encode(),
     "'query': contains a NUL byte"),
    ("invalid UTF-8", b'{"query": "\xff\xfe", "positive_passages": [{"text": "p"}]}',
     "undecodable byte at column 12"),
    ("source not a string", json.dumps({"query": "q", "positive_passages": [{"text": "p"}],
                                        "source": 1}).encode(), "'source'"),
    ("lone surrogate", b'{"query": "\\ud800\\u67e5\\u8be2", "positive_passages": [{"text": "p"}]}',
     "'query': character 1 is a lone surrogate"),
    ("nested too deeply", b'{"query": "q", "positive_passages": [{"text": "p"}], "neg": '
     + b"[" * 200_000, "invalid JSON (nested too deeply"),
    ("zero-width query", json.dumps({"query": "\u200b\u200d\ufeff", "positive_passages": [
        {"text": "p"}]}).encode(), "'query': empty, or only whitespace and invisible"),
    ("query equal to its only positive",
     json.dumps({"query": "同一句话", "positive_passages": [{"text": " 同一句话 "}]}).encode(),
     "'positive_passages[0].text': identical to the query"),
]


@pytest.mark.parametrize("desc,line,expected", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_names_file_line_and_field(tmp_path, desc, line, expected):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(GOOD).encode(), line], mode="wb")
    with pytest.raises(DataError) as err:
        list(records.read_jsonl(path))
    message = str(err.value)
    assert f"{path}:2:" in message, message
    assert expected in message, message


def test_lenient_mode_counts_every_bad_line_and_adds_up(tmp_path):
    lines = [json.dumps(GOOD).encode()] + [b[1] for b in BAD_LINES] + [b"", b"   "]
    path = _write(tmp_path / "mixed.jsonl", lines, mode="wb")
    report = LoadReport()
    kept = list(records.read_jsonl(path, strict=False, report=report))
    assert len(kept) == 1 and report.kept == 1
    # 20 bad lines: 2 invalid JSON (truncated, nested too deeply), 1 bad UTF-8, 17 schema
    # errors (the lone surrogate among them); blank lines are not records
    assert report.read == 21
    assert dict(report.dropped) == {"invalid_json": 2, "invalid_utf8": 1, "invalid_record": 17}
    report.check()
    assert report.examples[0].startswith(f"{path}:2:")


def test_bom_is_ignored_and_repairs_are_counted(tmp_path):
    rec = {"query": "q", "positive_passages": [{"text": "p"}, {"text": "p"}],
           "negative_passages": [{"text": "p"}, {"text": "n"}, {"text": "n"}]}
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    report = LoadReport()
    (out,) = list(records.read_jsonl(path, source="s", report=report))
    assert out == {"query": "q", "positive_passages": [{"text": "p"}],
                   "negative_passages": [{"text": "n"}], "source": "s"}
    assert dict(report.repaired) == {"duplicate_positive": 1, "negative_equal_to_positive": 1,
                                     "duplicate_negative": 1}


def test_a_negative_equal_to_a_positive_up_to_whitespace_is_no_negative():
    report = LoadReport()
    rec = records.validate_record(
        {"query": "问题", "positive_passages": [{"text": "北京 上海"}],
         "negative_passages": [{"text": " 北京\t\u200b上海 "}, {"text": "广州"},
                               {"text": "广州 "}]}, report=report)
    assert rec["negative_passages"] == [{"text": "广州"}]
    assert dict(report.repaired) == {"negative_equal_to_positive": 1, "duplicate_negative": 1}


def test_flag_embedding_conversion_and_negative_limit(tmp_path):
    line = json.dumps({"query": "法律问题", "pos": ["判决书正文"], "neg": ["n1", "n2", "n3"],
                       "pos_scores": [1.0], "prompt": "Represent this: "}, ensure_ascii=False)
    path = _write(tmp_path / "x.jsonl", [line])
    report = LoadReport()
    (rec,) = records.read_jsonl(path, source="lecardv2", converter=records.from_flag_embedding,
                             max_negatives=2, report=report)
    assert rec == {"query": "法律问题", "positive_passages": [{"text": "判决书正文"}],
                   "negative_passages": [{"text": "n1"}, {"text": "n2"}], "source": "lecardv2"}
    assert report.repaired["negatives_beyond_limit"] == 1
    bad = _write(tmp_path / "y.jsonl", [json.dumps({"query": "q", "pos": "p"})])
    with pytest.raises(DataError, match=r"y.jsonl:1: field 'pos': expected a list"):
        list(records.read_jsonl(bad, converter=records.from_flag_embedding))
    missing = _write(tmp_path / "z.jsonl", [json.dumps({"query": "q"})])
    with pytest.raises(DataError, match=r"z.jsonl:1: field 'pos': missing"):
        list(records.read_jsonl(missing, converter=records.from_flag_embedding))


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xef\xbb\xbf\n"],
                         ids=["zero bytes", "blank lines", "BOM only"])
def test_empty_file_is_an_error_or_listed(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}: empty file"):
        list(records.read_jsonl(path))
    report = LoadReport()
    assert list(records.read_jsonl(path, strict=False, report=report)) == []
    assert (report.read, report.kept, report.empty_files) == (0, 0, [str(path)])
    assert report.to_dict()["empty_files"] == [str(path)]


def test_five_megabyte_passage_is_cut_and_counted(tmp_path):
    long_text = "长" * 5_000_000  # 15 MB of UTF-8
    rec = {"query": "q", "positive_passages": [{"text": long_text}],
           "negative_passages": [{"text": "短"}]}
    path = _write(tmp_path / "long.jsonl", [json.dumps(rec, ensure_ascii=False)])
    report = LoadReport()
    (out,) = records.read_jsonl(path, report=report, max_chars=1000)
    assert out["positive_passages"] == [{"text": "长" * 1000}]
    assert out["negative_passages"] == [{"text": "短"}]
    assert dict(report.repaired) == {"text_truncated": 1}
    (kept,) = records.read_jsonl(path, max_chars=None)
    assert len(kept["positive_passages"][0]["text"]) == 5_000_000


def test_positive_equal_to_the_query_is_removed_when_another_remains():
    report = LoadReport()
    out = records.validate_record({"query": "检索 模型", "positive_passages": [
        {"text": "检索  模型"}, {"text": "正文"}]}, report=report)
    assert out["positive_passages"] == [{"text": "正文"}]
    assert dict(report.repaired) == {"positive_equal_to_query": 1}


def test_positive_repeated_as_negative_is_removed_not_trained_against():
    report = LoadReport()
    out = records.validate_record({"query": "q", "positive_passages": [{"text": "p"}],
                                "negative_passages": [{"text": "p"}]}, report=report)
    assert out["negative_passages"] == []
    assert dict(report.repaired) == {"negative_equal_to_positive": 1}


def test_traditional_characters_are_counted_and_optionally_converted(tmp_path):
    assert records.traditional_characters("檢索與簡體混合") == 4  # 檢 與 簡 體
    assert records.traditional_characters("检索与简体混合") == 0
    mixed = {"query": "法律檢索", "positive_passages": [{"text": "判決書的正文"}]}
    plain = {"query": "天气", "positive_passages": [{"text": "今天晴"}]}
    path = _write(tmp_path / "mixed.jsonl", [json.dumps(r, ensure_ascii=False)
                                             for r in (mixed, plain)])
    report = LoadReport()
    kept = list(records.read_jsonl(path, report=report))
    assert kept[0]["query"] == "法律檢索" and report.kept == 2
    assert dict(report.flagged) == {"traditional_characters": 1}
    report = LoadReport()
    kept = list(records.read_jsonl(path, report=report, simplify=True))
    assert (kept[0]["query"], kept[0]["positive_passages"][0]["text"]) == ("法律检索",
                                                                         "判决书的正文")
    assert dict(report.repaired) == {"traditional_characters": 1} and not report.flagged


def test_dedup_distinguishes_duplicate_records_from_conflicting_queries():
    recs = [
        {"query": "a  b", "positive_passages": [{"text": "p"}], "source": "s"},
        {"query": "a b", "positive_passages": [{"text": "p"}], "source": "s"},  # same record
        {"query": " a b", "positive_passages": [{"text": "other"}], "source": "t"},  # conflict
        {"query": "c", "positive_passages": [{"text": "p"}], "source": "s"},
    ]
    report = LoadReport()
    kept = data.dedup_records(recs, report)
    assert [r["query"] for r in kept] == ["a  b", "c"]
    assert dict(report.dropped) == {"duplicate_record": 1, "duplicate_query": 1}
    report.check()


def test_make_splits_hand_worked():
    import numpy as np

    s = data.make_splits(10, val_size=2, test_size=3, subset_sizes={"big": 4, "small": 2}, seed=7)
    order = np.random.default_rng(7).permutation(10).tolist()
    assert s["test"] == order[:3] and s["validation"] == order[3:5] and s["train"] == order[5:]
    assert s["subset_sizes"] == {"small": 2, "big": 4} and s["capped_subsets"] == {}
    capped = data.make_splits(10, 2, 3, {"huge": 9}, seed=7)
    assert capped["subset_sizes"] == {"huge": 5}
    assert capped["capped_subsets"] == {"huge": {"asked": 9, "available": 5}}
    with pytest.raises(ValueError, match="cannot hold"):
        data.make_splits(5, 2, 3, {})


# --- the full path: a local directory laid out like the extracted bge-m3-data -----------------

SOURCE_FILES = {
    "mldr_zh": ["zh/MLDR/mldr-zh_len-0-500.jsonl", "zh/MLDR/mldr-zh_len-7000-inf.jsonl"],
    "lecardv2": ["zh/LeCaRDv2/lecardv2_len-7000-inf.jsonl"],
    "t2ranking": ["zh/T2Ranking/t2ranking_len-0-500.jsonl"],
    "miracl_zh": ["multilingual/MIRACL/miracl-zh_len-0-500.jsonl"],
    "dureader": ["zh/DuReader/dureader_len-500-1000.jsonl"],
}
DISTRACTORS = ["en/MSMARCO/msmarco_len-0-500.jsonl",  # English: must not be read
               "zh/LeCaRDv2/lecardv2_len-0-500.jsonl",  # the report uses only len-7000-inf
               "multilingual/MIRACL/miracl-ja_len-0-500.jsonl"]


def _write_fake_bge_m3(root, per_file=12, duplicate_query=True):
    """Each file: per_file good records with unique queries, one bad line, optional duplicate."""
    expected = {}
    for source, files in SOURCE_FILES.items():
        expected[source] = 0
        for f in files:
            lines = [_flag(f"{source}-{f[-14:]}-查询{i}", [f"{source} 正例 {i}"],
                           [f"负例 {j}" for j in range(10)]) for i in range(per_file)]
            lines.append('{"query": "broken"')  # one truncated line per file
            if duplicate_query:
                lines.append(_flag(f"{source}-{f[-14:]}-查询0", [f"{source} 正例 0"]))
            _write(root / f, lines)
            expected[source] += per_file + 1
    for f in DISTRACTORS:
        _write(root / f, [_flag("english query", ["p"])])
    return expected


def _full_cfg(tmp_path, **kw):
    base = dict(data_dir=str(tmp_path / "bge-m3-data"), cache_dir=str(tmp_path / "cache"),
                val_size=6, test_size=8, subset_sizes={"10k": 10, "96k": 30, "288k": 1000},
                strict=False, num_hard_negatives=7)
    base.update(kw)
    return config.get_data_config("full", **base)


def test_find_source_files_matches_only_the_report_sources(tmp_path):
    _write_fake_bge_m3(tmp_path / "bge-m3-data")
    found = data.find_source_files(tmp_path / "bge-m3-data", config.BGE_M3_ZH_SOURCES)
    names = {s: sorted(p.name for p in paths) for s, paths in found.items()}
    assert names == {s: sorted(f.split("/")[-1] for f in fs) for s, fs in SOURCE_FILES.items()}


def test_missing_folder_or_source_gives_instructions(tmp_path):
    with pytest.raises(DataUnavailableError, match="does not exist") as err:
        data.find_source_files(tmp_path / "nowhere", config.BGE_M3_ZH_SOURCES)
    assert "HF_ENDPOINT" in str(err.value) and "data_dir" in str(err.value)
    _write(tmp_path / "d" / "t2ranking_len-0-500.jsonl", [_flag("q", ["p"])])
    with pytest.raises(DataUnavailableError,
                       match=r"mldr_zh \(pattern \*mldr\*zh\*_len-\*.jsonl\)"):
        data.find_source_files(tmp_path / "d", config.BGE_M3_ZH_SOURCES)
    # a spelling the pattern does not expect: the near misses are listed by name
    _write(tmp_path / "d" / "LeCaRD_v2" / "lecard-v2_len-7000-inf.jsonl", [_flag("q", ["p"])])
    _write(tmp_path / "d" / "._mldr_zh_len-0-500.jsonl", [])  # macOS resource fork: ignored
    with pytest.raises(DataUnavailableError) as err:
        data.find_source_files(tmp_path / "d", config.BGE_M3_ZH_SOURCES)
    assert ("lecardv2 (pattern *lecardv2*_len-7000-inf.jsonl): files whose names contain "
            "'lecard': LeCaRD_v2/lecard-v2_len-7000-inf.jsonl") in str(err.value)
    assert "no file name contains 'mldr'" in str(err.value)


def test_prepare_full_preset_from_local_directory(tmp_path):
    expected_read = _write_fake_bge_m3(tmp_path / "bge-m3-data")
    cfg = _full_cfg(tmp_path)
    splits = data.prepare_data(cfg)
    m = splits.manifest
    assert set(m["load"]) == set(SOURCE_FILES)
    for source, rep in m["load"].items():
        files = len(SOURCE_FILES[source])
        assert rep["read"] == expected_read[source] + files  # + the truncated line per file
        assert rep["dropped"] == {"invalid_json": files}
        assert rep["kept"] == 13 * files
        assert rep["repaired"] == {"negatives_beyond_limit": 3 * 12 * files}
        # which files each source matched, and the records each gave
        assert sorted(rep["files"]) == sorted(SOURCE_FILES[source])
        assert set(rep["files"].values()) == {13}
    n_files = sum(len(f) for f in SOURCE_FILES.values())
    assert m["dedup"]["dropped"] == {"duplicate_record": n_files}
    assert m["records_after_dedup"] == 12 * n_files == 72
    assert m["splits"] == {"train": 58, "validation": 6, "test": 8}
    assert m["subset_sizes"] == {"10k": 10, "96k": 30, "288k": 58}
    assert m["capped_subsets"] == {"288k": {"asked": 1000, "available": 58}}
    assert sum(m["by_source"]["test"].values()) == 8
    assert data.check_splits(splits)["nested"]
    assert all(len(r["negative_passages"]) == 7 for r in splits.train)
    assert not any("english" in q for q in splits.train["query"])
    # cached: a second call loads the same splits from disk
    again = data.prepare_data(cfg)
    assert again.test["query"] == splits.test["query"]
    assert again.subset("10k")["query"] == splits.train["query"][:10]


def test_prepared_splits_follow_their_source_files(tmp_path, capsys):
    root = tmp_path / "bge-m3-data"
    _write_fake_bge_m3(root)
    cfg = _full_cfg(tmp_path)
    first = data.prepare_data(cfg)
    assert set(first.manifest["source_files"]) == {f for fs in SOURCE_FILES.values() for f in fs}
    # touched, same content: prepared again, and said to be the same splits
    dureader = root / SOURCE_FILES["dureader"][0]
    os.utime(dureader, ns=(0, 0))
    capsys.readouterr()
    again = data.prepare_data(cfg)
    printed = capsys.readouterr().out
    assert "zh/DuReader/dureader_len-500-1000.jsonl: size or time changed" in printed
    assert "the records are the same as before" in printed
    assert again.test["query"] == first.test["query"]
    # new records in a source: prepared again, and said to differ
    with open(dureader, "a", encoding="utf-8") as fh:
        fh.write(_flag("新增的查询", ["新增的正文"]) + "\n")
    changed = data.prepare_data(cfg)
    assert "the records differ from before" in capsys.readouterr().out
    assert changed.manifest["records_after_dedup"] == first.manifest["records_after_dedup"] + 1
    # unchanged since: loaded from the cache, nothing printed
    data.prepare_data(cfg)
    assert capsys.readouterr().out == ""



def test_a_source_file_replaced_while_it_is_read_is_read_again(tmp_path, monkeypatch, capsys):
    """An editor or a download saves by writing a new file and renaming it over the old one;
    if that happens while prepare_data reads, the records of the old file must not be recorded
    as those of the new one (later calls would serve them as up to date)."""
    from retrieval_lib.data import splits as splits_module

    root = tmp_path / "bge-m3-data"
    _write_fake_bge_m3(root)
    dureader = root / SOURCE_FILES["dureader"][0]
    read = splits_module.load_bge_m3_zh
    calls = []

    def replaced_during_the_first_read(cfg, reports):
        for i, record in enumerate(read(cfg, reports)):
            if not calls and i == 3:  # part-way through: the new version is renamed over it
                calls.append("replaced")
                new = dureader.with_name("new.tmp")
                new.write_text(dureader.read_text(encoding="utf-8")
                               + _flag("改过的文件里的新查询", ["新的正文"]) + "\n",
                               encoding="utf-8")
                os.replace(new, dureader)
            yield record

    monkeypatch.setattr(splits_module, "load_bge_m3_zh", replaced_during_the_first_read)
    cfg = _full_cfg(tmp_path)
    first = data.prepare_data(cfg)
    assert "1 source file(s) changed while they were read (zh/DuReader/" in capsys.readouterr().out
    everything = [q for part in (first.train, first.validation, first.test)
                  for q in part["query"]]
    assert "改过的文件里的新查询" in everything  # the records of the file as it is now
    again = data.prepare_data(cfg)  # and the manifest records that file: served from cache
    assert capsys.readouterr().out == "" and again.test["query"] == first.test["query"]


def test_full_width_and_half_width_forms_of_one_query_are_one_query(tmp_path):
    rows = [{"query": "ＧＤＰ增长了多少？", "positive_passages": [{"text": "增长了５％。"}]},
            {"query": "GDP增长了多少?", "positive_passages": [{"text": "增长了5%。"}]},
            {"query": "ＧＤＰ增长了多少?", "positive_passages": [{"text": "另一段正文"}]},
            {"query": "别的问题", "positive_passages": [{"text": "正文"}]}]
    report = data.LoadReport()
    kept = data.dedup_records(rows, report)
    assert [r["query"] for r in kept] == ["ＧＤＰ增长了多少？", "别的问题"]  # kept as written
    # the second is the same record in other widths; the third another answer to it
    assert report.dropped == {"duplicate_record": 1, "duplicate_query": 1}
    assert report.flagged == {"duplicate_by_width_form": 2}
    assert data.normalise_text("　ＡＢＣ　１２３") == "ABC 123"  # the ideographic space too

def test_every_bad_input_in_the_data_folder_is_accounted_for_in_the_manifest(tmp_path):
    root = tmp_path / "bge-m3-data"
    _write_fake_bge_m3(root)
    # one more T2Ranking file holding every bad line, and an empty DuReader file
    flag_bad = [b[1] for b in BAD_LINES] + [_flag("同一句", ["同一句"]).encode(),
                                            _flag("繁體", ["內容", "內容"], ["內容"]).encode()]
    _write(root / "zh/T2Ranking/t2ranking_len-500-1000.jsonl", flag_bad, mode="wb")
    (root / "zh/DuReader/dureader_len-0-500.jsonl").write_bytes(b"")
    m = data.prepare_data(_full_cfg(tmp_path)).manifest
    for source, rep in m["load"].items():
        assert rep["read"] == rep["kept"] + sum(rep["dropped"].values()), source
    t2 = m["load"]["t2ranking"]
    # first file: 12 good + 1 truncated + 1 repeated query (kept here, dropped by dedup);
    # second: every bad line (in FlagEmbedding's layout "pos" is missing from most) and the
    # Traditional record, which is kept
    assert t2["read"] == 14 + len(flag_bad)
    assert t2["kept"] == 12 + 1 + 1
    assert sum(t2["dropped"].values()) == 1 + len(flag_bad) - 1
    assert t2["flagged"] == {"traditional_characters": 1}
    assert t2["repaired"]["duplicate_positive"] == 1
    assert t2["repaired"]["negative_equal_to_positive"] == 1
    assert m["load"]["dureader"]["empty_files"][0].endswith("dureader_len-0-500.jsonl")
    assert m["dedup"]["read"] == sum(rep["kept"] for rep in m["load"].values())


def test_splits_are_reproducible_and_depend_on_the_seed(tmp_path):
    _write_fake_bge_m3(tmp_path / "bge-m3-data")
    a = data.prepare_data(_full_cfg(tmp_path), out_dir=tmp_path / "a")
    b = data.prepare_data(_full_cfg(tmp_path), out_dir=tmp_path / "b")
    c = data.prepare_data(_full_cfg(tmp_path, seed=1), out_dir=tmp_path / "c")
    assert a.test["query"] == b.test["query"] and a.train["query"] == b.train["query"]
    assert a.test["query"] != c.test["query"]
    assert a.manifest["fingerprint"] == c.manifest["fingerprint"]  # same records, other split


def test_strict_full_load_stops_at_the_first_bad_line(tmp_path):
    _write_fake_bge_m3(tmp_path / "bge-m3-data")
    with pytest.raises(DataError, match=r"_len-[^:]*\.jsonl:13: invalid JSON"):
        data.prepare_data(_full_cfg(tmp_path, strict=True))


def _tar_of(root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root, arcname="bge-m3-data")
    return buf.getvalue()


def test_hub_download_extracts_only_the_chinese_sources(tmp_path, monkeypatch):
    import huggingface_hub

    _write_fake_bge_m3(tmp_path / "src")
    archive = tmp_path / "bge-m3-data.tar.gz"
    archive.write_bytes(_tar_of(tmp_path / "src"))
    calls = []

    def fake_download(repo_id, filename, repo_type, cache_dir):
        calls.append((repo_id, filename, repo_type))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    cfg = _full_cfg(tmp_path, data_dir=None)
    splits = data.prepare_data(cfg)
    assert calls == [("Shitao/bge-m3-data", "bge-m3-data.tar.gz", "dataset")]
    root = tmp_path / "cache" / "extracted"
    extracted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl"))
    assert extracted == sorted(f"bge-m3-data/{f}" for fs in SOURCE_FILES.values() for f in fs)
    assert splits.manifest["records_after_dedup"] == 72


def _tar_members(members, end=True):
    """An uncompressed tar of ``(name, bytes | ("link", target) | ("symlink", target))``;
    without ``end`` it stops after the last member, before tar's end-of-archive blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type = tarfile.LNKTYPE if content[0] == "link" else tarfile.SYMTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        last = tar.offset
    return buf.getvalue() if end else buf.getvalue()[:last]


SOURCES = {"mldr_zh": "*mldr*zh*_len-*.jsonl", "dureader": "*dureader*_len-*.jsonl"}
MLDR, DUREADER = b'{"query": "q"}\n' * 50, b'{"query": "d"}\n' * 30


def test_archive_extraction_keeps_folders_copies_hard_links_and_reports_skips(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_members([
        ("d/zh/mldr-zh_len-0-500.jsonl", MLDR),
        ("d/other/mldr-zh_len-0-500.jsonl", MLDR[:15]),  # the same name in another folder
        ("d/zh/dureader_len-0-500.jsonl", ("link", "d/zh/mldr-zh_len-0-500.jsonl")),
        ("d/zh/mldr-zh_len-500-1000.jsonl", ("symlink", "/etc/passwd")),
        ("../mldr-zh_len-9-9.jsonl", MLDR),
        ("d/en/msmarco_len-0-500.jsonl", b"not Chinese")]))
    extracted, skipped = data.extract_matching(archive, tmp_path / "out", SOURCES)
    assert extracted == {"d/zh/mldr-zh_len-0-500.jsonl": len(MLDR),
                         "d/other/mldr-zh_len-0-500.jsonl": 15,
                         "d/zh/dureader_len-0-500.jsonl": len(MLDR)}
    assert skipped == {"d/zh/mldr-zh_len-500-1000.jsonl": "a link to /etc/passwd",
                       "../mldr-zh_len-9-9.jsonl": "unsafe path"}
    assert (tmp_path / "out/d/zh/dureader_len-0-500.jsonl").read_bytes() == MLDR
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "out"]



def test_a_hard_link_into_a_folder_no_earlier_member_created_is_copied(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_members([
        ("d/zh/mldr-zh_len-0-500.jsonl", MLDR),
        ("d/new/folder/dureader_len-0-500.jsonl", ("link", "d/zh/mldr-zh_len-0-500.jsonl"))]))
    extracted, skipped = data.extract_matching(archive, tmp_path / "out", SOURCES)
    assert extracted["d/new/folder/dureader_len-0-500.jsonl"] == len(MLDR) and not skipped
    assert (tmp_path / "out/d/new/folder/dureader_len-0-500.jsonl").read_bytes() == MLDR


def test_cut_prepared_splits_name_the_folder_and_how_to_rebuild(tmp_path):
    _write_fake_bge_m3(tmp_path / "bge-m3-data")
    cfg = _full_cfg(tmp_path)
    out = data.prepare_data(cfg).manifest and data.prepared_dir(cfg)
    arrow = sorted((out / "train").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(data.DataError, match=rf"{out / 'train'}: the prepared train split cannot "
                                             rf"be read .*prepare_data\(cfg, rebuild=True\)"):
        data.prepare_data(cfg)
    assert len(data.prepare_data(cfg, rebuild=True).train) > 0  # and the advice works

@pytest.mark.parametrize("cut", ["inside a member", "at a member boundary", "gzip stream"])
def test_a_cut_archive_is_named_and_never_marked_complete(tmp_path, cut):
    import gzip

    whole = _tar_members([("d/mldr-zh_len-0-500.jsonl", MLDR),
                          ("d/dureader_len-0-500.jsonl", DUREADER)])
    archive = tmp_path / "a.tar.gz"
    if cut == "inside a member":
        archive.write_bytes(whole[:512 + 300])
    elif cut == "at a member boundary":
        archive.write_bytes(gzip.compress(_tar_members(
            [("d/mldr-zh_len-0-500.jsonl", MLDR), ("d/dureader_len-0-500.jsonl", DUREADER)],
            end=False)))
    else:
        compressed = gzip.compress(whole)
        archive.write_bytes(compressed[: len(compressed) - 40])
    with pytest.raises(DataUnavailableError, match=r"a\.tar\.gz (is cut or damaged|ends after "
                                                   r"the member d/dureader).*download it again"):
        data.extract_matching(archive, tmp_path / "out", SOURCES)
    assert not list((tmp_path / "out").rglob(".part-*")), "no partial file left"


def test_a_marked_extraction_whose_file_changed_is_extracted_again(tmp_path, monkeypatch,
                                                                   capsys):
    import huggingface_hub

    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_members([("d/mldr-zh_len-0-500.jsonl", MLDR),
                                      ("d/dureader_len-0-500.jsonl", DUREADER)]))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(archive))
    target = data.download_bge_m3_zh("r", SOURCES, tmp_path / "cache")
    assert "extracted 2 Chinese files" in capsys.readouterr().out
    (target / "d/dureader_len-0-500.jsonl").write_bytes(DUREADER[:10])  # cut, e.g. by a kill
    data.download_bge_m3_zh("r", SOURCES, tmp_path / "cache")
    assert "extracting again: " in capsys.readouterr().out
    assert (target / "d/dureader_len-0-500.jsonl").read_bytes() == DUREADER
    data.download_bge_m3_zh("r", SOURCES, tmp_path / "cache")
    assert capsys.readouterr().out == ""  # complete: used as it is


def test_unreachable_hub_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailableError) as err:
        data.prepare_data(_full_cfg(tmp_path, data_dir=None))
    message = str(err.value)
    assert "Shitao/bge-m3-data" in message and "HF_ENDPOINT" in message
    assert "data_dir" in message and "*lecardv2*_len-7000-inf.jsonl" in message


def test_corpus_of_deduplicates_passages_in_first_seen_order():
    split = [
        {"positive_passages": [{"text": "a"}], "negative_passages": [{"text": "b"}]},
        {"positive_passages": [{"text": "b"}], "negative_passages": [{"text": "c"}, {"text": "a"}]},
    ]
    assert data.corpus_of(split) == ["a", "b", "c"]


def test_collect_lengths_in_characters():
    split = [{"source": "s", "query": "一二三", "positive_passages": [{"text": "四五"}]},
             {"source": "t", "query": "六", "positive_passages": [{"text": "七八九十"},
                                                               {"text": "x"}]}]
    assert data.collect_lengths(split) == {"s": {"query": [3], "passage": [2]},
                                           "t": {"query": [1], "passage": [4, 1]}}
    table = data.summarize_lengths(data.collect_lengths(split))
    assert table.loc[("t", "passage"), "mean"] == 2.5


def test_lenient_mode_counts_surrogates_and_deep_nesting_instead_of_crashing(tmp_path):
    lines = [json.dumps(GOOD).encode(),
             b'{"query": "\\ud800x", "positive_passages": [{"text": "p"}]}',
             b'{"query": "q", "positive_passages": [{"text": "p"}], "neg": ' + b"[" * 200_000]
    path = _write(tmp_path / "bad.jsonl", lines, mode="wb")
    report = LoadReport()
    kept = list(records.read_jsonl(path, strict=False, report=report))
    assert len(kept) == 1 and report.read == 3
    assert report.dropped == {"invalid_record": 1, "invalid_json": 1}


def test_check_splits_catches_a_test_query_leaking_into_training():
    """The guard every experiment relies on: a query in two splits (up to whitespace and
    width, as normalise_text compares them) is an error naming the two splits."""
    from datasets import Dataset

    def rows(queries):
        return Dataset.from_list([{"query": q} for q in queries])

    manifest = {"splits": {"train": 3, "validation": 1, "test": 2}, "subset_sizes": {"a": 2}}
    clean = data.Splits(rows(["甲", "乙", "丙"]), rows(["丁"]), rows(["戊", "己"]), manifest)
    assert data.check_splits(clean)["disjoint"]
    leaked = data.Splits(rows(["甲", " 戊 ", "丙"]), rows(["丁"]), rows(["戊", "己"]), manifest)
    with pytest.raises(AssertionError, match="1 queries are in both train and test"):
        data.check_splits(leaked)
    miscounted = data.Splits(rows(["甲", "乙", "丙"]), rows(["丁"]), rows(["戊", "己"]),
                             {**manifest, "splits": {"train": 4, "validation": 1, "test": 2}})
    with pytest.raises(AssertionError, match="train: 3 rows, manifest says otherwise"):
        data.check_splits(miscounted)
