"""`compare`'s own settings (configs/compare.yaml): which variants, with what budget and test-time
augmentation; each variant's training config is its mode's preset with these applied (plan.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mtl_meniscus.config import (
    MAX_BOOTSTRAP,
    MAX_SEED,
    AugmentConfig,
    ConfigValueError,
    Section,
    TTAConfig,
    check_value,
    parse_section,
    plain,
    read_yaml,
    with_tta_defaults,
)
from mtl_meniscus.networks.models import MODELS

# per-network: each of the cascade's networks gets the whole budget (the reference protocol; the
# cascade trains len(TASKS) times the steps). equal-images: its networks share the shared model's
# steps (the same training images in all). equal-flops: they share the shared model's training
# FLOPs (counted by networks/flops.py: the cascade's networks cost more per image than the shared
# model, so they get fewer steps than with equal-images).
BUDGETS = ("per-network", "equal-images", "equal-flops")
RENAMED_BUDGETS = {"total": "equal-images"}  # 'total' was the name of equal-images
# What --same-regularization copies from the shared preset into every mode's config, so that the
# modes differ in sharing (and the architecture that goes with it) only: regularisation, optimiser,
# schedule, stopping, and the restart rule (each of the cascade's networks then restarts as the
# shared model does).
REGULARIZATION_KEYS = (
    "model.conv_dropout",
    "model.dense_dropout",
    "train.lr",
    "train.lr_factor",
    "train.lr_patience",
    "train.min_lr",
    "train.early_stopping_patience",
    "train.batch_size",
    "train.restart_if_at_chance_after",
    "augment",
)


def _compare_tta() -> TTAConfig:
    return TTAConfig(copies=5, augment=AugmentConfig(rotation_deg=8.0, translate_frac=0.05))


class CompareConfig(Section):
    """A comparison: every (mode, trunk, seed) variant trains on the same splits and is scored alike.

    Each variant's training config is its mode's preset with the budget, trunk and seed below.
    """

    modes: tuple[str, ...] = ("separate", "shared")  # registered models (networks/models.py, MODELS)
    # 'reference', 'plain' (the floor) or timm model names: resnet50, vgg16, vgg19
    trunks: tuple[str, ...] = ("reference",)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # Shares of the training split (a learning curve: every mode on nested subsets; 1.0 = all of it).
    train_fractions: tuple[float, ...] = (1.0,)
    # ROI-first classification (model.roi): none, predicted, classical, truth (an upper bound).
    # 'predicted' trains what finds the horns: the shared model's decoder, the cascade's own
    # segmentation network.
    rois: tuple[Literal["none", "predicted", "classical", "truth"], ...] = ("none",)
    # Segmentation as an auxiliary task (model.segmentation), off and/or on: the shared model's
    # (the cascade is planned with it off; roi 'predicted' always trains it).
    segmentation: tuple[bool, ...] = (False,)
    max_epochs: int | None = None  # training budget per variant; None: the preset's
    steps_per_epoch: int | None = None
    budget: str = "per-network"  # BUDGETS: how the budget above counts for the cascade
    same_regularization: bool = False  # REGULARIZATION_KEYS from the shared preset for every mode
    # Level of the built-in phantom for every variant; None: the presets' data.phantom_difficulty.
    phantom_difficulty: Literal["easy", "realistic", "hard"] | None = None
    presets: dict[str, str] = Field(
        default_factory=dict
    )  # mode -> training preset; default configs/<mode>.yaml
    pretrained: dict[str, str] = Field(
        default_factory=dict
    )  # timm trunk -> 'default' | 'none' | weights file
    tta: TTAConfig = Field(default_factory=_compare_tta)  # the same test-time augmentation for every variant
    bootstrap: int = 1000  # stratified bootstrap resamples of the test split for the CIs

    def validate(self) -> CompareConfig:
        self.budget = RENAMED_BUDGETS.get(self.budget, self.budget)
        for name in ("modes", "trunks", "seeds", "train_fractions", "rois", "segmentation"):
            values = getattr(self, name)
            check_value(
                len(values) > 0 and len(set(values)) == len(values), f"{name}", values, "distinct values"
            )
        check_value(set(self.modes) <= set(MODELS.names()), "modes", self.modes, ", ".join(MODELS.names()))
        check_value(self.budget in BUDGETS, "budget", self.budget, " or ".join(BUDGETS))
        check_value(
            all(0 < f <= 1 for f in self.train_fractions),
            "train_fractions",
            self.train_fractions,
            "fractions in (0, 1]",
        )
        shown = [f"{f:g}" for f in self.train_fractions]  # as the variants' names show them (plan.py)
        check_value(
            len(set(shown)) == len(shown),
            "train_fractions",
            self.train_fractions,
            "fractions that differ within 6 significant digits",
        )
        check_value(
            set(self.presets) <= set(MODELS.names()),
            "presets",
            self.presets,
            f"keys among {', '.join(MODELS.names())}",
        )
        for name in ("max_epochs", "steps_per_epoch"):
            value = getattr(self, name)
            check_value(value is None or value >= 1, name, value, "an integer >= 1 or null")
        check_value(
            all(0 <= s <= MAX_SEED for s in self.seeds), "seeds", self.seeds, f"integers 0..{MAX_SEED}"
        )
        check_value(
            0 <= self.bootstrap <= MAX_BOOTSTRAP,
            "bootstrap",
            self.bootstrap,
            f"an integer 0..{MAX_BOOTSTRAP}",
        )
        self.tta.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return plain(self.model_dump())


def load_compare_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> CompareConfig:
    """Load a comparison YAML (or the defaults) with dotted-key overrides like {'seeds': [0, 1]}."""
    data, source = read_yaml(path, overrides)
    settings = parse_section(CompareConfig, with_tta_defaults(data, _compare_tta().augment), source)
    try:
        return settings.validate()
    except ConfigValueError as err:  # named by the file or option that gave the value, as a type error is
        where = source.where(tuple(err.key.split(".")))
        raise ConfigValueError(err.key, f"{where}: {err}" if where else str(err)) from None
