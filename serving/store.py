"""The served model: loaded from the MLflow registry by alias, swapped atomically on reload."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import mlflow
import numpy as np
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

    def probabilities(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.probabilities(faces)


def load(tracking_uri: str, name: str, alias: str) -> Loaded:
    """The version that `alias` points at, loaded through mlflow.pyfunc."""
    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise NoModel(f"no {alias} registered for model {name!r}: run make train-best") from e
    mlflow.set_tracking_uri(tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    # The torch network itself: one batch through it, without pyfunc's DataFrame round trip.
    model = pyfunc.unwrap_python_model()
    return Loaded(name, str(version.version), alias, version.run_id, dict(version.tags), model)


class ModelStore:
    """Holds the current model; reload() loads the alias again and swaps only on success."""

    def __init__(self, tracking_uri: str, name: str, alias: str):
        self.tracking_uri, self.name, self.alias = tracking_uri, name, alias
        self._current: Loaded | None = None
        self._reload_lock = threading.Lock()
        self.last_error: str | None = None

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
