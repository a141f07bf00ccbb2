"""Every benchmark under bench/ run by its own `__main__`, as `make bench*` runs it, in a real
process on tiny data (a synthetic CSV, three photos of one face, the session's registered model),
so that a refactor cannot break one unseen. Only that each one runs to its table is checked, never
its numbers' values; nothing is written into bench/results/ (--no-save, --logs). bench.peers has
its own test (tests/test_peers.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Settings
from tests.conftest import astronaut_photos, machine, synthetic_faces, write_csv

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results"
NUMBER = re.compile(r"\d")

# One process runs every bench (see `benches`): its tests share one pytest-xdist process.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bench")]


def stores(settings: Settings) -> dict[str, str]:
    """The environment that points a bench at the registered model, its study and its data."""
    return {
        # Settings reads these two before FACEOPT_TRACKING_URI and FACEOPT_STORAGE.
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "OPTUNA_STORAGE": settings.storage,
        "FACEOPT_MODEL_NAME": settings.model_name,
        "FACEOPT_DATA": str(settings.data),
        "FACEOPT_CACHE_DIR": str(settings.cache_dir),
    }


def rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row printed, header rows and rules left out."""
    lines = text.splitlines()
    found = []
    for line, after in zip(lines, [*lines[1:], ""], strict=True):
        if line.startswith("| ") and "| ---" not in line and not after.startswith("| ---"):
            found.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return found


def labels(text: str) -> list[str]:
    """Each table row's first cell, after checking that the row holds a number."""
    found = rows(text)
    assert found, text
    for row in found:
        assert any(NUMBER.search(cell) for cell in row[1:]), row
    return [row[0] for row in found]


