"""The served model: loaded from the MLflow registry by alias, swapped atomically on reload."""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.registry.pyfunc import FaceModel

log = logging.getLogger(__name__)


class NoModel(RuntimeError):
    """Nothing is registered under the alias (yet)."""


@dataclass(frozen=True)
class Loaded:
    """One registered version, ready to predict."""

    name: str
    version: str
    alias: str
    run_id: str
    tags: dict[str, str]
    model: FaceModel = field(repr=False)

    @property
    def classes(self) -> dict[str, list[str]]:
        return self.model.meta["classes"]

    @property
    def takes_chips(self) -> bool:
        """Whether the version is given the face's 200x200 colour chip, not its 48x48 gray face."""
        return self.model.takes_chips

    def model_input(self, face) -> np.ndarray:
        """What this version is given of a cut face (pipeline.data.faces.Face)."""
        return face.chip if self.takes_chips else face.pixels

    def probabilities(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.probabilities(faces)


def load(tracking_uri: str, name: str, alias: str) -> Loaded:
    """The version that `alias` points at: its weights and JSON metadata, read into this
    installed code. The version's own Python code (its pyfunc, for MLflow's other consumers) is
    never run here: whoever can register a version must not run code in the service."""
    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise NoModel(f"no {alias} registered for model {name!r}: run make train-best") from e
    root = client.get_model_version_download_uri(name, version.version)
    what = f"version {version.version} of model {name!r}"
    with tempfile.TemporaryDirectory() as tmp:

        def fetch(path: str) -> Path:
            uri = f"{root.rstrip('/')}/{path}"
            local = mlflow.artifacts.download_artifacts(
                uri, dst_path=tmp, tracking_uri=tracking_uri
            )
            return Path(local)

        mlmodel = yaml.safe_load(fetch("MLmodel").read_text()) or {}
        files = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
        if not {"meta", "weights"} <= set(files):
            raise NoModel(
                f"{what} is not a faceopt model: its pyfunc has no 'meta' and 'weights' artifacts"
            )
        model = FaceModel()
        try:
            model.load(fetch(files["meta"]["path"]), fetch(files["weights"]["path"]))
        except ValueError as e:
            raise NoModel(f"{what}: {e}") from e
    return Loaded(name, str(version.version), alias, version.run_id, dict(version.tags), model)


class ModelStore:
    """Holds the current model; reload() loads the alias again and swaps only on success."""

    def __init__(self, tracking_uri: str, name: str, alias: str):
        self.tracking_uri, self.name, self.alias = tracking_uri, name, alias
        self._current: Loaded | None = None
        self._reload_lock = threading.Lock()
        self.last_error: str | None = None
        self._failed_version: str | None = None  # the watcher does not retry it every poll

    @property
    def current(self) -> Loaded:
        model = self._current  # one read: a request keeps the model it started with
        if model is None:
            raise NoModel(self.last_error or f"no {self.alias} registered: run make train-best")
        return model

    @property
    def ready(self) -> bool:
        return self._current is not None

    def reload(self) -> Loaded:
        """Load the alias's version; on any failure keep serving the old one and raise."""
        with self._reload_lock:
            try:
                loaded = load(self.tracking_uri, self.name, self.alias)
            except NoModel as e:
                self.last_error = str(e)
                raise
            except Exception as e:  # a broken artifact must not take the service down
                self.last_error = (
                    f"loading {self.name}@{self.alias} failed: {type(e).__name__}: {e}"
                )
                raise NoModel(self.last_error) from e
            self._current = loaded  # a single assignment: the swap is atomic for readers
            self.last_error = None
            log.info("serving %s version %s (%s)", loaded.name, loaded.version, loaded.alias)
            return loaded

    def follow(self) -> Loaded | None:
        """Reload if the alias now points at another version than the one served (and than
        the one that last failed to load); the newly served model, or None."""
        try:
            target = MlflowClient(self.tracking_uri).get_model_version_by_alias(
                self.name, self.alias
            )
        except MlflowException:  # the alias was removed: keep serving what we have
            return None
        version = str(target.version)
        served = self._current.version if self._current else None
        if version in (served, self._failed_version):
            return None
        try:
            loaded = self.reload()
        except NoModel as e:
            self._failed_version = version
            log.warning("%s moved to version %s, which did not load: %s", self.alias, version, e)
            return None
        self._failed_version = None
        return loaded
