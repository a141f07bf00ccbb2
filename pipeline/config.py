"""The one settings object, read from the environment (FACEOPT_*, OPTUNA_STORAGE, MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Metric = Literal["age", "ethnicity", "gender", "mean"]
SamplerName = Literal["tpe", "random", "skopt", "gp", "cmaes", "qmc"]
PrunerName = Literal["median", "hyperband", "successive-halving", "percentile", "none"]
SpaceName = Literal["mlp", "cnn", "cnn-cpu"]
PresetName = Literal["auto", "cpu", "gpu", "seed"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
ColourName = Literal["gray", "rgb"]
FeaturesName = Literal["pixels", "descriptor", "both", "search"]
DescriptorName = Literal["dlib-stages", "dlib128"]

# Defaults a preset brings; anything set explicitly (flag or environment) still wins.
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PRESETS: dict[str, dict] = {
    # 2 CPU cores: about an hour of tuning (cheap cnn space, 6-epoch trials, Hyperband), then
    # train-best in under 30 minutes.
    "cpu": {
        "study": "faceopt-cpu",
        "space": "cnn-cpu",
        "metric": "mean",
        "epochs": 6,
        "pruner": "hyperband",
        "n_trials": 1000,
        "timeout": 3600,
        "train_epochs": 20,
        "patience": 6,
        "enqueue": RECIPES / "cpu.json",  # the known good recipe first
    },
    # One GPU: the full cnn space and longer training.
    "gpu": {
        "study": "faceopt-gpu",
        "space": "cnn",
        "metric": "mean",
        "epochs": 20,
        "pruner": "hyperband",
        "n_trials": 150,
        "train_epochs": 80,
        "patience": 15,
    },
    # The original experiment: its MLP space, the scikit-optimize sampler with its arguments
    # (ET, EI, xi=0.02, 10 initial points: the sampler's defaults), median pruning.
    "seed": {"study": "faceopt-seed", "space": "mlp", "sampler": "skopt", "pruner": "median"},
}
# `auto` (what `make tune` runs without PRESET): the device's preset with a first budget, so that
# a first champion comes soon (on 2 cores, in under 20 minutes: the known good points only); the
# same study then tunes longer with PRESET=cpu or gpu.
FIRST_RUN: dict[str, dict] = {
    "cpu": {"n_trials": 2, "timeout": None},
    "gpu": {"n_trials": 20, "timeout": None},
}
# On a UTKFace folder a preset also sees the whole face: the chip in colour, and each trial chooses
# its pixels, dlib's pretrained face descriptor of the same chip, or both (the CSV keeps the
# recipe above).
FOLDER_PRESETS: dict[str, dict] = {
    "cpu": {
        "input_size": 64,
        "colour": "rgb",
        "features": "search",
        "enqueue": RECIPES / "cpu-folder.json",  # known good points first
    },
    "gpu": {"input_size": 96, "colour": "rgb", "features": "search"},
}


def device_preset() -> str:
    """The preset that fits this machine: gpu when torch sees a CUDA device, else cpu."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def preset_values(name: str, data: object) -> dict:
    """What preset `name` brings for `data` (a UTKFace folder or the CSV)."""
    if name == "auto":
        found = device_preset()
        return preset_values(found, data) | FIRST_RUN[found]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected auto or one of {sorted(PRESETS)}")
    folder = data is not None and Path(str(data)).is_dir()
    return PRESETS[name] | (FOLDER_PRESETS.get(name, {}) if folder else {})


GROUPS = ("study", "tune", "train", "train-best", "serve", "evaluate")  # flag groups (pipeline.cli)


def setting(
    default: object,
    description: str,
    groups: str = "",
    make: str | None = None,
    flag: str | None = None,
    **field: object,
) -> object:
    """A settings field that carries what the CLI, the Makefile and `make help` say of it:
    `description`; `groups`, the commands whose flags it is (space-separated GROUPS); `make`, its
    Makefile variable (default the field's name in capitals, "" for none); `flag`, its flag
    without dashes (default the name with dashes)."""
    unknown = set(groups.split()) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown groups {sorted(unknown)}; expected some of {GROUPS}")
    extra = {"groups": groups.split(), "make": make, "flag": flag}
    if "default_factory" in field:
        return Field(description=description, json_schema_extra=extra, **field)
    return Field(default, description=description, json_schema_extra=extra, **field)


