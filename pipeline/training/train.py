"""Training and evaluation on tensors held in memory: batched indexing, no per-sample Python."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import inputs, labels
from pipeline.data.dataset import FaceSet
from pipeline.data.inputs import SEED_FORM, InputSpec
from pipeline.errors import SettingError
from pipeline.model import augment

EVAL_BATCH = 2048
# Called after each epoch with its metrics; a truthy return stops training (early stopping),
# and an exception (optuna.TrialPruned) propagates.
OnEpoch = Callable[[int, dict[str, float]], bool | None]


@dataclass
class Tensors:
    """Model inputs (pixels x, descriptors d: either may be absent) and one target vector per
    head, already on the training device."""

    x: torch.Tensor | None
    y: dict[str, torch.Tensor]
    d: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(next(iter(self.y.values())))

    @property
    def device(self) -> torch.device:
        return next(iter(self.y.values())).device


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: plain fp32); fp16 also needs a gradient scaler against underflow."""

    dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)


FP32 = Precision()


def native_bf16_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX-512 BF16 or AMX, Arm BF16), from the
    flags in `cpuinfo`. Without it oneDNN emulates bf16 and autocast is slower than fp32."""
    try:
        info = Path(cpuinfo).read_text()
    except OSError:  # not Linux: no cheap way to tell, so fp32
        return False
    flags = set(info.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def select_precision(device: torch.device, choice: str = "auto") -> Precision:
    """The autocast precision for `device`: `choice` fp32, bf16 or fp16 forces one; auto takes
    bf16 on CUDA where supported (Ampere and later), else fp16, bf16 on a CPU with native bf16,
    else fp32. Weights stay fp32 whatever the choice (autocast casts per op)."""
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "bf16" if device.type == "cpu" and native_bf16_cpu() else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise SettingError(
            f"precision fp16 needs a CUDA GPU, this run is on {device.type}; use bf16 or fp32"
        )
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SettingError("precision bf16 is not supported by this GPU; use fp16 or fp32")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if choice not in dtypes:
        raise SettingError(f"unknown precision {choice!r}; expected auto, fp32, bf16 or fp16")
    return Precision(dtypes[choice])


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
    faces: FaceSet,
    rows: np.ndarray,
    edges: tuple[int, ...],
    device: torch.device,
    spec: InputSpec = SEED_FORM,
) -> Tensors:
    """Normalised inputs of the form `spec` and targets for `rows`, moved to `device` once."""
    targets = faces.targets(rows, edges)

    def moved(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":  # one pinned, asynchronous copy; the set then stays on the GPU
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    x = moved(inputs.pixel_tensor(faces.images[rows], spec)) if spec.pixels else None
    d = None
    if spec.descriptor:
        if faces.descriptors is None:
            raise SettingError("these faces were loaded without face descriptors")
        d = moved(inputs.descriptor_tensor(faces.descriptors[rows], spec))
    return Tensors(
        x=x,
        y={head: torch.as_tensor(t, dtype=torch.long).to(device) for head, t in targets.items()},
        d=d,
    )


def make_optimizer(
    name: str, parameters, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The named optimizer, in its fused or multi-tensor form where torch has one: a small
    network's step is mostly per-parameter overhead, which these remove (about 1.4x per epoch
    for Adam on 2 CPU cores)."""
    parameters = list(parameters)
    common = {"lr": lr, "weight_decay": weight_decay}
    if name in ("Adam", "AdamW", "SGD"):
        # Plain SGD at lr <= 1e-2 barely moves in a short trial; momentum is the usual fix.
        extra = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {}
        cls = getattr(torch.optim, name)
        try:
            return cls(parameters, fused=True, **common, **extra)
        except (RuntimeError, TypeError):  # no fused kernel for this device or torch version
            return cls(parameters, foreach=True, **common, **extra)
    if name in ("Adadelta", "RMSprop"):
        return getattr(torch.optim, name)(parameters, foreach=True, **common)
    if name == "MADGRAD":
        from madgrad import MADGRAD

        return MADGRAD(parameters, **common)
    raise ValueError(
        f"unknown optimizer {name!r}; expected Adam, AdamW, Adadelta, RMSprop, SGD or MADGRAD"
    )


