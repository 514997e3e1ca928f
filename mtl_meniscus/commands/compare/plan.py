"""Which variants a comparison trains and with which config: the plan, and whether a variant's run folder is done, resumable or from other settings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mtl_meniscus.commands.compare.settings import REGULARIZATION_KEYS, CompareConfig
from mtl_meniscus.config import (
    OWN_TRUNKS,
    SAVED_RUN_DEFAULTS,
    Config,
    config_differences,
    load_config,
    preset_path,
    saved_run_config,
)
from mtl_meniscus.engine.members import run_networks
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.labels import TASKS
from mtl_meniscus.networks.flops import flops_per_image
from mtl_meniscus.networks.models import check_output_contract, create_timm_backbone, trains_per_task

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Variant:
    """One training run of the comparison."""

    mode: str
    trunk: str
    seed: int
    fraction: float = 1.0  # share of the training split it trains on (a learning curve's point)
    roi: str = "none"  # model.roi: where the horn crops come from (none: no crops)
    segmentation: bool = False  # model.segmentation: the decoder as an auxiliary task

    @property
    def group(self) -> str:
        """The variant without its seed: what the table has one row for, e.g.
        'shared-reference-roi_classical-seg-train0.5' (the parts at their defaults left out)."""
        group = f"{self.mode}-{re.sub(r'[^A-Za-z0-9._]+', '_', self.trunk)}"
        group += f"-roi_{self.roi}" if self.roi != "none" else ""
        group += "-seg" if self.segmentation else ""
        return group if self.fraction == 1.0 else f"{group}-train{self.fraction:g}"

    @property
    def name(self) -> str:
        return f"{self.group}-seed{self.seed}"


def plan_variants(compare: CompareConfig) -> list[Variant]:
    """Every (mode, trunk, roi, segmentation, training fraction, seed) as it trains (_trainable),
    each once, seed-major: after the first round every row of the table has a value."""
    planned = [
        _trainable(Variant(mode, trunk, seed, fraction, roi, segmentation))
        for seed in compare.seeds
        for fraction in compare.train_fractions
        for trunk in compare.trunks
        for roi in compare.rois
        for segmentation in compare.segmentation
        for mode in compare.modes
    ]
    return list(dict.fromkeys(planned))  # in order, each once


def _trainable(variant: Variant) -> Variant:
    """The variant as it trains: roi predicted trains the decoder whose horns it crops (the shared
    model's own, the cascade's segmentation network: segmentation on); otherwise the cascade has
    no segmentation (an auxiliary task is the shared model's; planned with segmentation off)."""
    if variant.roi == "predicted":
        return replace(variant, segmentation=True)
    return replace(variant, segmentation=False) if trains_per_task(variant.mode) else variant


def baseline_group(variants: Sequence[Variant]) -> str:
    """The `separate` cascade with the reference trunk (without ROI crops or segmentation where
    there is one); else the first separate group; else the first group without either; else the first."""
    groups = list(dict.fromkeys(v.group for v in variants))
    plain = [v for v in variants if v.roi == "none" and not v.segmentation]
    preferred = [v.group for v in plain if v.mode == "separate" and v.trunk == "reference"]
    preferred += [v.group for v in variants if v.mode == "separate" and v.trunk == "reference"]
    preferred += [v.group for v in plain if v.mode == "separate"]
    preferred += [v.group for v in variants if v.mode == "separate"]
    preferred += [v.group for v in plain]
    return preferred[0] if preferred else groups[0]


def baselines(variants: Sequence[Variant]) -> dict[str, str]:
    """{group: the group it is compared with}: the baseline (baseline_group) among the variants
    trained on the same fraction of the training split."""
    by_fraction: dict[float, list[Variant]] = {}
    for variant in variants:
        by_fraction.setdefault(variant.fraction, []).append(variant)
    return {v.group: baseline_group(by_fraction[v.fraction]) for v in variants}


def variant_config(
    compare: CompareConfig,
    variant: Variant,
    presets: dict[str, Path],
    data_path: str | None,
    wandb_mode: str | None,
    wandb_group: str,
) -> Config:
    """The training config of one variant: its mode's preset with the comparison's settings on top
    (budget, trunk, seed, training fraction; with same_regularization the shared preset's
    REGULARIZATION_KEYS), and for the cascade the steps per epoch its budget gives each network."""
    timm_trunk = variant.trunk not in OWN_TRUNKS
    overrides = {
        "model.name": variant.mode,
        "model.trunk": variant.trunk,
        "model.roi": variant.roi,
        "model.segmentation": variant.segmentation,
        "model.pretrained": compare.pretrained.get(variant.trunk) if timm_trunk else None,
        "train.seed": variant.seed,
        "data.train_fraction": variant.fraction,
        "train.max_epochs": compare.max_epochs,
        "train.steps_per_epoch": compare.steps_per_epoch,
        "data.path": data_path,
        "tta": compare.to_dict()["tta"],
        "wandb.mode": wandb_mode,
        "wandb.group": wandb_group,
        "wandb.job_type": "compare-variant",
    }
    if variant.trunk == "plain":  # the floor starts later than the shared preset's restart epoch (README)
        overrides["train.restart_if_at_chance_after"] = 0
    if compare.phantom_difficulty:
        overrides["data.phantom_difficulty"] = compare.phantom_difficulty
    if compare.same_regularization:
        overrides |= regularization_of(_shared_config(compare, variant, presets, overrides))
    config = load_config(presets[variant.mode], overrides)
    if compare.budget != "per-network" and trains_per_task(variant.mode):
        steps = config.train.steps_per_epoch
        if compare.budget == "equal-images":
            # the classifiers share the steps; a segmentation network (roi predicted) trains as many
            # as each, as the shared model's decoder learns from the shared model's own images
            overrides["train.steps_per_epoch"] = steps_per_network(steps, len(config.model.tasks))
        else:
            shared = _shared_config(compare, variant, presets, overrides)
            overrides["train.steps_per_epoch"] = flops_matched_steps(
                shared.train.steps_per_epoch * shared.train.batch_size,
                training_flops(shared),
                training_flops(config),
                config.train.batch_size,
            )
        config = load_config(presets[variant.mode], overrides)
    return config


def _shared_config(compare: CompareConfig, variant: Variant, presets: dict[str, Path], overrides) -> Config:
    """The shared model's config for this variant's trunk and budget: the reference compute budget
    (equal-flops) and regularization (same_regularization) the other modes are matched to."""
    shared = dict(overrides, **{"model.name": "shared"})
    return load_config(presets.get("shared") or preset_path("shared"), shared)


def regularization_of(config: Config) -> dict[str, Any]:
    """{key: value} of REGULARIZATION_KEYS in `config` (sections such as 'augment' whole)."""
    values = config.to_dict()
    out = {}
    for key in REGULARIZATION_KEYS:
        section, _, name = key.partition(".")
        out[key] = values[section][name] if name else values[section]
    return out


def training_flops(config: Config) -> dict[str, float]:
    """{network: FLOPs of one training image (forward and backward)} of the networks the config's
    run trains, counted by networks.flops (timm trunks built without their weights). A plug-in
    that breaks the model contract is named first, as train names it, not by a traceback here."""
    check_output_contract(config.model, config.data.image_size)
    model = config.model
    if model.trunk not in OWN_TRUNKS:
        model = model.model_copy(update={"pretrained": "none"})
    return {
        network: flops_per_image(built, model.in_chans, config.data.image_size, training=True)
        for network, built in run_networks(model)
    }


def flops_matched_steps(
    shared_images: int, shared: dict[str, float], cascade: dict[str, float], batch_size: int
) -> int:
    """Budget 'equal-flops': steps per epoch of each cascade network (at `batch_size`) such that the
    networks together cost what the shared model's `shared_images` per epoch cost: shared_images x
    F_shared / (batch_size x the networks' summed F), rounded to the nearest step, at least one."""
    return max(1, round(shared_images * sum(shared.values()) / (batch_size * sum(cascade.values()))))


def steps_per_network(steps_per_epoch: int, networks: int = len(TASKS)) -> int:
    """Budget 'equal-images': the cascade's networks (one per task) share the shared model's steps.

    Each network keeps the epochs (so all validate and stop on the same schedule) and trains
    steps_per_epoch / networks steps of each, rounded to the nearest step, at least one.
    """
    return max(1, round(steps_per_epoch / networks))


def parse_list(text: str, option: str, kind: type = str) -> list:
    """'a,b,c' -> ['a', 'b', 'c'] (or ints), with a message naming the option on bad input."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise ConfigError(
            f"{option}: {text!r} is not a comma-separated list of {kind.__name__} values"
        ) from None
    if not values:
        raise ConfigError(f"{option}: empty list")
    return values


def parse_on_off(text: str, option: str) -> list[bool]:
    """'off,on' -> [False, True], with a message naming the option on bad input."""
    values = parse_list(text, option)
    unknown = [value for value in values if value not in ("off", "on")]
    if unknown:
        raise ConfigError(f"{option}: {', '.join(unknown)} (allowed: off, on)")
    return [value == "on" for value in values]


def parse_pretrained(values: Sequence[str], trunks: Sequence[str]) -> dict[str, str]:
    """--pretrained options: 'TRUNK=WEIGHTS' for one timm trunk, or 'WEIGHTS' for every timm trunk.

    WEIGHTS is 'default' (timm's weights, from the local cache), 'none' or a file.
    """
    timm_trunks = [t for t in trunks if t not in OWN_TRUNKS]
    out: dict[str, str] = {}
    for value in values:
        trunk, sep, weights = value.partition("=")
        if not sep and value in OWN_TRUNKS:
            raise ConfigError(
                f"--pretrained {value!r}: this package's trunks start from random weights; --pretrained "
                "gives a timm trunk's weights (TRUNK=WEIGHTS)"
            )
        if not sep and value in trunks and not Path(value).is_file():  # a trunk without its weights
            raise ConfigError(
                f"--pretrained {value!r}: a trunk's name; give TRUNK=WEIGHTS (e.g. {value}=/path/to/weights.pth, "
                f"{value}=default, {value}=none) or WEIGHTS for every timm trunk"
            )
        if not sep:
            out.update({t: value for t in timm_trunks})
        elif trunk in timm_trunks:
            out[trunk] = weights
        else:
            raise ConfigError(
                f"--pretrained {value!r}: {trunk!r} is not a timm trunk of this comparison "
                f"(trunks: {', '.join(trunks)})"
            )
    return out


def variant_status(run_dir: Path, config: Config) -> str:
    """'scored', 'trained', 'started' or 'new'; a folder holding another config is an error."""
    if not (run_dir / "config.yaml").is_file():
        return "new"
    path = run_dir / "config.yaml"
    # read as a resumed run reads it: a key added to the config since (e.g. model.roi) takes its
    # default, or the value the run trained with where the default changed (train.gated_loss_mean)
    saved = saved_run_config(path).to_dict()
    differences = config_differences(saved, config.to_dict())
    if _moved_data(saved["data"]["path"], run_dir):
        # The data folder moved (or the comparison came from another machine) and a scored
        # variant needs only its predictions, which are checked against this data's test split
        # (images and labels) before they count: the path alone must not cost its training.
        differences = [d for d in differences if not d.startswith("data.path:")]
    if differences:
        # a key whose default changed since: "the same options" are not enough to keep the variant
        defaults = [f"{section}.{key}" for section, key in SAVED_RUN_DEFAULTS]
        changed = [key for key in defaults if any(d.startswith(f"{key}:") for d in differences)]
        advice = (
            f"; {', '.join(changed)}: unless you changed it, its default did since this variant "
            "trained: set its earlier value in the comparison's config (--config) to keep the variant"
            if changed
            else ""
        )
        raise MeniscusError(
            f"{run_dir} was trained with other settings ({'; '.join(differences[:4])}"
            f"{'; ...' if len(differences) > 4 else ''}){advice}; rerun with the same options or use "
            "another --out"
        )
    if (run_dir / RESULT_FILE).is_file():
        return "scored"
    return "trained" if (run_dir / "metrics.json").is_file() else "started"


def _moved_data(saved_path: str | None, run_dir: Path) -> bool:
    """Whether a scored variant's data folder is gone from where it was trained (moved, or on
    another machine). An old folder that is still there may differ from the new one: refused."""
    return bool(saved_path) and not Path(saved_path).exists() and (run_dir / RESULT_FILE).is_file()


def check_pretrained_weights(configs: Sequence[Config]) -> None:
    """Build each timm trunk once with its weights before any training: a missing weights file
    stops the comparison now, not after hours of other variants."""
    checked = set()
    for config in configs:
        model = config.model
        key = (model.trunk, model.pretrained, model.in_chans)
        if model.trunk not in OWN_TRUNKS and key not in checked:
            create_timm_backbone(model.trunk, model.in_chans, model.pretrained)
            checked.add(key)
