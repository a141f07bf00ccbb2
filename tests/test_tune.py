from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import weakref
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli, tune
from pipeline.config import Settings
from pipeline.training import train
from pipeline.tuning import samplers
from pipeline.tuning.study import StudyMismatch
from tests.conftest import free_port, server_process, synthetic_faces, write_csv


class PruneTrialOne(optuna.pruners.BasePruner):
    """Deterministic pruning, through Optuna's real should_prune path."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


def child_runs(settings: Settings) -> tuple[MlflowClient, dict, list]:
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.study)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, {p.info.run_id: p for p in parents}, children


@pytest.mark.slow
def test_study_logs_one_child_run_per_trial(settings: Settings, monkeypatch) -> None:
    monkeypatch.setattr(samplers, "make_pruner", lambda name, epochs: PruneTrialOne())
    real_fit = train.fit

    def fit_failing_trial_two(net, params, *args, **kwargs):
        if kwargs.get("seed", args[3] if len(args) > 3 else None) == settings.seed + 2:
            raise RuntimeError("boom in trial 2")
        return real_fit(net, params, *args, **kwargs)

    monkeypatch.setattr(train, "fit", fit_failing_trial_two)
    summary = tune.run(settings.model_copy(update={"n_trials": 4, "study_plots": True}))
    assert (summary.trials, summary.complete, summary.pruned, summary.fail) == (
        4,
        2,
        1,
        1,
    )

    client, parents, children = child_runs(settings)
    assert len(parents) == 1 and len(children) == 4
    parent_id = next(iter(parents))
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [0, 1, 2, 3]
    expected = {
        0: ("COMPLETE", "FINISHED"),
        1: ("PRUNED", "FINISHED"),
        2: ("FAIL", "FAILED"),
        3: ("COMPLETE", "FINISHED"),
    }
    for number, (state, status) in expected.items():
        run = by_number[number]
        assert run.data.tags["state"] == state and run.info.status == status
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["sampler"] == "random" and run.data.tags["device"] == "cpu"
        assert run.data.metrics["trial_number"] == number
    assert "boom in trial 2" in by_number[2].data.tags["error"]
    for number, epochs in ((0, 2), (1, 1), (3, 2)):
        history = client.get_metric_history(by_number[number].info.run_id, "val_age_acc")
        assert [m.step for m in history] == list(range(epochs))
        for key in ("val_ethnicity_acc", "val_gender_acc", "train_loss", "val_loss"):
            assert len(client.get_metric_history(by_number[number].info.run_id, key)) == epochs
    assert by_number[0].data.params["num_fc_layers"] == str(
        optuna.load_study(study_name=settings.study, storage=settings.storage)
        .trials[0]
        .params["num_fc_layers"]
    )
    assert by_number[0].data.metrics["duration_s"] > 0

    parent = parents[parent_id]
    assert parent.info.status == "FINISHED" and parent.data.metrics["pruned"] == 1
    assert parent.data.tags["data.fingerprint"] and parent.data.params["split_digest"]
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"summary.json", "setup.json", "split.npz", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(parent_id, "plots")}
    assert {
        "study_plots.html",
        "optimization_history.png",
        "intermediate_values.png",
        "timeline.png",
    } <= plots


@pytest.mark.slow
def test_second_run_resumes_the_study(settings: Settings) -> None:
    tune.run(settings.model_copy(update={"n_trials": 2}))
    summary = tune.run(settings.model_copy(update={"n_trials": 2}))
    assert summary.trials == 4
    study = optuna.load_study(study_name=settings.study, storage=settings.storage)
    params = [t.params for t in study.trials]
    assert params[2] != params[0] and params[3] != params[1]  # no replay of the first draws
    # optuna-dashboard names the objective by it; set once, when the study was made
    assert study.metric_names == [f"best-epoch validation accuracy ({settings.metric})"]
    client, parents, children = child_runs(settings)
    assert len(parents) == 2 and len(children) == 4
    for parent_id in parents:  # study_plots off: the summary, no plots
        artifacts = {a.path for a in client.list_artifacts(parent_id)}
        assert "summary.json" in artifacts and "plots" not in artifacts


@pytest.mark.slow
def test_study_with_other_data_is_refused(settings: Settings, tmp_path: Path) -> None:
    tune.run(settings.model_copy(update={"n_trials": 1}))
    other = write_csv(synthetic_faces(240, seed=9), tmp_path / "other.csv")
    with pytest.raises(StudyMismatch, match="data_fingerprint"):
        tune.run(settings.model_copy(update={"n_trials": 1, "data": other}))
    study = optuna.load_study(study_name=settings.study, storage=settings.storage)
    assert len(study.trials) == 1


@pytest.mark.slow
def test_parallel_threads_log_every_trial(settings: Settings) -> None:
    summary = tune.run(settings.model_copy(update={"n_trials": 4, "n_jobs": 2, "sampler": "tpe"}))
    assert summary.complete == 4
    _, _, children = child_runs(settings)
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["optuna.trial_number"] for r in children}) == 4


def test_cli_tune_prints_the_summary(settings: Settings, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FACEOPT_STUDY_PLOTS", "false")  # settings from the environment apply too
    code = cli.main(
        [
            "tune",
            "--data",
            str(settings.data),
            "--storage",
            settings.storage,
            "--tracking-uri",
            settings.tracking_uri,
            "--study",
            "cli",
            "--n-trials",
            "2",
            "--epochs",
            "1",
            "--sampler",
            "skopt",
            "--sampler-args",
            '{"n_initial_points": 1}',
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Number of finished trials: 2" in out and "Best trial: #" in out
    client, parents, _ = child_runs(settings.model_copy(update={"study": "cli"}))
    assert "plots" not in {a.path for a in client.list_artifacts(next(iter(parents)))}


def test_a_timed_study_shows_time_left_not_trials(settings: Settings, capsys) -> None:
    """With a timeout the bar counts seconds against it (the CPU preset's n_trials=1000 gave a
    66-hour estimate for a one-hour study); without one it counts trials."""
    tune.run(settings.model_copy(update={"n_trials": 2, "timeout": 900}))
    err = capsys.readouterr().err
    assert "/900 [" in err and "trials=2" in err and "/2 [" not in err
    tune.run(settings.model_copy(update={"n_trials": 1, "timeout": None}))
    assert "/1 [" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_tune_fails_when_every_trial_fails(settings: Settings, monkeypatch, capsys) -> None:
    def broken_fit(*args, **kwargs):
        raise RuntimeError("boom: the objective is broken")

    monkeypatch.setattr(train, "fit", broken_fit)
    args = ["tune", "--data", str(settings.data), "--storage", settings.storage]
    args += ["--tracking-uri", settings.tracking_uri, "--study", "broken", "--n-trials", "2"]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert "all 2 trials of this run failed" in err and "boom: the objective is broken" in err
    client, parents, _ = child_runs(settings.model_copy(update={"study": "broken"}))
    assert [p.info.status for p in parents.values()] == ["FAILED"]


def test_cli_errors_say_what_to_do(tmp_path: Path, capsys) -> None:
    code = cli.main(
        ["tune", "--data", str(tmp_path / "missing.csv"), "--storage", f"sqlite:///{tmp_path}/o.db"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "No dataset at" in err and "make data" in err and "DATA=" in err
    assert cli.main(["tune", "--data", str(tmp_path), "--sampler", "nope"]) == 2
    assert "sampler" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_real_data_study(real_csv: Path, settings: Settings) -> None:
    summary = tune.run(settings.model_copy(update={"data": real_csv, "n_trials": 2, "epochs": 1}))
    assert summary.complete == 2
    assert 0.45 < summary.best_value <= 1.0  # age-bracket accuracy after one epoch
    _, parents, children = child_runs(settings)
    assert len(children) == 2
    assert next(iter(parents.values())).data.params["split_train"] == "13941"


@pytest.mark.parametrize(
    "command",
    ["tune", "tune-worker", "compare-samplers", "report", "train-best", "serve", "ui", "dashboard"],
)
def test_every_flag_is_a_setting_or_the_commands_own(command: str) -> None:
    args = cli.parser().parse_args([command])
    assert isinstance(cli._settings(args), Settings)
    args.n_trails = 3  # a mistyped dest is an error, not silently ignored
    with pytest.raises(TypeError, match="n_trails"):
        cli._settings(args)


def test_evaluate_flags() -> None:
    args = cli.parser().parse_args(["evaluate", "--photos", "x", "--min-face", "0.2"])
    assert args.own == ("photos", "version", "surround", "context")
    assert cli._settings(args).min_face == 0.2


def test_startup_loads_without_collection_then_collects_once_and_freezes(monkeypatch) -> None:
    """cli.startup, around a command's first imports: no cycle collection while they load, the
    garbage made meanwhile collected at the end (not frozen for good), what lives frozen, the
    collector on again; a second use in the same process changes nothing."""

    class Node:
        pass

    # As in a process that has not started a command yet (conftest's startup froze this one).
    monkeypatch.setattr(cli, "_started", False)
    gc.unfreeze()
    try:
        with cli.startup():
            assert not gc.isenabled()
            node = Node()
            node.cycle = node  # garbage only the cycle collector can free
            garbage = weakref.ref(node)
            del node
            assert garbage() is not None
        assert gc.isenabled() and garbage() is None
        frozen = gc.get_freeze_count()
        assert frozen > 100_000  # torch, MLflow and the rest, imported by now
        with cli.startup():
            assert gc.isenabled()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.freeze()


@pytest.mark.slow
def test_report_follows_the_study_tuned_last_and_names_a_missing_one(
    settings: Settings, capsys
) -> None:
    """`make tune PRESET=cpu && make report`: without STUDY, report works on the study tuned
    last (here not the default name); a named study that is not there is a message, not a
    traceback."""
    tune.run(settings.model_copy(update={"study": "tuned-last", "n_trials": 1}))
    flags = ["--storage", settings.storage, "--tracking-uri", settings.tracking_uri]
    assert cli.main(["report", *flags]) == 0
    assert "plots and summary of study 'tuned-last' logged to run" in capsys.readouterr().out
    assert cli.main(["report", *flags, "--study", "nothing"]) == 2
    assert "faceopt report: no study 'nothing' in sqlite:" in capsys.readouterr().err


@pytest.mark.slow
def test_dashboard_serves_the_study(settings: Settings, tmp_path: Path) -> None:
    """`faceopt dashboard` as a real process on a tuned study: its API lists the study and trials."""
    import httpx

    tune.run(settings.model_copy(update={"n_trials": 2}))
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "dashboard", "--storage", settings.storage]
    cmd += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, f"{url}/api/studies", os.environ, tmp_path / "dashboard.log"):
        studies = httpx.get(f"{url}/api/studies").json()["study_summaries"]
        assert [s["study_name"] for s in studies] == [settings.study]
        found = httpx.get(f"{url}/api/studies/{studies[0]['study_id']}").json()
        assert len(found["trials"]) == 2


def test_a_bug_keeps_its_traceback_a_user_error_does_not(monkeypatch, capsys) -> None:
    """Only FaceoptError is the user's to fix: any other exception (a bug) propagates."""

    def bug(settings):
        raise ValueError("a bug, not a user's mistake")

    monkeypatch.setattr(tune, "run", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["tune"])

    def mistake(settings):
        raise StudyMismatch("study 'x' was created with space='mlp'")

    monkeypatch.setattr(tune, "run", mistake)
    assert cli.main(["tune"]) == 2
    assert "faceopt tune: study 'x' was created with" in capsys.readouterr().err


