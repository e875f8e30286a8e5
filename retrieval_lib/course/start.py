"""The first call of every experiment notebook: its parameters turned into experiments.

A notebook's ``parameters`` cell stays literal (papermill rewrites it); the cell after it hands
its namespace to one call here, which sets the project home, resolves the preset, applies the
parameters that override an experiment (:data:`OVERRIDES`, those the notebook defines) and,
under the full preset, stops at once when weights or data are missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..settings.config import (
    ExperimentConfig,
    get_experiment,
    resolve_preset,
    set_project_home,
    with_overrides,
)
from .expansion import expansion_experiments
from .experiment import check_full_inputs

__all__ = ["OVERRIDES", "start_experiments", "start_expansion"]

#: Notebook parameters that override an experiment's settings (``with_overrides`` keywords).
OVERRIDES = ("data_dir", "model_path", "trust_remote_code", "expansion_init", "unfreeze_every",
             "epochs", "batch_size", "learning_rate", "temperature", "num_hard_negatives",
             "gradient_checkpointing")


def _start(parameters: Mapping) -> tuple[str, dict]:
    """Set the project home, resolve the preset; the overrides the notebook defines."""
    missing = [k for k in ("preset", "project_home") if k not in parameters]
    if missing:
        raise KeyError(f"the notebook defines no parameter {', '.join(missing)}: its "
                       "`parameters` cell must set it")
    set_project_home(parameters["project_home"])
    preset = resolve_preset(parameters["preset"])
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
    return preset, exps


def start_expansion(name: str, parameters: Mapping
                    ) -> tuple[str, ExperimentConfig, ExperimentConfig]:
    """``(preset, expansion, base)`` for an expansion notebook: :func:`expansion_experiments`
    with the notebook's ``parameters`` (its ``globals()``)."""
    preset, overrides = _start(parameters)
    return (preset, *expansion_experiments(name, preset, **overrides))
