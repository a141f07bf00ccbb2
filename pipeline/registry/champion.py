"""The champion/challenger gate: a new version against the champion on the same validation data."""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.data import labels
from pipeline.data.inputs import SEED_FORM, InputSpec

# The validation faces in a version's input form, and their descriptors when it takes them.
Inputs = Callable[[InputSpec], tuple[np.ndarray, np.ndarray | None]]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version under the champion alias; None only when there is none (a registry that
    fails for another reason raises, rather than letting any version through)."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        missing_alias = e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in e.message
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
            return None
        raise


def validation_accuracy(uri: str, inputs: Inputs, truth: dict[str, np.ndarray], metric: str):
    """A registered version's accuracy on the study's metric, through its own pyfunc, on the
    validation faces in the form it was trained on."""
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if hasattr(model, "probabilities_of"):
        found = model.probabilities_of(*inputs(model.spec))
    else:  # a version's own code from before input forms: 48x48 grayscale only
        found = model.probabilities(inputs(SEED_FORM)[0])
    acc = {head: float((found[head].argmax(1) == truth[head]).mean()) for head in labels.HEADS}
    return float(np.mean(list(acc.values()))) if metric == "mean" else acc[metric]


def gate(
    client: MlflowClient,
    name: str,
    version: str,
    inputs: Inputs,
    truth: dict[str, np.ndarray],
    metric: str,
    data_key: tuple[str, str],
    promote: bool,
) -> str:
    """champion when the new version is at least as good as the current champion on the same
    validation data (both evaluated here, now); else challenger. The test split is never read:
    it reports, it does not choose. Versions of other data or another split are not compared
    (challenger, unless promote forces champion)."""
    current = current_champion(client, name)
    if promote or current is None:
        alias = CHAMPION
    elif (current.tags.get("data.fingerprint"), current.tags.get("split.digest")) != data_key:
        log.warning(
            "version %s: not compared with champion v%s, which was trained on other data or "
            "another split (its validation rows are not ours); set alias 'challenger' "
            "(PROMOTE=1 / --promote makes it champion)",
            version,
            current.version,
        )
        alias = CHALLENGER
    else:
        new = validation_accuracy(f"models:/{name}/{version}", inputs, truth, metric)
        old = validation_accuracy(f"models:/{name}/{current.version}", inputs, truth, metric)
        alias = CHAMPION if new >= old else CHALLENGER
        log.info(
            "validation %s accuracy: version %s %.4f, champion v%s %.4f -> %s",
            metric,
            version,
            new,
            current.version,
            old,
            alias,
        )
    client.set_registered_model_alias(name, alias, version)
    return alias