class Settings(BaseSettings):
    """Defaults that hold on a fresh machine; every field can be set as FACEOPT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="FACEOPT_", extra="ignore", populate_by_name=True)

    preset: PresetName | None = setting(
        None,
        "budgets and recipe (PRESETS in pipeline/config.py); auto: this machine's preset from "
        "its known good points; seed: the original experiment",
        groups="study",
    )
    data: Path = setting(
        Path("data/age_gender.csv"), "age_gender.csv(.gz) or a UTKFace folder", groups="study"
    )
    cache_dir: Path = Path(".cache/faceopt")
    skip_bad_rows: bool = setting(
        False, "report and skip malformed rows instead of stopping", groups="tune"
    )
    # The face a network sees (a UTKFace folder; the Kaggle CSV holds 48 px gray only): its side
    # in pixels and its colour, and whether the trial gets the pixels, pretrained face features
    # of the same chip, both, or chooses among them (search); which face features: see
    # pipeline.data.descriptor (dlib128: what studies made before the kinds used).
    input_size: int = setting(
        48, "side of the face in pixels (a UTKFace folder; CSV: 48)", "study", "SIZE", ge=16, le=200
    )
    colour: ColourName = setting("gray", "the face's colour (a folder)", groups="study")
    features: FeaturesName = setting(
        "pixels",
        "the pixels, pretrained face features, both, or the trial chooses (search)",
        groups="study",
    )
    descriptor: DescriptorName = setting(
        "dlib-stages",
        "which face features: each level of dlib's face network, or its 128-D descriptor",
        groups="study",
    )

    storage: str = setting(
        "sqlite:///optuna.db",
        "Optuna storage URL",
        groups="study",
        validation_alias=AliasChoices("OPTUNA_STORAGE", "FACEOPT_STORAGE"),
    )
    tracking_uri: str = setting(
        "sqlite:///mlflow.db",
        "MLflow tracking URI",
        groups="study serve evaluate",
        make="",  # MLFLOW_TRACKING_URI, from the environment
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "FACEOPT_TRACKING_URI"),
    )
    artifact_root: Path = Path("mlruns")
    # `faceopt mlflow-server`'s backend store, shared by the hosts of a study.
    mlflow_backend: str = "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow"

    study: str = setting("faceopt", "study name (also the MLflow experiment)", groups="study")
    n_trials: int = setting(20, "trials to add to the study", groups="tune", ge=1)
    timeout: float | None = setting(
        None, "stop starting trials after this many seconds", groups="tune"
    )
    epochs: int = setting(10, "epochs per trial", groups="tune", ge=1)
    space: SpaceName = setting("mlp", "search space", groups="tune")
    metric: Metric = setting("age", "validation accuracy to maximise", groups="tune")
    sampler: SamplerName = setting("tpe", "the study's sampler", groups="tune")
    sampler_args: dict = setting(
        None,
        "JSON of sampler arguments, e.g. "
        '\'{"base_estimator": "ET", "acq_func_kwargs": {"xi": 0.02}}\'',
        groups="tune",
        default_factory=dict,
    )
    # A known good recipe: a point the study already has is not queued again.
    enqueue: Path | None = setting(
        None,
        "JSON file of trial params (an object or a list) to try first, e.g. recipes/cpu.json",
        groups="tune",
    )
    pruner: PrunerName = setting("median", "per-epoch pruning", groups="tune")
    n_jobs: int = setting(1, "trials in parallel threads within this process", "tune", ge=1)
    workers: int | Literal["auto"] = setting(
        1, "tuning processes on the study, or auto (one per GPU)", groups="tune"
    )
    heartbeat_interval: int = Field(10, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(30, ge=1)  # a trial without a heartbeat this long is failed...
    max_retry: int = Field(2, ge=0)  # ...and queued again, at most this many times
    seed: int = setting(42, "seed of the split and of every trial", groups="study")
    # Weights are kept, stored and served in fp32.
    precision: PrecisionName = setting(
        "auto",
        "training's autocast precision (auto: bf16 on GPUs that have it, else fp16, and on CPUs "
        "with native bf16, else fp32)",
        groups="train",
    )
    split_seed: int | None = None  # the split's own seed when it must not follow `seed`

    train_epochs: int = setting(
        50,
        "most epochs to train (early stopping may end sooner)",
        "train-best",
        flag="epochs",
        ge=1,
    )
    patience: int = setting(
        5, "epochs without a better validation metric before stopping", "train-best", ge=1
    )
    # Each member costs one more training and one more forward pass per face.
    ensemble: int = setting(
        1,
        "networks trained from seeds seed, seed + 1, ..., served as one (their mean logits)",
        "train-best",
        ge=1,
        le=16,
    )
    model_name: str = setting("faceopt", "the registered model", "train-best serve evaluate")
    # MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml finds one), sampled
    # every this many seconds on train-best runs, and on tuning parent runs if tune_system_metrics.
    system_metrics_interval: float = Field(10.0, gt=0)
    tune_system_metrics: bool = False
    # The study's plots (history, importances, slices, ...) on the tuning parent run at its end;
    # off, `faceopt report` makes them later, once, for a study many invocations share.
    study_plots: bool = True

    # serving
    host: str = setting("127.0.0.1", "address the service binds", groups="serve")
    port: int = setting(8000, "the service's port", groups="serve")
    # Host headers the service answers (a DNS-rebinding page sends its own name): the loopback
    # names by default; add the names the service is reached by when HOST opens it, or "*".
    allowed_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    # uvicorn worker processes, each with its own copy of the model and its own batching: one
    # process's event loop (HTTP, multipart, JSON) holds the GIL, so more cores need more processes.
    serve_workers: int = setting(
        1, "server processes", groups="serve", make="WORKERS", flag="workers", ge=1
    )
    alias: str = "champion"  # the registry alias the service loads
    # Seconds between looks at the alias; a moved alias is loaded and swapped in by itself (a
    # version that fails to load is skipped, the old one serving on). None: only POST /reload.
    watch_alias: float | None = Field(None, gt=0)
    max_file_bytes: int = Field(5 * 1024 * 1024, ge=1)
    max_files: int = Field(16, ge=1)
    # Whole request body; default: max_files files at max_file_bytes, plus the multipart framing.
    max_body_bytes: int | None = Field(None, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # all request headers together
    body_timeout: float = Field(30.0, gt=0)  # seconds to receive a whole request body
    # Pixels an image may declare (checked before decoding): a 48-megapixel phone photo, not more.
    max_pixels: int = Field(50_000_000, ge=1)
    # Images decoded and cut at once, across all requests: each holds a decoded photo in memory.
    decode_slots: int = Field(max(1, os.cpu_count() or 1), ge=1)
    # The smallest face looked for, as a fraction of the photo's shorter side: 0.15 finds the face
    # of a half-length portrait (5x the face's size); lower finds smaller faces (group photos) at
    # a steep cost per image (the detector's work grows with 1 / min_face squared).
    min_face: float = setting(
        0.15, "the smallest face looked for (of the shorter side)", "evaluate", gt=0, le=1
    )
    max_batch: int = setting(64, "most faces per pass shared by requests", "serve", ge=1)
    # POST /reload is refused unless this is set; then it needs "Authorization: Bearer <token>".
    reload_token: SecretStr | None = None
    torch_threads: int | None = None  # torch threads; serving default 1, tuning workers share

    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)  # of what is left after the test split
    age_edges: tuple[int, ...] = (0, 3, 18, 45, 64, 116)

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes or self.max_files * (self.max_file_bytes + 1024) + 64 * 1024

    @property
    def split_seed_or_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: object) -> object:
        if isinstance(values, dict) and values.get("preset"):
            data = values.get("data", cls.model_fields["data"].default)
            found = preset_values(values["preset"], data)
            # Its known good points are of the preset's space and features: another of either
            # keeps the preset's budgets, not its points (they may not even be points of it).
            preset = {k: found.get(k, cls.model_fields[k].default) for k in ("space", "features")}
            if any(values.get(k, v) != v for k, v in preset.items()):
                found.pop("enqueue", None)
            return found | values
        return values

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        if isinstance(value, str) and value != "auto":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"workers must be a positive integer or 'auto', got {value!r}")
            return int(value)
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        # FACEOPT_ALLOWED_HOSTS=a.example,b.example (or "*"), or a JSON list
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("age_edges")
    @classmethod
    def _increasing(cls, edges: tuple[int, ...]) -> tuple[int, ...]:
        if len(edges) < 3 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"age_edges must be at least 3 increasing integers, got {edges}")
        return edges
