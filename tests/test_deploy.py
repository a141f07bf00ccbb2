"""deploy/ names only what exists, and holds no secret (docs/operations.md).

No container is built or started here. What is checked instead, offline:
- every Kubernetes manifest validates against the Kubernetes schema (kubernetes-validate's bundled
  schemas, strict: an unknown field fails), and kustomization.yaml lists them;
- every command the image, compose.yaml and the manifests give `faceopt` parses with the CLI's
  own argparse parser (pipeline/cli.py), and its flags' values make valid Settings;
- every environment variable they set is one Settings reads (FACEOPT_<field>, or an alias such
  as MLFLOW_TRACKING_URI / OPTUNA_STORAGE) or one the PostgreSQL image reads (POSTGRES_ENV), and
  the values make valid Settings;
- the service's and the MLflow server's Host checks accept the health checks and the clients;
- compose.yaml publishes ports on 127.0.0.1 only and every .env key reaches it;
- no file holds what looks like a real credential: only CHANGE_ME placeholders and references.
Each checker is also run on a bad snippet, so that none of them passes by finding nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate.utils as kubernetes_validate  # the dev extra
import pytest
import yaml
from sqlalchemy.engine import make_url

from pipeline import cli
from pipeline.config import Settings
from serving.guard import Guard
from tests.conftest import require_service

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"
OPERATIONS = ROOT / "docs" / "operations.md"

# Manifests kustomization.yaml leaves out on purpose: a pod applied once by hand.
NOT_IN_KUSTOMIZATION = {"data-loader.yaml"}
# Kubernetes versions the manifests must validate against: an old supported one and the newest
# that kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# The environment the official postgres image reads (https://hub.docker.com/_/postgres). The
# MLflow server runs from this image (`faceopt mlflow-server`): its settings are flags and
# FACEOPT_MLFLOW_BACKEND, so it needs none of its own.
POSTGRES_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"}
# The Dockerfile's ENV that are not faceopt settings: Python's, pip's and the shell's.
IMAGE_ENV = {
    "PATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}
PLACEHOLDER = "CHANGE_ME"
ROLES = {"tune-worker", "train-best", "serve", "mlflow-server"}


# --- what faceopt reads -------------------------------------------------------------------------


def settings_env() -> set[str]:
    """Every environment variable Settings reads: FACEOPT_<FIELD>, or a field's aliases."""
    names = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add(f"{prefix}{name}".upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:  # AliasChoices
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
    return names


def command_problems(argv: list[str]) -> list[str]:
    """What is wrong with `faceopt <argv>`: an unknown subcommand or flag (the CLI's own parser),
    or a flag value that Settings refuses."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.parser().parse_args(argv)
    except SystemExit:
        said = err.getvalue().strip().splitlines() or ["exited"]
        return [f"faceopt {shlex.join(argv)}: {said[-1]}"]
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        Settings(**given)
    except Exception as e:  # pydantic's ValidationError: the value is not one the setting takes
        return [f"faceopt {shlex.join(argv)}: {e}"]
    return []


def env_problems(env: dict[str, str], allowed: set[str], where: str) -> list[str]:
    return [f"{where}: {name} is read by nothing here" for name in env if name not in allowed]


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a container with exactly this environment would make them."""
    known = settings_env()
    with monkeypatch.context() as m:
        for name in list(os.environ):
            if name.upper() in known:
                m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return Settings()


# --- compose ------------------------------------------------------------------------------------

INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, $$) of every
    string in `value`; a variable that is unset and has no default raises KeyError."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        found, op, arg = env.get(name), match.group("op"), match.group("arg")
        if op in (":-", "-"):
            return found if (found if op == ":-" else found is not None) else arg
        if found is None or (op == ":?" and not found):
            raise KeyError(f"${{{name}}} is not set ({arg or 'no default'})")
        return found

    return INTERPOLATION.sub(one, value)


def interpolated_names(text: str) -> set[str]:
    return {
        m.group("name") or m.group("bare")
        for m in INTERPOLATION.finditer(text)
        if m.group(0) != "$$"
    }


