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
# One process answers for all three tests (`elsewhere`): they share one pytest-xdist process.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("registered_model")]
FACES = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
# The first line of each script below: a short-lived process needs no cycle collection while
# MLflow and torch load (seconds of CPU; faceopt's own commands skip it too, see cli.startup).
NO_GC = "import gc; gc.disable()\n"
# Loads the version in a fresh interpreter and prints its probabilities, where its code came from
# and which of its modules ran.
PREDICT = (
    NO_GC
    + """
import json, sys, mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/faces/1")
out = model.predict(np.array(json.loads(sys.argv[2]), dtype=np.uint8))
import pipeline
print(json.dumps({"probs": out.filter(like=":").to_numpy().tolist(), "code": pipeline.__file__,
                  "cols": list(out.columns),
                  "modules": [m for m in sys.modules if m.startswith("pipeline")]}))
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


@pytest.fixture(scope="module")
def elsewhere(registered: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What version 1 answers (PREDICT) where nothing of this checkout helps it: a virtual
    environment with nothing but the version's requirements (installed by uv, as MLflow's own
    env_manager="uv" does, from the sources this machine's pip uses), another folder, and first
    on the path a copy of the project whose code has changed since: other normalisation, another
    network. One process for the three tests below: each start costs seconds of imports."""
    tmp = tmp_path_factory.mktemp("elsewhere")
    env_dir = tmp / "env"
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
    project = tmp / "project"
    shutil.copytree(ROOT / "pipeline", project / "pipeline")
    preprocess = project / "pipeline" / "data" / "preprocess.py"
    preprocess.write_text(preprocess.read_text().replace("MEAN = 0.5", "MEAN = 0.9"))
    network = project / "pipeline" / "model" / "network.py"
    network.write_text(
        network.read_text() + "\n\ndef build(params, classes):\n    raise SystemExit(3)\n"
    )
    folder = tmp / "folder"
    folder.mkdir()
    env = {"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"}
    return predict_elsewhere(python, registered, folder, env) | {"project": str(project)}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_requirements_name_every_package_the_model_code_imports(
    registered: Settings, elsewhere: dict
) -> None:
    local = artifact(registered)
    loaded = [m for m in elsewhere["modules"] if "." in m]  # the version's own modules that ran
    assert "pipeline.model.network" in loaded and "pipeline.registry.pyfunc" in loaded
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


def test_fresh_environment_from_the_requirements_loads_and_predicts(
    registered: Settings, elsewhere: dict
) -> None:
    """Loaded by models:/ URI with nothing installed but its requirements, it predicts as here."""
    np.testing.assert_allclose(np.array(elsewhere["probs"]), expected(registered), atol=1e-5)
    assert elsewhere["cols"][:3] == ["age", "ethnicity", "gender"]
    assert "age:0-3" in elsewhere["cols"] and "gender:female" in elsewhere["cols"]


def test_version_predicts_the_same_after_the_project_code_changes(
    registered: Settings, elsewhere: dict
) -> None:
    """The changed project came first on the path, and its own copy of the code ran instead."""
    assert elsewhere["code"] and not elsewhere["code"].startswith(elsewhere["project"])
    np.testing.assert_allclose(np.array(elsewhere["probs"]), expected(registered), atol=1e-5)