def test_reconcile_closes_what_a_killed_invocation_left_running(settings: Settings) -> None:
    """A parent whose process is gone from this machine is KILLED at once (at its last beat),
    whatever the grace period; one owned on another machine once its heartbeat is old; one whose
    process runs here is left, however old its heartbeat (a suspended laptop wakes up). A child
    takes its trial's final state; a child whose trial still runs is left alone."""
    from dataclasses import replace

    from pipeline.storage import Owner
    from pipeline.tracking import runs

    study = optuna.create_study(storage=settings.storage, study_name=settings.study)
    done = study.ask()
    study.tell(done, 0.75)
    still = study.ask()  # RUNNING, without an owner record: its heartbeats decide, not reconcile
    client = runs.client_for(settings.tracking_uri)
    exp = runs.ensure_experiment(client, settings.study, settings.artifact_root)
    me = Owner.current()

    def parent(study: str, owner: Owner, beat: str | None = None) -> str:
        run_id = runs.start_parent(client, exp, study, runs.owner_tags(owner))
        if beat:
            client.set_tag(run_id, runs.HEARTBEAT_TAG, beat)
        return run_id

    elsewhere = parent(settings.study, replace(me, machine="another-host"), "1000000000")  # 2001
    gone = parent(settings.study, replace(me, started=me.started - 3600))  # its pid reused since
    gone_beat = int(client.get_run(gone).data.tags[runs.HEARTBEAT_TAG])
    live = parent(settings.study, me, "1000000000")  # alive here: its old beat does not matter
    live_elsewhere = parent(settings.study, replace(me, machine="another-host"))
    other = parent("another-study", replace(me, machine="another-host"), "1000000000")
    # An older faceopt's run (no heartbeat tag): alive or dead, nothing tells; it is left alone.
    legacy = client.create_run(exp, tags={"optuna.study": settings.study}).info.run_id

    def child(trial: optuna.Trial) -> str:
        tags = {"mlflow.parentRunId": elsewhere, "optuna.study": settings.study}
        tags["optuna.trial_number"] = str(trial.number)
        return client.create_run(exp, tags=tags).info.run_id

    done_run, still_run = child(done), child(still)

    assert runs.reconcile(client, exp, study, heartbeat_interval=10, grace_period=600) == 3
    ids = (elsewhere, gone, live, live_elsewhere, other, legacy, done_run, still_run)
    status = {r: client.get_run(r).info for r in ids}
    assert status[elsewhere].status == "KILLED"
    assert status[elsewhere].end_time == 1000000000 * 1000
    assert status[gone].status == "KILLED" and status[gone].end_time == gone_beat * 1000
    closed_by = client.get_run(gone).data.tags["faceopt.closed_by"]
    assert closed_by == f"reconcile: its process {me} is gone"
    assert {status[r].status for r in (live, live_elsewhere, other, legacy)} == {"RUNNING"}
    assert status[done_run].status == "FINISHED" and status[still_run].status == "RUNNING"
    finished = client.get_run(done_run).data
    assert finished.tags["state"] == "COMPLETE" and finished.metrics["objective"] == 0.75
    assert runs.reconcile(client, exp, study, 10, 600) == 0  # nothing left to close


