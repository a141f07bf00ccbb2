"""How the suite itself runs under pytest-xdist (make test's -n)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.testkit import machine

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


# /proc/cpuinfo's first entries: an Intel and an AMD x86 processor, and an Arm one, which names no
# model. Each file holds two processors, as a real one does.
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor @ 2.90GHz
flags\t\t: fpu avx512_bf16 amx_bf16
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx512_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


@pytest.mark.parametrize(
    ("cpuinfo", "name"),
    [
        (XEON, "Intel(R) Xeon(R) Processor @ 2.90GHz (family 6 model 167)"),
        (EPYC, "AMD EPYC (family 26 model 2)"),
        (ARM, None),
        ("", None),  # no cpuinfo (not Linux)
    ],
)
def test_the_machine_names_its_processor(tmp_path: Path, cpuinfo: str, name: str | None) -> None:
    """What the benchmarks' results and `make test`'s header say a run's times belong to."""
    path = tmp_path / "cpuinfo"
    if cpuinfo:
        path.write_text(cpuinfo + "\n" + cpuinfo.replace("processor\t: 0", "processor\t: 1"))
    name = name or platform.processor() or platform.machine()
    assert machine(path) == f"{name}, {os.cpu_count()} cores"
