"""Training and evaluation on tensors held in memory: batched indexing, no per-sample Python."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import labels, preprocess
from pipeline.data import FaceSet

log = logging.getLogger(__name__)

EVAL_BATCH = 2048
OnEpoch = Callable[[int, dict[str, float]], None]


@dataclass
class Tensors:
    """Model inputs and one target vector per head, already on the training device."""

    x: torch.Tensor
    y: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.x)


def select_device(name: str | None = None) -> torch.device:
    """CUDA when available, else Apple MPS, else CPU; `name` forces one."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_tensors(
    faces: FaceSet, rows: np.ndarray, edges: tuple[int, ...], device: torch.device
) -> Tensors:
    """Normalised inputs and targets for `rows`, moved to `device` once."""
    targets = {
        "age": labels.age_bracket(faces.age[rows], edges),
        "ethnicity": faces.ethnicity[rows].astype(np.int64),
        "gender": faces.gender[rows].astype(np.int64),
    }
    return Tensors(
        x=preprocess.to_model_input(faces.images[rows]).to(device),
        y={
            head: torch.as_tensor(t, dtype=torch.long, device=device) for head, t in targets.items()
        },
    )


def make_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    if name == "Adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "Adadelta":
        return torch.optim.Adadelta(parameters, lr=lr)
    if name == "RMSprop":
        return torch.optim.RMSprop(parameters, lr=lr)
    if name == "SGD":
        # Plain SGD at lr <= 1e-2 barely moves in a short trial; momentum is the usual fix.
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    if name == "MADGRAD":
        from madgrad import MADGRAD

        return MADGRAD(parameters, lr=lr)
    raise ValueError(
        f"unknown optimizer {name!r}; expected Adam, Adadelta, RMSprop, SGD or MADGRAD"
    )


def multitask_loss(logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[head], y[head]) for head in labels.HEADS)


def fit(
    model: nn.Module,
    params: dict,
    train: Tensors,
    val: Tensors,
    epochs: int,
    seed: int,
    on_epoch: OnEpoch | None = None,
) -> list[dict[str, float]]:
    """Train for `epochs`, evaluating on `val` after each; on_epoch may raise to stop early."""
    optimizer = make_optimizer(params["optimizer"], model.parameters(), params["lr"])
    shuffle = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        train_loss = train_epoch(model, optimizer, train, params["batch_size"], shuffle)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch}")
        metrics = {"train_loss": train_loss, **evaluate(model, val)}
        history.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
    return history


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensors,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass in shuffled mini-batches; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(data), generator=generator).to(data.x.device)
    total = torch.zeros((), device=data.x.device)
    for start in range(0, len(data), batch_size):
        rows = order[start : start + batch_size]
        loss = multitask_loss(model(data.x[rows]), {h: y[rows] for h, y in data.y.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Summed on the device: a .item() per batch would force a sync on GPUs.
        total += loss.detach() * len(rows)
    return total.item() / len(data)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    chunks = [model(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    return {head: torch.cat([c[head] for c in chunks]) for head in chunks[0]}


def evaluate(model: nn.Module, data: Tensors) -> dict[str, float]:
    """Validation loss and accuracy of each head, plus their mean accuracy."""
    logits = predict_logits(model, data.x)
    metrics = {"val_loss": multitask_loss(logits, data.y).item()}
    for head in labels.HEADS:
        metrics[f"val_{head}_acc"] = (logits[head].argmax(1) == data.y[head]).float().mean().item()
    metrics["val_mean_acc"] = sum(metrics[f"val_{h}_acc"] for h in labels.HEADS) / len(labels.HEADS)
    return metrics


def metric_key(metric: str) -> str:
    """The history key of a tuning metric name (age, ethnicity, gender, mean)."""
    return f"val_{metric}_acc"
