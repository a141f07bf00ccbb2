"""Retrain the study's best configuration, evaluate it once on the test split, register it in MLflow."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import tempfile
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
import torch._dynamo  # noqa: F401  with the command's imports: see pipeline/tune.py
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from pipeline import storage
from pipeline.config import PresetName, Settings, preset_values
from pipeline.data import dataset, labels
from pipeline.data.inputs import SEED_FORM, InputSpec
from pipeline.errors import FaceoptError
from pipeline.model import network, space
from pipeline.registry import champion, package
from pipeline.tracking import runs
from pipeline.training import calibrate, metrics, train
from pipeline.tuning.study import data_form

log = logging.getLogger(__name__)


class TrainBestError(FaceoptError, ValueError):
    """The study cannot be retrained as asked (missing, empty, or other data)."""


def for_study(settings: Settings) -> Settings:
    """The settings to retrain with. Without STUDY, the study tuned last in the storage
    (storage.choose_study); then without DATA or PRESET, the ones that study was tuned with (the
    preset brings its train-best epochs and patience), so `make tune ... && make train-best`
    retrains what was just tuned."""
    given = settings.model_fields_set
    name = storage.choose_study(
        settings.storage,
        settings.study,
        "study" in given,
        settings.heartbeat_interval,
        settings.grace_period,
        "make train-best",
    )
    try:
        attrs = storage.load_study(
            settings.storage, name, settings.heartbeat_interval, settings.grace_period
        ).user_attrs
    except KeyError:
        attrs = {}  # load_best says what is missing
    updates: dict = {"study": name}
    if "data" not in given and attrs.get("data"):
        updates["data"] = Path(attrs["data"])
    preset = attrs.get("preset")
    if "preset" not in given and preset in typing.get_args(PresetName):
        # The seed preset (the original experiment) sets no train-best budgets: the defaults hold.
        brought = preset_values(preset, updates.get("data", settings.data))
        budgets = ("train_epochs", "patience")
        updates |= {k: v for k, v in brought.items() if k in budgets and k not in given}
    if updates != {"study": settings.study}:
        log.info("train-best: %s", ", ".join(f"{k}={v}" for k, v in updates.items()))
    return settings.model_copy(update=updates)


def load_best(settings: Settings) -> tuple[optuna.Study, optuna.trial.FrozenTrial, dict]:
    """The study, its best trial and that trial's params rebuilt through space.suggest."""
    try:
        study = storage.load_study(
            settings.storage, settings.study, settings.heartbeat_interval, settings.grace_period
        )
    except KeyError as e:
        raise storage.missing_study(settings.storage, settings.study) from e
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    if not complete:
        raise TrainBestError(
            f"study {settings.study!r} has no completed trial yet ({len(study.trials)} trials, "
            "all pruned, failed or running): run `make tune` until one completes"
        )
    best = study.best_trial
    attrs = study.user_attrs
    params = space.suggest(
        optuna.trial.FixedTrial(best.params), attrs["space"], attrs.get("features", "pixels")
    )
    return study, best, params


def study_split(
    settings: Settings, attrs: dict, spec: InputSpec = SEED_FORM
) -> tuple[dataset.FaceSet, dataset.Split]:
    """The same data and split the study selected on, checked by fingerprint and digest; the
    faces in the input form `spec`."""
    faces = dataset.load(settings.data, settings.cache_dir, settings.skip_bad_rows, spec)
    if faces.fingerprint != attrs["data_fingerprint"]:
        raise TrainBestError(
            f"{settings.data} is not the data study {settings.study!r} was tuned on "
            f"(sha256 {faces.fingerprint[:16]}…, study has {attrs['data_fingerprint'][:16]}…); "
            "pass the same DATA"
        )
    split = dataset.split(
        faces,
        tuple(attrs["age_edges"]),
        attrs["split_seed"],
        attrs["test_fraction"],
        attrs["val_fraction"],
        drop_conflicting=attrs.get("drop_conflicting", False),
    )
    if split.digest() != attrs["split_digest"]:
        raise TrainBestError(
            f"the split differs from study {settings.study!r}'s (digest {split.digest()}, study "
            f"has {attrs['split_digest']}): the study was made with other data rows or an older "
            "faceopt split; tune a new STUDY to retrain on this one"
        )
    return faces, split


