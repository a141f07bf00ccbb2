"""The settings object's validators, and a study with other age brackets end to end."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from pipeline import cli, config, train_best, tune
from pipeline.config import Settings
from pipeline.data import labels
from pipeline.tuning.study import StudyMismatch
from serving.app import create_app
from tests.conftest import LOCAL, astronaut_face, jpeg, upload


def test_workers_take_a_positive_count_or_auto(monkeypatch) -> None:
    assert Settings(workers="3").workers == 3
    assert Settings(workers="auto").workers == "auto"
    monkeypatch.setenv("FACEOPT_WORKERS", "2")
    assert Settings().workers == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValidationError, match="positive integer or 'auto'"):
            Settings(workers=bad)


def test_allowed_hosts_from_a_list_a_comma_string_or_json(monkeypatch) -> None:
    assert Settings(allowed_hosts="a.example, b.example").allowed_hosts == [
        "a.example",
        "b.example",
    ]
    assert Settings(allowed_hosts='["c.example"]').allowed_hosts == ["c.example"]
    monkeypatch.setenv("FACEOPT_ALLOWED_HOSTS", "*")
    assert Settings().allowed_hosts == ["*"]


@pytest.mark.parametrize("edges", [(0, 116), (0, 18, 18, 116), (0, 45, 18, 116)])
def test_age_edges_must_increase(edges) -> None:
    with pytest.raises(ValidationError, match="at least 3 increasing integers"):
        Settings(age_edges=edges)


def test_body_limit_follows_the_file_limits_unless_set() -> None:
    assert Settings(max_files=2, max_file_bytes=1000).body_limit == 2 * 2024 + 64 * 1024
    assert Settings(max_files=2, max_body_bytes=5000).body_limit == 5000


@pytest.mark.slow
def test_other_age_brackets_end_to_end(settings: Settings) -> None:
    """Brackets of the user's choosing go through tune, train-best, the registry and the service."""
    edges = (0, 30, 60, 116)
    mine = settings.model_copy(
        update={"age_edges": edges, "n_trials": 2, "train_epochs": 2, "model_name": "brackets"}
    )
    tune.run(mine)
    result = train_best.run(mine)
    assert result.alias == "champion"
    with TestClient(create_app(mine), base_url=LOCAL) as client:
        info = client.get("/model").json()
        assert info["age_edges"] == list(edges)
        assert info["labels"]["age"] == list(labels.bracket_names(edges)) and len(edges) == 4
        body = client.post("/predict", files=[upload("a.jpg", jpeg(astronaut_face()))]).json()
    age = body["predictions"][0]["age"]
    assert age["label"] in info["labels"]["age"] and set(age["probabilities"]) == set(
        info["labels"]["age"]
    )
    # A study keeps its brackets: resuming it with others is refused.
    with pytest.raises(StudyMismatch, match="was created with"):
        tune.run(settings.model_copy(update={"n_trials": 1}))


def test_every_name_the_settings_take_is_built_by_its_factory() -> None:
    """Sampler, pruner and space names are checked by the settings and built by the factories:
    the two lists are one."""
    import typing

    from pipeline import config
    from pipeline.model import space
    from pipeline.tuning import samplers

    assert set(typing.get_args(config.SamplerName)) == set(samplers.SAMPLERS)
    assert set(typing.get_args(config.PrunerName)) == set(samplers.PRUNERS)
    assert set(typing.get_args(config.SpaceName)) == set(space.SPACES)
    for name in samplers.SAMPLERS:
        assert isinstance(samplers.make_sampler(name, 0), optuna.samplers.BaseSampler)
    for name in samplers.PRUNERS:
        assert isinstance(samplers.make_pruner(name, 6), optuna.pruners.BasePruner)


def test_the_makefile_and_the_flags_follow_the_settings() -> None:
    """settings.mk is what the settings generate (`make settings` after adding one), every flag a
    group offers sets its own field, and `make help` has a line for every variable."""
    generated = (Path(__file__).resolve().parents[1] / "settings.mk").read_text()
    assert generated == cli.make_settings(), "settings.mk is stale: run `make settings`"
    helped = {line.split()[1] for line in generated.splitlines() if line.startswith("#: ")}
    for group in config.GROUPS:
        for flag, (name, _, text) in cli.settings_flags(group).items():
            assert Settings.model_fields[name].description in text, flag
            assert cli.make_var(name) in helped | {""}, name
    args = cli.parser().parse_args(
        ["train-best", "--epochs", "3", "--colour", "rgb", "--precision", "fp32"]
    )
    assert (args.train_epochs, args.colour, args.precision) == (3, "rgb", "fp32")
    args = cli.parser().parse_args(["serve", "--workers", "2"])
    assert args.serve_workers == 2 and "workers" not in vars(args)
    args = cli.parser().parse_args(["tune", "--skip-bad-rows", "--sampler-args", '{"a": 1}'])
    assert args.skip_bad_rows is True and args.sampler_args == {"a": 1}
    assert cli.parser().parse_args(["tune"]).skip_bad_rows is None  # unset: the environment's
