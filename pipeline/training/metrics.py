"""Test-split evaluation: per-head accuracy and macro-F1, confusion matrices, per-group table, model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import labels
from pipeline.training import calibrate

GROUPS = ("ethnicity", "gender", "age")
BOOTSTRAP = 1000  # resamples behind each interval


def head_metrics(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """test_<head>_acc, test_<head>_f1 (macro) and test_mean_acc."""
    metrics = {}
    for head in labels.HEADS:
        metrics[f"test_{head}_acc"] = float((pred[head] == truth[head]).mean())
        metrics[f"test_{head}_f1"] = macro_f1(truth[head], pred[head])
    metrics["test_mean_acc"] = float(np.mean([metrics[f"test_{h}_acc"] for h in labels.HEADS]))
    return metrics


def macro_f1(truth: np.ndarray, pred: np.ndarray, classes: np.ndarray | None = None) -> float:
    """The mean over `classes` (by default every class true or predicted) of each one's F1,
    2TP / (2TP + FP + FN), 0 where a class is neither true nor predicted: scikit-learn's
    f1_score(average="macro", zero_division=0), without its seconds of imports."""
    classes = np.union1d(truth, pred) if classes is None else classes
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (truth == c))
        wrong = np.sum((pred == c) != (truth == c))  # false positives and false negatives
        scores.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return float(np.mean(scores))


def bootstrap(
    values: dict[str, np.ndarray], seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """A percentile bootstrap interval of the mean of each per-row array (1 = right, or a paired
    difference), the same resampled rows for every array."""
    n = len(next(iter(values.values())))
    rows = np.random.default_rng(seed).integers(0, n, (BOOTSTRAP, n), dtype=np.int32)
    tail = (1 - level) / 2 * 100
    out = {}
    for key, per_row in values.items():
        low, high = np.percentile(
            np.asarray(per_row, dtype=np.float64)[rows].mean(axis=1), [tail, 100 - tail]
        )
        out[key] = (float(low), float(high))
    return out


def bootstrap_intervals(
    pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """test_<head>_acc_low / _high: the bootstrap interval of each head's accuracy."""
    found = bootstrap({h: pred[h] == truth[h] for h in labels.HEADS}, seed, level)
    out = {}
    for head, (low, high) in found.items():
        out[f"test_{head}_acc_low"], out[f"test_{head}_acc_high"] = low, high
    return out


def confusions(
    pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], names: dict[str, tuple[str, ...]]
) -> dict[str, np.ndarray]:
    found = {}
    for head in labels.HEADS:
        n = len(names[head])  # rows the truth, columns the prediction
        found[head] = np.bincount(truth[head] * n + pred[head], minlength=n * n).reshape(n, n)
    return found


def confusion_png(matrix: np.ndarray, names: tuple[str, ...], title: str, path: Path) -> Path:
    """The matrix as a heat map, each cell's count written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    middle = (matrix.max() + matrix.min()) / 2
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if count > middle else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour)
    ticks = range(len(names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=names, yticklabels=names)
    ax.set(xlabel="Predicted label", ylabel="True label", title=title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def per_group(
    pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], names: dict[str, tuple[str, ...]]
) -> pd.DataFrame:
    """Each head's accuracy within each ethnicity, gender and age-bracket group (a fairness view)."""
    rows = []
    for group in GROUPS:
        for index, name in enumerate(names[group]):
            mask = truth[group] == index
            row = {"group": group, "value": name, "n": int(mask.sum())}
            for head in labels.HEADS:
                hits = pred[head][mask] == truth[head][mask]
                row[f"{head}_acc"] = float(hits.mean()) if mask.any() else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def group_gaps(table: pd.DataFrame, group: str = "ethnicity") -> dict[str, float]:
    """Best minus worst group accuracy of each head, within one grouping."""
    sub = table[(table["group"] == group) & (table["n"] > 0)]
    return {
        f"{head}_acc": float(sub[f"{head}_acc"].max() - sub[f"{head}_acc"].min())
        for head in labels.HEADS
    }


