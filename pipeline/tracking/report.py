"""A finished study as a summary dict and plots: one interactive HTML page and a PNG per plot."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna

log = logging.getLogger(__name__)

# Contour and slice plots grow with the square / number of params; show the most important only.
TOP_PARAMS = 4
PLOTS = (
    "optimization_history",
    "param_importances",
    "intermediate_values",
    "parallel_coordinate",
    "slice",
    "contour",
    "timeline",
)


@dataclass(frozen=True)
class StudySummary:
    """What the original experiment printed of a study: trials conducted, pruned, completed,
    failed, and the best trial's number, value and params (None while nothing completed)."""

    study: str
    trials: int
    complete: int
    pruned: int
    fail: int
    running: int
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)


def summary(study: optuna.Study) -> StudySummary:
    """The study's counts by state and its best trial."""
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    best = study.best_trial if states.get("COMPLETE") else None
    return StudySummary(
        study=study.study_name,
        trials=sum(states.values()),
        complete=states.get("COMPLETE", 0),
        pruned=states.get("PRUNED", 0),
        fail=states.get("FAIL", 0),
        running=states.get("RUNNING", 0),
        best_trial=best.number if best else None,
        best_value=best.value if best else None,
        best_params=best.params if best else {},
    )


def format_summary(s: StudySummary) -> str:
    """The summary as the original experiment printed it."""
    lines = [
        f"Study statistics ({s.study}):",
        f"  Number of finished trials: {s.trials}",
        f"  Number of pruned trials: {s.pruned}",
        f"  Number of complete trials: {s.complete}",
        f"  Number of failed trials: {s.fail}",
    ]
    if s.best_value is not None:
        lines += [f"Best trial: #{s.best_trial}", f"  Value: {s.best_value:.4f}", "  Params:"]
        lines += [f"    {k}: {v}" for k, v in s.best_params.items()]
    else:
        lines.append("No trial completed yet.")
    return "\n".join(lines)


def _top_params(study: optuna.Study) -> list[str] | None:
    try:
        return list(optuna.importance.get_param_importances(study))[:TOP_PARAMS]
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None  # too few completed trials to rank; plots then use every param


def _plot_kwargs(name: str, target_name: str, top: list[str] | None) -> dict:
    kwargs: dict = {}
    if name in {"optimization_history", "parallel_coordinate", "slice", "contour"}:
        kwargs["target_name"] = target_name
    if name in {"slice", "contour", "parallel_coordinate"} and top:
        kwargs["params"] = top
    return kwargs


def write_plots(study: optuna.Study, out_dir: Path, target_name: str) -> list[Path]:
    """study_plots.html (every plot, plotly.js embedded once) and <plot>.png for each plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set here, not at import time
    out_dir.mkdir(parents=True, exist_ok=True)
    written, figures = [], []
    # The contour plot logs a warning per pair of params that one value filled (an enqueued or
    # short study): notes about the plot, not about the user's run.
    plot_log = logging.getLogger("optuna.visualization")
    level = plot_log.level
    plot_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # "few trials" notes from importance, axes
            top = _top_params(study)
            for name in PLOTS:
                kwargs = _plot_kwargs(name, target_name, top)
                _one_plot(study, name, kwargs, out_dir, figures, written)
    finally:
        plot_log.setLevel(level)
    if figures:
        html = out_dir / "study_plots.html"
        parts = [
            f"<h2>{name}</h2>" + fig.to_html(full_html=False, include_plotlyjs=(i == 0))
            for i, (name, fig) in enumerate(figures)
        ]
        html.write_text(
            f"<html><head><meta charset='utf-8'><title>{study.study_name}</title>"
            f"</head><body>{''.join(parts)}</body></html>"
        )
        written.append(html)
    return written


def _one_plot(study, name: str, kwargs: dict, out_dir: Path, figures: list, written: list) -> None:
    """Plotly figure for the HTML page and a matplotlib PNG; a plot that needs more trials is skipped."""
    import matplotlib.pyplot as plt
    import optuna.visualization as pv
    import optuna.visualization.matplotlib as pm

    try:
        figures.append((name, getattr(pv, f"plot_{name}")(study, **kwargs)))
        ax = getattr(pm, f"plot_{name}")(study, **kwargs)
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        legend = first.get_legend()
        if (
            legend is not None and len(legend.get_texts()) > 12
        ):  # one entry per trial drowns the plot
            legend.remove()
        fig = first.get_figure()
        fig.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    except Exception as e:
        log.warning("skipped plot %s: %s", name, e)
