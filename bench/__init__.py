"""Benchmarks: each module prints a markdown table and keeps it under bench/results/."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Settings

RESULTS = Path(__file__).parent / "results"


def save(kind: str, text: str) -> Path:
    """Write `text` to bench/results/<kind>-<date>-<time>.md and say where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text.rstrip("\n") + "\n")
    print(f"written to {out}")
    return out


def require_champion(settings: Settings) -> None:
    """Stop at once, saying what to do, when there is nothing to serve (not after a 3-minute wait).
    Here, importing MLflow only when called, so that bench.abuse need not import bench.serve's
    modules (seconds of imports)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.storage import redact

    try:
        MlflowClient(settings.tracking_uri).get_model_version_by_alias(
            settings.model_name, settings.alias
        )
    except MlflowException as e:
        raise SystemExit(
            f"no {settings.alias} of model {settings.model_name!r} in "
            f"{redact(settings.tracking_uri)}: "
            "run `make tune train-best DATA=...` first (or set MLFLOW_TRACKING_URI to the store "
            "that has one)"
        ) from e
