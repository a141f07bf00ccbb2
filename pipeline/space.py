"""Search spaces: the only module that touches an Optuna trial. A trial goes in, a plain dict comes out."""

from __future__ import annotations

from collections.abc import Callable

import optuna

OPTIMIZERS = ("Adam", "Adadelta", "RMSprop", "SGD", "MADGRAD")
BATCH_SIZES = (32, 64, 128, 256)


def suggest_mlp(trial: optuna.Trial) -> dict:
    """The original experiment's fully connected space, with its parameter names."""
    params: dict = {"arch": "mlp", "num_fc_layers": trial.suggest_int("num_fc_layers", 4, 8)}
    for i in range(params["num_fc_layers"]):
        params[f"fc_output_feat_{i}"] = trial.suggest_int(f"fc_output_feat_{i}", 8, 64)
        params[f"fc_dropout_{i}"] = trial.suggest_float(f"fc_dropout_{i}", 0.0, 0.5)
    params["last_fc"] = trial.suggest_int("last_fc", 8, 64)
    return params | _suggest_optimizer(trial)


def suggest_cnn(trial: optuna.Trial) -> dict:
    """Conv blocks (conv, optional batch norm, ReLU, pooling, dropout) then one hidden layer."""
    params: dict = {
        "arch": "cnn",
        "num_conv_blocks": trial.suggest_int("num_conv_blocks", 2, 4),
        "kernel_size": trial.suggest_categorical("kernel_size", [3, 5]),
        "batch_norm": trial.suggest_categorical("batch_norm", [True, False]),
        "pooling": trial.suggest_categorical("pooling", ["max", "avg"]),
    }
    for i in range(params["num_conv_blocks"]):
        params[f"conv_channels_{i}"] = trial.suggest_int(f"conv_channels_{i}", 16, 128, log=True)
        params[f"conv_dropout_{i}"] = trial.suggest_float(f"conv_dropout_{i}", 0.0, 0.5)
    params["last_fc"] = trial.suggest_int("last_fc", 32, 256, log=True)
    params["fc_dropout"] = trial.suggest_float("fc_dropout", 0.0, 0.5)
    return params | _suggest_optimizer(trial)


def _suggest_optimizer(trial: optuna.Trial) -> dict:
    return {
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
    }


SPACES: dict[str, Callable[[optuna.Trial], dict]] = {"mlp": suggest_mlp, "cnn": suggest_cnn}


def suggest(trial: optuna.Trial, space: str) -> dict:
    """Params for one trial of the named space."""
    if space not in SPACES:
        raise ValueError(f"unknown search space {space!r}; expected one of {sorted(SPACES)}")
    return SPACES[space](trial)
