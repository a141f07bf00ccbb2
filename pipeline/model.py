"""Build the network from a plain params dict: a shared body and one linear head per task."""

from __future__ import annotations

import torch
from torch import nn

from pipeline import preprocess


class FaceNet(nn.Module):
    """Shared body -> features -> logits for age bracket, ethnicity and gender."""

    def __init__(self, body: nn.Module, features: int, classes: dict[str, int]):
        super().__init__()
        self.body = body
        self.heads = nn.ModuleDict({name: nn.Linear(features, n) for name, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(x)
        return {name: head(z) for name, head in self.heads.items()}


def build(params: dict, classes: dict[str, int]) -> FaceNet:
    """The network for `params` (from space.suggest or a logged run) with `classes` outputs per head."""
    arch = params.get("arch", "mlp")
    if arch == "mlp":
        body, features = _mlp_body(params)
    elif arch == "cnn":
        body, features = _cnn_body(params)
    else:
        raise ValueError(f"unknown arch {arch!r} in params; expected 'mlp' or 'cnn'")
    return FaceNet(body, features, classes)


def _mlp_body(params: dict) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    width = preprocess.SIZE * preprocess.SIZE
    for i in range(params["num_fc_layers"]):
        out = params[f"fc_output_feat_{i}"]
        layers += [nn.Linear(width, out), nn.ReLU(), nn.Dropout(params[f"fc_dropout_{i}"])]
        width = out
    layers += [nn.Linear(width, params["last_fc"]), nn.ReLU()]
    return nn.Sequential(*layers), params["last_fc"]


def _cnn_body(params: dict) -> tuple[nn.Module, int]:
    k = params["kernel_size"]
    pool = nn.MaxPool2d if params["pooling"] == "max" else nn.AvgPool2d
    layers: list[nn.Module] = []
    channels, side = 1, preprocess.SIZE
    for i in range(params["num_conv_blocks"]):
        out = params[f"conv_channels_{i}"]
        # Batch norm makes the conv bias redundant.
        layers.append(nn.Conv2d(channels, out, k, padding=k // 2, bias=not params["batch_norm"]))
        if params["batch_norm"]:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.ReLU(), pool(2), nn.Dropout(params[f"conv_dropout_{i}"])]
        channels, side = out, side // 2
    layers += [
        nn.Flatten(),
        nn.Linear(channels * side * side, params["last_fc"]),
        nn.ReLU(),
        nn.Dropout(params["fc_dropout"]),
    ]
    return nn.Sequential(*layers), params["last_fc"]
