import math

import numpy as np
from sklearn.metrics import roc_auc_score

from mtl_meniscus.metrics import binary_auc, challenge_score, monitor_score, task_aucs

NAN = float("nan")


def test_task_aucs_mask_orientation_and_position_to_true_tears():
    rng = np.random.default_rng(0)
    n = 200
    fissure = (rng.random(n) < 0.3).astype(float)
    orientation = np.where(fissure == 1, (rng.random(n) < 0.6).astype(float), NAN)
    position = np.where(fissure == 1, (rng.random(n) < 0.2).astype(float), NAN)
    targets = np.stack([fissure, orientation, position], axis=1)
    probs = {t: rng.random(n) for t in ("fissure", "orientation", "position")}
    aucs = task_aucs(targets, probs)
    tears = fissure == 1
    assert math.isclose(aucs["fissure"], roc_auc_score(fissure, probs["fissure"]))
    assert math.isclose(aucs["orientation"], roc_auc_score(orientation[tears], probs["orientation"][tears]))
    assert math.isclose(aucs["position"], roc_auc_score(position[tears], probs["position"][tears]))


def test_one_class_subset_is_undefined_not_a_crash():
    assert math.isnan(binary_auc(np.ones(5), np.linspace(0, 1, 5)))


def test_challenge_score_on_known_aucs():
    aucs = {"fissure": 0.9222, "orientation": 0.9230, "position": 0.8214}
    assert math.isclose(challenge_score(aucs), 0.4 * 0.9222 + 0.3 * 0.9230 + 0.3 * 0.8214)
    assert math.isnan(challenge_score({"fissure": 0.9, "orientation": NAN, "position": 0.8}))


def test_monitor_score_renormalises_over_defined_tasks():
    assert math.isclose(monitor_score({"orientation": 0.8}), 0.8)
    assert math.isclose(monitor_score({"fissure": 1.0, "position": 0.5}), (0.4 + 0.15) / 0.7)
    assert math.isnan(monitor_score({"position": NAN}))
