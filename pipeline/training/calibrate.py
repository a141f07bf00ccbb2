"""Temperature scaling per head (fitted on the validation split) and expected calibration error."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, steps: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on (logits, y).

    Optimised over log T, so T stays positive; one scalar cannot change which class wins.
    """
    # Copies: logits from inference mode cannot take part in autograd.
    logits, y = logits.detach().float().cpu().clone(), y.detach().cpu().clone()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Clamped: a guard against degenerate validation sets (all right, or all one class).
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.float().cpu() / temperature, y.cpu()))


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by the
    bin's share of samples (equal-width bins over the top-class probability)."""
    confidence = probs.max(1)
    hits = probs.argmax(1) == y
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(hits[mask].mean() - confidence[mask].mean())
    return float(total)


def scaled_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(logits.float() / temperature, dim=1).cpu().numpy()


def report(
    logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor], temperatures: dict[str, float]
) -> dict[str, float]:
    """Per head: the temperature, ECE and NLL before and after scaling, as metric names."""
    metrics = {}
    for head, t in temperatures.items():
        truth = y[head].cpu().numpy()
        metrics[f"temperature_{head}"] = t
        metrics[f"test_{head}_ece_before"] = ece(scaled_probabilities(logits[head]), truth)
        metrics[f"test_{head}_ece_after"] = ece(scaled_probabilities(logits[head], t), truth)
        metrics[f"test_{head}_nll_before"] = nll(logits[head], y[head])
        metrics[f"test_{head}_nll_after"] = nll(logits[head], y[head], t)
    return metrics
