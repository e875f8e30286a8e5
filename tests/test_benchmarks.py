"""The benchmark scripts run end to end in their smoke mode (seconds): CI keeps them working.
Their numbers are not asserted: speed targets live in the scripts' printed ratios. The README's
throughput table is the one the saved results render."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def test_throughput_benchmark_smoke_in_bf16():
    """The demo shape (the real one takes minutes even in smoke mode; ``--matrix`` runs it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCHMARKS / "throughput.py"), "--smoke",
                          "--precision", "bf16"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"train", "encode"}
    assert set(report["train"]) == {"ours", "st", "st-cached"}
    assert set(report["encode"]) == {"ours", "st"}
    for results in report.values():
        for r in results.values():
            assert r["items"] > 0 and r["per_second"] > 0 and r["peak_memory_mb"] > 0
    assert "demo shape, bf16" in out.stdout and "ours/this" in out.stdout


def test_the_readme_table_is_rendered_from_the_saved_results():
    module = _script("throughput")
    saved = json.loads((BENCHMARKS / "results.json").read_text(encoding="utf-8"))
    assert {(r["shape"], r["precision"]) for r in saved["runs"]} == {
        (s, p) for s in ("demo", "real") for p in ("fp32", "bf16")}
    block = _readme_block(module)
    assert block.strip() == module.render_table(saved).strip()
    run = saved["runs"][0]["report"]["train"]
    ratio = run["ours"]["per_second"] / run["st"]["per_second"]
    assert f"{ratio:.2f}×" in block


