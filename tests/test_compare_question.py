"""What makes `compare` answer its question: an interval that holds with few seeds (checked by
simulation), FLOPs counted by PyTorch's counter (checked against a hand count), budgets of equal
images or equal FLOPs, nested training subsets for learning curves, the "still improving" flag and
--same-regularization."""

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from mtl_meniscus.commands.compare.plan import (
    Variant,
    baselines,
    flops_matched_steps,
    plan_variants,
    regularization_of,
    training_flops,
    variant_config,
)
from mtl_meniscus.commands.compare.settings import REGULARIZATION_KEYS, CompareConfig
from mtl_meniscus.commands.compare.statistics import still_improving
from mtl_meniscus.config import load_config
from mtl_meniscus.data.splits import UNUSED, nested_training_subset, stratified_group_split
from mtl_meniscus.evaluation.metrics import seeds_and_images_interval
from mtl_meniscus.networks.flops import flops_per_image

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"separate": ROOT / "configs" / "separate.yaml", "shared": ROOT / "configs" / "shared.yaml"}


# ---- the interval --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_seeds", [3, 5, 10])
@pytest.mark.parametrize("seed_sd", [0.01, 0.05, 0.15])
def test_no_true_difference_is_significant_in_at_most_6_percent(n_seeds, seed_sd):
    """500 comparisons with no true difference, through the package's interval: each seed's
    difference is its own training noise (sd seed_sd) plus the test set's draw, shared by all seeds
    (sd 0.02), which the image bootstrap sees as the spread of its resamples."""
    rng = np.random.default_rng([n_seeds, int(seed_sd * 1000)])
    image_sd, significant = 0.02, 0
    for _ in range(500):
        test_set_effect = rng.normal(0, image_sd)
        deltas = rng.normal(0, seed_sd, n_seeds) + test_set_effect
        image_resamples = deltas.mean() + rng.normal(0, image_sd, 200)  # the bootstrap around it
        low, high = seeds_and_images_interval(deltas, image_resamples)
        significant += not low <= 0 <= high
    # at most 6%, and not an interval so wide that nothing is ever significant (conservative: the
    # seeds' spread on one test set also holds some image noise, which the bootstrap adds again)
    assert 0.005 <= significant / 500 <= 0.06


def test_a_resampled_mean_of_three_seeds_was_too_narrow_and_the_t_interval_is_not():
    """The old interval (a bootstrap of the seeds) cannot leave the range of three values; the
    t-interval over seeds can and does."""
    per_seed = np.array([0.90, 0.92, 0.97])
    low, high = seeds_and_images_interval(per_seed, np.full(100, per_seed.mean()))
    assert low < per_seed.min() and high > per_seed.max()
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / np.sqrt(3)  # by hand: no image error here
    assert (low, high) == pytest.approx((per_seed.mean() - half, per_seed.mean() + half))
    assert np.isnan(seeds_and_images_interval(np.array([0.9]), np.full(10, 0.9))[0])  # one seed: no interval


# ---- FLOPs and budgets ---------------------------------------------------------------------------


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        return {"fissure": self.conv(x).mean(dim=(1, 2, 3))}


def test_flops_of_a_convolution_match_a_hand_count():
    # Forward: 2 FLOPs per multiply-add, one per output value and input value under the kernel:
    # 2 x Cout x H x W x Cin x k x k = 2 x 8 x 16 x 16 x 2 x 3 x 3.
    forward = 2 * 8 * 16 * 16 * 2 * 3 * 3
    assert flops_per_image(_Conv(), 2, 16) == forward
    # Training: the weight's gradient costs another convolution of the same size; the input needs
    # none (it is the data), so a training image costs twice the forward pass here.
    assert flops_per_image(_Conv(), 2, 16, training=True) == 2 * forward


def test_equal_flops_gives_the_cascade_the_shared_models_training_flops():
    compare = CompareConfig(budget="equal-flops", max_epochs=2, steps_per_epoch=60).validate()
    configs = {
        v.mode: variant_config(compare, v, PRESETS, "/data", None, "g") for v in plan_variants(compare)[:2]
    }
    shared, cascade = training_flops(configs["shared"]), training_flops(configs["separate"])
    assert set(cascade) == {"fissure", "orientation", "position"} and set(shared) == {"shared"}
    steps = configs["separate"].train.steps_per_epoch
    batch = configs["shared"].train.batch_size
    assert steps == flops_matched_steps(60 * batch, shared, cascade, batch) < 20  # fewer than equal images
    # another batch size for the cascade: as many images' worth of FLOPs, so steps x batch stays put
    assert flops_matched_steps(60 * batch, shared, cascade, 2 * batch) == round(steps / 2)
    per_epoch_shared = 60 * batch * shared["shared"]
    per_epoch_cascade = steps * batch * sum(cascade.values())
    assert per_epoch_cascade == pytest.approx(per_epoch_shared, rel=0.5 / steps)  # up to rounding a step
    # the counter, not a hand formula: the same model counted again gives the same number
    model = configs["shared"].model
    from mtl_meniscus.networks.models import build_model

    assert flops_per_image(build_model(model), model.in_chans, 256, training=True) == shared["shared"]