def markdown_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for row in table.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _retrained(info: dict) -> str:
    """How the version was retrained: one network, or an ensemble's members."""
    epochs, best = info["epochs"], info["best_epoch"]
    if len(epochs) == 1:
        return f"retrained {epochs[0]} epochs, best epoch {best[0]}"
    seeds = f"{info['seed']}..{info['seed'] + len(epochs) - 1}"
    return (
        f"retrained as an ensemble of {len(epochs)} networks (seeds {seeds}; the service "
        f"averages their logits): {', '.join(map(str, epochs))} epochs, best epochs "
        f"{', '.join(map(str, best))}"
    )


def model_card(info: dict, metrics: dict, table: pd.DataFrame) -> str:
    """A short markdown card: data, split, params, metrics, per-group table, known limits."""
    metric_lines = "\n".join(
        f"| {h} | {metrics[f'test_{h}_acc']:.4f} | {metrics[f'test_{h}_acc_low']:.4f}–"
        f"{metrics[f'test_{h}_acc_high']:.4f} | {metrics[f'test_{h}_f1']:.4f} |"
        for h in labels.HEADS
    )
    dup = info["split"]
    params = "\n".join(f"- `{k}`: {v}" for k, v in info["params"].items())
    cal = info["calibration"]
    calibration_lines = "\n".join(
        f"| {h} | {cal[f'temperature_{h}']:.3f} | {cal[f'test_{h}_ece_before']:.4f} | "
        f"{cal[f'test_{h}_ece_after']:.4f} | {cal[f'test_{h}_nll_before']:.4f} | "
        f"{cal[f'test_{h}_nll_after']:.4f} |"
        for h in labels.HEADS
    )
    return f"""# faceopt model card: {info["model_name"]}

Multi-task classifier of 48x48 grayscale faces: age bracket ({", ".join(info["brackets"])}),
ethnicity (White, Black, Asian, Indian, Other) and gender (male, female).

## Data and split
- Source: `{info["data"]}` (sha256 `{info["fingerprint"][:16]}…`), {info["n_faces"]} faces.
- Split (seed {dup["seed"]}, digest `{dup["digest"]}`): train {dup["train"]}, validation
  {dup["val"]} (early stopping, calibration, and the champion gate), test {dup["test"]} (used once,
  here, to report; it chose nothing: not the trial, the epoch, the temperatures nor the alias).
- Duplicates: {dup["duplicate_groups"]} groups of byte-identical images ({dup["duplicate_rows"]}
  rows), each group on one side of the split; {dup["conflicting_groups"]} groups
  ({dup["conflicting_rows"]} rows) disagree on a label, and were
  {"left out" if dup["conflicting_dropped"] else "kept"}.
- Tuned by study `{info["study"]}`, trial #{info["trial"]} (validation {info["metric"]} accuracy
  {info["trial_value"]:.4f}); {_retrained(info)}, on {info["device"]} ({info["precision"]}).
- Predictions average each face's logits with its mirror image's: {
        "yes (it raised the validation score)"
        if info.get("flip_average")
        else "no (it did not raise the validation score)"
    }.

## Hyperparameters
{params}

## Test metrics
Accuracy on the test split, arrays converted as the dataset was (a model figure; what the service
answers for photos is measured by `faceopt evaluate`), with a 95% bootstrap interval
({BOOTSTRAP} resamples):

| head | accuracy | 95% interval | macro-F1 |
| --- | --- | --- | --- |
{metric_lines}

## Calibration (test split)
Probabilities are softmax(logits / T) with one temperature T per head, fitted on the validation
split; expected calibration error ({calibrate.ECE_BINS} bins) before and after:

| head | T | ECE before | ECE after | NLL before | NLL after |
| --- | --- | --- | --- | --- | --- |
{calibration_lines}

## Accuracy by group (test split)
`n` is each group's count: small groups have wide intervals.

{markdown_table(table)}

## Known limits
- UTKFace labels come from file names and are noisy (wrong ages and genders exist); about 680
  photos are black-and-white. Ethnicity uses five coarse, self-reported-style categories and
  "Other" is small and heterogeneous.
- The data is imbalanced: most faces are 19-45 (always answering "19-45" scores about 57%), and
  White faces are over 40% of the set; per-group accuracy above shows where it is weaker.
- Inputs are aligned, cropped faces; photos of other framing need the same face crop first.
- UTKFace is licensed for non-commercial research only.
"""