# Every bench by its own `__main__`, with its own argv and environment, one after another in one
# process: each is seconds of work after seconds of imports (torch and its compiler, MLflow,
# dlib's models), which a process per bench would pay nine times. A bench that fails has its
# traceback in its place.
RUN_EACH = """
import contextlib, importlib, io, json, os, runpy, sys, traceback
from pipeline.cli import startup
plan = json.loads(sys.argv[1])
with startup():  # their imports once, as a faceopt command loads its own
    for module, _, _ in plan:
        importlib.import_module(f"bench.{module}")
found = {}
for module, argv, env in plan:
    sys.argv = [f"bench/{module}.py", *argv]
    before = dict(os.environ)
    os.environ.update(env)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"bench.{module}", run_name="__main__")
        found[module] = {"out": out.getvalue()}
    except BaseException:
        found[module] = {"out": out.getvalue(), "error": traceback.format_exc()}
    os.environ.clear()
    os.environ.update(before)
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def benches(registered: Settings, tmp_path_factory) -> dict[str, dict[str, str]]:
    """What each bench printed (and its traceback if it failed), all run once, at their
    smallest, none saving into bench/results/ (--no-save, --logs)."""
    tmp = tmp_path_factory.mktemp("bench")
    photos = astronaut_photos(tmp / "photos")
    data = write_csv(synthetic_faces(100), tmp / "faces.csv")
    # `make bench`: every section at its smallest. Tuning runs with 1 worker alone: a 2-worker
    # run is three more processes' imports; bench_tuning's code is the same for both, and
    # tests/test_workers.py covers the workers. The tuning run's plots (seconds of matplotlib)
    # are off. It runs first: its "peak memory of one process" is the largest child so far.
    run = ["--data", data, "--repeats", 1, "--epochs", 1]
    run += ["--tune-trials", 2, "--tune-repeats", 1, "--tune-workers", 1]
    # `make bench-serve`: our server and `mlflow models serve` of the champion, a few requests at
    # two concurrencies, and the served accuracy on the photos.
    serve = ["--samples", photos, "--requests", 4, "--concurrency", "1,2", "--logs", tmp / "logs"]
    # `make bench-abuse`: every case once, smaller (a 1000x1000 PNG, a 1 MiB header), the
    # service's limits lowered through its own settings (2 files a request, 2 s for a body, so
    # that the slow body is refused in 2 s, not 30); nothing settles.
    abuse = ["--concurrency", 1, "--settle", 0, "--bomb-side", 1000, "--header-mib", 1]
    abuse += ["--logs", tmp / "logs"]
    # `make bench-suite`: two clones of a one-commit repository made here (a CI checkout may have
    # no history), a setup that does nothing, and a command that prints a pytest summary.
    repo = one_commit_repo(tmp / "repo")
    summary = f"{sys.executable} -c \"print('=== 3 passed in 0.50s ===')\""
    suite = ["--repo", repo, "--baseline", "HEAD", "--runs", 2, "--setup", "true"]
    suite += ["--command", summary]
    model = stores(registered)
    limits = {"FACEOPT_MAX_FILES": "2", "FACEOPT_BODY_TIMEOUT": "2"}
    each = [
        ("run", run, {"FACEOPT_STUDY_PLOTS": "false"}),
        ("serve", serve, model),
        ("abuse", abuse, model | limits),
        ("by_age", ["--photos", photos], model),
        ("chips", ["--crops", photos], model),
        ("descriptor", ["--chips", photos, "--repeats", 1], model),
        ("versions", ["--photos", photos, "champion", 1], model),  # the champion against itself
        ("views", ["--version", "champion"], model),
        ("suite", suite, {}),
    ]
    argv = [[module, [*map(str, args), "--no-save"], env] for module, args, env in each]
    before = sorted(RESULTS.rglob("*"))
    done = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(RESULTS.rglob("*")) == before, "a smoke run wrote into bench/results/"
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_commit_repo(folder: Path) -> Path:
    """A git repository with one commit of one file."""
    folder.mkdir()
    (folder / "README.md").write_text("a suite\n")
    git = ["git", "-c", "user.name=faceopt", "-c", "user.email=faceopt@localhost"]
    for args in (["init", "-q"], ["add", "README.md"], ["commit", "-q", "-m", "one"]):
        subprocess.run([*git, *args], cwd=folder, check=True, capture_output=True)
    return folder


def printed(benches: dict[str, dict[str, str]], module: str) -> str:
    """What `module` printed, once it ran to its end."""
    assert "error" not in benches[module], benches[module]["error"]
    return benches[module]["out"]


def test_run_bench_runs_every_section(benches: dict) -> None:
    assert printed(benches, "run").startswith(f"{machine()}, torch ")  # whose times they are
    found = labels(printed(benches, "run"))
    expected = [
        "data load: first",
        "data load: cached",
        "training (mlp, batch 64): DataLoader",
        "training (mlp, batch 64): our loop",
        "training (mlp, batch 64): the model's step alone",
        "training epoch incl. validation (cnn-cpu reference, batch 64): fp32",
        "training epoch incl. validation (cnn-cpu reference, batch 64): default",
        "validation mean accuracy after 1 epochs (cnn-cpu reference, seed 0): fp32",
        "validation mean accuracy after 1 epochs (cnn-cpu reference, seed 0): default",
        "trial (1 epochs), no logging",
        "trial (1 epochs), MLflow trial logger",
        "trial (1 epochs) on 25% of the training data",
        "trial (1 epochs) on 50% of the training data",
        "trial (1 epochs) on 100% of the training data",
        "tuning, 1 worker (2 trials x 1 epochs)",
        "tuning: peak memory of one process",
    ]
    # Where CUDA is present, the GPU section's rows come between; they are not asserted here.
    cpu = [label for label in found if ", cuda" not in label and "train-best's path" not in label]
    assert len(cpu) == len(expected), found
    for label, start in zip(cpu, expected, strict=True):
        assert label.startswith(start), (label, start)


def test_serve_bench_against_mlflow_models_serve(benches: dict) -> None:
    out = printed(benches, "serve")
    assert f", {machine()}, " in out.splitlines()[0]
    found = labels(out)
    assert found[:4] == ["faceopt /predict (JPEG)"] * 2 + ["mlflow models serve (48x48 JSON)"] * 2
    assert found[4:] == ["1", "2"]  # the faceopt / mlflow ratio per concurrency
    assert "served accuracy on 3 UTKFace sample JPEGs over HTTP, as they are" in out
    assert "each in a photo 2x its size" in out


def test_abuse_bench_against_a_real_server(benches: dict) -> None:
    found = labels(printed(benches, "abuse"))
    assert re.fullmatch(r"1 requests x 1 PNG of \d+ KB declaring 1000x1000 pixels", found[0])
    assert found[1:] == [
        "1 requests x 2 noise JPEGs of 5.0 MiB",
        "one 200 MiB part (declared length)",
        "a 1 MiB header",
        "a body sent 1 byte per 100 ms",
    ]
    assert "/health afterwards: 200" in printed(benches, "abuse")


def test_by_age_bench(benches: dict) -> None:
    out = printed(benches, "by_age")
    assert labels(out) == ["0-3", "4-18", "19-45", "46-64", "65+"]
    assert "Photos, served: " in out and "Test split: " in out


def test_chips_bench(benches: dict) -> None:
    out = printed(benches, "chips")
    assert labels(out) == ["68 landmarks"] * 3 + ["5 landmarks"] * 3
    assert "the crops' lowest" in out and "pictures without people: highest" in out


def test_descriptor_bench(benches: dict) -> None:
    out = printed(benches, "descriptor")
    assert labels(out) == ["1", "3"]  # faces per call: one, and all three in one batch
    assert f"one thread of {machine()}, " in out
    assert "Euclidean distance between the two descriptors" in out


def test_versions_bench(benches: dict) -> None:
    out = printed(benches, "versions")
    assert labels(out) == ["age", "ethnicity", "gender"]
    assert "Network time per face" in out


def test_views_bench(benches: dict) -> None:
    out = printed(benches, "views")
    sets = ["plain", "+ mirror", "+ mirror, 4 shifts", "+ mirror, zoom 1.08 and 0.92"]
    assert [row[:2] for row in rows(out)] == [[s, v] for s in ("val", "test") for v in sets]
    assert all(NUMBER.search(row[2]) for row in rows(out))


def test_suite_bench_times_both_clones(benches: dict) -> None:
    out = printed(benches, "suite")
    assert out.startswith("# `") and out.splitlines()[0].endswith(machine())
    found = rows(out)
    named = [re.fullmatch(r"(baseline|current): ([0-9a-f]{7}) \(HEAD\)", row[0]) for row in found]
    assert [m and m[1] for m in named] == ["baseline", "current"], found
    assert named[0][2] == named[1][2]  # both the repository's one commit
    for row in found:
        assert row[1:3] == ["3 passed", "0.5, 0.5"], row  # pytest's own summary, each run
    assert "Ratio of the medians, current / baseline: 1.00 (run by run 1.00)" in out