def test_a_live_parent_run_keeps_its_heartbeat(settings: Settings) -> None:
    from pipeline.tracking import runs

    client = runs.client_for(settings.tracking_uri)
    exp = runs.ensure_experiment(client, settings.study, settings.artifact_root)
    run_id = runs.start_parent(client, exp, settings.study, {})
    client.set_tag(run_id, runs.HEARTBEAT_TAG, "1000000000")
    with runs.heartbeat(client, run_id, interval=0.05):
        deadline = time.time() + 10
        while client.get_run(run_id).data.tags[runs.HEARTBEAT_TAG] == "1000000000":
            assert time.time() < deadline, "no heartbeat within 10 s"
            time.sleep(0.05)


def test_a_stale_trial_closes_its_run_even_without_the_run_id(settings: Settings) -> None:
    """A worker killed between creating a trial's run and recording its id on the trial: the
    heartbeat callback finds the run by its study and trial tags and closes it as FAILED."""
    from pipeline.tracking import runs

    study = optuna.create_study(storage=settings.storage, study_name=settings.study)
    lost, other = study.ask(), study.ask()
    client = runs.client_for(settings.tracking_uri)
    exp = runs.ensure_experiment(client, settings.study, settings.artifact_root)
    parent = runs.start_parent(client, exp, settings.study, {})
    logger = runs.TrialLogger(client, exp, parent, {})
    lost_run = logger.start(lost)
    other_run = logger.start(other)
    # What the killed worker had written: the run, but not yet the trial's link to it.
    study._storage.set_trial_user_attr(lost._trial_id, runs.RUN_ID_ATTR, None)

    frozen = study._storage.get_trial(lost._trial_id)
    assert frozen.user_attrs[runs.RUN_ID_ATTR] is None
    logger.stale(study, frozen)
    assert client.get_run(lost_run).info.status == "FAILED"
    assert client.get_run(lost_run).data.tags["state"] == "FAIL"
    assert client.get_run(other_run).info.status == "RUNNING"