def test_demo_ablation_smoke():
    """Three variants on a sliver of the demo data: the script trains each in a home of its own
    and compares it on the validation set with the unchanged twin; the second-corpus variant
    pretrains its LM on the reviews too (a cache folder of its own)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "demo_ablation.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(out.stdout.strip().splitlines()[-1])
    assert saved["smoke"] and list(saved["variants"]) == ["baseline", "lr_1e-3",
                                                         "pretrain_reviews"]
    changed = saved["variants"]["lr_1e-3"]
    assert changed["training"] == {"learning_rate": 1e-3} and changed["train_records"] == 100
    assert changed["validation_vs_baseline"]["n"] == 40  # the smoke validation set
    assert 0 <= changed["validation_ndcg@10"] <= 1 and changed["pretrain_steps"] == 30
    assert "validation_vs_baseline" not in saved["variants"]["baseline"]
    base, reviews = saved["variants"]["baseline"], saved["variants"]["pretrain_reviews"]
    assert base["extra_pretraining_texts"] == 0 and reviews["extra_pretraining_texts"] == 200
    report = reviews["extra_corpus_report"]
    assert report["read"] == report["kept"] + sum(report["dropped"].values())
    # the same schedule on more text is another LM: its held-out perplexity differs
    assert reviews["heldout_perplexity"] != base["heldout_perplexity"]


def test_demo_ablation_merges_re_measured_rows_only_against_the_same_baseline():
    module = _script("demo_ablation")
    base = {"validation_ndcg@10": 0.3, "test_ndcg@5": 0.2, "heldout_perplexity": 270.0,
            "train_records": 600}
    saved = {"commit": "aaa", "date": "d0", "bm25": {"test_ndcg@5": 0.77},
             "variants": {"baseline": base, "epochs_12": {"v": 1}, "lr_1e-3": {"v": 2}}}
    new = {"commit": "bbb", "date": "d1", "bm25": {"test_ndcg@5": 0.77},
           "variants": {"baseline": dict(base), "lr_1e-3": {"v": 3}, "pretrain_0": {"v": 4}}}
    merged = module.merge_results(saved, new)
    # rows in VARIANTS order; re-measured rows replaced and stamped, the others kept as saved
    assert list(merged["variants"]) == ["baseline", "pretrain_0", "epochs_12", "lr_1e-3"]
    assert merged["variants"]["lr_1e-3"] == {"v": 3, "commit": "bbb", "date": "d1"}
    assert merged["variants"]["epochs_12"] == {"v": 1} and merged["commit"] == "aaa"
    assert merged["variants"]["baseline"] is base
    new["variants"]["baseline"]["heldout_perplexity"] = 271.0  # another LM: not comparable
    with pytest.raises(ValueError, match="heldout_perplexity"):
        module.merge_results(saved, new)


def test_the_stated_time_of_the_whole_demo_ablation_is_what_its_rows_took():
    """README and docstring say how long a full run takes: the saved rows' seconds, summed
    and rounded to 5 minutes (re-measuring rows may move it; then the text must follow)."""
    module = _script("demo_ablation")
    saved = json.loads(module.RESULTS.read_text(encoding="utf-8"))
    minutes = 5 * round(sum(v["seconds"] for v in saved["variants"].values()) / 300)
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"About {minutes} minutes on 2 cores: `.venv/bin/python benchmarks/demo_ablation.py`" \
        in readme
    assert f"# ~{minutes} minutes on 2 CPU cores" in module.__doc__


def test_the_fine_tuning_rows_after_stage_1_are_rendered_from_their_saved_results():
    """``demo_ablation.py --stages``: the fine-tuning rows only, from the demo's stage-1 start;
    its unchanged row is the stage ablation's 1a + 1b recipe, so it must equal that saved row to
    the digit (the same shipped stage-1 runs, the same fine-tuning)."""
    module = _script("demo_ablation")
    saved = json.loads(module.RESULTS_AFTER_STAGES.read_text(encoding="utf-8"))
    assert not saved["smoke"] and saved["pretraining_stages"] == ["retromae", "contrastive"]
    assert list(saved["variants"]) == list(module.FINE_TUNING_VARIANTS)
    assert "pretrain_0" not in module.FINE_TUNING_VARIANTS
    assert _readme_block(module).strip() == module.render_table(saved).strip()
    stage = json.loads((BENCHMARKS / "stage1_ablation.json").read_text(encoding="utf-8"))
    same = stage["models"]["minimind27_10k"]["recipes"]["retromae_contrastive"]
    base = saved["variants"]["baseline"]
    assert (base["validation_ndcg@10"], base["test_ndcg@5"]) == (same["validation_ndcg@10"],
                                                                 same["test_ndcg@5"])


def _readme_block(module) -> str:
    """The text between a benchmark's table markers on its docs page."""
    readme = module.DOC.read_text(encoding="utf-8")
    return readme[readme.index(module.TABLE_START) + len(module.TABLE_START):
                  readme.index(module.TABLE_END)]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batching_benchmark_smoke():
    """Four policies on the synthetic stand-in: padding and tokens per process come from the
    seeded batches (no timing in them), so the shared seed's bound on the two processes'
    imbalance shows even at this size."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "batching.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(out.stdout.strip().splitlines()[-1])
    policies = saved["policies"]
    assert list(policies) == list(_script("batching").POLICIES)
    for r in policies.values():
        assert 0 < r["padding_fraction"] < 1 and r["tokens_per_process_max_over_min"] >= 1
        assert r["steps"] == 5 * 32 // 16 and r["steps_per_second"] > 0
    shared, alone = policies["grouped, shared seed"], policies["grouped per process"]
    assert shared["tokens_per_process_max_over_min"] < alone["tokens_per_process_max_over_min"]
    assert alone["padding_fraction"] < policies["random"]["padding_fraction"]


def test_the_batching_table_is_rendered_from_the_saved_results():
    module = _script("batching")
    saved = json.loads((BENCHMARKS / "batching.json").read_text(encoding="utf-8"))
    assert not saved["smoke"] and list(saved["policies"]) == list(module.POLICIES)
    block = _readme_block(module)
    assert block.strip() == module.render_table(saved).strip()


def test_reranking_benchmark_smoke():
    """Both contenders score the same pairs with the same weights: their scores agree (fp32
    exactly, bf16 within half-precision rounding)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "reranking.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(saved["results"]) == ["demo/fp32", "demo/bf16"]
    for r in saved["results"].values():
        assert r["pairs"] == 64 and r["ours_pairs_per_second"] > 0 and r["st_pairs_per_second"] > 0
    assert saved["results"]["demo/fp32"]["max_score_difference"] < 1e-5
    assert saved["results"]["demo/bf16"]["max_score_difference"] < 0.05


def test_the_reranking_table_is_rendered_from_the_saved_results():
    module = _script("reranking")
    saved = json.loads((BENCHMARKS / "reranking.json").read_text(encoding="utf-8"))
    assert not saved["smoke"] and list(saved["results"]) == [
        "demo/fp32", "demo/bf16", "real/fp32", "real/bf16"]
    block = _readme_block(module)
    assert block.strip() == module.render_table(saved).strip()


