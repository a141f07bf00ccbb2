"""Build the network from a plain params dict: a shared body and one linear head per task."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.data import preprocess


class FaceNet(nn.Module):
    """Shared body -> features -> logits for age bracket, ethnicity and gender."""

    def __init__(self, body: nn.Module, features: int, classes: dict[str, int]):
        super().__init__()
        self.body = body
        self.heads = nn.ModuleDict({name: nn.Linear(features, n) for name, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(x)
        return {name: head(z) for name, head in self.heads.items()}


class Ensemble(nn.Module):
    """Networks of one architecture trained from different seeds, answering as one: the mean
    of their logits per head (the normalised geometric mean of their probabilities)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [member(x) for member in self.members]
        return {head: torch.stack([o[head].float() for o in outs]).mean(0) for head in outs[0]}


def build(params: dict, classes: dict[str, int], members: int = 1) -> nn.Module:
    """The network for `params` (from space.suggest or a logged run) with `classes` outputs per
    head; with members > 1, an Ensemble of that many such networks."""
    if members > 1:
        return Ensemble([build(params, classes) for _ in range(members)])
    arch = params.get("arch", "mlp")
    if arch == "mlp":
        body, features = _mlp_body(params)
    elif arch == "cnn":
        body, features = _cnn_body(params)
    else:
        raise ValueError(f"unknown arch {arch!r} in params; expected 'mlp' or 'cnn'")
    net = FaceNet(body, features, classes)
    if arch == "cnn":
        # oneDNN's convolutions are about 20% faster on CPU in channels-last; cuDNN's with AMP too.
        net = net.to(memory_format=torch.channels_last)
    return net


def _mlp_body(params: dict) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    width = preprocess.SIZE * preprocess.SIZE
    for i in range(params["num_fc_layers"]):
        out = params[f"fc_output_feat_{i}"]
        layers += [nn.Linear(width, out), nn.ReLU(), nn.Dropout(params[f"fc_dropout_{i}"])]
        width = out
    layers += [nn.Linear(width, params["last_fc"]), nn.ReLU()]
    return nn.Sequential(*layers), params["last_fc"]


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # Batch norm makes the conv bias redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class Residual(nn.Module):
    """Two 3x3 conv-BN layers and a skip connection (a 1x1 projection when widths differ)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out), nn.ReLU(), *_conv_bn(c_out, c_out))
        self.skip = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _cnn_body(params: dict) -> tuple[nn.Module, int]:
    """Stem, then `stages` stages of `blocks` blocks each (width doubling, 2x2 max pooling after
    each), global average pooling, dropout and an optional hidden layer."""
    width = params["width"]
    layers: list[nn.Module] = [*_conv_bn(1, width), nn.ReLU()]
    side = preprocess.SIZE
    if params["stem_pool"]:
        layers.append(nn.MaxPool2d(2))
        side //= 2
    channels = width
    for stage in range(params["stages"]):
        out = width * 2**stage
        for _ in range(params["blocks"]):
            if params["block"] == "residual":
                layers.append(Residual(channels, out))
            else:
                layers += [*_conv_bn(channels, out), nn.ReLU()]
            channels = out
        if side >= 4:  # stop pooling at 3x3 or smaller
            layers.append(nn.MaxPool2d(2))
            side //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(params["dropout"])]
    features = channels
    if params["last_fc"]:
        layers += [nn.Linear(channels, params["last_fc"]), nn.ReLU(), nn.Dropout(params["dropout"])]
        features = params["last_fc"]
    return nn.Sequential(*layers), features


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """For inference: every conv directly followed by batch norm becomes one conv with the norm's
    scale and shift folded into its weights (the same outputs, one op fewer). `net` must be in
    eval mode; it is changed in place and returned."""
    if net.training:
        raise ValueError("fold_batch_norm needs a network in eval mode (running statistics)")
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module._modules.items())
        for (conv_name, conv), (bn_name, bn) in pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return net