def validation_inputs(
    settings: Settings,
    split: dataset.Split,
    loaded: tuple[InputSpec, dataset.FaceSet],
    spec: InputSpec,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The validation faces in the input form `spec` (a version's own), and their descriptors
    when it takes them: each version is judged on what it was trained to see. The faces already
    `loaded` serve their own form; another form is read from its cache."""
    form, faces = loaded
    if spec != form:
        faces = dataset.load(settings.data, settings.cache_dir, settings.skip_bad_rows, spec)
    return faces.images[split.val], (faces.descriptors[split.val] if spec.descriptor else None)


def trial_seed(best: optuna.trial.FrozenTrial, settings: Settings) -> int:
    """The seed the trial trained with (recorded by tune; older studies: seed + trial number)."""
    return int(best.user_attrs.get("seed", settings.seed + best.number))


def fit_best(
    params: dict,
    sets: dict[str, train.Tensors],
    settings: Settings,
    seed: int,
    metric: str,
    classes: dict[str, int],
    precision: train.Precision,
    log_scores: Callable[[dict[str, float], int], None],
    desc: str = "train-best",
    spec: InputSpec = SEED_FORM,
) -> tuple[torch.nn.Module, list[dict], int]:
    """Train up to train_epochs with early stopping on validation; returns the best epoch's weights.

    The trial's learning-rate schedule spans all train_epochs (train.fit sizes it by the epochs
    it is given), so a one-cycle or cosine schedule is the trial's, stretched to this length."""
    train.seed_everything(seed)
    net = network.build(params, classes, spec=spec).to(sets["train"].device)
    key = train.metric_key(metric)
    best = {"value": -1.0, "epoch": -1, "state": None}
    bar = tqdm(total=settings.train_epochs, desc=desc, unit="epoch")

    def on_epoch(epoch: int, scores: dict[str, float]) -> bool:
        log_scores(scores, epoch)
        bar.update()
        bar.set_postfix(
            {key: f"{scores[key]:.4f}", "best": f"{max(best['value'], scores[key]):.4f}"}
        )
        if scores[key] > best["value"]:
            best.update(value=scores[key], epoch=epoch, state=copy.deepcopy(net.state_dict()))
        return epoch - best["epoch"] >= settings.patience

    try:
        history = train.fit(
            net,
            params,
            sets["train"],
            sets["val"],
            settings.train_epochs,
            seed,
            on_epoch,
            precision,
        )
    finally:
        bar.close()
    net.load_state_dict(best["state"])
    return net, history, best["epoch"]


def fit_members(
    fit: Callable[..., tuple[torch.nn.Module, list[dict], int]],
    members: int,
    seed: int,
    log_scores: Callable[[dict[str, float], int], None],
) -> tuple[torch.nn.Module, list[int], list[int]]:
    """`fit` (fit_best with everything but seed, log_scores and desc given) once per ensemble
    member, member i from seed + i (member 0 is the trial's own run); one network, or an
    Ensemble of them. Also each member's epochs and best epoch. A member's metrics are logged as
    member<i>_<metric> when there are several."""
    nets, epochs, best_epochs = [], [], []
    for i in range(members):

        def log_member(scores: dict[str, float], epoch: int, i: int = i) -> None:
            log_scores({member_key(key, i, members): v for key, v in scores.items()}, epoch)

        desc = f"train-best {i + 1}/{members}" if members > 1 else "train-best"
        net, history, best_epoch = fit(seed=seed + i, log_scores=log_member, desc=desc)
        nets.append(net)
        epochs.append(len(history))
        best_epochs.append(best_epoch)
    return (nets[0] if members == 1 else network.Ensemble(nets)), epochs, best_epochs


def member_key(key: str, member: int, members: int) -> str:
    """A metric's name for one member of an ensemble of `members` (a lone network: as it is)."""
    return key if members == 1 else f"member{member}_{key}"


def choose_flip_average(net, val: train.Tensors, metric: str) -> tuple[bool, dict[str, float]]:
    """Whether averaging each face's logits with its mirror image's helps this network, decided
    on the validation split by the study's metric (the test split chooses nothing); with the
    validation accuracies both ways, for the run."""
    plain = train.accuracies(train.predict_logits(net, val.x, d=val.d), val.y)
    flipped = train.accuracies(train.predict_logits(net, val.x, flip_average=True, d=val.d), val.y)
    key = train.metric_key(metric)
    scores = {f"{k}_plain": v for k, v in plain.items()}
    scores |= {f"{k}_flip_average": v for k, v in flipped.items()}
    return flipped[key] > plain[key], scores


def log_evaluation(
    client: MlflowClient,
    run_id: str,
    pred: dict,
    truth: dict,
    edges: tuple[int, ...],
    card_info: dict,
) -> dict:
    """Metrics, confusion matrices, per-group table and model card on the run."""
    names = labels.class_names(edges)
    scores = metrics.head_metrics(pred, truth) | metrics.bootstrap_intervals(pred, truth)
    table = metrics.per_group(pred, truth, names)
    gaps = metrics.group_gaps(table)
    runs.log_metrics(client, run_id, scores | {f"ethnicity_gap_{k}": v for k, v in gaps.items()})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for head, matrix in metrics.confusions(pred, truth, names).items():
            metrics.confusion_png(
                matrix, names[head], f"{head} (test)", out / f"confusion_{head}.png"
            )
        table.to_csv(out / "per_group.csv", index=False)
        (out / "per_group.md").write_text(metrics.markdown_table(table) + "\n")
        (out / "model_card.md").write_text(metrics.model_card(card_info, scores, table))
        client.log_artifacts(run_id, str(out), artifact_path="evaluation")
    return scores


def lineage_tags(study: optuna.Study, best: optuna.trial.FrozenTrial, client: MlflowClient) -> dict:
    """Tags and a note that lead from the training run back to the trial and study runs."""
    trial_run = best.user_attrs.get(runs.RUN_ID_ATTR, "")
    parent = ""
    if trial_run:
        with contextlib.suppress(MlflowException):  # trial run deleted: no link, no failure
            parent = client.get_run(trial_run).data.tags.get("mlflow.parentRunId", "")
    note = (
        f"Retrained from trial #{best.number} of study `{study.study_name}` "
        f"(trial run `{trial_run}`, study run `{parent}`)."
    )
    return {
        "optuna.study": study.study_name,
        "optuna.best_trial": str(best.number),
        "faceopt.best_trial_run_id": trial_run,
        "faceopt.study_parent_run_id": parent,
        "mlflow.note.content": note,
    }


def describe(
    client: MlflowClient,
    name: str,
    version: str,
    run_id: str,
    edges: tuple[int, ...],
    scores: dict[str, float],
    spec: InputSpec = SEED_FORM,
) -> None:
    """Registry pages that say what the model and this version are: what it predicts from what,
    and the version's test figures with the way to its model card."""
    names = labels.class_names(edges)
    given = (
        "uint8 (N, 200, 200, 3) colour face chips"
        if spec.takes_chips
        else "uint8 (N, 48, 48) grayscale faces"
    )
    client.update_registered_model(
        name,
        description=(
            f"Age bracket, ethnicity and gender from a face: input {given} cut as UTKFace's "
            "crops were; output per head the label and every class's "
            "calibrated probability. Labels: "
            + "; ".join(f"{head}: {', '.join(classes)}" for head, classes in names.items())
            + ". Trained by faceopt train-best; the champion alias is what the service loads."
        ),
    )
    figures = ", ".join(
        f"{head} {scores[f'test_{head}_acc']:.1%} "
        f"[{scores[f'test_{head}_acc_low']:.1%}, {scores[f'test_{head}_acc_high']:.1%}]"
        for head in labels.HEADS
    )
    client.update_model_version(
        name,
        version,
        description=(
            f"Test split accuracy (95% bootstrap interval): {figures}. The test split reports, it "
            f"chooses nothing. Model card: artifact evaluation/model_card.md of run {run_id}."
        ),
    )


@dataclass(frozen=True)
class Retraining:
    """What train-best retrains: the study's best trial, on the faces and split it chose on."""

    settings: Settings
    study: optuna.Study
    best: optuna.trial.FrozenTrial
    params: dict
    edges: tuple[int, ...]
    metric: str
    seed: int
    spec: InputSpec
    faces: dataset.FaceSet
    split: dataset.Split
    device: torch.device
    precision: train.Precision
    sets: dict[str, train.Tensors]  # train, val, test on the device


@dataclass(frozen=True)
class Trained:
    """The retrained network and what validation decided for it."""

    net: torch.nn.Module
    epochs: list[int]  # one per ensemble member
    best_epochs: list[int]
    flip: bool
    temperatures: dict[str, float]


@dataclass(frozen=True)
class Result:
    """What train-best did: the version it registered, where the alias went, its test figures."""

    model: str
    version: str
    alias: str
    run_id: str
    trial: int
    trial_value: float
    epochs: list[int]  # one per ensemble member
    best_epoch: list[int]
    device: str
    precision: str
    wall_s: float
    scores: dict[str, float]  # test_<head>_acc with their intervals, F1 and more
    calibration: dict[str, float]


def run(settings: Settings, promote: bool = False) -> Result:
    """Retrain the study's best trial, test it once, register it and offer it to the champion
    gate; what happened comes back as a Result."""
    job = prepare(settings)
    started = time.time()
    with training_run(job) as stage:
        client, run_id = stage.client, stage.run_id
        log_setup(client, run_id, job)
        trained = fit(client, run_id, job)
        scores, calibration = evaluate_once(client, run_id, job, trained)
        wall = {"wall_s": time.time() - started} | {
            member_key("best_epoch", i, len(trained.best_epochs)): b
            for i, b in enumerate(trained.best_epochs)
        }
        runs.log_metrics(client, run_id, wall)
        version = register(client, run_id, job, trained, scores)
        alias = champion.gate(
            client,
            settings.model_name,
            version,
            functools.partial(validation_inputs, settings, job.split, (job.spec, job.faces)),
            job.faces.targets(job.split.val, job.edges),
            job.metric,
            (job.faces.fingerprint, job.split.digest()),
            promote,
        )
    return Result(
        model=settings.model_name,
        version=version,
        alias=alias,
        run_id=run_id,
        trial=job.best.number,
        trial_value=job.best.value,
        epochs=trained.epochs,
        best_epoch=trained.best_epochs,
        device=str(job.device),
        precision=job.precision.name,
        wall_s=time.time() - started,
        scores=scores,
        calibration=calibration,
    )


def prepare(settings: Settings) -> Retraining:
    """The study's best trial, its input form, faces, split and device, ready to train."""
    settings = for_study(settings)
    study, best, params = load_best(settings)
    attrs = study.user_attrs
    edges = tuple(attrs["age_edges"])
    spec = network.input_spec(params, data_form(attrs))
    faces, split = study_split(settings, attrs, spec)
    device = train.select_device()
    precision = train.select_precision(device, settings.precision)
    log.info(
        "train-best on %s (%s): study %s, trial #%d (val %.4f)",
        device,
        precision.name,
        study.study_name,
        best.number,
        best.value,
    )
    sets = {
        part: train.to_tensors(faces, getattr(split, part), edges, device, spec)
        for part in ("train", "val", "test")
    }
    return Retraining(
        settings=settings,
        study=study,
        best=best,
        params=params,
        edges=edges,
        metric=attrs["metric"],
        seed=trial_seed(best, settings),
        spec=spec,
        faces=faces,
        split=split,
        device=device,
        precision=precision,
        sets=sets,
    )


def training_run(job: Retraining) -> contextlib.AbstractContextManager[runs.Stage]:
    """The MLflow run of this retraining, in the study's experiment, tagged with its lineage."""
    client = runs.client_for(job.settings.tracking_uri)
    tags = lineage_tags(job.study, job.best, client) | {
        "device": str(job.device),
        "precision": job.precision.name,
        "data.fingerprint": job.faces.fingerprint,
        "split.digest": job.split.digest(),
    }
    return runs.stage_run(
        client,
        job.study.study_name,
        f"train-best-{time.strftime('%Y%m%d-%H%M%S')}",
        tags,
        study=job.study,
        liveness=runs.Liveness.of(job.settings),
        artifact_root=job.settings.artifact_root,
        system_metrics=job.settings.system_metrics_interval,
    )


def log_setup(client: MlflowClient, run_id: str, job: Retraining) -> None:
    """The trial's params, the retraining's budgets and input form, and the data, on the run."""
    settings, spec = job.settings, job.spec
    budgets = {
        "seed": job.seed,
        "train_epochs": settings.train_epochs,
        "patience": settings.patience,
        "ensemble": settings.ensemble,
        "input_size": spec.size,
        "colour": spec.colour,
        "features": spec.features,
        "descriptor": spec.descriptor_kind,
    }
    runs.log_params(client, run_id, job.params | budgets)
    sizes = job.split.sizes()
    runs.log_dataset(client, run_id, str(settings.data), job.faces.fingerprint, sizes, "training")


def fit(client: MlflowClient, run_id: str, job: Retraining) -> Trained:
    """Train the ensemble's members with early stopping, then decide flip averaging and fit the
    temperatures on validation (the test split chooses nothing)."""

    def log_scores(scores: dict[str, float], epoch: int) -> None:
        runs.log_metrics(client, run_id, scores, step=epoch)

    fit_one = functools.partial(
        fit_best,
        job.params,
        job.sets,
        job.settings,
        metric=job.metric,
        classes=labels.num_classes(job.edges),
        precision=job.precision,
        spec=job.spec,
    )
    net, epochs, best_epochs = fit_members(fit_one, job.settings.ensemble, job.seed, log_scores)
    flip, flip_scores = choose_flip_average(net, job.sets["val"], job.metric)
    runs.log_metrics(client, run_id, flip_scores)
    runs.log_params(client, run_id, {"flip_average": flip})
    val = job.sets["val"]
    val_logits = train.predict_logits(net, val.x, flip_average=flip, d=val.d)
    temperatures = {h: calibrate.fit_temperature(val_logits[h], val.y[h]) for h in labels.HEADS}
    return Trained(net, epochs, best_epochs, flip, temperatures)


def evaluate_once(
    client: MlflowClient, run_id: str, job: Retraining, trained: Trained
) -> tuple[dict[str, float], dict[str, float]]:
    """The one look at the test split: accuracies with intervals, calibration, per-group table
    and model card on the run; in fp32 and with the version's flip averaging, as served."""
    data = job.sets["test"]
    logits = train.predict_logits(trained.net, data.x, flip_average=trained.flip, d=data.d)
    pred = {head: logits[head].argmax(1).cpu().numpy() for head in labels.HEADS}
    truth = {head: y.cpu().numpy() for head, y in data.y.items()}
    calibration = calibrate.report(logits, data.y, trained.temperatures)
    runs.log_metrics(client, run_id, calibration)
    card = {
        "model_name": job.settings.model_name,
        "brackets": labels.bracket_names(job.edges),
        "data": job.settings.data,
        "fingerprint": job.faces.fingerprint,
        "n_faces": len(job.faces),
        "split": job.split.summary(),
        "study": job.study.study_name,
        "trial": job.best.number,
        "metric": job.metric,
        "trial_value": job.best.value,
        "epochs": trained.epochs,
        "best_epoch": trained.best_epochs,
        "seed": job.seed,
        "device": job.device,
        "precision": job.precision.name,
        "params": job.params,
        "flip_average": trained.flip,
        "input": job.spec.to_meta(),
        "calibration": calibration,
    }
    return log_evaluation(client, run_id, pred, truth, job.edges, card), calibration


def register(
    client: MlflowClient, run_id: str, job: Retraining, trained: Trained, scores: dict[str, float]
) -> str:
    """Log the network as a pyfunc version of the registered model, with its lineage and test
    figures as tags and in its description; the new version's number."""
    name = job.settings.model_name
    tags = {
        **scores,
        "optuna.study": job.study.study_name,
        "optuna.best_trial": job.best.number,
        "faceopt.best_trial_run_id": job.best.user_attrs.get(runs.RUN_ID_ATTR, ""),
        "data.fingerprint": job.faces.fingerprint,
        "split.digest": job.split.digest(),
    }
    version = package.log_and_register(
        job.settings.tracking_uri,
        run_id,
        trained.net,
        job.params,
        job.edges,
        trained.temperatures,
        name,
        job.precision.name,
        trained.flip,
        job.spec,
        {tag: str(value) for tag, value in tags.items()},
    ).version
    describe(client, name, version, run_id, job.edges, scores, job.spec)
    return str(version)
