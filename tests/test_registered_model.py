"""A registered version stands on its own for MLflow's consumers: its code travels with it, and its
requirements name every package that code imports."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.registry import pyfunc

ROOT = Path(__file__).resolve().parents[1]
FACES = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
# The first line of each script below: a short-lived process needs no cycle collection while
# MLflow and torch load (seconds of CPU; faceopt's own commands skip it too, see cli.startup).
NO_GC = "import gc; gc.disable()\n"
# Loads the version in a fresh interpreter and prints its probabilities and where its code came from.
PREDICT = (
    NO_GC
    + """
import json, sys, mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/faces/1")
out = model.predict(np.array(json.loads(sys.argv[2]), dtype=np.uint8))
import pipeline
print(json.dumps({"probs": out.filter(like=":").to_numpy().tolist(), "code": pipeline.__file__,
                  "cols": list(out.columns)}))
"""
)


def pip_sources() -> list[str]:
    """This machine's pip sources (its configuration files and PIP_* variables, the later winning)
    as uv's options: uv reads no pip configuration, and torch's CPU wheel may come from one of
    them only. Several indexes are searched as pip does, for the best match among all."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    config = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.rsplit(".", 1)[-1]] = value.strip("'")
    options = ["--index-strategy", "unsafe-best-match"]
    for key, flag in (
        ("index-url", "--index-url"),
        ("extra-index-url", "--extra-index-url"),
        ("find-links", "--find-links"),
        ("constraint", "--constraint"),
    ):
        for value in config.get(key, "").split():
            options += [flag, value]
    return options


def predict_elsewhere(python: str, settings: Settings, cwd: Path, env: dict | None = None) -> dict:
    done = subprocess.run(
        [python, "-c", PREDICT, settings.tracking_uri, json.dumps(FACES.tolist())],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def expected(settings: Settings) -> np.ndarray:
    mlflow.set_tracking_uri(settings.tracking_uri)
    out = mlflow.pyfunc.load_model("models:/faces/1").predict(FACES)
    return out.filter(like=":").to_numpy()


def artifact(settings: Settings) -> Path:
    mlflow.set_tracking_uri(settings.tracking_uri)
    return Path(mlflow.artifacts.download_artifacts("models:/faces/1"))


@pytest.mark.slow  # real processes: make test, not the edit loop
def test_version_predicts_the_same_after_the_project_code_changes(
    registered: Settings, tmp_path: Path
) -> None:
    before = expected(registered)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "pipeline", project / "pipeline")
    # Today's code changes: other normalisation, another network. A version must not follow them.
    preprocess = project / "pipeline" / "data" / "preprocess.py"
    preprocess.write_text(preprocess.read_text().replace("MEAN = 0.5", "MEAN = 0.9"))
    network = project / "pipeline" / "model" / "network.py"
    network.write_text(
        network.read_text() + "\n\ndef build(params, classes):\n    raise SystemExit(3)\n"
    )
    env = {"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"}
    result = predict_elsewhere(sys.executable, registered, project, env)
    assert str(project) not in result["code"]  # the version's own copy of the code ran
    np.testing.assert_allclose(np.array(result["probs"]), before, atol=1e-6)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.slow  # real processes: make test, not the edit loop
def test_requirements_name_every_package_the_model_code_imports(registered: Settings) -> None:
    local = artifact(registered)
    # Which of the version's own modules run when MLflow loads it, asked of a fresh interpreter.
    script = (
        NO_GC + "import json, sys, mlflow\n"
        f"mlflow.pyfunc.load_model({str(local)!r})\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('pipeline')]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=local
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = [m for m in json.loads(done.stdout.strip().splitlines()[-1]) if "." in m]
    code = local / "code"
    files = [code.joinpath(*m.split(".")).with_suffix(".py") for m in loaded]
    files = [f if f.is_file() else f.with_suffix("") / "__init__.py" for f in files]
    files.append(code / "pipeline" / "registry" / "pyfunc_entry.py")
    imported = set().union(*(_imports(f) for f in files)) - set(sys.stdlib_module_names)
    imported -= {"pipeline", "__future__"}
    required = {
        line.split("==")[0].lower()
        for line in (local / "requirements.txt").read_text().split()
        if "==" in line
    }
    assert {"pillow", "torch", "numpy", "mlflow"} <= required
    for module in imported:
        assert {d.lower() for d in pyfunc.providers(module)} & required, (module, required)
    for line in (local / "requirements.txt").read_text().split():
        name, version = line.split("==")
        assert version == metadata.version(name).split("+")[0]  # the installed version


@pytest.mark.slow
def test_fresh_environment_from_the_requirements_loads_and_predicts(
    registered: Settings, tmp_path: Path
) -> None:
    """A virtual environment with nothing but the version's requirements (installed by uv, as
    MLflow's own env_manager="uv" does, from the sources this machine's pip uses) loads it by
    models:/ URI from another folder and predicts."""
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    requirements = artifact(registered) / "requirements.txt"
    uv = Path(sys.executable).parent / "uv"
    install = subprocess.run(
        [str(uv), "pip", "install", "-q", "--python", python, "-r", str(requirements)]
        + pip_sources(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = predict_elsewhere(python, registered, elsewhere, {"PATH": "/usr/bin:/bin"})
    np.testing.assert_allclose(np.array(result["probs"]), expected(registered), atol=1e-5)
    assert result["cols"][:3] == ["age", "ethnicity", "gender"]
    assert "age:0-3" in result["cols"] and "gender:female" in result["cols"]
