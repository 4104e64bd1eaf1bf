"""Analysis of trained models: evaluation plots, trajectories, and the attractor landscape.

* `eqr_jax.analysis.plots` -- evaluation and landscape plots, Sudoku trajectory GIFs,
  convergence statistics over per-step logits;
* `eqr_jax.analysis.stability` -- spectral radius of the step map's Jacobian (matrix-free);
* `eqr_jax.analysis.trace` -- per-step records of many initialisations per puzzle, through an
  `Evaluator` (its model, noise and keys);
* `eqr_jax.analysis.landscape` -- attractor census, convergence vs correctness, compute vs
  difficulty, PCA of latent paths, all NumPy on the records;
* `eqr_jax.analysis.report` -- the whole analysis of a model on a dataset (``eqr analyze``,
  `eqr_jax.cli.analyze`): ``analysis.json``, its plots and a printed summary.
"""

from eqr_jax.analysis.landscape import (attractor_census, bucket_stats, convergence_score,
                                        curves_by_outcome, first_streak, group_attractors, pca_2d,
                                        rankdata, selection_vs_threshold, spearman,
                                        steps_to_convergence, steps_to_halt, steps_to_solution)
from eqr_jax.analysis.plots import (convergence_statistics, logit_delta_norms,
                                    plot_accuracy_vs_depth, plot_residuals, plot_steps_histogram,
                                    render_grid, save_all_plots, save_landscape_plots,
                                    save_trajectory)
from eqr_jax.analysis.report import AnalysisOptions, analyze, sudoku_difficulty, summary_lines
from eqr_jax.analysis.stability import (SpectralEstimate, exact_jacobian_eigenvalues,
                                        jacobian_spectral_radius, map_spectral_radius)
from eqr_jax.analysis.trace import Trajectories, trace_trajectories

__all__ = [
    "Trajectories", "attractor_census", "bucket_stats", "convergence_score", "curves_by_outcome",
    "first_streak", "group_attractors", "pca_2d", "rankdata", "selection_vs_threshold",
    "spearman", "steps_to_convergence", "steps_to_halt", "steps_to_solution",
    "trace_trajectories", "convergence_statistics", "logit_delta_norms", "plot_accuracy_vs_depth",
    "plot_residuals", "plot_steps_histogram", "render_grid", "save_all_plots",
    "save_landscape_plots", "save_trajectory", "SpectralEstimate", "exact_jacobian_eigenvalues",
    "jacobian_spectral_radius", "map_spectral_radius", "AnalysisOptions", "analyze",
    "sudoku_difficulty", "summary_lines",
]
