import math

import torch

from mtl_meniscus.networks.losses import (
    FixedWeighting,
    UncertaintyWeighting,
    masked_bce,
    task_losses,
    task_mask,
)

NAN = float("nan")


def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_masked_loss_against_hand_values():
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, NAN, NAN], [1.0, 0.0, 1.0], [0.0, NAN, NAN]])
    outputs = {
        "fissure": torch.tensor([2.0, -1.0, 0.5, 3.0]),
        "orientation": torch.tensor([1.0, 9.0, -2.0, -9.0]),  # rows 1 and 3 must not count
        "position": torch.tensor([0.0, 5.0, 1.5, 5.0]),
    }
    expected_fissure = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 1) + _bce(3.0, 0)) / 4
    tears_orientation = _bce(1.0, 1) + _bce(-2.0, 0)  # rows 0 and 2, the tears
    tears_position = _bce(0.0, 0) + _bce(1.5, 1)
    # per image (the default): the tears' sum over all 4 images, the labels' joint log-likelihood
    losses = task_losses(outputs, targets)
    assert math.isclose(losses["fissure"].item(), expected_fissure, rel_tol=1e-6)
    assert math.isclose(losses["orientation"].item(), tears_orientation / 4, rel_tol=1e-6)
    assert math.isclose(losses["position"].item(), tears_position / 4, rel_tol=1e-6)
    total = sum(losses.values()).item()
    per_image = [  # BCE(fissure) + [torn] (BCE(orientation) + BCE(position)), image by image
        _bce(2.0, 1) + _bce(1.0, 1) + _bce(0.0, 0),
        _bce(-1.0, 0),
        _bce(0.5, 1) + _bce(-2.0, 0) + _bce(1.5, 1),
        _bce(3.0, 0),
    ]
    assert math.isclose(total, sum(per_image) / 4, rel_tol=1e-6)
    # per gated row (the earlier default): the tears' mean
    losses = task_losses(outputs, targets, gated_mean="per-gated-row")
    assert math.isclose(losses["fissure"].item(), expected_fissure, rel_tol=1e-6)
    assert math.isclose(losses["orientation"].item(), tears_orientation / 2, rel_tol=1e-6)
    assert math.isclose(losses["position"].item(), tears_position / 2, rel_tol=1e-6)


def test_per_image_mean_ignores_rows_without_a_fissure_label():
    """A row whose fissure label is unknown was never asked "if torn, how?": it is not in the
    gated tasks' denominator either."""
    targets = torch.tensor([[1.0, 1.0, 0.0], [NAN, NAN, NAN], [0.0, NAN, NAN]])
    outputs = {task: torch.tensor([1.0, -3.0, 2.0]) for task in ("fissure", "orientation", "position")}
    losses = task_losses(outputs, targets)
    assert math.isclose(losses["orientation"].item(), _bce(1.0, 1) / 2, rel_tol=1e-6)
    assert math.isclose(losses["fissure"].item(), (_bce(1.0, 1) + _bce(2.0, 0)) / 2, rel_tol=1e-6)


def test_all_negative_batch_gives_zero_connected_loss():
    targets = torch.tensor([[0.0, NAN, NAN], [0.0, NAN, NAN]])
    logits = {t: torch.randn(2, requires_grad=True) for t in ("fissure", "orientation", "position")}
    losses = task_losses(logits, targets)
    assert losses["orientation"].item() == 0 and losses["position"].item() == 0
    total = FixedWeighting(list(logits))(losses)
    assert torch.isfinite(total)
    total.backward()
    assert logits["orientation"].grad is not None and torch.all(logits["orientation"].grad == 0)
    assert torch.all(logits["fissure"].grad != 0)


def test_double_tear_position_is_masked_but_orientation_counts():
    targets = torch.tensor([[1.0, 0.0, NAN]])
    assert task_mask(targets, "orientation").tolist() == [True]
    assert task_mask(targets, "position").tolist() == [False]


def test_pos_weight_scales_positive_rows():
    logits, targets, mask = torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([True])
    assert math.isclose(
        masked_bce(logits, targets, mask, pos_weight=5.0).item(), 5 * _bce(0.3, 1), rel_tol=1e-6
    )


def test_fixed_weights():
    losses = {"fissure": torch.tensor(2.0), "orientation": torch.tensor(3.0)}
    assert FixedWeighting(["fissure", "orientation"], {"orientation": 0.5})(losses).item() == 3.5


def test_uncertainty_weights_are_parameters_the_optimizer_moves():
    weighting = UncertaintyWeighting(["fissure", "orientation"])
    assert len(list(weighting.parameters())) == 2
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    losses = {"fissure": torch.tensor(4.0), "orientation": torch.tensor(0.25)}
    # at s = 0 the total is sum(L_t); d/ds_t = 1/2 - L_t
    assert math.isclose(weighting(losses).item(), 4.25)
    for _ in range(80):
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()
    # optimum exp(-s_t) = 1 / (2 L_t): the high-loss task gets the smaller weight
    weights = weighting.current_weights()
    assert math.isclose(weights["fissure"], 1 / 8.0, rel_tol=0.05)
    assert math.isclose(weights["orientation"], 1 / 0.5, rel_tol=0.05)


