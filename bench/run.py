"""`make bench`: the pipeline's costs, each a median of repeats with min and max, and each set
against a baseline measured in the same run. Prints a markdown table and writes it to
bench/results/.

1. data load: first load of the CSV.gz (decode) against the cached load;
2. training throughput: our in-memory loop against a plain DataLoader(TensorDataset) loop (mlp);
   the cnn-cpu reference network in fp32 against this machine's default precision, speed and
   validation accuracy; where CUDA is present, both loops on the GPU and train-best's AMP path;
3. MLflow logging overhead: trial wall time with and without our trial logger;
4. cost growth: trial time at 25%, 50%, 100% of the training data, and a tuning run's peak memory;
5. workers: finished trials per minute with 1 and with 2 worker processes, same budget.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench import save
from pipeline.config import Settings
from pipeline.data import dataset, labels
from pipeline.model import network
from pipeline.testkit import machine
from pipeline.tracking import runs
from pipeline.training import train
from pipeline.tuning.objective import make_objective

EDGES = (0, 3, 18, 45, 64, 116)
# A mid-sized configuration of the mlp space, fixed so every measurement trains the same network.
PARAMS = {
    "arch": "mlp",
    "num_fc_layers": 6,
    "last_fc": 32,
    "optimizer": "Adam",
    "lr": 1e-3,
    "batch_size": 64,
    **{f"fc_output_feat_{i}": 48 for i in range(6)},
    **{f"fc_dropout_{i}": 0.2 for i in range(6)},
}
# The CPU preset's best network (docs/tuning.md) (width 32, 3 stages of 2 residual blocks, AdamW
# lr 0.012 one-cycle, batch 64); the recipe's other values fixed mid-range.
CNN = {
    "arch": "cnn",
    "width": 32,
    "stages": 3,
    "blocks": 2,
    "block": "residual",
    "stem_pool": True,
    "dropout": 0.2,
    "last_fc": 128,
    "flip": True,
    "shift": 2,
    "rotate": 5.0,
    "jitter": 0.1,
    "label_smoothing": 0.1,
    "weight_decay": 1e-3,
    "schedule": "onecycle",
    "loss_weight_age": 1.0,
    "loss_weight_ethnicity": 1.0,
    "loss_weight_gender": 1.0,
    "optimizer": "AdamW",
    "lr": 0.012,
    "batch_size": 64,
}
CPU = torch.device("cpu")
Row = tuple[str, str, str]


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def fmt(values: list[float], unit: str = "s", digits: int = 3) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{med:.{digits}f} {unit} (min {lo:.{digits}f}, max {hi:.{digits}f})"


def bench_load(path: Path, repeats: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        caches = iter(range(repeats))
        # A fresh cache folder per repeat, so every "first" load really decodes.
        first = timed(lambda: dataset.load(path, Path(tmp) / str(next(caches))), repeats)
        cached = timed(lambda: dataset.load(path, Path(tmp) / "0"), repeats * 2)
    ratio = statistics.median(first) / statistics.median(cached)
    return [
        ("data load: first (decode + cache)", fmt(first), "baseline"),
        ("data load: cached", fmt(cached), f"{ratio:.0f}x faster"),
    ]


def _sets(
    faces: dataset.FaceSet, fraction: float = 1.0, device: torch.device = CPU
) -> tuple[train.Tensors, train.Tensors]:
    split = dataset.split(faces, EDGES, 42, 0.2, 0.2)
    rows = split.train[: int(len(split.train) * fraction)]
    return (
        train.to_tensors(faces, rows, EDGES, device),
        train.to_tensors(faces, split.val, EDGES, device),
    )


def _dataloader_epoch(net, optimizer, tensors: train.Tensors, batch_size: int) -> None:
    """The textbook loop: per-sample indexing and collation by DataLoader from host memory, each
    batch then copied to the network's device."""
    device = next(net.parameters()).device
    dataset = TensorDataset(tensors.x.cpu(), *(tensors.y[h].cpu() for h in labels.HEADS))
    net.train()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, pin_memory=device.type == "cuda"
    )
    for x, *ys in loader:
        x, ys = x.to(device, non_blocking=True), [y.to(device, non_blocking=True) for y in ys]
        loss = train.multitask_loss(net(x), dict(zip(labels.HEADS, ys, strict=True)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """fn, then wait for the GPU: its kernels run asynchronously."""

    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def bench_training(
    faces: dataset.FaceSet,
    repeats: int,
    params: dict = PARAMS,
    name: str = "mlp",
    device: torch.device = CPU,
    epochs: int = 2,
) -> list[Row]:
    """Our loop against a DataLoader loop, both fp32, and the model's step alone as a ceiling."""
    train_set, _ = _sets(faces, device=device)
    classes = labels.num_classes(EDGES)
    batch = params["batch_size"]
    where = f"{name}, batch {batch}" + (f", {device.type}" if device.type != "cpu" else "")

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        net = network.build(params, classes).to(device)
        return net, train.make_optimizer(params["optimizer"], net.parameters(), params["lr"])

    def ours() -> None:
        net, opt = build()
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            train.train_epoch(net, opt, train_set, batch, gen)

    def plain() -> None:
        net, _ = build()
        opt = getattr(torch.optim, params["optimizer"])(net.parameters(), lr=params["lr"])
        for _ in range(epochs):
            _dataloader_epoch(net, opt, train_set, batch)

    def model_only() -> None:
        """The same number of steps on one batch that never moves: the model's own forward,
        backward and (fused) optimizer step, which no data loading can go below."""
        net, opt = build()
        x, ys = train_set.x[:batch], {h: y[:batch] for h, y in train_set.y.items()}
        net.train()
        for _ in range(epochs * math.ceil(len(train_set) / batch)):
            loss = train.multitask_loss(net(x), ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    samples = len(train_set) * epochs
    ours_rate = [samples / t for t in timed(_synced(ours, device), repeats)]
    plain_rate = [samples / t for t in timed(_synced(plain, device), repeats)]
    ceiling_rate = [samples / t for t in timed(_synced(model_only, device), repeats)]
    base = statistics.median(plain_rate)
    return [
        (
            f"training ({where}): DataLoader(TensorDataset) + {params['optimizer']}",
            fmt(plain_rate, "samples/s", 0),
            "baseline",
        ),
        (
            f"training ({where}): our loop (in-memory batches, fused optimizer)",
            fmt(ours_rate, "samples/s", 0),
            f"{statistics.median(ours_rate) / base:.1f}x faster",
        ),
        (
            f"training ({where}): the model's step alone, no data movement (ceiling of any loop)",
            fmt(ceiling_rate, "samples/s", 0),
            f"{statistics.median(ceiling_rate) / base:.1f}x faster",
        ),
    ]


def bench_cnn_precision(faces: dataset.FaceSet, epochs: int = 3) -> list[Row]:
    """The cnn-cpu reference network in fp32 against the default precision of this machine, in
    the real loop (train.fit_epochs on the whole training split, validation included), same seed:
    samples/s of each epoch, the two runs' epochs interleaved so machine noise hits both alike,
    and the validation mean accuracy after `epochs` (evaluated in fp32, as served)."""
    train_set, val_set = _sets(faces)
    default = train.select_precision(CPU)
    variants = {"fp32": train.FP32, f"default ({default.name}, channels-last)": default}
    nets, runs = {}, {}
    for name, precision in variants.items():
        train.seed_everything(0)
        nets[name] = network.build(CNN, labels.num_classes(EDGES))
        runs[name] = train.fit_epochs(nets[name], CNN, train_set, val_set, epochs, 0, precision)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(epochs):
        for name in variants:
            start = time.perf_counter()
            next(runs[name])
            rates[name].append(len(train_set) / (time.perf_counter() - start))
    accuracy = {name: train.evaluate(net, val_set)["val_mean_acc"] for name, net in nets.items()}
    rows = []
    base_rate, base_acc = statistics.median(rates["fp32"]), accuracy["fp32"]
    for name in variants:
        speedup = statistics.median(rates[name]) / base_rate
        rows.append(
            (
                f"training epoch incl. validation (cnn-cpu reference, batch 64): {name}",
                fmt(rates[name], "samples/s", 0),
                "baseline" if name == "fp32" else f"{speedup:.2f}x the samples/s",
            )
        )
    for name in variants:
        delta = 100 * (accuracy[name] - base_acc)
        rows.append(
            (
                f"validation mean accuracy after {epochs} epochs (cnn-cpu reference, seed 0): "
                f"{name}",
                f"{accuracy[name]:.4f}",
                "baseline" if name == "fp32" else f"{delta:+.2f} points",
            )
        )
    return rows


def bench_gpu(faces: dataset.FaceSet, repeats: int, epochs: int = 2) -> list[Row]:
    """Where CUDA is present: our loop against the DataLoader loop for the mlp and the cnn
    reference, and train-best's mixed-precision path (two epochs of train.fit)."""
    cuda = torch.device("cuda")
    rows = bench_training(faces, repeats, PARAMS, "mlp", cuda, epochs)
    rows += bench_training(faces, repeats, CNN, "cnn-cpu reference", cuda, epochs)
    train_set, val_set = _sets(faces, device=cuda)
    precision = train.select_precision(cuda)
    times = []
    for _ in range(repeats):
        train.seed_everything(0)
        net = network.build(CNN, labels.num_classes(EDGES)).to(cuda)
        fit = partial(train.fit, net, CNN, train_set, val_set, epochs, 0, precision=precision)
        times += timed(_synced(fit, cuda), 1)
    rate = [len(train_set) * epochs / t for t in times]
    rows.append(
        (
            f"train-best's path on {torch.cuda.get_device_name()} ({precision.name}, "
            f"{epochs} epochs with validation, cnn-cpu reference)",
            fmt(rate, "samples/s", 0),
            "-",
        )
    )
    return rows


class _NoLogger:
    """Stands in for TrialLogger: the same calls, nothing logged."""

    def start(self, trial: optuna.Trial) -> str:
        return ""

    def log_params(self, *args) -> None:
        pass

    def log_epoch(self, *args) -> None:
        pass

    def fail(self, *args, **kwargs) -> None:
        pass

    def __call__(self, study, trial) -> None:
        pass


def _trial_seconds(settings: Settings, sets, logger, n: int) -> list[float]:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    params = {k: v for k, v in PARAMS.items() if k != "arch"}
    for _ in range(n):
        study.enqueue_trial(params)
    objective = make_objective(settings, *sets, logger)
    study.optimize(objective, n_trials=n, callbacks=[logger])
    return [t.duration.total_seconds() for t in study.trials]


def bench_mlflow(faces: dataset.FaceSet, repeats: int, tmp: Path, epochs: int = 5) -> list[Row]:
    settings = Settings(
        epochs=epochs,
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        artifact_root=tmp / "mlruns",
        study="bench",
    )
    sets = _sets(faces)
    client = runs.client_for(settings.tracking_uri)
    experiment = runs.ensure_experiment(client, "bench", settings.artifact_root)
    parent = runs.start_parent(client, experiment, "bench", {})
    logged = runs.TrialLogger(client, experiment, parent, {})
    with_logger, without = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        without += _trial_seconds(settings, sets, _NoLogger(), 1)
        with_logger += _trial_seconds(settings, sets, logged, 1)
    overhead = 100 * (statistics.median(with_logger) / statistics.median(without) - 1)
    return [
        (f"trial ({epochs} epochs), no logging", fmt(without), "baseline"),
        (
            f"trial ({epochs} epochs), MLflow trial logger",
            fmt(with_logger),
            f"{overhead:+.1f}% time",
        ),
    ]


def bench_growth(faces: dataset.FaceSet, repeats: int, tmp: Path, epochs: int = 3) -> list[Row]:
    settings = Settings(epochs=epochs)
    rows, base = [], None
    for fraction in (0.25, 0.5, 1.0):
        times = []
        for _ in range(repeats):
            times += _trial_seconds(settings, _sets(faces, fraction), _NoLogger(), 1)
        base = base or statistics.median(times)
        rows.append(
            (
                f"trial ({epochs} epochs) on {fraction:.0%} of the training data",
                fmt(times),
                f"{statistics.median(times) / base:.2f}x the 25% time",
            )
        )
    return rows


def _tune_cmd(
    data_path: Path, tmp: Path, study: str, n_trials: int, n_workers: int, epochs: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "tune",
        "--data",
        str(data_path),
        "--storage",
        f"sqlite:///{tmp / 'optuna.db'}",
        "--tracking-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
        "--study",
        study,
        "--n-trials",
        str(n_trials),
        "--epochs",
        str(epochs),
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--workers",
        str(n_workers),
    ]


def bench_tuning(
    data_path: Path,
    repeats: int,
    tmp: Path,
    n_trials: int = 48,
    epochs: int = 5,
    workers: tuple[int, ...] = (1, 2),
) -> list[Row]:
    """Trials per minute with each number of worker processes, the first the baseline; peak
    memory of a tuning process.

    Each process pays ~5 s of imports and data loading, so the budget must be large enough
    for that not to dominate (at 12 trials x 3 epochs, 2 workers were slower than 1; at 24 x 5,
    1.45x; the budget here is the size of a small real study)."""
    rates: dict[int, list[float]] = {n: [] for n in workers}
    env = os.environ | {"FACEOPT_ARTIFACT_ROOT": str(tmp / "mlruns")}
    for r in range(repeats):
        for n in workers:
            start = time.perf_counter()
            subprocess.run(
                _tune_cmd(data_path, tmp, f"w{n}-{r}", n_trials, n, epochs),
                env=env,
                check=True,
                capture_output=True,
            )
            rates[n].append(n_trials / (time.perf_counter() - start) * 60)
    peak_mb = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    )  # largest child, Linux KiB
    base, rows = statistics.median(rates[workers[0]]), []
    for n in workers:
        ratio = statistics.median(rates[n]) / base
        rows.append(
            (
                f"tuning, {n} worker{'s' if n > 1 else ''} ({n_trials} trials x {epochs} epochs)",
                fmt(rates[n], "trials/min", 1),
                "baseline" if n == workers[0] else f"{ratio:.2f}x the trials/min",
            )
        )
    return rows + [
        ("tuning: peak memory of one process", f"{peak_mb:.0f} MB (max over the runs above)", "-")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/age_gender.csv.gz"))
    parser.add_argument("--repeats", type=int, default=3)
    # Smoke runs on tiny data (tests/test_bench.py); without them, each section's own sizes.
    parser.add_argument(
        "--epochs", type=int, help="epochs of every training measurement (default: 2 to 5 each)"
    )
    parser.add_argument("--tune-trials", type=int, default=48, help="trials of each tuning run")
    parser.add_argument(
        "--tune-repeats", type=int, help="tuning runs per worker count (default: repeats - 1, >= 2)"
    )
    # A smoke run tunes with 1 worker alone: a run with 2 starts 3 processes, each ~8 s of imports.
    parser.add_argument(
        "--tune-workers", default="1,2", help="worker counts to tune with, the first the baseline"
    )
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not args.data.exists():
        raise SystemExit(dataset.missing_data_message(args.data))
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    tune_repeats = args.tune_repeats or max(2, args.repeats - 1)
    started = time.time()
    rows = bench_load(args.data, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        faces = dataset.load(args.data, Path(tmp) / "cache")
        rows += bench_training(faces, args.repeats, **epochs)
        rows += bench_cnn_precision(faces, **epochs)
        if torch.cuda.is_available():
            rows += bench_gpu(faces, args.repeats, **epochs)
        rows += bench_mlflow(faces, args.repeats, Path(tmp), **epochs)
        rows += bench_growth(faces, args.repeats, Path(tmp), **epochs)
        workers = tuple(int(n) for n in args.tune_workers.split(","))
        rows += bench_tuning(
            args.data, tune_repeats, Path(tmp), args.tune_trials, workers=workers, **epochs
        )
    table = "\n".join(
        [
            f"{machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{time.time() - started:.0f} s in all",
            "",
            "| benchmark | median (min, max) | against the baseline |",
            "| --- | --- | --- |",
        ]
        + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    )
    print(table)
    if not args.no_save:
        save("bench", f"data: {args.data}\n\n{table}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