def make_schedule(
    optimizer: torch.optim.Optimizer, params: dict, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule of `params` (none for the mlp space): one-cycle, or
    cosine decay after a linear warm-up."""
    schedule = params.get("schedule")
    if schedule is None:
        return None
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params["lr"], total_steps=total_steps
        )
    if schedule == "cosine":
        warm = int(params.get("warmup", 0.0) * total_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'onecycle' or 'cosine'")


@dataclass(frozen=True)
class Loss:
    """Cross-entropy summed over heads, each with its weight, with optional label smoothing."""

    weights: tuple[float, ...] = (1.0,) * len(labels.HEADS)
    label_smoothing: float = 0.0

    @classmethod
    def from_params(cls, params: dict) -> Loss:
        return cls(
            tuple(float(params.get(f"loss_weight_{h}", 1.0)) for h in labels.HEADS),
            float(params.get("label_smoothing", 0.0)),
        )

    def __call__(self, logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            w * F.cross_entropy(logits[h], y[h], label_smoothing=self.label_smoothing)
            for w, h in zip(self.weights, labels.HEADS, strict=True)
        )


multitask_loss = Loss()  # the plain loss, also the validation loss of every recipe


@dataclass(frozen=True)
class Recipe:
    """What a training step does besides the forward and backward pass."""

    loss: Loss = multitask_loss
    policy: augment.Policy = augment.Policy()
    scaler: torch.amp.GradScaler | None = None  # fp16 only


def fit(
    model: nn.Module,
    params: dict,
    train: Tensors,
    val: Tensors,
    epochs: int,
    seed: int,
    on_epoch: OnEpoch | None = None,
    precision: Precision = FP32,
) -> list[dict[str, float]]:
    """Train for up to `epochs` with the recipe in `params`, evaluating on `val` after each
    epoch; on_epoch may stop it early."""
    history = []
    for epoch, metrics in enumerate(fit_epochs(model, params, train, val, epochs, seed, precision)):
        history.append(metrics)
        if on_epoch and on_epoch(epoch, metrics):
            break
    return history


def fit_epochs(
    model: nn.Module,
    params: dict,
    train: Tensors,
    val: Tensors,
    epochs: int,
    seed: int,
    precision: Precision = FP32,
) -> Iterator[dict[str, float]]:
    """fit, one epoch per step: each yields that epoch's training loss and validation metrics
    (the schedule spans all `epochs`)."""
    optimizer = make_optimizer(
        params["optimizer"], model.parameters(), params["lr"], params.get("weight_decay", 0.0)
    )
    steps = epochs * math.ceil(len(train) / params["batch_size"])
    recipe = Recipe(
        Loss.from_params(params),
        augment.Policy.from_params(params),
        precision.scaler(train.device),
    )
    schedule = make_schedule(optimizer, params, steps)
    shuffle = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        train_loss = train_epoch(
            model, optimizer, train, params["batch_size"], shuffle, precision, recipe, schedule
        )
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch}")
        yield {"train_loss": train_loss, **evaluate(model, val, precision)}


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensors,
    batch_size: int,
    generator: torch.Generator,
    precision: Precision = FP32,
    recipe: Recipe = Recipe(),
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass in shuffled mini-batches (augmented, stepping the schedule); the mean loss."""
    device = data.device
    scaler = recipe.scaler or precision.scaler(device)
    model.train()
    order = torch.randperm(len(data), generator=generator).to(device)
    total = torch.zeros((), device=device)
    for start in range(0, len(data), batch_size):
        rows = order[start : start + batch_size]
        x = augment.augment(data.x[rows], recipe.policy) if data.x is not None else None
        d = data.d[rows] if data.d is not None else None
        with precision.autocast(device):
            loss = recipe.loss(model(x, d), {h: y[rows] for h, y in data.y.items()})
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a pass-through unless fp16
        scaler.step(optimizer)
        scaler.update()
        if schedule is not None:
            schedule.step()
        # Summed on the device: a .item() per batch would force a sync on GPUs.
        total += loss.detach().float() * len(rows)
    return total.item() / len(data)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor | None,
    precision: Precision = FP32,
    flip_average: bool = False,
    d: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """fp32 logits per head from pixels `x` and/or descriptors `d`, computed in chunks so a large
    set fits in memory. With flip_average, the mean of the logits of each face and of its mirror
    image (the mirror's pixels; a descriptor is its face's, mirrored or not)."""
    model.eval()
    n = len(x) if x is not None else len(d)

    def part(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
        return t[i : i + EVAL_BATCH] if t is not None else None

    def forward(i: int) -> dict[str, torch.Tensor]:
        out = model(part(x, i), part(d, i))
        if not flip_average or x is None:
            return out
        mirrored = model(part(x, i).flip(-1), part(d, i))
        return {head: (out[head].float() + mirrored[head].float()) / 2 for head in out}

    with precision.autocast((x if x is not None else d).device):
        chunks = [forward(i) for i in range(0, n, EVAL_BATCH)]
    return {head: torch.cat([c[head] for c in chunks]).float() for head in chunks[0]}


def accuracies(logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy of each head and their mean, keyed as metric_key names them (val_<head>_acc)."""
    scores = {
        metric_key(head): (logits[head].argmax(1) == y[head]).float().mean().item()
        for head in labels.HEADS
    }
    scores[metric_key("mean")] = sum(scores.values()) / len(labels.HEADS)
    return scores


def evaluate(model: nn.Module, data: Tensors, precision: Precision = FP32) -> dict[str, float]:
    """Validation loss and accuracy of each head, plus their mean accuracy."""
    logits = predict_logits(model, data.x, precision, d=data.d)
    return {"val_loss": multitask_loss(logits, data.y).item(), **accuracies(logits, data.y)}


def metric_key(metric: str) -> str:
    """The history key of a tuning metric name (age, ethnicity, gender, mean)."""
    return f"val_{metric}_acc"