@pytest.mark.slow
def test_plots_of_a_warm_started_study_print_no_library_warnings(tmp_path: Path, capfd) -> None:
    """Params that one value filled (enqueued trials) make Optuna's contour plot warn per pair."""
    from pipeline.tracking import report

    study = optuna.create_study(direction="maximize")
    for flip in (True, False, True):
        study.enqueue_trial({"x": 1.0, "y": 2.0, "flip": flip})
    study.optimize(
        lambda t: (
            t.suggest_float("x", 0, 2)
            + t.suggest_float("y", 0, 3)
            + t.suggest_categorical("flip", [True, False])
        ),
        n_trials=3,
    )
    capfd.readouterr()
    assert report.write_plots(study, tmp_path, "mean accuracy")
    assert "unique value length" not in capfd.readouterr().err
    assert logging.getLogger("optuna.visualization").level == logging.NOTSET


def test_a_run_shorter_than_the_sampling_interval_still_gets_system_metrics(
    settings: Settings,
) -> None:
    """MLflow's monitor logs after a full interval; a quick train-best must not end up without."""
    from pipeline.tracking import runs

    client = runs.client_for(settings.tracking_uri)
    exp = runs.ensure_experiment(client, settings.study, settings.artifact_root)
    run_id = client.create_run(exp).info.run_id
    with runs.system_metrics(settings.tracking_uri, run_id, interval=60):
        pass
    recorded = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in recorded
    assert "system/system_memory_usage_megabytes" in recorded