def dotenv(path: Path) -> dict[str, str]:
    """KEY=value lines of a .env file (comments and blank lines skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip().strip("'\"")
    return found


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def resolved_compose() -> dict:
    """compose.yaml as `docker compose config` would see it with .env.example as deploy/.env."""
    return interpolate(compose_doc(), dotenv(ENV_EXAMPLE))


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def is_faceopt(image: str) -> bool:
    return image.split("/")[-1].split(":")[0] == "faceopt"


def published_port_problems(compose: dict) -> list[str]:
    """Ports published on anything but the host's loopback (by default)."""
    bad = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            text = str(port if not isinstance(port, dict) else port.get("host_ip", ""))
            if not (text.startswith("127.0.0.1:") or text == "127.0.0.1"):
                bad.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
    return bad


# Service keys of the Compose specification that these files may use (a typo is not one).
_SERVICE_KEYS = (
    "image build command entrypoint environment env_file volumes ports depends_on healthcheck "
    "restart profiles deploy labels user networks working_dir gpus stop_grace_period shm_size "
    "ulimits init read_only security_opt cap_drop tmpfs expose pull_policy"
)
COMPOSE_SERVICE_KEYS = set(_SERVICE_KEYS.split())


def compose_structure_problems(compose: dict) -> list[str]:
    bad = []
    top = set(compose) - {"name", "services", "volumes", "networks", "configs", "secrets"}
    bad += [f"unknown top-level key {k!r}" for k in top if not k.startswith("x-")]
    services = compose.get("services", {})
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        bad += [f"{name}: unknown key {k!r}" for k in set(service) - COMPOSE_SERVICE_KEYS]
        for other in service.get("depends_on", {}):
            if other not in services:
                bad.append(f"{name}: depends on {other!r}, which is not a service")
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/", "$", "~")) and source not in volumes:
                bad.append(f"{name}: volume {source!r} is not declared under volumes:")
        check = service.get("healthcheck", {})
        if "test" in check and check["test"][0] not in ("CMD", "CMD-SHELL", "NONE"):
            bad.append(f"{name}: healthcheck test must start with CMD or CMD-SHELL")
    return bad


# --- Kubernetes ---------------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_k8s() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in manifests() for doc in documents(path)]


def schema_problems(doc: dict, version: str) -> list[str]:
    """Where `doc` does not validate against the Kubernetes schema of `version` (strict)."""
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        return [f"{name} (Kubernetes {version}): {where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{name}: {e.message}"]
    return []


def pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "Pod":
        return [spec]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for pod in pod_specs(doc) for c in pod.get("containers", [])]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in all_k8s() if d["kind"] == kind}


def container_env(container: dict) -> dict[str, str]:
    """The container's environment, ConfigMaps and the example Secret resolved."""
    maps, secrets = by_kind("ConfigMap"), by_kind("Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= maps[source["configMapRef"]["name"]]["data"]
        if "secretRef" in source:
            env |= secrets[source["secretRef"]["name"]]["stringData"]
    for item in container.get("env", []):
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            env[item["name"]] = secrets[key["name"]]["stringData"][key["key"]]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[item["name"]] = maps[key["name"]]["data"][key["key"]]
        else:
            env[item["name"]] = str(item.get("value", ""))
    return env


def env_names(container: dict) -> dict[str, str]:
    """Every name a container's environment gets, with where it comes from."""
    maps, secrets = by_kind("ConfigMap"), by_kind("Secret")
    names = {item["name"]: "env" for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= dict.fromkeys(maps[source["configMapRef"]["name"]]["data"], "ConfigMap")
        if "secretRef" in source:
            names |= dict.fromkeys(secrets[source["secretRef"]["name"]]["stringData"], "Secret")
    return names


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def exec_form(arguments: str) -> list[str]:
    """An ENTRYPOINT/CMD in exec form (a JSON list); the shell form is refused here."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def dockerfile_problems(text: str) -> list[str]:
    """The image's entrypoint is a console script of the project, its CMD a real command, it
    runs as a non-root user and has a health check on the service's /health."""
    found = dockerfile_instructions(text)
    last = {word: rest for word, rest in found}
    bad = []
    if "ENTRYPOINT" not in last:
        return ["no ENTRYPOINT"]
    entrypoint = exec_form(last["ENTRYPOINT"])
    if entrypoint[0] not in console_scripts():
        bad.append(f"ENTRYPOINT {entrypoint} is not a console script of pyproject.toml")
    if "CMD" in last:
        bad += command_problems(entrypoint[1:] + exec_form(last["CMD"]))
    user = last.get("USER", "root").split(":")[0]
    if user in ("root", "0"):
        bad.append(f"the image runs as {user}")
    if not re.search(r"/health\b", last.get("HEALTHCHECK", "")):
        bad.append("no HEALTHCHECK on /health")
    return bad


def dockerfile_env(text: str) -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions(text):
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# --- secrets ------------------------------------------------------------------------------------

URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"]+:(?P<password>[^\s@/'\"]+)@")
SECRET_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_])(?P<key>[A-Za-z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY"
    r"|PRIVATE_KEY)[A-Za-z0-9_]*)[ \t]*[:=][ \t]*(?P<value>[^\s#]*)",
    re.IGNORECASE,
)
KNOWN_FORMATS = {
    "an AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "an API key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "a JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}"),
}


