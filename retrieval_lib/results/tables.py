"""Results: comparisons and the report's tables over the saved runs.

The runs of a preset (read by :func:`retrieval_lib.results.runs.collect_runs`: every training run
and every baseline, or the mark of one that could not run) go into :func:`report_table`: the
report's table, with the reference system (BGE-M3, or BM25 where BGE-M3 was not run), each
model's gain over its base and paired tests, and :func:`markdown_table` writes it for the README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..evaluation.metrics import HEADLINE_METRICS, bootstrap_ci, paired_test, summarize_systems
from ..settings.config import project_root
from ..settings.provenance import png_text, run_source
from .cmteb import cmteb_table
from .runs import environment_info

__all__ = ["reference_system", "report_table", "markdown_table", "write_markdown_report",
           "report_sources", "KEY_FIGURES",
           "write_between_markers", "save_benchmark", "system_summaries", "efficiency_points",
           "data_scaling_groups", "PUBLISHED_RESULTS"]

#: Numbers the original report published, ``{experiment: {metric: mean}}``, shown beside the
#: measured ones and labelled as published. Empty: the report's tables are not in this
#: repository; add them here from the report (never from a run of this code).
PUBLISHED_RESULTS: dict[str, dict[str, float]] = {}


def reference_system(runs: dict[str, dict]) -> str | None:
    """The system every model is compared with: BGE-M3 (dense) when it was run, else BM25."""
    for name in ("bge_m3", "bm25"):
        if runs.get(name, {}).get("status") == "done":
            return name
    return None


def _base_of(name: str, run: dict, runs: dict[str, dict]) -> str | None:
    """The run a model's gain is measured against: its base experiment for an expansion (or an
    ablation variant of one), nothing for a model trained from its pretrained LM."""
    base = run.get("base_experiment")
    return base if base in runs and runs[base]["status"] == "done" else None


def report_table(runs: dict[str, dict], metrics=HEADLINE_METRICS, reference: str | None = None,
                 test_metric: str = "ndcg@5", seed: int = 0):
    """The report's table, one row per system that was run (not-run baselines are listed with
    their status only): for each metric mean, std, 95% bootstrap CI and % of the reference;
    the gain of ``test_metric`` over the untrained model and over the base experiment; a
    paired randomisation test of ``test_metric`` against the reference; and the published
    number of the report where :data:`PUBLISHED_RESULTS` has it."""
    import pandas as pd

    if not runs:
        raise ValueError("no saved runs: run the 03_* and 04 notebooks of this preset first")
    reference = reference or reference_system(runs)
    ref = runs[reference]["test"] if reference else None
    rows = []
    for name, run in runs.items():
        row = {"system": name, "kind": run["kind"], "status": run["status"]}
        if run["status"] != "done":
            row["note"] = run["reason"]
            row["how_to_run"] = run.get("how_to_run")
            rows.append(row)
            continue
        row.update({"title": run["title"], "parameters": run["parameters"],
                    "train_records": run["train_records"]})
        per_query = run["test"]["per_query"]
        for metric in metrics:
            values = list(per_query[metric].values())
            agg = run["test"]["aggregate"][metric]
            low, high = bootstrap_ci(values, seed=seed)
            row.update({f"{metric}": agg["mean"], f"{metric}_std": agg["std"],
                        f"{metric}_ci_low": low, f"{metric}_ci_high": high})
            if ref is not None:
                ref_mean = ref["aggregate"][metric]["mean"]
                row[f"{metric}_pct_of_reference"] = (agg["mean"] / ref_mean if ref_mean
                                                     else float("nan"))
            published = PUBLISHED_RESULTS.get(name, {}).get(metric)
            row[f"{metric}_published"] = published
        mean = run["test"]["aggregate"][test_metric]["mean"]
        if "untrained" in run:
            row[f"{test_metric}_gain_over_untrained"] = (
                mean - run["untrained"]["aggregate"][test_metric]["mean"])
        base = _base_of(name, run, runs)
        row["base"] = base
        if base:
            row[f"{test_metric}_gain_over_base"] = (
                mean - runs[base]["test"]["aggregate"][test_metric]["mean"])
        if ref is not None and name != reference:
            test = paired_test(per_query[test_metric], ref["per_query"][test_metric], seed=seed)
            row.update({f"{test_metric}_vs_reference": test["mean_difference"],
                        "p_value_vs_reference": test["p_value"]})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("system")
    table.attrs["reference"] = reference
    table.attrs["test_metric"] = test_metric
    return table


def markdown_table(table, metrics=HEADLINE_METRICS, digits: int = 3) -> str:
    """The report table as GitHub markdown: "mean ± std" per metric, % of the reference, gain
    over the base, p-value against the reference; systems not run (or whose saved run is broken)
    marked so."""
    reference = table.attrs.get("reference")
    test_metric = table.attrs.get("test_metric", "ndcg@5")
    header = (["system", "params", "train"] + [m for m in metrics]
              + [f"% of {reference}" if reference else "% of reference",
                 f"Δ{test_metric} vs base", f"p vs {reference or 'reference'}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        if row["status"] != "done":
            cells = [name, "", ""] + [row["status"]] * len(metrics) + ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        params = row.get("parameters")
        cells = [name, f"{params / 1e6:.1f}M" if params == params and params else "—",
                 f"{int(row['train_records']):,}" if row.get("train_records") == row.get(
                     "train_records") and row.get("train_records") else "—"]
        cells += [f"{row[m]:.{digits}f} ± {row[f'{m}_std']:.{digits}f}" for m in metrics]
        pct = row.get(f"{test_metric}_pct_of_reference")
        cells.append(f"{pct:.0%}" if pct == pct and pct is not None else "—")
        gain = row.get(f"{test_metric}_gain_over_base")
        cells.append(f"{gain:+.{digits}f} ({row['base']})" if gain == gain and gain is not None
                     else "—")
        p = row.get("p_value_vs_reference")
        cells.append(f"{p:.3g}" if p == p and p is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_between_markers(path: str | os.PathLike, start: str, end: str, body: str) -> None:
    """Replace what ``path`` holds between the lines ``start`` and ``end`` with ``body`` (how the
    benchmark and mutation scripts keep the README's tables rendered from their saved JSON)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{path}: the markers {start!r} and {end!r} are not both there")
    first, last = text.index(start) + len(start), text.index(end)
    path.write_text(text[:first] + "\n" + body + "\n" + text[last:], encoding="utf-8")


def save_benchmark(saved: dict, results: str | os.PathLike, readme: str | os.PathLike,
                   start: str, end: str, table: str) -> None:
    """A benchmark's measurements: ``saved`` written to ``results`` (JSON), ``table`` (rendered
    from it) into ``readme`` between the markers, unless ``saved["smoke"]``; ``saved`` is
    printed as the last line either way (what the smoke tests read)."""
    if not saved["smoke"]:
        Path(results).write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
        write_between_markers(readme, start, end, table)
    print(json.dumps(saved, ensure_ascii=False))


#: The figures the report page shows beside its table, when they were drawn: file name patterns
#: under ``figures/<preset>/`` (notebook + name) and what to look for in each.
KEY_FIGURES = (
    ("05_results_and_plots_metric_bars.png",
     "Every run's test metrics with 95% confidence intervals; the reference system is red and "
     "its mean dashed: how far each dense model is from it."),
    ("05_results_and_plots_training_curves.png",
     "Training loss and validation NDCG@10 / Recall@10 of every training run; dotted lines mark "
     "where an expansion unfreezes its next new layer."),
    ("05_results_and_plots_data_scaling_*.png",
     "One model trained on the nested subsets: does more labelled data still help?"),
    ("05_results_and_plots_efficiency_frontier.png",
     "Parameters against NDCG@5; the grey line joins the models that no smaller model beats, "
     "baselines without parameters are horizontal lines."),
    ("03_train_minimind38_unfreeze_schedule.png",
     "The expansion schedule: the pretrained layers always train, the new layers join one per "
     "stage."),
    ("03_stage1_pretraining_stage_curves.png",
     "Stage 1 before fine-tuning: RetroMAE's reconstruction losses and the unsupervised "
     "contrastive stage's loss, with their held-out values."),
    ("03_stage1_pretraining_recipe_metrics.png",
     "The seed's stage ablation on experiment 4.1.1: the same fine-tuning from the LM, after "
     "RetroMAE, after both stages and after the contrastive stage alone."),
    ("03_train_minimind27_test_metrics.png",
     "The first experiment before and after fine-tuning: what contrastive training adds to an "
     "LM that never learned to embed a text."),
    ("03_beyond_the_report_test_metrics.png",
     "The options beyond the report, each changing one thing of the 27M baseline."),
    ("03_beyond_the_report_rerank_metrics.png",
     "A cross-encoder reranking the first stages' top candidates, against those first stages "
     "and a random order."),
    ("05_results_and_plots_per_query_distributions.png",
     "Per-query NDCG@5: most queries score 0 or 1, which is why the standard deviations are "
     "large."),
)


def report_sources(runs: dict[str, dict], preset: str) -> dict[str, str]:
    """The saved results behind a table, keyed as ``settings.provenance`` keys them: each done
    run by the digest of its ``metrics.json``, and the prepared data its runs were trained on by
    its fingerprint (``mixed:...`` when they were not all trained on the same)."""
    keys, data = {}, {}
    for name, run in runs.items():
        if run.get("status") != "done":
            continue
        _, keys[f"runs/{preset}/{name}"] = run_source(run["out_dir"])
        config = run.get("config") or {}
        fingerprint = (config.get("data_manifest") or {}).get("fingerprint")
        if fingerprint:
            data.setdefault((config.get("data") or {}).get("kind", preset), set()).add(fingerprint)
    for kind, prints in data.items():
        keys[f"data/{kind}"] = (next(iter(prints)) if len(prints) == 1
                                else "mixed:" + ",".join(sorted(prints)))
    return dict(sorted(keys.items()))


def write_markdown_report(table, preset: str, root: str | os.PathLike | None = None,
                          runs: dict[str, dict] | None = None) -> Path:
    """``<root>/reports/results_<preset>.md``: the report table with what made it (preset,
    reference, machine, versions), for the README to link; below it, each system that was not
    run (or whose run is broken) with the reason and, where known, how to run it, then the key
    figures of ``figures/<preset>/`` (:data:`KEY_FIGURES`) that were drawn.

    Beside it, ``results_<preset>.json``: the same table and, given the ``runs`` it was built
    from, the digests of their results (:func:`report_sources`), which the committed figures
    are checked against (``settings.provenance.stale_figures``)."""
    env = environment_info(preset)
    root = Path(root or project_root())
    reference = table.attrs.get("reference") or "none"
    lines = [f"# Results: `{preset}` preset", "",
             f"Built by `05_results_and_plots.ipynb` from the saved runs in `runs/{preset}/` on "
             f"{env['time_utc']} at commit `{env['git_commit']}` ({env['device']}, "
             f"{env['cpu_count']} CPUs, torch {env['packages'].get('torch')}). Each cell is the "
             f"mean ± sample std over the test queries; `% of {reference}` and "
             f"`p vs {reference}` compare {table.attrs.get('test_metric', 'ndcg@5')} with the "
             f"reference system (a paired randomisation test over the same queries); Δ vs base "
             f"is the gain over the model an expansion grew from.", ""]
    if preset == "demo":
        lines += ["The demo preset uses tiny models and the People's Daily 1998 corpus: these "
                  "numbers show that the pipeline works, not how the real models compare.", ""]
    rendered = markdown_table(table)
    missing = [f"- `{name}` {row['status']}: {row['note']}."
               + (f" To run it: {row['how_to_run']}." if row.get("how_to_run") else "")
               for name, row in table.iterrows() if row["status"] != "done"]
    notes = (["", "Not in the table's numbers:", ""] + missing) if missing else []
    cmteb = cmteb_table(runs) if runs is not None else None
    if cmteb:
        notes += ["", "## C-MTEB retrieval (mteb)", "", "NDCG@10 of the runs evaluated with "
                  "`retrieval_lib.results.evaluate_mteb` (mteb's own evaluator; each run's "
                  "`cmteb.json`).", "", cmteb]
    figures = _key_figures(root / "figures" / preset)
    if figures:
        notes += ["", "## Figures", "", f"Drawn from the same runs by the notebooks (all of them "
                  f"are in `figures/{preset}/`); each PNG names the runs it was drawn from in its "
                  f"metadata.", ""]
        for path, what in figures:
            notes += [f"![{png_text(path).get('Title', path.stem)}](../figures/{preset}/"
                      f"{path.name})", "", what, ""]
    path = root / "reports" / f"results_{preset}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + rendered + "\n".join(notes)
                    + ("\n" if notes else ""), encoding="utf-8")
    saved = {"preset": preset, "commit": env["git_commit"], "time_utc": env["time_utc"],
             "reference": table.attrs.get("reference"),
             "sources": report_sources(runs, preset) if runs is not None else {},
             "table_markdown": rendered}
    path.with_suffix(".json").write_text(json.dumps(saved, ensure_ascii=False, indent=2) + "\n",
                                         encoding="utf-8")
    return path