def test_serving_benchmark_smoke():
    """Three contenders, each in its own process, on both tasks of the demo shape."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "serving.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(saved["results"]) == ["demo/encode", "demo/rerank"]
    for row in saved["results"].values():
        assert list(row) == ["torch", "onnx", "int8"]
        for r in row.values():
            # the process's own peak: a few hundred MB for torch and a 0.5M-parameter model,
            # far below what the parent holds after parsing the corpus
            assert r["items"] == 64 and r["per_second"] > 0 and 100 < r["peak_memory_mb"] < 900


def test_the_serving_table_is_rendered_from_the_saved_results():
    module = _script("serving")
    saved = json.loads((BENCHMARKS / "serving.json").read_text(encoding="utf-8"))
    assert not saved["smoke"] and list(saved["results"]) == [
        "demo/encode", "demo/rerank", "real/encode", "real/rerank"]
    block = _readme_block(module)
    assert block.strip() == module.render_table(saved).strip()


def test_step_share_smoke():
    """The whole step and the encoder alone timed on the same batches; the share and the bound
    are the medians' ratios (worked out again here from the saved times)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "step_share.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])["result"]
    assert set(r["seconds"]) == {"step", "encoder"}  # nothing compiled in the smoke run
    assert all(len(t) == r["steps"] == 3 for t in r["seconds"].values())
    step, encoder = (sorted(r["seconds"][k][1:]) for k in ("step", "encoder"))
    step, encoder = (step[0] + step[1]) / 2, (encoder[0] + encoder[1]) / 2  # median of two
    assert r["encoder_share"] == pytest.approx(encoder / step)
    assert r["bound_outside_encoder"] == pytest.approx(step / encoder)
    assert r["passage_tokens"] == 128 and r["compiled_speedup"] is None
    # how close to the machine: rates are the counted operations over the median times, and
    # a step (both towers forward, then backward at twice the forward's products) counts at
    # least three times the passage tower's forward and less than four times
    use = r["machine_use"]
    assert 3 <= use["flops"]["step"] / use["flops"]["encode"] < 4
    assert "fp32" in use["precisions"]
    for row in use["precisions"].values():
        for kind in ("step", "encode"):
            times = sorted(row["seconds"][kind][1:])
            achieved = use["flops"][kind] / ((times[0] + times[1]) / 2)
            assert row["achieved_flops"][kind] == pytest.approx(achieved)
            assert row["share_of_peak"][kind] == pytest.approx(achieved / row["peak_flops"])


def test_the_operation_count_covers_the_forward_and_the_backward():
    """By hand: a bias-free linear layer 8 -> 4 on 3 inputs that need no gradient costs
    2·3·8·4 = 192 operations forward and as many for the weight's gradient; a product of
    (5 × 6) and (6 × 7) matrices costs 2·5·6·7 = 420."""
    import torch

    module = _script("step_share")
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    assert module.counted_flops(lambda: layer(x).sum().backward()) == 384
    assert module.counted_flops(lambda: layer(x)) == 192
    assert module.counted_flops(torch.matmul, torch.randn(5, 6), torch.randn(6, 7)) == 420


def test_the_step_share_table_is_rendered_from_the_saved_results():
    module = _script("step_share")
    saved = json.loads((BENCHMARKS / "step_share.json").read_text(encoding="utf-8"))
    r = saved["result"]
    assert not saved["smoke"] and r["shape"] == "real" and "compiled" in r["seconds"]
    block = _readme_block(module)
    assert block.strip() == module.render_table(saved).strip()
    assert f"{r['bound_outside_encoder']:.2f}×" in block
    # the machine-use table in the same page, and the README's sentence, from the same run
    page = module.DOC.read_text(encoding="utf-8")
    table = page.split(module.USE_START)[1].split(module.USE_END)[0]
    assert table.strip() == module.render_machine_use(saved).strip()
    readme = module.README.read_text(encoding="utf-8")
    summary = readme.split(module.SUMMARY_START)[1].split(module.SUMMARY_END)[0]
    assert summary.strip() == module.render_summary(saved).strip()
    fp32 = r["machine_use"]["precisions"]["fp32"]["share_of_peak"]["step"]
    assert f"fp32 {fp32:.0%}" in summary


