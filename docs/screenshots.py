"""The documentation's screenshots, from a real browser (Debian's chromium) on real server processes:
the service's upload page answering a photo, optuna-dashboard on a study, and the MLflow UI's
experiment, train-best run, system metrics and registry pages, all on this folder's stores
(FACEOPT_* settings as for any command).

    .venv/bin/python -m docs.screenshots --study faceopt-cpu --dashboard-study dashboard-demo
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import skimage
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import storage
from pipeline.config import Settings
from pipeline.testkit import free_port, server_process

log = logging.getLogger(__name__)
DOCS = Path(__file__).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]


def shoot(page, url: str, selector: str, path: Path) -> None:
    """Open `url`, wait until `selector` shows and the page is quiet, save a screenshot."""
    page.goto(url)
    page.locator(selector).first.wait_for(state="visible", timeout=60_000)
    page.wait_for_timeout(3000)  # charts draw after their data arrives (MLflow polls: never idle)
    page.screenshot(path=str(path))
    log.info("wrote %s", path)


def upload_page(page, url: str, photo: Path, path: Path) -> None:
    """The service's page at `url` after a person picks `photo`: its answer, as they see it."""
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.includes('version')")
    page.set_input_files("#files", [str(photo)])
    page.wait_for_selector(".prediction", timeout=60_000)
    page.wait_for_timeout(500)  # the bars' width transition
    page.screenshot(path=str(path), full_page=True)
    log.info("wrote %s", path)


def mlflow_pages(settings: Settings, study: str, model: str) -> list[tuple[str, str, str]]:
    """(url path, what to wait for, file name) of the MLflow pages worth showing."""
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(study)
    version = client.get_model_version_by_alias(model, "champion")
    experiment_page = f"#/experiments/{experiment.experiment_id}"
    run = f"{experiment_page}/runs/{version.run_id}"
    ml = "?workflowType=machine_learning"  # what `faceopt ui`'s link opens: the runs, not GenAI
    return [
        (experiment_page + ml, "text=train-best", "mlflow-experiment.png"),
        (run + ml, "text=train-best-", "mlflow-train-best-run.png"),
        (f"{run}/system-metrics{ml}", "text=cpu_utilization", "mlflow-system-metrics.png"),
        (f"#/models/{model}{ml}", "text=Age bracket", "mlflow-registered-model.png"),
        (
            f"#/models/{model}/versions/{version.version}{ml}",
            "text=test split",
            "mlflow-version.png",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", required=True, help="the study and MLflow experiment to show")
    parser.add_argument("--model", default="faceopt", help="the registered model to show")
    parser.add_argument("--dashboard-study", help="the study optuna-dashboard shows (--study)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from playwright.sync_api import sync_playwright

    settings = Settings()
    faceopt = [sys.executable, "-m", "pipeline.cli"]
    shown = args.dashboard_study or args.study
    study_id = storage.load_study(settings.storage, shown, 10, 30)._study_id
    ui_port, dashboard_port, serve_port = free_port(), free_port(), free_port()
    ui, dashboard = f"http://127.0.0.1:{ui_port}", f"http://127.0.0.1:{dashboard_port}"
    service = f"http://127.0.0.1:{serve_port}"
    logs = DOCS / ".logs"
    logs.mkdir(exist_ok=True)
    # A photo anyone may show: NASA's portrait of Eileen Collins, shipped with scikit-image.
    photo = logs / "astronaut.jpg"
    Image.fromarray(skimage.data.astronaut()).save(photo, quality=90)
    env = dict(os.environ)
    serve = [*faceopt, "serve", "--port", str(serve_port), "--model-name", args.model]
    with (
        server_process(serve, f"{service}/ready", env, logs / "serve.log"),
        server_process([*faceopt, "ui", "--port", str(ui_port)], ui, env, logs / "ui.log"),
        server_process(
            [*faceopt, "dashboard", "--port", str(dashboard_port)],
            f"{dashboard}/api/studies",
            env,
            logs / "dashboard.log",
        ),
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            upload_page(page, service, photo, DOCS / "upload-page.png")
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            shoot(
                page,
                f"{dashboard}/dashboard/studies/{study_id}",
                ".js-plotly-plot",
                DOCS / "optuna-dashboard.png",
            )
            for path, text, name in mlflow_pages(settings, args.study, args.model):
                shoot(page, f"{ui}/{path}", text, DOCS / name)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
