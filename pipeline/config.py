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


class Settings(BaseSettings):
    """Defaults that hold on a fresh machine; every field can be set as FACEOPT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="FACEOPT_", extra="ignore", populate_by_name=True)

    preset: PresetName | None = None  # see PRESETS and FIRST_RUN
    data: Path = Path("data/age_gender.csv")
    cache_dir: Path = Path(".cache/faceopt")
    skip_bad_rows: bool = False
    # The face a network sees (a UTKFace folder; the Kaggle CSV holds 48 px gray only): its side
    # in pixels and its colour, and whether the trial gets the pixels, pretrained face features
    # of the same chip, both, or chooses among them (search); which face features: see
    # pipeline.data.descriptor (dlib128: what studies made before the kinds used).
    input_size: int = Field(48, ge=16, le=200)
    colour: ColourName = "gray"
    features: FeaturesName = "pixels"
    descriptor: DescriptorName = "dlib-stages"

    storage: str = Field(
        "sqlite:///optuna.db", validation_alias=AliasChoices("OPTUNA_STORAGE", "FACEOPT_STORAGE")
    )
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "FACEOPT_TRACKING_URI"),
    )
    artifact_root: Path = Path("mlruns")
    # `faceopt mlflow-server`'s backend store, shared by the hosts of a study.
    mlflow_backend: str = "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow"

    study: str = "faceopt"
    n_trials: int = Field(20, ge=1)
    timeout: float | None = None
    epochs: int = Field(10, ge=1)
    space: SpaceName = "mlp"
    metric: Metric = "age"
    sampler: SamplerName = "tpe"
    sampler_args: dict = Field(default_factory=dict)
    # A JSON file of trial params (an object, or a list of them) the study tries before its
    # sampler's own: a known good recipe. A point the study already has is not queued again.
    enqueue: Path | None = None
    pruner: PrunerName = "median"
    n_jobs: int = Field(1, ge=1)
    workers: int | Literal["auto"] = 1  # processes on one study; auto: one per GPU
    heartbeat_interval: int = Field(10, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(30, ge=1)  # a trial without a heartbeat this long is failed...
    max_retry: int = Field(2, ge=0)  # ...and queued again, at most this many times
    seed: int = 42
    # Training's autocast precision; auto: bf16 on GPUs that have it (else fp16) and on CPUs
    # with native bf16, else fp32. Weights are kept, stored and served in fp32.
    precision: PrecisionName = "auto"
    split_seed: int | None = None  # the split's own seed when it must not follow `seed`

    train_epochs: int = Field(50, ge=1)  # train-best: the most epochs; early stopping ends sooner
    patience: int = Field(5, ge=1)  # train-best: epochs without a better validation metric
    # train-best: networks trained from seeds seed, seed + 1, ... and served as one (their mean
    # logits); each costs one more training and one more forward pass per face.
    ensemble: int = Field(1, ge=1, le=16)
    model_name: str = "faceopt"  # the registered model
    # MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml finds one), sampled
    # every this many seconds on train-best runs, and on tuning parent runs if tune_system_metrics.
    system_metrics_interval: float = Field(10.0, gt=0)
    tune_system_metrics: bool = False
    # The study's plots (history, importances, slices, ...) on the tuning parent run at its end;
    # off, `faceopt report` makes them later, once, for a study many invocations share.
    study_plots: bool = True

    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    # Host headers the service answers (a DNS-rebinding page sends its own name): the loopback
    # names by default; add the names the service is reached by when HOST opens it, or "*".
    allowed_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    # uvicorn worker processes, each with its own copy of the model and its own batching: one
    # process's event loop (HTTP, multipart, JSON) holds the GIL, so more cores need more processes.
    serve_workers: int = Field(1, ge=1)
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
    min_face: float = Field(0.15, gt=0, le=1)
    max_batch: int = Field(64, ge=1)  # most faces per pass shared by several requests
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
            if values.get("space", found["space"]) != found["space"]:
                found.pop("enqueue", None)  # its known good points are of the preset's space
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