def harmless(value: str) -> bool:
    """A placeholder or a reference, not a credential: CHANGE_ME, $VAR / ${VAR} / $(VAR),
    <...> or ... in prose, nothing at all, or the name of a variable (UPPER_SNAKE)."""
    value = value.strip().strip("'\"")
    return (
        not value
        or PLACEHOLDER in value
        or value.startswith("$")
        or value in ("...", "***")
        or (value.startswith("<") and value.endswith(">"))
        or re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None
    )


def secret_problems(text: str, where: str) -> list[str]:
    """Whatever in `text` looks like a real credential."""
    bad = []
    for match in URL_PASSWORD.finditer(text):
        if not harmless(match.group("password")):
            bad.append(f"{where}: a URL with a password: {match.group(0)}")
    for match in SECRET_ASSIGNMENT.finditer(text):
        if not harmless(match.group("value")):
            bad.append(f"{where}: {match.group('key')} is given a value: {match.group(0)}")
    bad += [f"{where}: {what}" for what, regex in KNOWN_FORMATS.items() if regex.search(text)]
    if where.endswith(".yaml"):
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                if doc.get("data"):
                    bad.append(f"{where}: Secret data: (base64) hides its values; use stringData")
                for key, value in (doc.get("stringData") or {}).items():
                    if PLACEHOLDER not in str(value):
                        bad.append(
                            f"{where}: Secret value {key} is not a {PLACEHOLDER} placeholder"
                        )
    return bad


