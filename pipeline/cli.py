"""`faceopt <command>`: a thin layer that turns flags into Settings and calls the stage modules."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from pydantic import ValidationError

from pipeline import config
from pipeline.config import Settings
from pipeline.errors import FaceoptError

if typing.TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("faceopt")

# `faceopt serve --workers N` hands its settings to uvicorn's worker processes through this variable.
SERVE_SETTINGS_ENV = "FACEOPT_SERVE_SETTINGS"
KAGGLE_DATASET = "nipunarora8/age-gender-and-ethnicity-face-data-csv"


def _choices(annotation: object) -> tuple[str, ...]:
    """The values a Literal setting takes (also a `Literal[...] | None` one)."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(map(str, typing.get_args(annotation)))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _choices(args[0]) if len(args) == 1 else ()


def _flag_type(annotation: object) -> typing.Callable | str:
    """How a flag's text becomes the setting: store_true for a bool, JSON for a dict; the rest as
    text or a number, which Settings validates."""
    kinds = set(typing.get_args(annotation)) - {type(None)} or {annotation}
    if kinds == {bool}:
        return "store_true"
    if kinds == {dict}:
        return json.loads
    if kinds in ({int}, {float}):
        return kinds.pop()
    return str


def settings_flags(group: str) -> dict[str, tuple[str, typing.Callable | str, str]]:
    """flag -> (setting, type, help) for every setting in `group` (config.GROUPS), read from
    the fields themselves (config.setting): a new setting needs no edit here."""
    flags = {}
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        if group not in extra.get("groups", ()):
            continue
        choices = _choices(field.annotation)
        text = f"{', '.join(choices)}: {field.description}" if choices else field.description
        default = field.get_default(call_default_factory=True)
        if default not in (None, False, {}):
            text += f" (default {default})"
        flag = "--" + (extra["flag"] or name).replace("_", "-")
        flags[flag] = (name, _flag_type(field.annotation), text)
    return flags


def make_var(name: str) -> str:
    """The Makefile variable of setting `name` ("" for none)."""
    make = (Settings.model_fields[name].json_schema_extra or {}).get("make")
    return name.upper() if make is None else make


def make_settings() -> str:
    """settings.mk: per group, each setting's make variable turned into its flag when set, and
    one help line per variable; generated, so that the Makefile follows the settings."""
    out = [
        "# Generated from pipeline/config.py by `make settings` (faceopt make-settings): do not",
        "# edit. A make variable becomes its flag only when set, so FACEOPT_* settings still apply.",
        "# `make help` lists the #: lines.",
    ]
    described: dict[str, str] = {}
    for group in config.GROUPS:
        calls = []
        for flag, (name, kind, text) in settings_flags(group).items():
            var = make_var(name)
            if not var:
                continue
            if kind == "store_true":
                calls.append(f"$(if $({var}),{flag})")
            else:
                calls.append(f"$(call flag,{var},{flag[2:]})")
            if text not in described.get(var, ""):  # one variable, several settings
                described[var] = f"{described[var]}; {text}" if var in described else text
        out.append(f"SETTINGS_{group.upper().replace('-', '_')} = " + " \\\n\t".join(calls))
    out += [f"#: {var:<14} {text}" for var, text in described.items()]
    return "\n".join(out) + "\n"


def _add(parser: argparse.ArgumentParser, *groups: str) -> None:
    for group in groups:
        for flag, (dest, kind, text) in settings_flags(group).items():
            text = text.replace("%", "%%")  # argparse formats help with %
            if kind == "store_true":
                parser.add_argument(flag, dest=dest, action=kind, default=None, help=text)
            else:
                parser.add_argument(flag, dest=dest, type=kind, help=text)


def _settings(args: argparse.Namespace) -> Settings:
    """Environment first, then any flag given on the command line. A command's flags that are not
    settings are named in its `own` default; any other flag must name a setting (Settings ignores
    unknown names, so a mistyped `dest` would otherwise be dropped without a word)."""
    skip = {"command", "func", "verbose", "own", *args.own}
    given = {k: v for k, v in vars(args).items() if k not in skip}
    unknown = set(given) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"flags {sorted(unknown)} are neither settings nor in `own`")
    return Settings(**{k: v for k, v in given.items() if v is not None})


# Set once startup() has run in this process (gc.get_freeze_count() would say so, but it walks all
# the frozen objects: a tenth of a second at each call).
_started = False


