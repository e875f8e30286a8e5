"""A mutation check of the test suite: do the tests fail when the core is plausibly wrong?

    .venv/bin/python tests/mutation_check.py            # every mutation (about 10 minutes)
    .venv/bin/python tests/mutation_check.py --only 3   # one, by number
    .venv/bin/python tests/mutation_check.py --readme   # also rewrite the README's table

Each mutation below is a small, plausible bug in the library (an off-by-one, a sign, a
dropped mask, a forgotten state): it is applied to a temporary copy of the repository, the test
files that cover that code run there (``-x``, no notebooks), and the mutation counts as caught
when they fail. The table of caught and missed mutations is printed, saved to
``tests/mutation_results.json`` and, with ``--readme``, rendered into the README between the
``mutation table`` markers. It is run on demand, not in CI (it runs the suite ~50 times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("mutation_results.json")
#: The page whose table ``--readme`` rewrites.
DOC = ROOT / "docs" / "tests.md"
TABLE_START, TABLE_END = "<!-- mutation table: start -->", "<!-- mutation table: end -->"


@dataclass(frozen=True)
class Mutation:
    area: str
    what: str  # the bug, in words
    file: str  # under retrieval_lib/
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # test files that should catch it


MUTATIONS = [
    # metrics
    Mutation("metrics", "precision@k divides by k+1", "evaluation/metrics.py",
             'out[f"precision@{k}"] = hits / k', 'out[f"precision@{k}"] = hits / (k + 1)',
             ("tests/test_evaluation.py",)),
    Mutation("metrics", "recall@k counts one rank too many", "evaluation/metrics.py",
             "hits = sum(1 for d in ranking[:k] if d in relevant)",
             "hits = sum(1 for d in ranking[:k + 1] if d in relevant)",
             ("tests/test_evaluation.py",)),
    Mutation("metrics", "NDCG discount log2(i+1) instead of log2(i+2)", "evaluation/metrics.py",
             "dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]) if g)",
             "dcg = sum(g / math.log2(i + 1.5) for i, g in enumerate(gains[:k]) if g)",
             ("tests/test_evaluation.py",)),
    Mutation("metrics", "MRR of the first relevant document off by one", "evaluation/metrics.py",
             'out = {"mrr": 0.0 if first is None else 1.0 / (first + 1)}',
             'out = {"mrr": 0.0 if first is None else 1.0 / (first + 2)}',
             ("tests/test_evaluation.py",)),
    Mutation("metrics", "mrr@k keeps a first hit at rank k+1", "evaluation/metrics.py",
             'out[f"mrr@{k}"] = out["mrr"] if first is not None and first < k else 0.0',
             'out[f"mrr@{k}"] = out["mrr"] if first is not None and first <= k else 0.0',
             ("tests/test_evaluation.py",)),
    # losses
    Mutation("losses", "temperature applied twice", "models/losses.py",
             "    return s / temperature\n", "    return s / temperature / temperature\n",
             ("tests/test_losses.py",)),
    Mutation("losses", "positive column of query i is i (ignores the hard negatives)",
             "models/losses.py", "return torch.arange(num_queries) * (num_passages // num_queries)",
             "return torch.arange(num_queries)", ("tests/test_losses.py",)),
    Mutation("losses", "GradCache replays the gradients without the loss scale",
             "models/gradcache.py",
             "(scale(loss) if scale is not None else loss).backward()", "loss.backward()",
             ("tests/test_gradcache.py", "tests/test_training.py")),
    # pooling and model
    Mutation("pooling", "mean pooling counts padding", "models/retriever.py",
             "return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)",
             "return hidden.mean(1)", ("tests/test_modeling.py",)),
    Mutation("pooling", "last-token pooling takes the last position, padding or not",
             "models/retriever.py", "last = (attention_mask.long() * positions).argmax(dim=1)",
             "last = torch.full_like(attention_mask[:, 0], attention_mask.shape[1] - 1).long()",
             ("tests/test_modeling.py",)),
    Mutation("model", "embeddings not L2-normalised", "models/retriever.py",
             "        return nn.functional.normalize(out, dim=-1)\n", "        return out\n",
             ("tests/test_modeling.py",)),
    Mutation("model", "passages encoded by the query projection", "models/retriever.py",
             'projection = self.query_projection if tower == "query" else '
             'self.passage_projection',
             "projection = self.query_projection", ("tests/test_modeling.py",
                                                    "tests/test_export.py")),
    # expansion and unfreezing
    Mutation("expansion", "identity init leaves down_proj random", "models/expansion.py",
             "for module in (layer.self_attn.o_proj, layer.mlp.down_proj):",
             "for module in (layer.self_attn.o_proj,):", ("tests/test_expansion.py",)),
    Mutation("unfreezing", "an unfreeze that never freezes", "models/expansion.py",
             "p.requires_grad_(index in trainable)", "p.requires_grad_(True)",
             ("tests/test_expansion.py",)),
    Mutation("unfreezing", "stages start one step late", "models/expansion.py",
             "if step >= start]", "if step > start]", ("tests/test_expansion.py",)),
    Mutation("unfreezing", "a schedule that cannot complete is accepted", "models/expansion.py",
             "if starts and starts[-1] >= total_steps:", "if starts and starts[-1] > total_steps:",
             ("tests/test_expansion.py",)),
    # optimizer and training
    Mutation("optimizer", "weight decay on biases and norms instead of matrices",
             "training/optim.py",
             "(no_decay if p.ndim < 2 else decay).append(p)",
             "(decay if p.ndim < 2 else no_decay).append(p)", ("tests/test_training.py",)),
    Mutation("training", "gradients never clipped", "training/optim.py",
             "    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)\n",
             "", ("tests/test_training.py",)),
    Mutation("training", "collator samples negatives with an unseeded generator",
             "training/collator.py",
             "self.rng = random.Random(seed)", "self.rng = random.Random()",
             ("tests/test_training.py", "tests/test_checkpoint.py")),
    # checkpoint and resume
    Mutation("checkpoint", "fp16 loss scale not saved", "settings/checkpoint.py",
             '"scaler": scaler.state_dict() if scaler is not None else None,',
             '"scaler": None,', ("tests/test_checkpoint.py",)),
    Mutation("checkpoint", "checksums not compared", "settings/checkpoint.py",
             "    if file_sha256(path) != sha256:\n", "    if False:\n",
             ("tests/test_checkpoint.py", "tests/test_saved_folders.py")),
    Mutation("checkpoint", "diverged weights count as a good checkpoint", "settings/checkpoint.py",
             "if not math.isfinite(largest) or largest > WEIGHT_LIMIT:",
             "if not math.isfinite(largest):", ("tests/test_checkpoint.py",)),
    Mutation("checkpoint", "a failed folder write still swaps in", "settings/saved_folder.py",
             "        shutil.rmtree(tmp, ignore_errors=True)\n        raise\n",
             "        pass\n", ("tests/test_checkpoint.py", "tests/test_saved_folders.py")),
    # data validation and splits
    Mutation("data", "negatives equal to a positive kept", "data/records.py",
             "        if form in positive_forms:\n", "        if False:\n",
             ("tests/test_data.py",)),
    Mutation("data", "lone surrogates pass validation", "data/records.py",
             '        value.encode("utf-8")\n', '        value.encode("utf-8", "surrogatepass")\n',
             ("tests/test_data.py",)),
    Mutation("splits", "validation overlaps the test set by one record", "data/splits.py",
             "val = order[test_size:test_size + val_size]",
             "val = order[test_size - 1:test_size - 1 + val_size]", ("tests/test_data.py",)),
    Mutation("splits", "split-overlap guard disabled", "data/splits.py",
             'assert not overlap, f"{len(overlap)} queries are in both {a} and {b}"',
             "pass", ("tests/test_data.py",)),
    Mutation("data", "deduplication by exact query instead of normalised", "data/splits.py",
             '        key = normalise_text(r["query"])\n', '        key = r["query"]\n',
             ("tests/test_data.py",)),
    # M3 heads
    Mutation("m3", "sparse weights summed over repeated tokens instead of the max", "models/m3.py",
             'reduce="amax"', 'reduce="sum"', ("tests/test_m3.py",)),
    Mutation("m3", "ColBERT scores include padded passage tokens", "models/m3.py",
             '    sim = sim.masked_fill(~p_mask.bool()[None, :, None, :], float("-inf"))\n', "",
             ("tests/test_m3.py",)),
    Mutation("m3", "skip_first_token ignored", "models/m3.py",
             "        if self.skip_first_token:\n", "        if False:\n",
             ("tests/test_m3.py",)),
    Mutation("m3", "hybrid score swaps the sparse and ColBERT weights", "models/m3.py",
             "(weights[0] * float(dense) + weights[1] * s\n"
             "                                                   + weights[2] * c)",
             "(weights[0] * float(dense) + weights[2] * s\n"
             "                                                   + weights[1] * c)",
             ("tests/test_m3.py", "tests/test_baselines.py")),
    # mining
    Mutation("mining", "a positive can be mined as a negative", "training/mining.py",
             "            if corpus[j] in positives:\n", "            if False:\n",
             ("tests/test_mining.py",)),
    Mutation("mining", "rank range shifted by one", "training/mining.py",
             "if rank < lo or rank >= hi:", "if rank <= lo or rank > hi:",
             ("tests/test_mining.py",)),
    Mutation("mining", "false-negative rate over all hits instead of candidates",
             "training/mining.py",
             'report["false_negative_rate"] = (report["outrank_positive"] / report["candidates"]',
             'report["false_negative_rate"] = (report["outrank_positive"] / (report["candidates"]'
             ' + report["positives_excluded"])', ("tests/test_mining.py",)),
    # index
    Mutation("index", "search returns the ids of the next rows", "serving/index.py",
             "hits = [[self.ids[j] for j in row if j >= 0] for row in rows]",
             "hits = [[self.ids[(j + 1) % len(self.ids)] for j in row if j >= 0] for row in rows]",
             ("tests/test_index.py",)),
    # long documents
    Mutation("windows", "MaxP sums the windows' scores", "evaluation/windows.py",
             'reduce = np.maximum if how == "max" else np.add', "reduce = np.add",
             ("tests/test_windows.py",)),
    Mutation("windows", "the end of a long text falls outside every window",
             "evaluation/windows.py",
             "    if starts[-1] + size < n:", "    if False:", ("tests/test_windows.py",)),
    Mutation("windows", "a window's text tokens ignore the special tokens", "evaluation/windows.py",
             "special = tok.num_special_tokens_to_add(pair=False)", "special = 0",
             ("tests/test_windows.py",)),
    Mutation("index", "a windowed index lists a document at each of its windows",
             "serving/index.py",
             "if r >= 0 and self.documents[r] not in best:", "if r >= 0:",
             ("tests/test_windows.py",)),
    # fusion and the hybrid
    Mutation("fusion", "reciprocal ranks counted from 0", "evaluation/search.py",
             "for rank, doc in enumerate(rank_documents(scores), start=1):",
             "for rank, doc in enumerate(rank_documents(scores), start=0):",
             ("tests/test_evaluation.py",)),
    Mutation("fusion", "the hybrid's dense run chosen by its last epoch, not its kept one",
             "results/baselines.py",
             'best = next(e for e in history["epochs"] if e["epoch"] == history["best_epoch"])',
             'best = history["epochs"][-1]', ("tests/test_training.py",)),
    Mutation("fusion", "the hybrid's fusion chosen among the first fusion's weights only",
             "results/baselines.py", "return max(((f, w) for f, ws in curve.items() for w in ws),",
             "return max(((f, w) for f, ws in list(curve.items())[:1] for w in ws),",
             ("tests/test_baselines.py",)),
    # long positives in training, and settings newer than a saved run
    Mutation("training", "the best window of a positive is its lowest-scoring one",
             "training/collator.py",
             "picks[i] = int(np.argmax(p[start:start + n] @ q[row]))",
             "picks[i] = int(np.argmin(p[start:start + n] @ q[row]))",
             ("tests/test_training.py",)),
    Mutation("config", "a setting missing from an older run is not read as its default",
             "settings/config.py",
             "    return {**json.loads(json.dumps({k: v for k, v in defaults.items() "
             "if k not in saved})),\n"
             "            **saved}",
             "    return saved", ("tests/test_training.py", "tests/test_checkpoint.py")),
    # BM25
    Mutation("bm25", "BM25 without length normalisation", "data/bm25.py",
             "self._model = bm25s.BM25(k1=k1, b=b)", "self._model = bm25s.BM25(k1=k1, b=0.0)",
             ("tests/test_baselines.py", "tests/test_mining.py", "tests/test_demo_corpus.py")),
    # expansion studies
    Mutation("studies", "the ablation of an expansion is trained again even when it is the "
             "configured initialisation", "course/expansion.py",
             "if ablation_init and ablation_init != exp.model.expansion_init:",
             "if ablation_init:", ("tests/test_pipeline_helpers.py",)),
    Mutation("studies", "the untrained identity check compares trained results",
             "course/expansion.py",
             'before = base_run["untrained"]["per_query"][metric]',
             'before = base_run["test"]["per_query"][metric]',
             ("tests/test_pipeline_helpers.py",)),
    # batching
    Mutation("batching", "each process shuffles its buckets with its own seed",
             "training/batching.py",
             "            rng = random.Random(seed)\n",
             "            rng = random.Random(seed + self.rank)\n",
             ("tests/test_batching.py",)),
    Mutation("batching", "bucket remainders are dropped instead of pooled", "training/batching.py",
             "            batches += [(None, rest[i:i + size]) for i in range(0, len(rest) - "
             "size + 1, size)]",
             "            pass", ("tests/test_batching.py",)),
    Mutation("batching", "the sub-batch token budget never splits a batch", "models/gradcache.py",
             "        if rows * width <= self.token_budget:",
             "        if rows * width <= 10 ** 12:", ("tests/test_gradcache.py",)),
]


def _pytest(copy: Path, tests, python: str) -> subprocess.CompletedProcess:
    # the copy's library comes first on the path: the installed one must not be tested
    return subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-m", "not notebook", "-o", "addopts=", "-rfE", *tests],
                          cwd=copy, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(copy), "RETRIEVAL_HOME": str(copy)})


def snapshot(into: Path) -> Path:
    """The repository as it is now, once: later edits do not leak into the mutants."""
    copy = into / "snapshot"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "data_cache", "figures", "outputs", "__pycache__",
        ".pytest_cache", "*.egg-info"))
    return copy


def control(base: Path, python: str) -> None:
    """Every test file of the list passes on the unmutated copy, or no result means anything."""
    tests = sorted({t for m in MUTATIONS for t in m.tests})
    out = _pytest(base, tests, python)
    if out.returncode != 0:
        raise SystemExit("the unmutated copy fails its tests; fix that first:\n"
                         + out.stdout[-3000:])


def occurrences(mutation: Mutation, repo: Path = ROOT) -> int:
    """How often the text ``mutation`` replaces occurs in its library file under ``repo``: it
    applies only where that is exactly once."""
    return (repo / "retrieval_lib" / mutation.file).read_text(encoding="utf-8").count(
        mutation.find)


def run_one(index: int, mutation: Mutation, base: Path, python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(base, copy)
        found = occurrences(mutation, copy)
        if found != 1:
            raise SystemExit(f"mutation {index} ({mutation.what}): the text to replace occurs "
                             f"{found} times in {mutation.file}")
        target = copy / "retrieval_lib" / mutation.file
        source = target.read_text(encoding="utf-8")
        target.write_text(source.replace(mutation.find, mutation.replace), encoding="utf-8")
        start = time.perf_counter()
        out = _pytest(copy, mutation.tests, python)
        failed = [line.split(" ", 1)[1].split(" - ")[0] for line in out.stdout.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))]
        return {"number": index, "area": mutation.area, "what": mutation.what,
                "file": mutation.file, "tests": list(mutation.tests),
                "caught": out.returncode != 0, "by": failed[:1],
                "seconds": round(time.perf_counter() - start, 1)}


def render_table(saved: dict) -> str:
    rows = saved["results"]
    caught = sum(r["caught"] for r in rows)
    lines = [f"{caught} of {len(rows)} mutations caught ({caught / len(rows):.0%}), measured "
             f"{saved['date']} at commit `{saved['commit']}` by `tests/mutation_check.py`.", "",
             "| # | area | mutation | caught by |", "| --- | --- | --- | --- |"]
    for r in rows:
        by = f"`{r['by'][0].split('::')[-1]}`" if r["by"] else ("yes" if r["caught"] else
                                                                 "**missed**")
        lines.append(f"| {r['number']} | {r['area']} | {r['what']} | {by} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="*", help="mutation numbers to run")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table")
    args = parser.parse_args(argv)
    chosen = args.only or range(1, len(MUTATIONS) + 1)
    results = []
    workdir = tempfile.TemporaryDirectory()
    base = snapshot(Path(workdir.name))
    if not args.only:
        control(base, sys.executable)
        print("control: every listed test file passes on the unmutated copy", flush=True)
    for index in chosen:
        result = run_one(index, MUTATIONS[index - 1], base, sys.executable)
        results.append(result)
        print(f"{index:3d} {'caught' if result['caught'] else 'MISSED':6s} "
              f"{result['seconds']:6.1f} s  {result['area']}: {result['what']}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    saved = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "results": results}
    print("\n" + render_table(saved))
    if args.only:
        return 0
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    if args.readme:
        from retrieval_lib.results import write_between_markers

        write_between_markers(DOC, TABLE_START, TABLE_END, render_table(saved))
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
