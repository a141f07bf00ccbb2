"""The sampler comparison: one study per (sampler, seed), same data, split, budget and pruner."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline import storage, tune
from pipeline.config import Settings
from pipeline.tracking import runs
from pipeline.tuning import workers

log = logging.getLogger(__name__)


def study_name(prefix: str, sampler: str, seed: int) -> str:
    return f"{prefix}-{sampler}-s{seed}"


def run_studies(settings: Settings, samplers: list[str], seeds: int, prefix: str) -> dict:
    """Run (or finish) every study; a study that already has n_trials finished is skipped.

    Every study splits with settings.seed (so all see the same split) and samples with
    settings.seed + k for k in range(seeds).
    """
    studies: dict[str, list[optuna.Study]] = {}
    for sampler in samplers:
        for k in range(seeds):
            name = study_name(prefix, sampler, k)
            done = _finished(settings, name)
            if done < settings.n_trials:
                log.info(
                    "study %s: %d of %d trials finished, running the rest",
                    name,
                    done,
                    settings.n_trials,
                )
                tune.run(
                    settings.model_copy(
                        update={
                            "study": name,
                            "sampler": sampler,
                            "seed": settings.seed + k,
                            "split_seed": settings.split_seed_or_seed,
                            "n_trials": settings.n_trials - done,
                        }
                    )
                )
            else:
                log.info("study %s already has %d finished trials: skipped", name, done)
            studies.setdefault(sampler, []).append(
                storage.load_study(
                    settings.storage, name, settings.heartbeat_interval, settings.grace_period
                )
            )
    return studies


def _finished(settings: Settings, name: str) -> int:
    try:
        return workers.finished(
            storage.load_study(
                settings.storage, name, settings.heartbeat_interval, settings.grace_period
            )
        )
    except KeyError:
        return 0


def best_so_far(study: optuna.Study, n_trials: int) -> np.ndarray:
    """Best completed value after each of the first n_trials trials (NaN before the first)."""
    curve = np.full(n_trials, np.nan)
    best = -math.inf
    for i, t in enumerate(sorted(study.trials, key=lambda t: t.number)[:n_trials]):
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = max(best, t.value)
        curve[i] = best if best > -math.inf else np.nan
    return curve


def _first_reaching(curve: np.ndarray, target: float) -> int | None:
    hits = np.flatnonzero(np.nan_to_num(curve, nan=-math.inf) >= target)
    return int(hits[0]) if len(hits) else None


def summarize(studies: dict[str, list[optuna.Study]], n_trials: int) -> list[dict]:
    """One row per sampler, aggregated over its seeds."""
    curves = {s: [best_so_far(st, n_trials) for st in sts] for s, sts in studies.items()}
    random_final = np.nanmean([c[-1] for c in curves["random"]]) if "random" in curves else None
    rows = []
    for sampler, sts in studies.items():
        finals = np.array([c[-1] for c in curves[sampler]])
        states = [[t.state for t in st.trials[:n_trials]] for st in sts]
        walls = [_wall_seconds(st) for st in sts]
        best_at = [_first_reaching(c, c[-1]) for c in curves[sampler]]
        row = {
            "sampler": sampler,
            "seeds": len(sts),
            "best_mean": float(np.nanmean(finals)),
            "best_std": float(np.nanstd(finals)),
            "complete": float(np.mean([s.count(TrialState.COMPLETE) for s in states])),
            "pruned": float(np.mean([s.count(TrialState.PRUNED) for s in states])),
            "wall_s": float(np.mean(walls)),
            "best_at": float(np.mean([b for b in best_at if b is not None]))
            if any(b is not None for b in best_at)
            else None,
        }
        if random_final is not None:
            reached = [_first_reaching(c, random_final) for c in curves[sampler]]
            hit = [r for r in reached if r is not None]
            row["random_matched_at"] = float(np.mean(hit)) if hit else None
            row["random_matched_in"] = f"{len(hit)}/{len(reached)}"
        rows.append(row)
    return rows


def _wall_seconds(study: optuna.Study) -> float:
    starts = [t.datetime_start for t in study.trials if t.datetime_start]
    ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0


def markdown(rows: list[dict], n_trials: int, pruner: str) -> str:
    def trial(v: float | None) -> str:
        return "never" if v is None else f"{v + 1:.0f}"  # 1-based, as people count trials

    lines = [
        "| sampler | best val. accuracy (mean ± std) | complete | pruned | wall time "
        "| best reached at trial | random's final best matched at trial |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        matched = (
            f"{trial(r.get('random_matched_at'))} ({r.get('random_matched_in', '-')} seeds)"
            if "random_matched_in" in r
            else "-"
        )
        lines.append(
            f"| {r['sampler']} | {100 * r['best_mean']:.2f}% ± {100 * r['best_std']:.2f} "
            f"| {r['complete']:.1f} | {r['pruned']:.1f} | {r['wall_s'] / 60:.1f} min "
            f"| {trial(r['best_at'])} | {matched} |"
        )
    seeds = rows[0]["seeds"] if rows else 0
    lines.append("")
    lines.append(
        f"{n_trials} trials per study, {seeds} seeds per sampler, pruner {pruner}; "
        "counts and times are means per study."
    )
    return "\n".join(lines)


def plot(studies: dict[str, list[optuna.Study]], n_trials: int, path: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    x = np.arange(1, n_trials + 1)
    for sampler, sts in studies.items():
        curves = np.array([best_so_far(st, n_trials) for st in sts])
        with np.errstate(all="ignore"):
            mean = np.nanmean(curves, axis=0)
        line = ax.plot(x, mean, label=f"{sampler} (mean of {len(sts)})")[0]
        ax.fill_between(
            x,
            np.nanmin(curves, axis=0),
            np.nanmax(curves, axis=0),
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best validation {metric} accuracy so far")
    ax.set_title("Sampler comparison: mean, min-max band over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run(settings: Settings, samplers: list[str], seeds: int, prefix: str) -> tuple[str, str]:
    """The whole comparison; returns its markdown table and the MLflow comparison run's id."""
    studies = run_studies(settings, samplers, seeds, prefix)
    rows = summarize(studies, settings.n_trials)
    table = markdown(rows, settings.n_trials, settings.pruner)
    client = runs.client_for(settings.tracking_uri)
    experiment_id = runs.ensure_experiment(client, f"{prefix}-comparison", settings.artifact_root)
    run_id = runs.start_parent(
        client, experiment_id, f"{prefix}-comparison", {"faceopt.comparison": prefix}
    )
    links = []
    for sts in studies.values():
        for st in sts:
            experiment = client.get_experiment_by_name(st.study_name)
            if experiment:
                client.set_tag(run_id, f"study.{st.study_name}", experiment.experiment_id)
                links.append(
                    f"- `{st.study_name}`: [experiment {experiment.experiment_id}]"
                    f"(#/experiments/{experiment.experiment_id})"
                )
    runs.log_params(
        client,
        run_id,
        {
            "samplers": ",".join(samplers),
            "seeds": seeds,
            "n_trials": settings.n_trials,
            "pruner": settings.pruner,
            "epochs": settings.epochs,
            "split_seed": settings.seed,
        },
    )
    for r in rows:
        runs.log_metrics(
            client,
            run_id,
            {
                f"{r['sampler']}_best_mean": r["best_mean"],
                f"{r['sampler']}_best_std": r["best_std"],
            },
        )
    client.set_tag(run_id, "mlflow.note.content", table + "\n\nStudies:\n" + "\n".join(links))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "comparison.md").write_text(table + "\n")
        plot(studies, settings.n_trials, Path(tmp) / "comparison.png", settings.metric)
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id)
    return table, run_id
