"""Creating or resuming a study: its data and split, and the setup every later run must share."""

from __future__ import annotations

import json
import platform
import warnings
from importlib import metadata
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

from pipeline import storage
from pipeline.config import Settings
from pipeline.data import dataset
from pipeline.data.inputs import InputSpec
from pipeline.errors import FaceoptError
from pipeline.model import space
from pipeline.tuning import samplers

# Recorded on the study when it is created; a later run on the same study must agree, so that
# trials stay comparable and train-best rebuilds exactly the split the study selected on.
# Epochs too: a trial's schedule spans its epochs, so trials of other lengths are not comparable.
STUDY_ATTRS = (
    "data_fingerprint",
    "split_digest",
    "space",
    "metric",
    "age_edges",
    "epochs",
    "input_size",
    "colour",
    "features",
    "descriptor",
)
# What a study made before an attribute existed had.
ATTR_DEFAULTS = {"input_size": 48, "colour": "gray", "features": "pixels", "descriptor": "dlib128"}
LIBRARIES = ("torch", "optuna", "mlflow", "numpy", "scikit-optimize", "madgrad", "faceopt")


class StudyMismatch(FaceoptError, ValueError):
    """The named study was created with other data, split, space or metric."""


class EnqueueError(FaceoptError, ValueError):
    """The file of params to try first cannot be read, or its points are not of the space."""


def study_attrs(settings: Settings, faces: dataset.FaceSet, split: dataset.Split) -> dict:
    return {
        "data_fingerprint": faces.fingerprint,
        "split_digest": split.digest(),
        "split_seed": split.seed,
        "test_fraction": settings.test_fraction,
        "val_fraction": settings.val_fraction,
        "drop_conflicting": settings.skip_bad_rows,
        "space": settings.space,
        "metric": settings.metric,
        "age_edges": list(settings.age_edges),
        "epochs": settings.epochs,
        "input_size": settings.input_size,
        "colour": settings.colour,
        "features": settings.features,
        "descriptor": settings.descriptor,
        # Not checked on resume; train-best takes them when it is not told (make tune && make
        # train-best retrains what was just tuned, whatever DATA and PRESET tune had).
        "data": str(settings.data),
        "preset": settings.preset,
    }


def open_study(
    settings: Settings, attrs: dict, store: BaseStorage | str | None = None, salt: int = 0
) -> optuna.Study:
    """Create the study or load it (load_if_exists), checking it was made with the same setup."""
    study = optuna.create_study(
        storage=store or settings.storage,
        study_name=settings.study,
        direction="maximize",
        pruner=samplers.make_pruner(settings.pruner, settings.epochs),
        load_if_exists=True,
    )
    # A resumed study must not replay the same random draws: seed by how far the study got,
    # and (salt) by worker, so processes joining at once do not propose the same points.
    study.sampler = samplers.make_sampler(
        settings.sampler, settings.seed + len(study.trials) + salt, **settings.sampler_args
    )
    recorded = study.user_attrs
    if not recorded:  # a new study: record its setup
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    else:  # a resumed one: the setup must be the same
        for key in STUDY_ATTRS:
            if key == "descriptor" and attrs["features"] == "pixels":
                continue  # pixels-only trials never see face features
            had = recorded.get(key, ATTR_DEFAULTS.get(key))
            if had != attrs[key]:
                raise StudyMismatch(
                    f"study {settings.study!r} in {storage.redact(settings.storage)} was created "
                    f"with {key}={had!r}, this run has {attrs[key]!r}; use the same "
                    "settings to add trials to it, or a new STUDY name"
                )
    if study.metric_names is None:  # named once; a resumed study keeps its name
        with warnings.catch_warnings():  # experimental: Optuna (5.0) warns
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric_name(settings.metric)])
    if settings.enqueue:
        for params in read_enqueue(settings.enqueue, settings.space, settings.features):
            study.enqueue_trial(params, skip_if_exists=True)
    return study


def metric_name(metric: str) -> str:
    """What the objective returns, named for optuna-dashboard: its best epoch's validation
    accuracy on `metric` (an age, ethnicity or gender head, or their mean)."""
    return f"best-epoch validation accuracy ({metric})"


def read_enqueue(path: Path, space_name: str, features: str = "pixels") -> list[dict]:
    """Trial params to try first, from a JSON object or list of objects; each must be a complete
    point of the space (what the space would ask for, its conditional params included)."""
    try:
        found = json.loads(Path(path).read_text())
    except OSError as e:
        raise EnqueueError(f"{path}: cannot read it ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise EnqueueError(f"{path}: not JSON ({e})") from e
    points = [found] if isinstance(found, dict) else found
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise EnqueueError(f"{path}: expected a JSON object of trial params, or a list of them")
    for i, params in enumerate(points):
        try:
            space.suggest(optuna.trial.FixedTrial(params), space_name, features)
        except ValueError as e:  # FixedTrial's "parameter 'lr' is not contained in the trial"
            raise EnqueueError(f"{path}: point {i} is not one of space {space_name!r}: {e}") from e
    return points


def data_form(attrs: dict) -> InputSpec:
    """The form a study's faces are loaded in: every input its trials may take (features
    search: pixels and descriptors both), from the study's attributes."""
    get = {key: attrs.get(key, default) for key, default in ATTR_DEFAULTS.items()}
    features = "both" if get["features"] == "search" else get["features"]
    return InputSpec(get["input_size"], get["colour"], features, descriptor_kind=get["descriptor"])


def load_data(settings: Settings) -> tuple[dataset.FaceSet, dataset.Split, dict]:
    form = data_form(settings.model_dump(include=set(ATTR_DEFAULTS)))
    faces = dataset.load(settings.data, settings.cache_dir, settings.skip_bad_rows, form)
    split = dataset.split(
        faces,
        settings.age_edges,
        settings.split_seed_or_seed,
        settings.test_fraction,
        settings.val_fraction,
        drop_conflicting=settings.skip_bad_rows,
    )
    return faces, split, study_attrs(settings, faces, split)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
