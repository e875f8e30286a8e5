"""The course: figures, one experiment end to end (and its command line), the studies the
notebooks show, and running the notebooks.

Modules, each importing only those before it: ``plotting``, ``result_plots``, ``inputs``,
``stage1``, ``experiment``,
``expansion``, ``ablation``, ``beyond``, ``stage_study``, ``start``, ``notebooks``.
"""

from .plotting import (
    BUNDLED_FONT, CJK_FONTS, LOSS_PART_LABELS, bundled_cjk_font, figure_title, figures_dir,
    file_slug, log_x_axis, moving_average, plot_length_distributions, plot_loss_parts,
    plot_negative_gradients, plot_optimisation_history, plot_split_counts,
    plot_temperature_softmax, save_figure, setup_cjk_font
)
from .result_plots import (
    plot_efficiency_frontier, plot_memory_plan, plot_metric_bars, plot_metric_panels,
    plot_metrics_vs_data_size, plot_per_query_distributions, plot_training_curves,
    plot_stage_curves, plot_unfreeze_schedule, run_styles, unfreeze_epochs
)
from .inputs import (
    check_full_inputs, MissingInputsError, realised, training_pool, with_checkpoint_shape,
    with_prepared_records
)
from .stage1 import (
    check_stages, ensure_stages, run_stage, SHIPPED_PARTS, SHIPPED_STAGE1, stage_folder,
    stage_texts
)
from .experiment import (
    describe, ensure_run, fit_to_device, parse_command_line, prepare_base_model, repeat_command,
    result_summary, run_experiment, setup_differences
)
from .expansion import (
    SHARED_INPUTS, differences_note, expansion_comparisons, expansion_experiments,
    expansion_histories, expansion_parameters, expansion_summary, expansion_systems,
    ExpansionStudy, parameter_table, run_differences, run_expansion_with_ablation, show_plan,
    unfreeze_plan, unfreeze_table, untrained_gaps
)
from .ablation import (
    ABLATION_RESULTS, ablation_sentences, ablation_table, load_ablation
)
from .beyond import (
    AGGREGATION_LABELS, OPTION_LABELS, OPTIONS_EXPERIMENT, QUERY_INSTRUCTION, RERANK_LABELS,
    SERVING_LABELS, WINDOWED_LABEL, aggregation_study, option_comparisons, option_systems,
    option_variants, rerank_study, reranker_folder, serving_study, windowed_variant
)
from .stage_study import (
    STAGE_RECIPES, difference_text, recipe_variants, run_stage_study, stage_study_rows,
    stage_study_sentences
)
from .start import (
    OVERRIDES, SUBSETS, distinct_subsets, list_parameter, start_expansion, start_experiments
)
from .notebooks import (
    chapters_dir, notebook_paths, render_chapter, run_notebook
)

__all__ = [
    "BUNDLED_FONT", "bundled_cjk_font", "CJK_FONTS", "setup_cjk_font", "figures_dir",
    "figure_title", "file_slug", "save_figure", "plot_length_distributions",
    "plot_split_counts", "plot_temperature_softmax", "plot_negative_gradients",
    "plot_optimisation_history", "plot_loss_parts", "LOSS_PART_LABELS", "moving_average",
    "log_x_axis", "run_styles", "plot_training_curves", "plot_metric_bars",
    "plot_metrics_vs_data_size",
    "unfreeze_epochs", "plot_unfreeze_schedule", "plot_memory_plan", "plot_metric_panels",
    "plot_efficiency_frontier", "plot_per_query_distributions", "MissingInputsError",
    "check_full_inputs", "with_checkpoint_shape", "with_prepared_records", "training_pool",
    "realised",
    "prepare_base_model", "fit_to_device", "run_experiment", "setup_differences", "ensure_run",
    "result_summary", "describe", "repeat_command", "parse_command_line", "run_differences",
    "differences_note",
    "unfreeze_plan", "show_plan", "SHARED_INPUTS", "expansion_experiments",
    "expansion_parameters", "parameter_table", "run_expansion_with_ablation", "untrained_gaps",
    "expansion_comparisons", "expansion_systems", "expansion_histories", "unfreeze_table",
    "expansion_summary", "ExpansionStudy", "ABLATION_RESULTS", "load_ablation",
    "ablation_sentences", "ablation_table", "OPTIONS_EXPERIMENT", "QUERY_INSTRUCTION",
    "OPTION_LABELS", "option_variants", "option_systems", "option_comparisons",
    "AGGREGATION_LABELS", "WINDOWED_LABEL", "windowed_variant", "aggregation_study",
    "RERANK_LABELS", "reranker_folder", "rerank_study", "SERVING_LABELS", "serving_study",
    "OVERRIDES", "SUBSETS", "list_parameter", "start_experiments", "start_expansion",
    "distinct_subsets",
    "notebook_paths", "run_notebook", "chapters_dir", "render_chapter",
    "check_stages", "stage_texts", "stage_folder", "SHIPPED_STAGE1", "SHIPPED_PARTS",
    "run_stage", "ensure_stages", "plot_stage_curves", "STAGE_RECIPES", "recipe_variants",
    "run_stage_study", "difference_text", "stage_study_rows", "stage_study_sentences"
]
