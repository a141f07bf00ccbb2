from __future__ import annotations

import logging

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import compare
from pipeline.config import Settings


@pytest.mark.slow
def test_comparison_table_plot_and_resumption(settings: Settings, caplog) -> None:
    small = settings.model_copy(update={"n_trials": 2, "epochs": 1, "pruner": "median"})
    table, run_id = compare.run(small, ["random", "tpe"], seeds=2, prefix="cmp")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["random", "tpe"]
    assert "2 trials per study, 2 seeds per sampler, pruner median" in table
    names = [compare.study_name("cmp", s, k) for s in ("random", "tpe") for k in range(2)]
    studies = {n: optuna.load_study(study_name=n, storage=small.storage) for n in names}
    assert all(len(s.trials) == 2 for s in studies.values())
    # Same split for every study, different sampler seeds.
    assert len({s.user_attrs["split_digest"] for s in studies.values()}) == 1
    assert studies[names[0]].trials[0].params != studies[names[1]].trials[0].params

    client = MlflowClient(small.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"comparison.md", "comparison.png"} <= artifacts
    tags = client.get_run(run_id).data.tags
    assert {f"study.{n}" for n in names} <= set(tags)

    caplog.clear()
    caplog.set_level(logging.INFO, logger="pipeline.compare")
    compare.run(small, ["random", "tpe"], seeds=2, prefix="cmp")  # resumed: nothing to do
    assert caplog.text.count("already has 2 finished trials: skipped") == 4
    assert all(
        len(optuna.load_study(study_name=n, storage=small.storage).trials) == 2 for n in names
    )
    compare.run(small.model_copy(update={"n_trials": 3}), ["random"], seeds=1, prefix="cmp")
    assert len(optuna.load_study(study_name=names[0], storage=small.storage).trials) == 3


def test_summary_rows_from_known_curves() -> None:
    def study(values: list[float | None]) -> optuna.Study:
        s = optuna.create_study(direction="maximize")
        for v in values:
            t = s.ask()
            s.tell(t, v) if v is not None else s.tell(t, state=optuna.trial.TrialState.PRUNED)
        return s

    studies = {
        "random": [study([0.5, 0.6, None]), study([0.7, None, 0.6])],
        "tpe": [study([0.4, 0.66, 0.8]), study([None, 0.9, 0.5])],
    }
    assert np.allclose(
        compare.best_so_far(studies["tpe"][1], 3), [np.nan, 0.9, 0.9], equal_nan=True
    )
    rows = {r["sampler"]: r for r in compare.summarize(studies, 3)}
    assert rows["random"]["best_mean"] == pytest.approx(0.65)
    assert rows["tpe"]["best_mean"] == pytest.approx(0.85)
    assert rows["random"]["pruned"] == 1 and rows["tpe"]["complete"] == 2.5
    assert rows["tpe"]["random_matched_at"] == 1.0  # both reach 0.65 at trial index 1
    assert rows["random"]["random_matched_in"] == "1/2"
