"""Networks. Every model maps x (B, C, H, W) to {task: logits (B,)} for the tasks it predicts.

- ConvTrunk: the reference method's conv blocks (conv + BatchNorm + ReLU + max-pool + dropout),
  then adaptive average pooling to a small grid and flatten, so that *where* a tear is
  (anterior/posterior horn) survives into the features.
- DenseHead: the reference method's dense 32 -> 16 -> 1 head with dropout.
- SharedTrunkNet: one trunk, one head per task.
- SeparateCascade: the reference method's three independent networks behind the same contract.
Models are built by name from a ModelConfig through MODEL_BUILDERS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import ModelConfig
from .labels import TASKS


class ConvBlock(nn.Sequential):
    """conv(k) + 2x2 max-pool + BatchNorm + ReLU + dropout: halves H and W.

    Pooling comes before normalisation: max-pool commutes with ReLU and with BatchNorm's
    positive-scale affine map, and BatchNorm's backward on the full-resolution map was
    43% of a training step on CPU (torch.profiler); after the pool it runs on 4x fewer values.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel: int, dropout: float):
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel, padding=kernel // 2, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )


class ConvTrunk(nn.Module):
    """Stack of ConvBlocks; forward (B, C, H, W) -> features (B, num_features)."""

    def __init__(
        self, in_chans: int, widths: Sequence[int], kernels: Sequence[int], pool_grid: int, dropout: float
    ):
        super().__init__()
        blocks, chans = [], in_chans
        for width, kernel in zip(widths, kernels):
            blocks.append(ConvBlock(chans, width, kernel, dropout))
            chans = width
        self.blocks = nn.Sequential(*blocks)
        self.max_pool = nn.AdaptiveMaxPool2d(pool_grid)
        self.avg_pool = nn.AdaptiveAvgPool2d(pool_grid)
        self.num_features = 2 * chans * pool_grid * pool_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.blocks(x)  # (B, C, H / 2^blocks, W / 2^blocks)
        pooled = torch.cat([self.max_pool(maps), self.avg_pool(maps)], dim=1)  # (B, 2C, g, g)
        return pooled.flatten(1)  # (B, 2C * g * g)


class DenseHead(nn.Sequential):
    """features (B, F) -> logits (B,) through dense layers with leaky ReLU and dropout.

    Leaky, not plain, ReLU: with plain ReLU the 16-unit layer of a head could die early in
    training (every unit negative on every input) and the head then output a constant for good;
    we saw the orientation head stuck at AUC exactly 0.500 for 7 epochs on the phantom.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.LeakyReLU(0.01, inplace=True), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, 1))
        super().__init__(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).squeeze(1)


class SharedTrunkNet(nn.Module):
    """One trunk feeding one head per task: the shared representation of the reference's next step."""

    def __init__(self, trunk: nn.Module, tasks: Sequence[str], hidden: Sequence[int], dropout: float):
        super().__init__()
        self.tasks = tuple(tasks)
        self.trunk = trunk
        self.heads = nn.ModuleDict({t: DenseHead(trunk.num_features, hidden, dropout) for t in self.tasks})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(x)  # (B, F)
        return {task: head(features) for task, head in self.heads.items()}


class SeparateCascade(nn.Module):
    """The reference method's independent networks, one per task, behind the shared contract."""

    def __init__(self, networks: dict[str, nn.Module]):
        super().__init__()
        self.tasks = tuple(t for t in TASKS if t in networks)
        self.networks = nn.ModuleDict(networks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for network in self.networks.values():
            out.update(network(x))
        return {task: out[task] for task in self.tasks}


def _trunk(config: ModelConfig, kernels: Sequence[int]) -> ConvTrunk:
    return ConvTrunk(
        config.in_chans, config.widths[: len(kernels)], kernels, config.pool_grid, config.conv_dropout
    )


def build_shared(config: ModelConfig) -> SharedTrunkNet:
    """Shared trunk (the reference's 4-block trunk by default) with one head per task."""
    return SharedTrunkNet(_trunk(config, config.kernels), config.tasks, config.dense, config.dense_dropout)


def build_single_task(config: ModelConfig, task: str) -> SharedTrunkNet:
    """One network of the cascade: fissure has 3 conv blocks, orientation and position 4."""
    kernels = config.fissure_kernels if task == "fissure" else config.kernels
    return SharedTrunkNet(_trunk(config, kernels), (task,), config.dense, config.dense_dropout)


def build_separate(config: ModelConfig) -> SeparateCascade:
    """Three independent single-task networks (the reference baseline)."""
    return SeparateCascade({task: build_single_task(config, task) for task in config.tasks})


MODEL_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "shared": build_shared,
    "separate": build_separate,
}


def build_model(config: ModelConfig) -> nn.Module:
    """Build a model by name from its config."""
    try:
        builder = MODEL_BUILDERS[config.name]
    except KeyError:
        from .errors import ConfigError

        raise ConfigError(
            f"config key 'model.name': unknown model {config.name!r} (allowed: {', '.join(MODEL_BUILDERS)})"
        ) from None
    return builder(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
