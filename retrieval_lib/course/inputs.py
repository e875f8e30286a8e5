"""What a full run really gets, settled before it starts: its inputs are there, its model has
the checkpoint's shape, and its training subset has the records the prepared data holds.

``check_full_inputs`` names every missing weight file and data source before anything is
downloaded or prepared. ``with_checkpoint_shape`` gives the experiment the shape read from the
checkpoint's config (a checkpoint of another architecture is refused; one of another size runs
under its own name). ``with_prepared_records`` gives it the training records the prepared data
holds (fewer than the subset's nominal size when the data is smaller). Settings tables, plans,
expansion positions and figure labels all read the experiment, so they show what runs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..data.records import DataUnavailableError
from ..data.sources import find_source_files
from ..data.splits import prepared_dir
from ..models.base import parameter_count_from_config
from ..models.checkpoints import check_base_model, checkpoint_shape
from ..settings.config import PUBLISHED_BASE_MODELS, ExperimentConfig, get_experiment
from ..settings.hub import hub_has

__all__ = ["MissingInputsError", "check_full_inputs", "with_checkpoint_shape",
           "with_prepared_records", "training_pool", "realised"]

#: Shape fields that change what a model is (its size), not only how it computes.
_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size")

#: The notebook that fine-tunes each architecture's checkpoints.
_NOTEBOOK_FOR = {"llama": "03_train_minimind27 / 03_train_minimind108",
                 "qwen2": "03_train_qwen2_613"}


class MissingInputsError(FileNotFoundError):
    """A full-preset run whose weights or data cannot be found; the message lists each."""


def check_full_inputs(exp: ExperimentConfig) -> None:
    """Raise :class:`MissingInputsError` naming every missing model file and data source,
    before anything is downloaded or prepared.

    The model (:func:`~retrieval_lib.models.checkpoints.check_base_model`): a local folder must hold
    config.json, weights and a tokenizer (a MiniMind checkpoint must also be convertible); a
    hub id must be reachable or cached and hold the same. The data: prepared splits exist,
    ``exp.data.data_dir`` holds a file for every source, or the hub dataset is reachable.
    """
    missing = [f"- model ({exp.model.name}): {problem}" for problem in check_base_model(
        exp.model.base_model, exp.model.trust_remote_code,
        hub_id=PUBLISHED_BASE_MODELS.get(exp.model.name))]
    prepared = prepared_dir(exp.data)
    data_ok = (prepared / "manifest.json").exists()
    if not data_ok and exp.data.data_dir:
        try:
            find_source_files(exp.data.data_dir, exp.data.sources)
            data_ok = True
        except DataUnavailableError as exc:
            missing.append("- data: " + str(exc).split("\nSupply the data")[0])
    elif not data_ok:
        data_ok = hub_has(exp.data.hub_repo, "dataset")
        if not data_ok:
            missing.append(
                f"- data: no prepared splits at {prepared}, no `data_dir` given, and the hub "
                f"dataset {exp.data.hub_repo!r} is not reachable.\n  Supply it: download "
                f"bge-m3-data.tar.gz from https://huggingface.co/datasets/{exp.data.hub_repo}, "
                f"extract it and run with `-p data_dir DIR` (notebook 01 prepares the splits); "
                f"or set HF_ENDPOINT to a mirror.")
    if missing:
        given = [f"{name} {value!r}" for name, value in (
            ("data_dir", exp.data.data_dir),
            ("model_path", exp.model.base_model
             if exp.model.base_model != get_experiment(exp.name, "full").model.base_model
             else "")) if value]
        advice = (f"\nCheck the path(s) you passed ({', '.join(given)}): the fix is there." if given
                  else "\nOn a machine without GPU or hub access, run with `-p preset demo` "
                       "instead.")
        raise MissingInputsError(
            f"the full preset of experiment {exp.name} ({exp.section}) cannot start:\n"
            + "\n".join(missing) + advice)


def with_checkpoint_shape(exp: ExperimentConfig) -> ExperimentConfig:
    """Under the full preset, ``exp`` with its model's shape read from the checkpoint it loads
    (``model_path`` or the hub id; :func:`~retrieval_lib.models.checkpoints.checkpoint_shape`).

    A checkpoint of another architecture than the experiment's is refused. One of another
    size runs under its own name (the checkpoint's folder and parameter count) instead of the
    experiment's model name; every differing setting is printed. The demo is unchanged: its
    LMs are built from the config.
    """
    if exp.preset != "full":
        return exp
    shape = checkpoint_shape(exp.model.base_model)
    if shape["architecture"] != exp.model.architecture:
        raise ValueError(
            f"{exp.name} fine-tunes {exp.model.name}, a {exp.model.architecture} model; "
            f"{exp.model.base_model} holds a {shape['architecture']} checkpoint. Pass a "
            f"{exp.model.name} checkpoint as model_path"
            + (f", or run {_NOTEBOOK_FOR[shape['architecture']]} with this one"
               if shape["architecture"] in _NOTEBOOK_FOR else "") + ".")
    differs = {k: (getattr(exp.model, k), v) for k, v in shape.items()
               if getattr(exp.model, k) != v}
    if not differs:
        return exp
    model = replace(exp.model, **shape)
    if any(k in differs for k in _SIZE_FIELDS):
        params = parameter_count_from_config(model, include_new_layers=False)
        label = Path(exp.model.base_model).name or exp.model.base_model
        model = replace(model, name=f"{label} ({params / 1e6:.1f}M)")
    print(f"{exp.name}: the checkpoint {exp.model.base_model} differs from {exp.model.name}'s "
          f"configuration in " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differs.items())
          + "; the run uses the checkpoint's shape"
          + (f" and is named {model.name!r}" if model.name != exp.model.name else ""))
    return replace(exp, model=model)


def _prepared_manifest(exp: ExperimentConfig) -> dict | None:
    """The manifest of ``exp.data``'s prepared folder, or None before the data is prepared."""
    path = prepared_dir(exp.data) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def with_prepared_records(exp: ExperimentConfig, manifest: dict | None = None
                          ) -> ExperimentConfig:
    """``exp`` with the training records its subset holds in the prepared data (``manifest``,
    or the manifest of the prepared folder of ``exp.data`` when it exists; unchanged when the
    data is not prepared yet). When the data held fewer records than the subset asks for, it
    says so.
    """
    manifest = manifest or _prepared_manifest(exp)
    if manifest is None:
        return exp
    records = manifest["subset_sizes"][exp.subset]
    if records == exp.prepared_records:
        return exp
    asked = exp.data.subset_sizes[exp.subset]
    if records != asked:
        print(f"{exp.name}: the prepared data holds {records:,} training records for subset "
              f"{exp.subset}, not the {asked:,} it asks for (the data has no more); plans, "
              f"labels and comparisons use {records:,}")
    return replace(exp, prepared_records=records)


def training_pool(exp: ExperimentConfig) -> tuple[int, bool]:
    """``(records, known)``: the training pool stage 1 reads its passages from (every training
    record outside validation and test, not only ``exp``'s subset) as the prepared data holds it
    (``known``), or, before the data is prepared, the largest subset's nominal size, a lower
    bound."""
    manifest = _prepared_manifest(exp)
    if manifest is not None:
        return manifest["splits"]["train"], True
    return max(exp.data.subset_sizes.values()), False


def realised(exp: ExperimentConfig, manifest: dict | None = None) -> ExperimentConfig:
    """``exp`` with the checkpoint's shape and the prepared record count (both above)."""
    return with_prepared_records(with_checkpoint_shape(exp), manifest)