@contextmanager
def startup() -> Iterator[None]:
    """Around a command's first imports. torch, MLflow and the rest leave some 450,000 objects
    that live as long as the process, and the cycle collector would walk them again at each of
    its full passes, while they load and as the process exits: about 2 s of the 7 s of CPU that
    importing a tune-worker's modules cost. They are collected once instead, then frozen out of
    later passes. Once per process (tests call main() again and again)."""
    global _started
    if _started:
        yield
        return
    _started = True
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()
        gc.enable()


def cmd_tune(args: argparse.Namespace) -> int:
    with startup():
        from pipeline import tune
        from pipeline.tracking import report

    # Optuna's own per-trial lines would break its progress bar; the summary follows at the end.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary = tune.run(_settings(args))
    print(report.format_summary(summary))
    return 0


def cmd_tune_worker(args: argparse.Namespace) -> int:
    """One worker on a shared study, until it has `until` finished trials (default N_TRIALS)."""
    with startup():
        from pipeline import tune
        from pipeline.tracking import report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = _settings(args)
    summary = tune.run_worker(
        settings, args.parent_run_id, args.until or settings.n_trials, not args.quiet
    )
    if not args.quiet:
        print(report.format_summary(summary))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    with startup():
        from pipeline import compare

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = _settings(args)
    table, run_id = compare.run(settings, args.samplers.split(","), args.seeds, args.prefix)
    print(table)
    print(f"comparison logged to MLflow run {run_id} (experiment {args.prefix}-comparison)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    with startup():
        from pipeline import storage, tune

    settings = _settings(args)
    study = storage.choose_study(
        settings.storage,
        settings.study,
        "study" in settings.model_fields_set,
        settings.heartbeat_interval,
        settings.grace_period,
        "make report",
    )
    settings = settings.model_copy(update={"study": study})
    run_id = tune.report_run(settings, args.run_id)
    print(f"plots and summary of study {settings.study!r} logged to run {run_id}")
    return 0


def cmd_train_best(args: argparse.Namespace) -> int:
    with startup():
        from pipeline import train_best
        from pipeline.data import labels

    result = train_best.run(_settings(args), promote=args.promote)
    heads = ", ".join(f"{h} {result.scores[f'test_{h}_acc']:.4f}" for h in labels.HEADS)
    print(
        f"Registered {result.model} version {result.version} as '{result.alias}' "
        f"(run {result.run_id}).\n"
        f"  Best trial #{result.trial}: validation {result.trial_value:.4f}\n"
        f"  Test accuracy: {heads}\n"
        f"  {'/'.join(map(str, result.epochs))} epochs (best "
        f"{'/'.join(map(str, result.best_epoch))}) on {result.device} "
        f"({result.precision}) in {result.wall_s:.0f} s"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The service's answers on a folder of labelled photos, next to the dataset's conversion."""
    with startup():
        from pipeline import evaluate

    try:
        contexts = tuple(float(c) for c in args.context.split(","))
    except ValueError:
        contexts = (0.0,)  # not numbers: the same message as a size under 1
    if any(c < 1 for c in contexts):
        raise evaluate.EvaluateError(
            f"--context takes sizes of 1 or more (the photo's side over the face's), got {args.context}"
        )
    settings = _settings(args)
    result = evaluate.run(settings, Path(args.photos), args.version, contexts, args.surround)
    print(evaluate.table(result))
    print(f"logged to run {result.run_id} of {result.model} version {result.version}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(args)
    if settings.serve_workers == 1:
        with startup():
            from serving.app import create_app
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
        return 0
    # Several processes: uvicorn imports the app in each, so the settings travel by environment
    # (the reload token, a secret that comes only from the environment, is inherited as it is).
    # This process only supervises them: it imports neither torch nor the app.
    os.environ[SERVE_SETTINGS_ENV] = settings.model_dump_json(
        exclude_none=True, exclude={"reload_token"}
    )
    uvicorn.run(
        f"{__name__}:serving_app",
        factory=True,
        workers=settings.serve_workers,
        host=settings.host,
        port=settings.port,
        log_level="info",
    )
    return 0


def serving_app() -> FastAPI:
    """The app in each of uvicorn's worker processes, with the settings `faceopt serve` passed on."""
    with startup():
        from serving.app import create_app
    return create_app(Settings(**json.loads(os.environ[SERVE_SETTINGS_ENV])))


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    """An MLflow tracking server for several hosts: PostgreSQL backend store, served artifacts."""
    from pipeline.storage import ensure_postgres_database, redact

    backend = args.backend_store_uri or Settings().mlflow_backend
    ensure_postgres_database(backend)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        Path(args.artifacts).resolve().as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    if args.allowed_hosts:  # else MLflow's own list: localhost and private addresses
        cmd += ["--allowed-hosts", args.allowed_hosts]
    # mlflow server starts uvicorn by name: this environment's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    log.info(
        "MLflow server on http://%s:%s, backend %s",
        args.host,
        args.port,
        redact(backend),
    )
    # The server takes this process's place, so a service manager's SIGTERM (or Ctrl-C) reaches
    # MLflow itself and stops what it started, instead of leaving it behind a dead parent.
    # MLflow's job runner (GenAI judges and prompt optimisation) is of no use to a tracking store
    # and starts processes of its own: off unless asked for.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | os.environ | {"PATH": path}
    os.execve(sys.executable, cmd, env)


def cmd_data(args: argparse.Namespace) -> int:
    """Download the Kaggle CSV with the official client, or say exactly how to provide it."""
    target = Path(args.dir)
    has_token = (
        os.environ.get("KAGGLE_API_TOKEN")
        or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
        or (
            Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
        ).exists()
    )
    if not has_token:
        print(
            "No Kaggle credentials found (~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY).\n"
            "Either create an API token at https://www.kaggle.com/settings (Account > API > Create "
            "New Token), save it as ~/.kaggle/kaggle.json and run `make data` again,\n"
            f"or download age_gender.csv from https://www.kaggle.com/datasets/{KAGGLE_DATASET} and "
            "run `make tune DATA=/path/to/age_gender.csv`.",
            file=sys.stderr,
        )
        return 2
    kaggle = shutil.which("kaggle")
    if kaggle is None:
        print(
            "The Kaggle client is not installed: run `pip install kaggle` (or `make data`, which "
            "installs it).",
            file=sys.stderr,
        )
        return 2
    target.mkdir(parents=True, exist_ok=True)
    cmd = [kaggle, "datasets", "download", "-d", KAGGLE_DATASET, "-p", str(target), "--unzip"]
    subprocess.run(cmd, check=True)
    found = sorted(target.glob("**/age_gender.csv"))
    print(f"downloaded to {found[0] if found else target}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the study storage: live history, importances, trials and notes."""
    with startup():
        import optuna_dashboard

        from pipeline import storage

    settings = _settings(args)
    store = storage.open_storage(
        settings.storage, settings.heartbeat_interval, settings.grace_period
    )
    log.info(
        "optuna-dashboard on http://%s:%s for %s",
        settings.host,
        settings.port,
        storage.redact(settings.storage),
    )
    optuna_dashboard.run_server(store, host=settings.host, port=settings.port)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the same store `make tune` writes to."""
    from pipeline.storage import redact

    settings = _settings(args)
    if settings.tracking_uri.startswith(("http://", "https://")):
        print(f"Tracking goes to a server; its UI is at {redact(settings.tracking_uri)}")
        return 0
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking_uri,
        "--default-artifact-root",
        Path(settings.artifact_root).resolve().as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    # MLflow 3.17's UI opens a new browser on its GenAI view (traces); this link opens the runs.
    log.info(
        "MLflow UI for %s: http://%s:%s/#/experiments?workflowType=machine_learning",
        redact(settings.tracking_uri),
        args.host,
        args.port,
    )
    os.execv(cmd[0], cmd)  # as mlflow-server: signals reach MLflow itself


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faceopt", description=__doc__)
    p.set_defaults(own=())  # a command's flags that are not settings (see _settings)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    tune = sub.add_parser("tune", help="run (or resume) an Optuna study, logging to MLflow")
    _add(tune, "study", "tune", "train")
    tune.set_defaults(func=cmd_tune)

    worker = sub.add_parser(
        "tune-worker", help="join a study as one more worker (any host with the same settings)"
    )
    _add(worker, "study", "tune", "train")
    worker.add_argument(
        "--until",
        type=int,
        help="stop at this many finished trials in the study "
        "(default: --n-trials, counted over the whole study)",
    )
    worker.add_argument("--parent-run-id", help="log trials under this MLflow run")
    worker.add_argument(
        "--quiet", action="store_true", help="no progress bar, summary or Ctrl-C message"
    )
    worker.set_defaults(func=cmd_tune_worker, own=("parent_run_id", "until", "quiet"))

    cmp = sub.add_parser("compare-samplers", help="one study per sampler and seed, compared")
    _add(cmp, "study", "tune", "train")
    cmp.add_argument("--samplers", default="random,tpe,skopt,gp")
    cmp.add_argument("--seeds", type=int, default=3)
    cmp.add_argument("--prefix", default="compare", help="study names: <prefix>-<sampler>-s<k>")
    cmp.set_defaults(func=cmd_compare, own=("samplers", "seeds", "prefix"))

    rep = sub.add_parser("report", help="log the study's plots and summary to MLflow")
    _add(rep, "study")
    rep.add_argument("--run-id", help="log to this run instead of a new one")
    rep.set_defaults(func=cmd_report, own=("run_id",))

    best = sub.add_parser("train-best", help="retrain the best trial, test it, register it")
    _add(best, "study", "train-best", "train")
    best.add_argument("--promote", action="store_true", help="make it champion even if worse")
    best.set_defaults(func=cmd_train_best, own=("promote",))

    ev = sub.add_parser(
        "evaluate", help="a registered version on a folder of photos, through the service's crop"
    )
    ev.add_argument("--photos", required=True, help="folder of UTKFace-named photos")
    ev.add_argument("--version", default="champion", help="alias or version number")
    ev.add_argument(
        "--context",
        default="1",
        help="comma-separated: 1 = photos as they are; 2, 3 ... = each inside a photo that many "
        "times its size",
    )
    ev.add_argument(
        "--surround", default="blur", help="blur (a blurred copy) or mean (border colour)"
    )
    _add(ev, "evaluate")
    ev.set_defaults(func=cmd_evaluate, own=("photos", "version", "surround", "context"))

    serve = sub.add_parser("serve", help="start the FastAPI service on the registered champion")
    _add(serve, "serve")
    serve.set_defaults(func=cmd_serve)

    server = sub.add_parser("mlflow-server", help="MLflow tracking server on PostgreSQL")
    server.add_argument(
        "--backend-store-uri", help="the server's store (default FACEOPT_MLFLOW_BACKEND's)"
    )
    server.add_argument("--artifacts", default="mlartifacts", help="where served artifacts live")
    server.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind: 127.0.0.1 (default) serves this host only; 0.0.0.0 opens it to "
        "the network, which should then sit behind MLflow's basic-auth app (see docs/serving.md, Security)",
    )
    server.add_argument("--port", type=int, default=5000)
    server.add_argument(
        "--workers", type=int, default=4, help="uvicorn worker processes (default 4, MLflow's)"
    )
    server.add_argument(
        "--allowed-hosts",
        help="Host headers the server accepts (default: MLflow's, localhost and private addresses)",
    )
    server.set_defaults(func=cmd_mlflow_server)

    gen = sub.add_parser("make-settings", help="print settings.mk, the Makefile's settings")
    gen.set_defaults(func=lambda args: print(make_settings(), end="") or 0)

    dl = sub.add_parser("data", help="download age_gender.csv from Kaggle")
    dl.add_argument("--dir", default="data", help="where to put it (default: data/)")
    dl.set_defaults(func=cmd_data)

    dash = sub.add_parser("dashboard", help="start optuna-dashboard on the study storage")
    dash.add_argument("--storage", dest="storage", help="Optuna storage URL")
    dash.add_argument("--host", dest="host", default="127.0.0.1")
    dash.add_argument("--port", dest="port", type=int, default=8080)
    dash.set_defaults(func=cmd_dashboard)

    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store")
    ui.add_argument("--tracking-uri", dest="tracking_uri")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except ValidationError as e:
        print(f"faceopt {args.command}: invalid setting: {e}", file=sys.stderr)
    except FaceoptError as e:  # the user's to fix: the message says how; a bug keeps its traceback
        print(f"faceopt {args.command}: {e}", file=sys.stderr)
    except KeyboardInterrupt:  # a --quiet worker's coordinator, if any, says it once for all
        if not getattr(args, "quiet", False):
            print(
                "interrupted; the study is saved, run the same command to resume", file=sys.stderr
            )
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