def test_a_segmenting_networks_training_flops_count_its_decoder():
    """A training step of a segmenting network runs and trains its decoder (trainer's
    SegmentationTraining); inference does not (forward never runs it)."""
    from mtl_meniscus.networks.models import build_model

    tiny = ROOT / "configs" / "tiny.yaml"
    plain, segmenting = (
        build_model(load_config(tiny, {"model.segmentation": on}).model) for on in (False, True)
    )
    assert flops_per_image(segmenting, 2, 64) == flops_per_image(plain, 2, 64)
    assert flops_per_image(segmenting, 2, 64, training=True) > flops_per_image(plain, 2, 64, training=True)


def test_same_regularization_makes_the_modes_differ_in_sharing_only():
    compare = CompareConfig(same_regularization=True).validate()
    configs = {
        v.mode: variant_config(compare, v, PRESETS, "/data", None, "g") for v in plan_variants(compare)[:2]
    }
    assert regularization_of(configs["separate"]) == regularization_of(configs["shared"])
    assert configs["separate"].model.conv_dropout == load_config(PRESETS["shared"]).model.conv_dropout == 0.0
    assert configs["separate"].model.kernels != configs["shared"].model.kernels  # the architecture stays
    assert "augment" in REGULARIZATION_KEYS
    shared_restart = load_config(PRESETS["shared"]).train.restart_if_at_chance_after
    assert configs["separate"].train.restart_if_at_chance_after == shared_restart > 0  # restarts alike
    default = CompareConfig().validate()
    plain = {
        v.mode: variant_config(default, v, PRESETS, "/data", None, "g") for v in plan_variants(default)[:2]
    }
    assert regularization_of(plain["separate"]) != regularization_of(plain["shared"])


# ---- learning curves -----------------------------------------------------------------------------


def test_training_subsets_are_nested_stratified_and_patient_grouped():
    rng = np.random.default_rng(0)
    n = 600
    patients = [f"p{k // 3}" for k in range(n)]  # three rows per patient
    per_patient = rng.choice(["none", "tear-h", "tear-v"], size=n // 3)
    strata = [str(per_patient[k // 3]) for k in range(n)]  # a patient's rows share its stratum
    splits = stratified_group_split(strata, seed=1, groups=patients)
    subsets = {
        f: nested_training_subset(splits, strata, f, seed=4, groups=patients) for f in (0.1, 0.25, 0.5, 1.0)
    }
    train = {f: {k for k, s in enumerate(subset) if s == "train"} for f, subset in subsets.items()}
    assert train[0.1] < train[0.25] < train[0.5] < train[1.0]  # nested
    for f, subset in subsets.items():
        assert [s for s in subset if s in ("val", "test")] == [s for s in splits if s in ("val", "test")]
        kept = {patients[k] for k in train[f]}
        left = {patients[k] for k, s in enumerate(subset) if s == UNUSED}
        assert not kept & left  # a patient is kept or left out whole
        for stratum in ("none", "tear-h", "tear-v"):  # each stratum keeps its share of patients
            in_stratum = {patients[k] for k in train[1.0] if strata[k] == stratum}
            assert len({patients[k] for k in train[f] if strata[k] == stratum}) == max(
                1, round(f * len(in_stratum))
            )


def test_each_training_share_is_compared_with_the_cascade_on_the_same_share():
    compare = CompareConfig(train_fractions=(0.25, 1.0), seeds=(0,)).validate()
    variants = plan_variants(compare)
    assert [v.name for v in variants] == [
        "separate-reference-train0.25-seed0",
        "shared-reference-train0.25-seed0",
        "separate-reference-seed0",
        "shared-reference-seed0",
    ]
    assert baselines(variants) == {
        "separate-reference-train0.25": "separate-reference-train0.25",
        "shared-reference-train0.25": "separate-reference-train0.25",
        "separate-reference": "separate-reference",
        "shared-reference": "separate-reference",
    }
    config = variant_config(compare, Variant("shared", "reference", 0, 0.25), PRESETS, "/data", None, "g")
    assert config.data.train_fraction == 0.25


# ---- converged or flagged ------------------------------------------------------------------------


def test_a_best_epoch_in_the_last_fifth_of_the_budget_is_still_improving():
    def result(best_epoch, epochs, budget=20):
        return {"max_epochs": budget, "best": {"fissure": {"best_epoch": best_epoch, "epochs": epochs}}}

    assert still_improving(result(18, 20))
    assert not still_improving(result(16, 20))  # not in the last 20%
    assert not still_improving(result(12, 18))  # stopped early: it had stopped improving
    assert not still_improving({"best": {"fissure": {"best_epoch": 20, "epochs": 20}}})  # no budget recorded
    cascade = result(5, 20) | {
        "best": {"fissure": {"best_epoch": 5, "epochs": 20}, "position": {"best_epoch": 19, "epochs": 20}}
    }
    assert still_improving(cascade)  # any network