def scanned_files() -> list[Path]:
    """Every file of deploy/ but a local deploy/.env (git-ignored: the real values), and the
    operations page."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != ".env"]
    return sorted(files) + [OPERATIONS]


# === the tests ==================================================================================


def test_the_files_exist() -> None:
    for path in (DOCKERFILE, COMPOSE, ENV_EXAMPLE, K8S / "kustomization.yaml", OPERATIONS):
        assert path.is_file(), path
    assert ".env" in (DEPLOY / ".gitignore").read_text().split(), "deploy/.env must be ignored"


# --- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline: the schemas ship inside kubernetes-validate; any connection attempt fails here.
    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = documents(path)
    assert docs, f"{path.name} holds no manifest"
    problems = [p for doc in docs for v in K8S_VERSIONS for p in schema_problems(doc, v)]
    assert not problems, "\n".join(problems)


def test_the_schema_check_finds_a_mistake() -> None:
    deployment = documents(K8S / "serve.yaml")[0]
    assert not schema_problems(deployment, K8S_VERSIONS[-1])
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # not a field
    assert schema_problems(typo, K8S_VERSIONS[-1])
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    assert schema_problems(wrong_type, K8S_VERSIONS[-1])
    assert schema_problems(
        {"apiVersion": "v9", "kind": "Nothing", "metadata": {"name": "x"}}, "1.30"
    )


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    expected = {p.name for p in manifests()} - NOT_IN_KUSTOMIZATION
    assert listed == expected, f"missing {expected - listed}, extra {listed - expected}"
    assert kustomization["namespace"] == "faceopt"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert {"StatefulSet", "Deployment", "Job", "Secret", "ConfigMap", "Service"} <= set(kinds)
    assert all(
        d["metadata"].get("namespace") == "faceopt"
        for d in yaml.safe_load_all(out.stdout)
        if d and d["kind"] != "Namespace"
    )


def test_manifests_have_every_role_and_the_required_shape() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in all_k8s()}
    assert ("StatefulSet", "faceopt-postgres") in kinds and ("Service", "faceopt-postgres") in kinds
    assert ("Deployment", "faceopt-mlflow") in kinds and ("Service", "faceopt-mlflow") in kinds
    assert ("Deployment", "faceopt-serve") in kinds and ("Service", "faceopt-serve") in kinds
    jobs = by_kind("Job")
    tune, best = jobs["faceopt-tune"], jobs["faceopt-train-best"]
    assert tune["spec"]["parallelism"] >= 2
    assert containers(tune)[0]["args"][0] == "tune-worker"
    assert containers(best)[0]["args"][0] == "train-best"
    assert best["spec"]["suspend"] is True, "train-best waits for the tuning"
    shared = {"OPTUNA_STORAGE", *by_kind("ConfigMap")["faceopt-study"]["data"]}
    tune_env, best_env = container_env(containers(tune)[0]), container_env(containers(best)[0])
    assert {k: tune_env[k] for k in shared} == {k: best_env[k] for k in shared}
    roles = {c["args"][0] for _, d in all_k8s() for c in containers(d) if is_faceopt(c["image"])}
    assert roles == ROLES

    postgres = containers(by_kind("StatefulSet")["faceopt-postgres"])[0]
    password = next(e for e in postgres["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert "secretKeyRef" in password["valueFrom"], "the database password comes from a Secret"

    serve = containers(by_kind("Deployment")["faceopt-serve"])[0]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/health"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(serve["resources"][kind]), kind


def test_manifests_run_real_faceopt_commands() -> None:
    problems = []
    for path, doc in all_k8s():
        for container in containers(doc):
            if not is_faceopt(container["image"]):
                continue
            where = f"{path.name}: {container['name']}"
            if "command" in container:  # would replace the image's ENTRYPOINT ["faceopt"]
                problems.append(f"{where}: command replaces faceopt; give args")
            problems += [f"{where}: {p}" for p in command_problems(container.get("args", []))]
    assert not problems, "\n".join(problems)


def test_the_command_check_finds_a_mistake() -> None:
    assert not command_problems(["serve", "--host", "0.0.0.0", "--port", "8000"])
    assert command_problems(["tune-workers"])  # no such subcommand
    assert command_problems(["serve", "--bind", "0.0.0.0"])  # no such flag
    assert command_problems(["serve", "--port", "http"])  # not a number
    assert command_problems(
        ["tune-worker", "--preset", "fastest"]
    )  # argparse takes it; Settings not
    assert command_problems(["mlflow-server", "--threads", "2"])


def test_manifests_set_only_environment_that_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    known = settings_env()
    problems = []
    for path, doc in all_k8s():
        for container in containers(doc):
            image = container["image"]
            allowed = known if is_faceopt(image) else POSTGRES_ENV if "postgres" in image else set()
            problems += env_problems(env_names(container), allowed, f"{path.name}: {image}")
            if is_faceopt(image):
                settings_from_env(container_env(container), monkeypatch)  # values are valid
    for name, config in by_kind("ConfigMap").items():  # read by faceopt pods only
        problems += env_problems(config["data"], known, f"ConfigMap {name}")
    assert not problems, "\n".join(problems)


def test_the_environment_check_finds_a_mistake() -> None:
    known = settings_env()
    assert {"FACEOPT_ALLOWED_HOSTS", "MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"} <= known
    assert {"FACEOPT_STORAGE", "FACEOPT_TRACKING_URI", "FACEOPT_MLFLOW_BACKEND"} <= known
    assert env_problems({"FACEOPT_ALLOWED_HOST": "x"}, known, "typo")  # the field is plural
    assert env_problems({"MLFLOW_TRACKING_URL": "x"}, known, "typo")
    assert env_problems({"POSTGRES_PASSWORD": "x"}, known, "a faceopt pod")


@pytest.mark.slow
def test_the_service_and_mlflow_answer_their_probes_and_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    serve = containers(by_kind("Deployment")["faceopt-serve"])[0]
    settings = settings_from_env(container_env(serve), monkeypatch)
    guard = Guard(app=None, settings=settings)

    def answered(host: str) -> bool:
        return guard.check({"headers": [(b"host", host.encode())]}) is None

    for probe in ("readinessProbe", "livenessProbe"):
        headers = serve[probe]["httpGet"].get("httpHeaders", [])
        host = next((h["value"] for h in headers if h["name"].lower() == "host"), "10.1.2.3:8000")
        assert answered(host), f"{probe} sends Host {host!r}, which the service refuses"
    assert not answered("10.1.2.3:8000"), "a probe without its Host header would be refused"
    assert answered("faceopt-serve:8000") and answered("127.0.0.1:8000")  # Service, port-forward
    assert not answered("attacker.example")

    mlflow = containers(by_kind("Deployment")["faceopt-mlflow"])[0]
    args = mlflow["args"]
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    url = make_url(container_env(containers(by_kind("Job")["faceopt-tune"])[0])["OPTUNA_STORAGE"])
    tracking = by_kind("ConfigMap")["faceopt-study"]["data"]["MLFLOW_TRACKING_URI"]
    client_host = tracking.split("://", 1)[1].rstrip("/")
    assert is_allowed_host_header(hosts, client_host), f"MLflow refuses its clients' {client_host}"
    assert is_allowed_host_header(hosts, "localhost:5000")  # port-forward
    assert not is_allowed_host_header(hosts, "attacker.example")
    assert client_host.split(":")[0] == "faceopt-mlflow" and url.host == "faceopt-postgres"


def test_the_example_secret_matches_the_database() -> None:
    secret = by_kind("Secret")["faceopt-credentials"]["stringData"]
    postgres = containers(by_kind("StatefulSet")["faceopt-postgres"])[0]
    env = {e["name"]: e.get("value") for e in postgres["env"]}
    for key in ("OPTUNA_STORAGE", "FACEOPT_MLFLOW_BACKEND"):
        url = make_url(secret[key])
        assert url.username == env["POSTGRES_USER"], key
        assert url.password == secret["POSTGRES_PASSWORD"] == PLACEHOLDER, key
        assert url.host == "faceopt-postgres" and url.port == 5432, key
    assert make_url(secret["OPTUNA_STORAGE"]).database == env["POSTGRES_DB"]


# --- compose ------------------------------------------------------------------------------------


def test_compose_parses_and_has_every_role() -> None:
    compose = resolved_compose()
    assert not compose_structure_problems(compose), compose_structure_problems(compose)
    services = compose["services"]
    assert {"postgres", "mlflow", "tune-worker", "train-best", "serve"} <= set(services)
    worker = services["tune-worker"]
    assert "container_name" not in worker and "ports" not in worker, "--scale needs neither"
    assert services["train-best"].get("profiles"), "train-best is one-shot, behind a profile"
    assert service_env(worker) == service_env(services["train-best"]), "one study, one setting"
    assert "/ready" in " ".join(services["serve"]["healthcheck"]["test"])
    assert "postgres-data" in compose["volumes"] and "mlflow-artifacts" in compose["volumes"]
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert any(v.startswith("mlflow-artifacts:") for v in services["mlflow"]["volumes"])


def compose_cli() -> list[str] | None:
    """Docker Compose v2 (`docker compose`), or the older docker-compose 1.x, when installed."""
    if shutil.which("docker"):
        found = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if found.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """Compose's own schema check (`config` needs no daemon), with .env.example as deploy/.env."""
    command = compose_cli()
    if command is None:
        require_service("docker-compose", "neither docker compose nor docker-compose is installed")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copy(ENV_EXAMPLE, tmp_path / "deploy" / ".env")
    compose = tmp_path / "deploy" / "compose.yaml"
    if command == ["docker-compose"]:  # 1.x predates the top-level `name`
        compose.write_text(re.sub(r"(?m)^name: .*\n", "", compose.read_text()))
    out = subprocess.run(
        [*command, "-f", str(compose), "--profile", "train", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=compose.parent,
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"postgres", "mlflow", "tune-worker", "train-best", "serve"} <= set(services)


def test_the_compose_structure_check_finds_a_mistake() -> None:
    bad = {
        "services": {
            "serve": {
                "image": "faceopt",
                "enviroment": {},
                "depends_on": {"mlflw": {}},
                "volumes": ["cache:/x"],
                "healthcheck": {"test": ["curl", "x"]},
            }
        },
        "version": "3",
    }
    assert len(compose_structure_problems(bad)) == 5


def test_compose_runs_real_faceopt_commands() -> None:
    cmd = exec_form(dict(dockerfile_instructions(DOCKERFILE.read_text()))["CMD"])
    problems, roles = [], set()
    for name, service in resolved_compose()["services"].items():
        if not is_faceopt(service["image"]):
            continue
        assert "entrypoint" not in service, f"{name}: keep the image's ENTRYPOINT"
        command = service.get("command", cmd)
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        problems += [f"{name}: {p}" for p in command_problems(argv)]
        roles.add(argv[0])
    assert not problems, "\n".join(problems)
    assert roles == ROLES


def test_compose_sets_only_environment_that_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    known = settings_env()
    problems = []
    for name, service in resolved_compose()["services"].items():
        env = service_env(service)
        if is_faceopt(service["image"]):
            problems += env_problems(env, known, name)
            settings_from_env(env, monkeypatch)
        elif service["image"].startswith("postgres:"):
            problems += env_problems(env, POSTGRES_ENV, name)
        else:
            problems += env_problems(env, set(), name)
    assert not problems, "\n".join(problems)


def test_env_example_keys_are_read_and_reach_compose() -> None:
    example = dotenv(ENV_EXAMPLE)
    compose_text = COMPOSE.read_text()
    used = interpolated_names(compose_text)
    # deploy/.env only feeds compose's interpolation: a key compose.yaml never names is lost.
    problems = [
        f".env.example: {key} is never used by compose.yaml" for key in example if key not in used
    ]
    # A name in faceopt's namespaces must be one faceopt reads (compose-only keys such as
    # BIND_ADDRESS or DATA_DIR name ports, folders and build arguments).
    problems += [
        f".env.example: {key} looks like a faceopt setting but is none"
        for key in example
        if key.startswith(("FACEOPT_", "MLFLOW_", "OPTUNA_")) and key not in settings_env()
    ]
    required = {
        m.group("name") for m in INTERPOLATION.finditer(compose_text) if m.group("op") == ":?"
    }
    problems += [
        f"compose.yaml requires {key}, which .env.example lacks" for key in required - set(example)
    ]
    assert not problems, "\n".join(problems)
    resolved_compose()  # nothing is left unset


def test_compose_urls_match_the_database_and_services() -> None:
    example = dotenv(ENV_EXAMPLE)
    services = resolved_compose()["services"]
    for key, database in (("OPTUNA_STORAGE", "optuna"), ("FACEOPT_MLFLOW_BACKEND", "mlflow")):
        url = make_url(example[key])
        assert (url.username, url.password) == (
            example["POSTGRES_USER"],
            example["POSTGRES_PASSWORD"],
        )
        assert url.host == "postgres" and url.database == database, key
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "optuna"
    tracking = example["MLFLOW_TRACKING_URI"]
    assert tracking == "http://mlflow:5000"


def test_compose_health_checks_and_clients_pass_the_host_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    services = resolved_compose()["services"]
    settings = settings_from_env(service_env(services["serve"]), monkeypatch)
    assert settings.host == "127.0.0.1"  # the flag, not the environment, opens it in the container
    guard = Guard(app=None, settings=settings)
    for host in ("127.0.0.1:8000", "localhost:8000", "serve:8000"):  # health check, host, network
        assert guard.check({"headers": [(b"host", host.encode())]}) is None, host
    mlflow = services["mlflow"]["command"]
    hosts = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5001"):
        assert is_allowed_host_header(hosts, host), host


def test_compose_publishes_ports_on_loopback_only() -> None:
    assert dotenv(ENV_EXAMPLE)["BIND_ADDRESS"] == "127.0.0.1"
    defaults = {
        k: v
        for k, v in dotenv(ENV_EXAMPLE).items()
        if k not in interpolated_names(str(compose_doc()["services"]["serve"]["ports"]))
    }
    assert not published_port_problems(interpolate(compose_doc(), defaults))  # compose's defaults
    assert not published_port_problems(resolved_compose())  # with .env.example
    assert "ports" not in compose_doc()["services"]["postgres"]


def test_the_port_check_finds_a_mistake() -> None:
    bad = {"services": {"a": {"ports": ["8000:8000"]}, "b": {"ports": ["0.0.0.0:5000:5000"]}}}
    assert len(published_port_problems(bad)) == 2


def test_interpolation_as_compose_does() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert interpolate("${A}-${B:-d}-${EMPTY:-e}-${EMPTY-f}-$$A-$A", env) == "x-d-e--$A-x"
    with pytest.raises(KeyError, match="set it"):
        interpolate("${B:?set it}", env)
    assert interpolated_names("${A} $${B} ${C:-x} $D") == {"A", "C", "D"}


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_entrypoint_cmd_user_and_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert not dockerfile_problems(text), dockerfile_problems(text)
    found = dockerfile_instructions(text)
    assert exec_form(dict(found)["ENTRYPOINT"]) == ["faceopt"]
    args = dict(rest.split("=", 1) for word, rest in found if word == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "BASE_IMAGE" in args and found[1] == ("FROM", "${BASE_IMAGE}")
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH \?= torch==(\S+)", makefile, re.MULTILINE)
    if pinned:  # the image follows `make setup`'s pin
        assert args["TORCH_VERSION"] == pinned.group(1)


def test_dockerfile_environment_is_read() -> None:
    env = dockerfile_env(DOCKERFILE.read_text())
    problems = env_problems(env, settings_env() | IMAGE_ENV, "Dockerfile ENV")
    assert not problems, problems
    assert env["FACEOPT_CACHE_DIR"].startswith("/var/lib/faceopt")


def test_dockerfile_copies_only_what_the_context_sends() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the ignore file starts by leaving everything out"
    kept = {line[1:] for line in lines if line.startswith("!")}
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source in kept, f"COPY {source}, which Dockerfile.dockerignore leaves out"


def test_the_dockerfile_check_finds_a_mistake() -> None:
    good = DOCKERFILE.read_text()
    assert dockerfile_problems(good.replace('ENTRYPOINT ["faceopt"]', 'ENTRYPOINT ["faceopt2"]'))
    assert dockerfile_problems(good.replace('"serve", "--host"', '"serv", "--host"'))
    assert dockerfile_problems(good.replace("USER 10001:10001", "USER root"))
    assert dockerfile_problems(good.replace("/health", "/healthz"))
    assert dockerfile_problems('FROM python\nCMD ["serve"]\n') == ["no ENTRYPOINT"]


# --- secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_holds_a_real_secret(path: Path) -> None:
    problems = secret_problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_secret_check_finds_a_secret() -> None:
    assert not secret_problems(
        "POSTGRES_PASSWORD=CHANGE_ME\n"
        "OPTUNA_STORAGE=postgresql+psycopg://faceopt:CHANGE_ME@postgres:5432/optuna\n"
        "  POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}\n"
        "  key: POSTGRES_PASSWORD\n"
        "  url: postgresql://user:$(POSTGRES_PASSWORD)@db/x\n",
        "good.env",
    )
    for bad in (
        "POSTGRES_PASSWORD=hunter2",
        "OPTUNA_STORAGE=postgresql+psycopg://faceopt:s3cret@postgres:5432/optuna",
        "  FACEOPT_RELOAD_TOKEN: 'a8f3c1d9e2b7'",
        "aws = AKIAIOSFODNN7EXAMPLE",
        "-----BEGIN RSA PRIVATE KEY-----",
    ):
        assert secret_problems(bad, "bad.env"), bad
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\ndata:\n  A: aHVudGVyMg==\n"
    assert secret_problems(secret, "bad.yaml")
    plain = "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData:\n  A: hunter2\n"
    assert secret_problems(plain, "bad.yaml")


def test_parser_is_the_clis() -> None:
    """The commands are checked with the parser `faceopt` itself runs (pipeline.cli.main)."""
    assert isinstance(cli.parser(), argparse.ArgumentParser)
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= ROLES