MLP_POINT = {
    "num_fc_layers": 4,
    **{f"fc_output_feat_{i}": 16 for i in range(4)},
    **{f"fc_dropout_{i}": 0.1 for i in range(4)},
    "last_fc": 16,
    "optimizer": "Adam",
    "lr": 1e-3,
    "batch_size": 64,
}


@pytest.mark.slow
def test_enqueued_points_are_tried_first_and_once(settings: Settings, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps([MLP_POINT, MLP_POINT | {"lr": 3e-3}]))
    warm = settings.model_copy(update={"enqueue": recipe, "n_trials": 3})
    tune.run(warm)
    study = optuna.load_study(study_name=settings.study, storage=settings.storage)
    assert [t.params["lr"] for t in study.trials[:2]] == [1e-3, 3e-3]
    assert study.trials[0].params == MLP_POINT
    tune.run(warm.model_copy(update={"n_trials": 1}))  # the same file again: nothing re-queued
    study = optuna.load_study(study_name=settings.study, storage=settings.storage)
    assert len(study.trials) == 4 and study.trials[3].params["lr"] not in (1e-3, 3e-3)


def test_enqueue_errors_name_the_file_and_what_is_wrong(
    tmp_path: Path, faces_csv: Path, capsys
) -> None:
    from pipeline.tuning.study import EnqueueError, read_enqueue

    bad = tmp_path / "bad.json"
    cases = {
        "cannot read it": None,
        "not JSON": "{width: 32",
        "expected a JSON object of trial params": "[1, 2]",
        "point 1 is not one of space 'mlp'": json.dumps([MLP_POINT, {"lr": 0.1}]),
    }
    for message, text in cases.items():
        if text is None:
            bad.unlink(missing_ok=True)
        else:
            bad.write_text(text)
        with pytest.raises(EnqueueError, match=message) as found:
            read_enqueue(bad, "mlp")
        assert str(bad) in str(found.value)
    # The CPU preset's recipe is a point of its space.
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "cpu.json"
    assert [p["flip"] for p in read_enqueue(recipe, "cnn-cpu")] == [True, False]
    assert cli.main(["tune", "--enqueue", str(bad), "--data", str(faces_csv)]) == 2
    assert "bad.json: point 1 is not one of space" in capsys.readouterr().err
