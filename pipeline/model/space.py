"""Search spaces: the only module that touches an Optuna trial. A trial goes in, a plain dict comes out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import optuna

from pipeline.data import labels
from pipeline.data.inputs import FEATURES
from pipeline.errors import SettingError

OPTIMIZERS = ("Adam", "Adadelta", "RMSprop", "SGD", "MADGRAD")
BATCH_SIZES = (32, 64, 128, 256)
CNN_OPTIMIZERS = ("AdamW", "SGD")


def suggest_mlp(trial: optuna.Trial, features: str = "pixels") -> dict:
    """The original experiment's fully connected space, with its parameter names, over the
    flattened pixels, the pretrained face features, or both joined."""
    params: dict = {"arch": "mlp", "num_fc_layers": trial.suggest_int("num_fc_layers", 4, 8)}
    for i in range(params["num_fc_layers"]):
        params[f"fc_output_feat_{i}"] = trial.suggest_int(f"fc_output_feat_{i}", 8, 64)
        params[f"fc_dropout_{i}"] = trial.suggest_float(f"fc_dropout_{i}", 0.0, 0.5)
    params["last_fc"] = trial.suggest_int("last_fc", 8, 64)
    return params | _suggest_optimizer(trial)


@dataclass(frozen=True)
class CnnRanges:
    """Where a cnn space may go: the GPU space is wide, the CPU one fits 2 cores in an hour."""

    widths: tuple[int, ...]  # channels of the first stage; each later stage doubles them
    stages: tuple[int, int]
    blocks: tuple[int, int]  # blocks per stage
    stem_pool: tuple[bool, ...]  # pool right after the stem: a quarter of the cost per layer


CNN_RANGES = {
    "cnn": CnnRanges(
        widths=(32, 48, 64, 96), stages=(3, 4), blocks=(1, 3), stem_pool=(False, True)
    ),
    "cnn-cpu": CnnRanges(widths=(16, 24, 32), stages=(3, 3), blocks=(1, 2), stem_pool=(True,)),
}


def suggest_cnn(
    trial: optuna.Trial, ranges: CnnRanges = CNN_RANGES["cnn"], features: str = "pixels"
) -> dict:
    """Conv stages of plain or residual blocks with batch norm on the pixels, a fully connected
    branch on the pretrained face features (when the trial's features have them), and the training
    recipe: augmentation, label smoothing, weight decay, LR schedule and a loss weight per head."""
    params: dict = {"arch": "cnn"}
    if features != "pixels":
        # 0: the face features join the conv features as they are
        params["descriptor_fc"] = trial.suggest_categorical("descriptor_fc", [0, 128, 256])
        if params["descriptor_fc"]:
            params["descriptor_layers"] = trial.suggest_int("descriptor_layers", 1, 2)
            params["descriptor_dropout"] = trial.suggest_float("descriptor_dropout", 0.0, 0.5)
    if features != "descriptor":
        params |= _suggest_conv(trial, ranges)
    params |= {
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 5e-2, log=True),
        "schedule": trial.suggest_categorical("schedule", ["onecycle", "cosine"]),
    }
    if params["schedule"] == "cosine":
        params["warmup"] = trial.suggest_float("warmup", 0.0, 0.2)  # fraction of all steps
    for head in labels.HEADS:
        params[f"loss_weight_{head}"] = trial.suggest_float(f"loss_weight_{head}", 0.5, 2.0)
    return params | {
        "optimizer": trial.suggest_categorical("optimizer", list(CNN_OPTIMIZERS)),
        # One range for both: AdamW does well low in it, SGD with momentum high.
        "lr": trial.suggest_float("lr", 3e-4, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
    }


def _suggest_conv(trial: optuna.Trial, ranges: CnnRanges) -> dict:
    """The conv body and the augmentation of its pixels."""
    return {
        "width": trial.suggest_categorical("width", list(ranges.widths)),
        "stages": trial.suggest_int("stages", *ranges.stages),
        "blocks": trial.suggest_int("blocks", *ranges.blocks),
        "block": trial.suggest_categorical("block", ["plain", "residual"]),
        "stem_pool": trial.suggest_categorical("stem_pool", list(ranges.stem_pool)),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "last_fc": trial.suggest_categorical("last_fc", [0, 64, 128, 256]),  # 0: no hidden layer
        # Aligned faces: mirror images are faces, small shifts and tilts are how crops differ.
        "flip": trial.suggest_categorical("flip", [True, False]),
        "shift": trial.suggest_int("shift", 0, 4),  # pixels
        "rotate": trial.suggest_float("rotate", 0.0, 15.0),  # degrees
        "jitter": trial.suggest_float("jitter", 0.0, 0.2),  # brightness and contrast
    }


def _suggest_optimizer(trial: optuna.Trial) -> dict:
    return {
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
    }


SPACES: dict[str, Callable[..., dict]] = {
    "mlp": suggest_mlp,
    **{name: partial(suggest_cnn, ranges=ranges) for name, ranges in CNN_RANGES.items()},
}


def suggest(trial: optuna.Trial, space: str, features: str = "pixels") -> dict:
    """Params for one trial of the named space on the study's `features` (pixels, descriptor,
    both, or search: the trial chooses among them)."""
    if space not in SPACES:
        raise SettingError(f"unknown search space {space!r}; expected one of {sorted(SPACES)}")
    if features == "search":
        features = trial.suggest_categorical("features", list(FEATURES))
    elif features not in FEATURES:
        raise SettingError(f"unknown features {features!r}; expected one of {FEATURES} or search")
    params = SPACES[space](trial, features=features)
    # Pixels-only params stay as they were before features existed.
    return params if features == "pixels" else params | {"features": features}