def test_the_weighting_owns_the_backward_step_and_reports_its_weights():
    """backward() gives the parameters the gradient of the weighted sum and returns the weights used."""
    shared = torch.tensor(1.5, requires_grad=True)  # stands in for a shared trunk parameter
    losses = {"fissure": 2 * shared, "orientation": shared**2}
    loss, weights = FixedWeighting(["fissure", "orientation"], {"orientation": 0.5}).backward(losses)
    assert weights == {"fissure": 1.0, "orientation": 0.5}
    assert math.isclose(loss.item(), 2 * 1.5 + 0.5 * 1.5**2) and not loss.requires_grad
    assert math.isclose(shared.grad.item(), 2 + 0.5 * 2 * 1.5)  # d/dx (2x + 0.5 x^2)
    weighting = UncertaintyWeighting(["fissure", "orientation"])
    with torch.no_grad():
        weighting.log_vars["fissure"].fill_(math.log(4.0))
    _, weights = weighting.backward({"fissure": torch.tensor(1.0), "orientation": torch.tensor(1.0)})
    assert math.isclose(weights["fissure"], 0.25, rel_tol=1e-6) and weights["orientation"] == 1.0
    assert weighting.log_vars["fissure"].grad is not None


def test_uncertainty_weighting_is_kendalls_classification_form():
    # Kendall et al. 2018 for a classification likelihood: L / sigma^2 + log sigma = exp(-s) L + s / 2
    weighting = UncertaintyWeighting(["fissure", "orientation"])
    with torch.no_grad():
        weighting.log_vars["fissure"].fill_(1.0)
        weighting.log_vars["orientation"].fill_(-1.0)
    losses = {"fissure": torch.tensor(4.0), "orientation": torch.tensor(0.25)}
    expected = math.exp(-1) * 4.0 + 0.5 + math.exp(1) * 0.25 - 0.5
    assert math.isclose(weighting(losses).item(), expected, rel_tol=1e-6)


def test_positive_class_weight_stays_exact_under_bf16_autocast():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.1]).to(torch.bfloat16)  # what autocast hands the loss
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.ones(4, dtype=torch.bool)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), targets, pos_weight=torch.tensor(10.1)
    )
    assert math.isclose(
        masked_bce(logits, targets, mask, pos_weight=10.1).item(), expected.item(), rel_tol=1e-6
    )


def test_validation_loss_has_the_training_losss_mean():
    """history.csv's val_loss is the training loss's masked BCE (per image or per gated row) on
    the validation images, so the two curves of the training figure are on one scale."""
    import numpy as np

    from mtl_meniscus.engine.validation import masked_log_loss
    from mtl_meniscus.labels import DEFAULT_TASKS

    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, NAN, NAN], [1.0, 0.0, 1.0], [0.0, NAN, NAN]])
    logits = {
        "fissure": torch.tensor([2.0, -1.0, 0.5, 3.0]),
        "orientation": torch.tensor([1.0, 9.0, -2.0, -9.0]),
        "position": torch.tensor([0.0, 5.0, 1.5, 5.0]),
    }
    probs = {task: torch.sigmoid(value).numpy().astype(np.float64) for task, value in logits.items()}
    for mean in ("per-image", "per-gated-row"):
        training = sum(task_losses(logits, targets, gated_mean=mean).values()).item()
        validation = masked_log_loss(targets.numpy(), probs, DEFAULT_TASKS, mean)
        assert math.isclose(validation, training, rel_tol=1e-5), mean
    # no scored row (a tear-free validation split for the orientation network): no loss, not 0
    no_tears = targets[[1, 3]].numpy()
    assert math.isnan(masked_log_loss(no_tears, {"orientation": probs["orientation"][[1, 3]]}, DEFAULT_TASKS))


def test_a_run_saved_before_the_per_image_loss_keeps_its_loss(tmp_path):
    """A run folder whose config.yaml predates train.gated_loss_mean trained per gated row: resumed,
    it goes on so, and compare does not take it for a variant of the per-image loss."""
    import pytest
    import yaml
    from support import TINY

    from mtl_meniscus.commands.compare.plan import variant_status
    from mtl_meniscus.config import load_config, saved_run_config
    from mtl_meniscus.errors import MeniscusError

    config = load_config(TINY)
    assert config.train.gated_loss_mean == "per-image"
    saved = config.to_dict()
    del saved["train"]["gated_loss_mean"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert saved_run_config(tmp_path / "config.yaml").train.gated_loss_mean == "per-gated-row"
    with pytest.raises(MeniscusError, match="train.gated_loss_mean: 'per-gated-row' -> 'per-image'"):
        variant_status(tmp_path, config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))  # a run of today
    assert saved_run_config(tmp_path / "config.yaml").train.gated_loss_mean == "per-image"
    assert variant_status(tmp_path, config) == "started"
