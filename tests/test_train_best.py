from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli, storage, train_best, tune
from pipeline.config import Settings
from pipeline.data.inputs import SEED_FORM
from pipeline.registry import champion
from pipeline.training import train
from pipeline.tuning.study import StudyMismatch
from tests.conftest import copy_sqlite, make_settings, synthetic_faces, write_csv


@pytest.fixture(scope="module")
def tuned_once(tmp_path_factory) -> Settings:
    """A 3-trial study on synthetic faces, tuned once for the module."""
    tmp = tmp_path_factory.mktemp("tuned")
    settings = make_settings(tmp, write_csv(synthetic_faces(240), tmp / "age_gender.csv"))
    tune.run(
        settings.model_copy(update={"tune_system_metrics": True, "system_metrics_interval": 1})
    )
    return settings


@pytest.fixture
def tuned(tuned_once: Settings, tmp_path: Path) -> Settings:
    """Each test's own copy of that study's Optuna and MLflow databases (SQLite's backup, which
    includes what is still in the WAL); new artifacts go under their own run ids in the module's
    artifact folder. Train-best settings kept short."""
    stores = {}
    for field in ("storage", "tracking_uri"):
        source = getattr(tuned_once, field).removeprefix("sqlite:///")
        copy = tmp_path / Path(source).name
        copy_sqlite(Path(source), copy)
        stores[field] = f"sqlite:///{copy}"
    return tuned_once.model_copy(
        update={
            **stores,
            "train_epochs": 6,
            "patience": 3,
            "model_name": "faces",
            "system_metrics_interval": 1,
        }
    )