def _key_figures(folder: Path) -> list[tuple[Path, str]]:
    """The :data:`KEY_FIGURES` found in ``folder``, in their order, with what to look for."""
    return [(path, what) for pattern, what in KEY_FIGURES
            for path in sorted(folder.glob(pattern))]


def system_summaries(runs: dict[str, dict], metrics=HEADLINE_METRICS, seed: int = 0) -> dict:
    """``{system: {metric: {mean, std, ci_low, ci_high, n}}}`` of every run that was done."""
    return summarize_systems({name: run["test"] for name, run in runs.items()
                              if run["status"] == "done"}, list(metrics), seed)


def efficiency_points(runs: dict[str, dict], metric: str = "ndcg@5", seed: int = 0) -> dict:
    """Parameters and ``metric`` (mean, CI) of every run with a parameter count."""
    summaries = system_summaries(runs, [metric], seed)
    return {name: {"parameters": runs[name]["parameters"], **summaries[name][metric]}
            for name in summaries if runs[name].get("parameters")}


def data_scaling_groups(runs: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Training runs of one unexpanded model on several data sizes: ``{model: {run: records}}``
    (models with a single size are left out)."""
    groups: dict[str, dict[str, int]] = {}
    for name, run in runs.items():
        if run["kind"] == "experiment" and run["status"] == "done" and not run["num_new_layers"]:
            groups.setdefault(run["model"], {})[name] = run["train_records"]
    return {model: sizes for model, sizes in groups.items() if len(set(sizes.values())) > 1}