def test_flagembedding_benchmark_smoke(tmp_path):
    """FlagEmbedding's own fine-tuning and the library's, two steps each at the demo shape:
    the peer trains on the JSON-lines file the benchmark writes in its format (query, pos, neg
    with K negatives), and both report what they ran."""
    module = _script("flagembedding")
    records = [{"query": "q1", "positive_passages": [{"text": "p1"}],
                "negative_passages": [{"text": "n1"}, {"text": "n2"}, {"text": "n3"}]}]
    written = module.write_flag_records(records, 2, tmp_path / "train.jsonl")
    assert [json.loads(x) for x in written.read_text(encoding="utf-8").splitlines()] == [
        {"query": "q1", "pos": ["p1"], "neg": ["n1", "n2"]}]
    out = subprocess.run([sys.executable, str(BENCHMARKS / "flagembedding.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(out.stdout.strip().splitlines()[-1])
    (run,) = saved["runs"]
    assert set(run["results"]) == {"ours", "flag"}
    assert run["results"]["flag"]["steps"] == 2 and run["results"]["flag"]["items"] == 8
    assert run["results"]["ours"]["items"] == 8


def test_the_flagembedding_table_is_rendered_from_the_saved_results():
    module = _script("flagembedding")
    saved = json.loads((BENCHMARKS / "flagembedding.json").read_text(encoding="utf-8"))
    assert not saved["smoke"] and {(r["shape"], r["precision"]) for r in saved["runs"]} == {
        (s, p) for s in ("demo", "real") for p in ("fp32", "bf16")}
    assert _readme_block(module).strip() == module.render_table(saved).strip()
    for run in saved["runs"]:  # the ratio is to the faster of the peer's two runs
        r = run["results"]
        best = max(r["flag"]["per_second"], r["flag+kept"]["per_second"])
        ratio = module.ratios(saved)[f"{run['shape']} {run['precision']}"]
        assert ratio == pytest.approx(r["ours"]["per_second"] / best)
        assert r["flag"]["steps"] == run["steps"]
    readme = module.README.read_text(encoding="utf-8")
    assert readme.split(module.SUMMARY_START)[1].split(module.SUMMARY_END)[0].strip() == \
        module.readme_summary(saved)


def test_stage1_ablation_smoke():
    """Four recipes of the 27M twin on a sliver of the demo: each row is a real run, the
    stage recipes name the stage runs they started from, and recipe 1 has none."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "stage1_ablation.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(out.stdout.strip().splitlines()[-1])
    rows = saved["models"]["minimind27_10k"]["recipes"]
    assert list(rows) == ["lm", "retromae", "retromae_contrastive", "contrastive"]
    assert [[s["stage"] for s in r["stage_runs"]] for r in rows.values()] == [
        [], ["retromae"], ["retromae", "contrastive"], ["contrastive"]]
    both = rows["retromae_contrastive"]["stage_runs"]
    assert both[0]["folder"] == rows["retromae"]["stage_runs"][0]["folder"]  # 1a reused
    assert both[1]["folder"] != rows["contrastive"]["stage_runs"][0]["folder"]  # other source
    for key, r in rows.items():
        assert 0 <= r["test_ndcg@5"] <= 1
        assert ("validation_vs_lm" in r) == (key != "lm")


def test_the_stage1_table_is_rendered_from_the_saved_results():
    module = _script("stage1_ablation")
    saved = json.loads((BENCHMARKS / "stage1_ablation.json").read_text(encoding="utf-8"))
    assert not saved["smoke"] and list(saved["models"]) == list(module.MODELS)
    assert _readme_block(module).strip() == module.render_table(saved).strip()
    readme = module.README.read_text(encoding="utf-8")
    summary = readme[readme.index(module.SUMMARY_START) + len(module.SUMMARY_START):
                     readme.index(module.SUMMARY_END)]
    assert summary.strip() == module.render_summary(saved).strip()
    # one row per twin, its recipes' test NDCG@5 in the saved order, BM25's last
    row = next(line for line in summary.splitlines() if line.startswith("| minimind108_10k"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    recipes = saved["models"]["minimind108_10k"]["recipes"]
    assert [float(c.split(",")[0]) for c in cells[1:]] == [
        round(r["test_ndcg@5"], 3) for r in recipes.values()] + [
        round(saved["models"]["minimind108_10k"]["bm25_test_ndcg@5"], 3)]