@pytest.mark.slow  # real processes: make test, not the edit loop
def test_champion_then_challenger_with_lineage_and_evaluation(tuned: Settings, monkeypatch) -> None:
    def tagged_later(*args, **kwargs):
        raise AssertionError("a version must be made with its tags, not tagged afterwards")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", tagged_later)
    first = train_best.run(tuned)
    assert (first.version, first.alias) == ("1", "champion")
    client = MlflowClient(tuned.tracking_uri)
    v1 = client.get_model_version_by_alias("faces", "champion")
    assert str(v1.version) == "1" and v1.tags["optuna.study"] == tuned.study
    assert float(v1.tags["test_age_acc"]) == pytest.approx(first.scores["test_age_acc"])
    # The registry pages say what the model and the version are.
    model = client.get_registered_model("faces")
    assert "Age bracket, ethnicity and gender" in model.description
    assert "ethnicity: White, Black, Asian, Indian, Other" in model.description
    assert f"age {first.scores['test_age_acc']:.1%}" in v1.description
    assert f"evaluation/model_card.md of run {first.run_id}" in v1.description
    # Flip averaging was decided on validation, both ways recorded, and went into the version.
    run = client.get_run(first.run_id).data
    assert {"val_mean_acc_plain", "val_mean_acc_flip_average"} <= set(run.metrics)
    chosen = run.metrics["val_mean_acc_flip_average"] > run.metrics["val_mean_acc_plain"]
    assert run.params["flip_average"] == str(chosen)
    # Both the study's parent run and the training run carry the data as a dataset input.
    faces, split = train_best.study_split(tuned, train_best.load_best(tuned)[0].user_attrs)
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name(tuned.study).experiment_id])
        if "mlflow.parentRunId" not in r.data.tags and r.info.run_id != first.run_id
    )
    for run_id, context in ((parent.info.run_id, "tuning"), (first.run_id, "training")):
        (found,) = client.get_run(run_id).inputs.dataset_inputs
        assert found.dataset.digest == faces.fingerprint[:16]
        assert found.dataset.name == Path(tuned.data).name
        assert json.loads(found.dataset.profile) == split.sizes()
        assert [(t.key, t.value) for t in found.tags] == [("mlflow.data.context", context)]
    # MLflow's system metrics on the training run, and (tune_system_metrics) the study's run.
    for run_id in (parent.info.run_id, first.run_id):
        recorded = client.get_run(run_id).data.metrics
        assert "system/cpu_utilization_percentage" in recorded, sorted(recorded)
        assert "system/system_memory_usage_megabytes" in recorded
    # The experiment opens on its runs table in the MLflow UI, not on the GenAI overview.
    experiment = client.get_experiment_by_name(tuned.study)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # Deliberately worse: the same recipe with every optimisation step skipped (untrained net).
    monkeypatch.setattr(train, "train_epoch", lambda *args, **kwargs: 1.0)
    second = train_best.run(tuned)
    assert second.scores["test_age_acc"] < first.scores["test_age_acc"]
    assert (second.version, second.alias) == ("2", "challenger")
    assert str(client.get_model_version_by_alias("faces", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("faces", "challenger").version) == "2"

    # Lineage: the training run leads back to the trial and the study's parent run.
    run = client.get_run(first.run_id)
    trial_run = client.get_run(run.data.tags["faceopt.best_trial_run_id"])
    assert trial_run.data.tags["optuna.trial_number"] == run.data.tags["optuna.best_trial"]
    assert run.data.tags["faceopt.study_parent_run_id"] == trial_run.data.tags["mlflow.parentRunId"]
    evaluation = {Path(a.path).name for a in client.list_artifacts(first.run_id, "evaluation")}
    assert {
        "confusion_age.png",
        "confusion_ethnicity.png",
        "confusion_gender.png",
        "per_group.csv",
        "model_card.md",
    } <= evaluation
    # A fresh process loads and predicts: tests/test_registered_model.py.


def test_same_seed_gives_identical_test_metrics(tuned: Settings) -> None:
    a = train_best.run(tuned)
    b = train_best.run(tuned)
    assert a.scores and a.scores == b.scores
    assert a.best_epoch == b.best_epoch


def test_an_ensembles_first_member_is_the_trial_and_the_version_carries_every_member(
    tuned: Settings,
) -> None:
    """ENSEMBLE=2: member 0 trains exactly as a lone retraining of the trial (same seed, same
    validation history), member 1 from the next seed; the version holds both and says so."""
    import mlflow

    from pipeline.model import network

    tuned = tuned.model_copy(update={"train_epochs": 3})
    alone = train_best.run(tuned)
    pair = train_best.run(tuned.model_copy(update={"ensemble": 2}))
    client = MlflowClient(tuned.tracking_uri)
    run = client.get_run(pair.run_id).data
    assert run.params["ensemble"] == "2"
    assert {"member0_best_epoch", "member1_best_epoch", "member1_val_mean_acc"} <= set(run.metrics)

    def history(run_id: str, key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run_id, key)]

    first = history(pair.run_id, "member0_val_mean_acc")
    assert first == history(alone.run_id, "val_mean_acc") and len(first) == 3
    assert history(pair.run_id, "member1_val_loss") != history(pair.run_id, "member0_val_loss")
    mlflow.set_tracking_uri(tuned.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/faces/{pair.version}").unwrap_python_model()
    assert isinstance(model.net, network.Ensemble) and len(model.net.members) == 2
    assert model.meta["members"] == 2
    card = Path(client.download_artifacts(pair.run_id, "evaluation/model_card.md")).read_text()
    assert "ensemble of 2 networks (seeds" in card


def test_study_without_completed_trial_is_a_clear_error(settings: Settings, capsys) -> None:
    with pytest.raises(storage.StudyChoiceError, match="no study 'test-study'"):
        train_best.run(settings)
    code = cli.main(["train-best", "--study", "nothing", "--storage", settings.storage])
    assert code == 2 and "run `make tune` first" in capsys.readouterr().err
    # A study whose trials all failed or were pruned: there is nothing to retrain.
    study = optuna.create_study(study_name="no-complete", storage=settings.storage)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    with pytest.raises(train_best.TrainBestError, match="no completed trial yet .2 trials"):
        train_best.run(settings.model_copy(update={"study": "no-complete"}))


def test_other_data_than_the_study_is_refused(tuned: Settings, tmp_path: Path) -> None:
    other = write_csv(synthetic_faces(240, seed=5), tmp_path / "other.csv")
    with pytest.raises(train_best.TrainBestError, match="not the data study"):
        train_best.run(tuned.model_copy(update={"data": other}))


def test_gate_reads_validation_only_and_refuses_other_splits(tuned: Settings, monkeypatch) -> None:
    seen = []
    real_gate = champion.gate

    def spy(client, name, version, inputs, *args):
        seen.append(inputs(SEED_FORM)[0])
        return real_gate(client, name, version, inputs, *args)

    monkeypatch.setattr(champion, "gate", spy)
    first = train_best.run(tuned)
    attrs = train_best.load_best(tuned)[0].user_attrs
    faces, split = train_best.study_split(tuned, attrs, SEED_FORM)
    # The gate saw exactly the validation faces: never a test row.
    assert np.array_equal(seen[0], faces.images[split.val])
    assert first.alias == "champion"
    seed = train_best.load_best(tuned)[1].user_attrs["seed"]
    client = MlflowClient(tuned.tracking_uri)
    assert client.get_run(first.run_id).data.params["seed"] == str(seed)  # the trial's seed

    # A champion of another split is not compared: the new version waits as challenger...
    client.set_model_version_tag("faces", "1", "split.digest", "another-split")
    second = train_best.run(tuned)
    assert second.alias == "challenger"
    assert str(client.get_model_version_by_alias("faces", "champion").version) == "1"
    # ...unless promotion is forced.
    assert train_best.run(tuned, promote=True).alias == "champion"


def test_registry_outage_is_not_read_as_no_champion(monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    class Down:
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("connection refused", error_code=INTERNAL_ERROR)

    with pytest.raises(MlflowException, match="connection refused"):
        champion.current_champion(Down(), "faces")

    class Empty:
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException(
                f"Registered model alias {alias} not found.", error_code=INVALID_PARAMETER_VALUE
            )

    assert champion.current_champion(Empty(), "faces") is None


def test_resuming_with_other_epochs_is_refused(tuned: Settings) -> None:
    with pytest.raises(StudyMismatch, match="epochs"):
        tune.run(tuned.model_copy(update={"epochs": tuned.epochs + 1}))


@pytest.mark.slow
def test_journal_storage_end_to_end(settings: Settings, tmp_path: Path, capsys) -> None:
    """A journal file can be tuned, reported, retrained and compared, like any other storage."""
    journal = settings.model_copy(
        update={"storage": f"journal:{tmp_path / 'study.log'}", "n_trials": 2, "train_epochs": 2}
    )
    tune.run(journal)
    flags = ["--storage", journal.storage, "--tracking-uri", journal.tracking_uri]
    flags += ["--study", journal.study, "--data", str(journal.data)]
    assert cli.main(["report", *flags]) == 0
    assert f"plots and summary of study {journal.study!r} logged to run" in capsys.readouterr().out
    result = train_best.run(journal)
    assert result.alias == "champion" and result.epochs == [2]
    from pipeline import compare

    studies = compare.run_studies(journal.model_copy(update={"n_trials": 1}), ["random"], 1, "j")
    assert len(studies["random"][0].trials) == 1


@pytest.mark.slow
def test_train_best_after_tune_needs_no_settings_repeated(
    settings: Settings, tmp_path: Path
) -> None:
    """`make tune PRESET=cpu DATA=x && make train-best`: without STUDY, DATA or PRESET, train-best
    retrains the study tuned last in the storage, on its data, with its preset's budgets."""
    stores = {
        k: getattr(settings, k) for k in ("storage", "tracking_uri", "artifact_root", "cache_dir")
    }
    older = settings.model_copy(update={"study": "older", "n_trials": 1})
    tune.run(older)
    tuned = settings.model_copy(
        update={"study": "just-tuned", "n_trials": 2, "preset": "cpu", "space": "mlp"}
    )
    tune.run(tuned.model_copy(update={"timeout": None, "pruner": "none", "epochs": 2}))
    bare = Settings(**stores)  # what `make train-best` gets: no STUDY, DATA or PRESET
    assert "study" not in bare.model_fields_set and bare.data != settings.data
    chosen = train_best.for_study(bare)
    assert (chosen.study, chosen.data) == ("just-tuned", settings.data)
    assert (chosen.train_epochs, chosen.patience) == (20, 6)  # the cpu preset's
    # What is given still wins.
    assert train_best.for_study(Settings(**stores, study="older")).study == "older"
    assert train_best.for_study(bare.model_copy(update={"train_epochs": 2})).train_epochs == 2
    result = train_best.run(bare.model_copy(update={"train_epochs": 2}))
    assert result.alias == "champion" and result.epochs == [2]


def test_train_best_after_the_seed_preset_keeps_its_own_budgets(settings: Settings) -> None:
    """`make tune PRESET=seed && make train-best`: the original experiment's preset brings no
    train-best epochs or patience, so the defaults (or what is given) hold."""
    study = optuna.create_study(storage=settings.storage, study_name="faceopt-seed")
    study.set_user_attr("preset", "seed")
    bare = Settings(storage=settings.storage, tracking_uri=settings.tracking_uri)
    chosen = train_best.for_study(bare)
    assert chosen.study == "faceopt-seed"
    assert (chosen.train_epochs, chosen.patience) == (bare.train_epochs, bare.patience)
    given = bare.model_copy(update={"train_epochs": 3})
    assert train_best.for_study(given).train_epochs == 3


@pytest.mark.slow
def test_train_best_lists_the_studies_when_the_choice_is_not_clear(
    settings: Settings, tmp_path: Path
) -> None:
    """The study tuned last has no completed trial (all pruned, or just started) while another
    has: no guess, but every study with its best value and the command for it."""
    tune.run(settings.model_copy(update={"study": "done", "n_trials": 1}))
    started = optuna.create_study(storage=settings.storage, study_name="just-started")
    started.ask()  # a trial running, none complete
    bare = Settings(storage=settings.storage, tracking_uri=settings.tracking_uri)
    with pytest.raises(storage.StudyChoiceError) as refused:
        train_best.for_study(bare)
    message = str(refused.value)
    assert "'just-started', has no completed trial yet" in message
    assert (
        "make train-best STUDY=done" in message and "make train-best STUDY=just-started" in message
    )
    assert re.search(r"done: 1 trials \(0 running\), best 0\.\d{4}", message)
