"""The first call of every experiment notebook: its parameters turned into experiments.

A notebook's ``parameters`` cell stays literal (papermill rewrites it); the cell after it hands
its namespace to one call here, which sets the project home, resolves the preset, applies the
parameters that override an experiment (:data:`OVERRIDES`, those the notebook defines) and,
under the full preset, stops at once when weights or data are missing.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping, Sequence

from ..settings.config import (
    ExperimentConfig,
    get_data_config,
    get_experiment,
    resolve_preset,
    set_project_home,
    with_overrides,
)
from .expansion import expansion_experiments
from .inputs import check_full_inputs, realised

__all__ = ["OVERRIDES", "SUBSETS", "list_parameter", "start_experiments", "start_expansion",
           "distinct_subsets"]

#: Notebook parameters that override an experiment's settings (``with_overrides`` keywords).
OVERRIDES = ("data_dir", "model_path", "trust_remote_code", "expansion_init", "unfreeze_every",
             "epochs", "batch_size", "learning_rate", "temperature", "num_hard_negatives",
             "gradient_checkpointing", "pretraining_stages")

#: Notebook parameters that only the full preset reads: ``auto`` refuses to drop them.
FULL_INPUTS = ("data_dir", "model_path")

#: The nested training subsets, smallest first (``DataConfig.subset_sizes`` of every preset).
SUBSETS = tuple(get_data_config("full").subset_sizes)


def _start(parameters: Mapping) -> tuple[str, dict]:
    """Set the project home, resolve the preset; the overrides the notebook defines."""
    missing = [k for k in ("preset", "project_home") if k not in parameters]
    if missing:
        raise KeyError(f"the notebook defines no parameter {', '.join(missing)}: its "
                       "`parameters` cell must set it")
    set_project_home(parameters["project_home"])
    preset = resolve_preset(parameters["preset"], {k: parameters.get(k) for k in FULL_INPUTS})
    return preset, {k: parameters[k] for k in OVERRIDES if k in parameters}


def start_experiments(names: Sequence[str], parameters: Mapping
                      ) -> tuple[str, dict[str, ExperimentConfig]]:
    """``(preset, {name: experiment})`` for a notebook that trains ``names`` with its
    ``parameters`` (the notebook's ``globals()``) applied to each; under the full preset the
    first one's weights and data are checked before anything is prepared.

    >>> preset, exps = start_experiments(["minimind27_10k"], {"preset": "demo",
    ...     "project_home": "", "epochs": 2, "learning_rate": None, "unused": 1})
    >>> preset, exps["minimind27_10k"].training.epochs
    ('demo', 2)
    """
    preset, overrides = _start(parameters)
    exps = {name: with_overrides(get_experiment(name, preset), **overrides) for name in names}
    if preset == "full" and exps:
        check_full_inputs(exps[names[0]])
    return preset, {name: realised(exp) for name, exp in exps.items()}


def start_expansion(name: str, parameters: Mapping
                    ) -> tuple[str, ExperimentConfig, ExperimentConfig]:
    """``(preset, expansion, base)`` for an expansion notebook: :func:`expansion_experiments`
    with the notebook's ``parameters`` (its ``globals()``)."""
    preset, overrides = _start(parameters)
    return (preset, *expansion_experiments(name, preset, **overrides))


def list_parameter(value, name: str, allowed: Collection[str] | None = None) -> list[str]:
    """A list parameter of a notebook as any way of passing it gives it: a list (the cell, or
    ``papermill -y``), or a string (``papermill -p``, which passes text): comma-separated
    (``10k,96k``) or a list literal (``'["10k"]'``). Every item must be one of ``allowed``;
    anything else stops with the forms that work.

    >>> list_parameter("10k, 96k", "subsets"), list_parameter('["10k"]', "subsets")
    (['10k', '96k'], ['10k'])
    >>> list_parameter("10k,1k", "subsets", ["10k", "96k"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: subsets: '1k' is not one of 10k, 96k. Pass a list ... -p subsets 10k,96k  or ...
    """
    items = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                items = None
        else:
            items = [x.strip() for x in text.split(",") if x.strip()]
    example = list(allowed)[:2] if allowed else ["a", "b"]
    quoted = ", ".join(f'"{x}"' for x in example)
    forms = (f"-p {name} {','.join(example)}  or  -p {name} '[{quoted}]'  or  "
             f"-y '{name}: [{', '.join(example)}]'")
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{name}: {value!r} is not a list of names. Pass a list in any of "
                         f"these forms: {forms}")
    if not items:
        raise ValueError(f"{name} is empty. Pass a list in any of these forms: {forms}")
    unknown = [x for x in items if allowed is not None and x not in allowed]
    if unknown:
        raise ValueError(f"{name}: {unknown[0]!r} is not one of {', '.join(allowed)}. Pass a "
                         f"list in any of these forms: {forms}")
    return list(items)


def distinct_subsets(exps: Mapping[str, ExperimentConfig]) -> list[str]:
    """The subsets of ``exps`` (``{subset: experiment}``, smallest first) whose training data
    differ: nested prefixes with the same prepared record count are the same records, so only
    the first of them is kept, and the others are named.

    >>> from dataclasses import replace
    >>> exps = {s: replace(get_experiment(f"minimind108_{s}", "full"), prepared_records=n)
    ...         for s, n in (("10k", 100), ("96k", 100), ("288k", 100))}
    >>> distinct_subsets(exps)
    子集 96k、288k 与 10k 的训练数据相同（都是 100 条：准备好的数据没有更多记录），只运行 10k
    ['10k']
    """
    kept: dict[int, str] = {}
    same: dict[str, list[str]] = {}
    for subset, exp in exps.items():
        first = kept.setdefault(exp.train_size, subset)
        if first != subset:
            same.setdefault(first, []).append(subset)
    for first, others in same.items():
        print(f"子集 {'、'.join(others)} 与 {first} 的训练数据相同（都是 "
              f"{exps[first].train_size:,} 条：准备好的数据没有更多记录），只运行 {first}")
    return list(kept.values())
