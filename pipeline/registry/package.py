"""Logging a trained network as an MLflow pyfunc model and registering it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import torch

from pipeline.data.inputs import SEED_FORM, InputSpec
from pipeline.model import network
from pipeline.registry import pyfunc


def log_and_register(
    tracking_uri: str,
    run_id: str,
    net,
    params: dict,
    edges,
    temperatures: dict[str, float],
    name: str,
    precision: str = "fp32",
    flip_average: bool = False,
    spec: InputSpec = SEED_FORM,
    tags: dict[str, str] | None = None,
) -> mlflow.entities.model_registry.ModelVersion:
    """Log the pyfunc (weights, params, labels, temperatures, preprocessing) on run `run_id` and
    register it, `tags` on the new version as it is made (one write, not one per tag). The one
    place faceopt uses MLflow's fluent API: model logging has no client form, so the run is made
    active here, for this call only."""
    import pipeline

    mlflow.set_tracking_uri(tracking_uri)

    with tempfile.TemporaryDirectory() as tmp:
        weights, meta = Path(tmp) / "weights.pt", Path(tmp) / "meta.json"
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, weights)
        members = len(net.members) if isinstance(net, network.Ensemble) else 1
        meta.write_text(
            json.dumps(
                pyfunc.metadata(
                    params, edges, temperatures, precision, flip_average, members, spec
                ),
                indent=2,
            )
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                # Models from code: the class is loaded from source, not unpickled; code_paths carries
                # this pipeline package with the model, so the version keeps predicting the same
                # after the project's code changes (in a process that has not imported it already).
                python_model=str(Path(pyfunc.__file__).with_name("pyfunc_entry.py")),
                artifacts={"weights": str(weights), "meta": str(meta)},
                code_paths=[str(Path(pipeline.__file__).parent)],
                signature=pyfunc.signature(edges, spec),
                input_example=pyfunc.example(spec),
                pip_requirements=pyfunc.requirements(),
            )
    return mlflow.register_model(info.model_uri, name, tags=tags)
