"""How the suite itself runs under pytest-xdist (make test's -n)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    with open(os.path.join(os.environ["RAN_IN"], f"ran-{i}"), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])


@pytest.mark.parametrize("i", range(6))
def test_free(i):
    pass
"""


@pytest.mark.slow  # three pytest processes: seconds beside the other tests
def test_an_xdist_group_runs_in_one_process(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    """tests/test_bench.py and tests/test_serving_live.py start their bench process and servers
    once per module, and an xdist_group mark keeps each module in one pytest-xdist process under
    --dist loadgroup. pytest 9.2 with pytest-xdist 3.8 silently dropped the grouping: each process
    then started its own (a minute of CPU)."""
    assert "--dist loadgroup" in " ".join(pytestconfig.getini("addopts"))
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    ran = tmp_path / "ran"
    ran.mkdir()
    # pytest-xdist alone: the other installed plugins' imports are seconds in each process.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "xdist.plugin", "-n", "2", "--dist", "loadgroup"]
        + ["-q", "-p", "no:cacheprovider", "test_grouped.py"],
        cwd=tmp_path,
        env=os.environ | {"RAN_IN": str(ran), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    workers = [path.read_text() for path in ran.iterdir()]
    assert len(workers) == 6 and len(set(workers)) == 1, workers
