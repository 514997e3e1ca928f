"""Metrics (evaluation/metrics.py): masked task AUCs, the challenge score, threshold counts, bootstrap
intervals and DeLong's test, against hand values and scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from mtl_meniscus.evaluation.metrics import (
    binary_auc,
    binary_counts,
    bootstrap_cis,
    challenge_score,
    delong_test,
    monitor_score,
    task_aucs,
    youden_threshold,
)
from mtl_meniscus.labels import DEFAULT_TASKS

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


def test_binary_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for n in (4, 31, 250):
        y = (rng.random(n) < 0.3).astype(int)
        y[:2] = (1, 0)
        p = np.round(rng.random(n), 1)  # many ties
        assert math.isclose(binary_auc(y, p), roc_auc_score(y, p), abs_tol=1e-12)


def _per_task_bootstrap_by_hand(y, p, n_resamples, seed):
    """Reference: resample positives and negatives separately, AUC by scikit-learn, 95% percentiles."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values = []
    for _ in range(n_resamples):
        rows = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values.append(roc_auc_score(y[rows], p[rows]))
    return np.percentile(values, [2.5, 97.5])


def test_bootstrap_ci_of_a_rare_class_matches_a_per_task_stratified_bootstrap():
    # 28 tears of which 3 anterior (as in the phantom's test split), a position AUC of about 0.7.
    # Stratified on the joint label, strata of 1 and 2 tears were drawn unchanged in every resample
    # and the interval came out far too narrow (0.57-0.81 where this gives about 0.36-0.97).
    n = 112
    fissure = np.zeros(n)
    fissure[:28] = 1
    orientation = np.full(n, NAN)
    orientation[:28] = np.arange(28) % 5 < 3
    position = np.full(n, NAN)
    position[:28] = 0
    position[[0, 1, 3]] = 1  # anterior: two horizontal tears and one vertical
    targets = np.stack([fissure, orientation, position], axis=1)
    rng = np.random.default_rng(7)
    probs = {
        "fissure": np.clip(fissure * 0.4 + rng.random(n) * 0.6, 0, 1),
        "orientation": rng.random(n),
        "position": rng.random(n),
    }
    probs["position"][[0, 1, 3]] = (0.95, 0.75, 0.4)  # AUC about 0.7; the lone vertical one scores low
    cis = bootstrap_cis(targets, probs, n_resamples=3000, seed=0)
    tears = fissure == 1
    by_hand = _per_task_bootstrap_by_hand(position[tears], probs["position"][tears], 3000, seed=1)
    low, high = cis["position"]
    assert abs(low - by_hand[0]) < 0.05 and abs(high - by_hand[1]) < 0.05
    assert high - low > 0.4  # three positives: a wide interval


def test_bootstrap_ci_coverage_of_a_known_auc():
    # Scores of positives ~ N(d, 1), negatives ~ N(0, 1): the true AUC is Phi(d / sqrt(2)).
    d = 1.2
    true_auc = 0.5 * math.erfc(-d / 2)  # Phi(d / sqrt 2)
    rng = np.random.default_rng(11)
    draws, covered = 200, 0
    n_pos, n_neg = 12, 48
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    targets = np.stack([y, np.full_like(y, NAN), np.full_like(y, NAN)], axis=1)
    for _ in range(draws):
        scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        low, high = bootstrap_cis(
            targets, {"fissure": scores}, n_resamples=300, seed=int(rng.integers(1 << 30))
        )["fissure"]
        covered += low <= true_auc <= high
    assert 0.89 <= covered / draws <= 0.99


def test_delong_on_a_hand_computed_example():
    # Placement values by hand: A: positives (1, 1, 1/2), negatives (2/3, 1); B: (1, 0, 1), (2/3, 2/3).
    # AUC_A = 5/6, AUC_B = 2/3; Var = (1/12 + 1/3 + 2 * 1/12) / 3 + (1/18) / 2 = 2/9.
    y = np.array([1, 1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.3])
    b = np.array([0.7, 0.2, 0.8, 0.5, 0.6])
    result = delong_test(y, a, b)
    assert math.isclose(result["auc_a"], 5 / 6) and math.isclose(result["auc_b"], 2 / 3)
    assert math.isclose(result["se"], math.sqrt(2 / 9))
    assert math.isclose(result["z"], 1 / (2 * math.sqrt(2)))
    assert math.isclose(result["p_value"], math.erfc(0.25))
    assert math.isclose(result["auc_a"], roc_auc_score(y, a)) and math.isclose(
        result["auc_b"], roc_auc_score(y, b)
    )
    same = delong_test(y, a, a)
    assert same["z"] == 0 and same["p_value"] == 1
    assert math.isnan(delong_test(np.ones(3), a[:3], b[:3])["p_value"])


def test_delong_leaves_p_undefined_with_a_single_image_of_a_class():
    # One positive: its placement values' spread (half of the variance) cannot be estimated; taken
    # as 0 it made p < 0.05 in most draws with no true difference. AUCs stay defined (sklearn's).
    y = np.array([1, 0, 0, 0, 0, 0])
    a = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    b = np.array([0.35, 0.1, 0.2, 0.3, 0.4, 0.5])
    result = delong_test(y, a, b)
    assert result["auc_a"] == roc_auc_score(y, a) and result["auc_b"] == roc_auc_score(y, b)
    assert math.isclose(result["difference"], 1 - 0.6)
    assert all(math.isnan(result[key]) for key in ("se", "z", "p_value"))
    assert math.isnan(delong_test(1 - y, a, b)["p_value"])  # a single negative alike


def test_challenge_score_keeps_the_auc_scale_with_an_extra_scored_task():
    from mtl_meniscus.labels import Task

    tasks = DEFAULT_TASKS.extended(
        [Task("displaced", {"yes": 1.0, "no": 0.0}, gated_by="fissure", weight=0.2)]
    )
    aucs = {"fissure": 0.9, "orientation": 0.8, "position": 0.7, "displaced": 0.6}
    by_hand = (0.4 * 0.9 + 0.3 * 0.8 + 0.3 * 0.7 + 0.2 * 0.6) / 1.2
    assert math.isclose(challenge_score(aucs, tasks), by_hand)
    assert math.isclose(challenge_score(dict.fromkeys(aucs, 1.0), tasks), 1.0)
    assert math.isclose(challenge_score(dict.fromkeys(aucs, 0.5), tasks), 0.5)


def test_the_score_interval_is_undefined_with_the_score_when_a_scored_task_is_not_predicted():
    rng = np.random.default_rng(2)
    fissure = (rng.random(80) < 0.4).astype(float)
    orientation = np.where(fissure == 1, (rng.random(80) < 0.5).astype(float), NAN)
    targets = np.stack([fissure, orientation, orientation], axis=1)
    probs = {"fissure": fissure + rng.random(80), "orientation": rng.random(80)}  # no position
    cis = bootstrap_cis(targets, probs, n_resamples=50, seed=0)
    assert math.isnan(challenge_score(task_aucs(targets, probs)))
    assert all(math.isnan(end) for end in cis["score"])
    assert all(math.isfinite(end) for end in cis["fissure"])


def test_seeds_and_images_interval_never_takes_an_undefined_image_error_for_zero():
    from scipy import stats

    from mtl_meniscus.evaluation.metrics import seeds_and_images_interval

    seeds = np.array([0.80, 0.85, 0.90])
    half = stats.t.ppf(0.975, 2) * seeds.std(ddof=1) / math.sqrt(3)
    # no bootstrap asked for: the seeds' t-interval
    assert seeds_and_images_interval(seeds, np.array([])) == pytest.approx((0.85 - half, 0.85 + half))
    # resampled, but no resample defined: unknown, not the seeds' interval
    assert all(math.isnan(end) for end in seeds_and_images_interval(seeds, np.full(1000, NAN)))


def test_the_paired_cluster_test_gives_delongs_answer_when_both_models_are_perfect():
    from mtl_meniscus.evaluation.metrics import paired_cluster_test

    y = np.array([1, 1, 0, 0, 1, 0], dtype=float)
    perfect = y + 0.1
    cluster = paired_cluster_test(y, perfect, 2 * perfect, [f"p{k}" for k in range(6)], n_resamples=50)
    delong = delong_test(y, perfect, 2 * perfect)
    assert (cluster["z"], cluster["p_value"]) == (delong["z"], delong["p_value"]) == (0.0, 1.0)


def test_youden_threshold_of_a_model_no_cut_helps_keeps_the_j_it_claims():
    # Scores that rank every negative above every positive: no cut beats J = 0. The cut returned
    # must give J = 0 when applied (p >= cut), not the +inf cut turned into 1.0, which calls the
    # p = 1.0 negative positive (J = -0.5).
    y, p = np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.9, 1.0])
    cut = youden_threshold(y, p)
    counts = binary_counts(y, p, cut)
    assert counts["sensitivity"] + counts["specificity"] - 1 == 0


def test_threshold_metrics_against_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(int)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    counts = binary_counts(y, p, 0.5)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    assert (counts["tp"], counts["fp"], counts["tn"], counts["fn"]) == (tp, fp, tn, fn)
    assert math.isclose(counts["sensitivity"], tp / (tp + fn)) and math.isclose(
        counts["specificity"], tn / (tn + fp)
    )
    t = youden_threshold(y, p)
    best = max(
        binary_counts(y, p, c)["sensitivity"] + binary_counts(y, p, c)["specificity"] for c in np.unique(p)
    )
    at_t = binary_counts(y, p, t)
    assert math.isclose(at_t["sensitivity"] + at_t["specificity"], best)


def _synthetic(n, seed):
    rng = np.random.default_rng(seed)
    fissure = (rng.random(n) < 0.3).astype(float)
    orientation = np.where(fissure == 1, (rng.random(n) < 0.6).astype(float), np.nan)
    position = np.where(fissure == 1, (rng.random(n) < 0.3).astype(float), np.nan)
    targets = np.stack([fissure, orientation, position], axis=1)
    noise = lambda: rng.normal(0, 1.0, n)  # noqa: E731
    probs = {
        "fissure": 1 / (1 + np.exp(-(2 * fissure - 1 + noise()))),
        "orientation": 1 / (1 + np.exp(-(2 * np.nan_to_num(orientation) - 1 + noise()))),
        "position": 1 / (1 + np.exp(-(2 * np.nan_to_num(position) - 1 + noise()))),
    }
    return targets, probs


def test_bootstrap_ci_covers_the_estimate_and_narrows_with_more_data():
    targets, probs = _synthetic(300, 0)
    cis = bootstrap_cis(targets, probs, n_resamples=300, seed=0)
    tears = targets[:, 0] == 1
    point = {
        "fissure": roc_auc_score(targets[:, 0], probs["fissure"]),
        "orientation": roc_auc_score(targets[tears, 1], probs["orientation"][tears]),
    }
    for task, value in point.items():
        low, high = cis[task]
        assert low < value < high
    big_targets, big_probs = _synthetic(3000, 0)
    big = bootstrap_cis(big_targets, big_probs, n_resamples=300, seed=0)
    for task in ("fissure", "orientation", "position", "score"):
        assert big[task][1] - big[task][0] < 0.6 * (cis[task][1] - cis[task][0])
    assert bootstrap_cis(targets, probs, n_resamples=50, seed=4) == bootstrap_cis(
        targets, probs, n_resamples=50, seed=4
    )


def _clustered_draw(rng, patients=30, slices=20, delta=1.0, sd_patient=1.0, sd_slice=0.5):
    """Slices of a knee share its label and a patient effect: scores correlated within a patient.
    The population AUC of a slice of a torn knee against one of a healthy knee is
    Phi(delta / sqrt(2 (sd_patient^2 + sd_slice^2)))."""
    label = np.repeat(np.arange(patients) % 2, slices).astype(float)
    effect = np.repeat(rng.normal(0, sd_patient, patients), slices)
    score = delta * label + effect + rng.normal(0, sd_slice, patients * slices)
    targets = np.full((len(label), 3), np.nan)
    targets[:, 0] = label
    return targets, {"fissure": score}, [f"p{k}" for k in np.repeat(np.arange(patients), slices)]


@pytest.mark.slow  # 200 x 2 bootstraps, ~10 s
def test_the_cluster_bootstrap_covers_the_true_auc_where_slices_share_a_patient():
    from scipy.stats import norm

    true_auc = norm.cdf(1.0 / np.sqrt(2 * (1.0**2 + 0.5**2)))
    covered = {"rows": 0, "patients": 0}
    rng = np.random.default_rng(0)
    for k in range(200):  # 200 simulated test sets of 30 knees x 20 slices
        targets, probs, patients = _clustered_draw(rng)
        for unit, groups in (("rows", None), ("patients", patients)):
            low, high = bootstrap_cis(targets, probs, 200, seed=k, groups=groups)["fissure"]
            covered[unit] += low <= true_auc <= high
    assert covered["patients"] / 200 >= 0.90
    assert covered["rows"] / 200 < 0.60  # slices taken as independent: far too narrow


def test_one_row_per_patient_gives_the_unclustered_intervals_exactly():
    rng = np.random.default_rng(1)
    targets, probs, _ = _clustered_draw(rng, patients=80, slices=1)
    targets[:, 1] = np.where(targets[:, 0] == 1, rng.integers(0, 2, len(targets)), np.nan)
    probs["orientation"] = rng.random(len(targets))
    alone = bootstrap_cis(targets, probs, 300, seed=4)
    grouped = bootstrap_cis(targets, probs, 300, seed=4, groups=[f"id{k}" for k in range(80)])
    np.testing.assert_equal(grouped, alone)  # NaNs equal: the score (no position predicted) in both


def test_the_paired_cluster_test_agrees_with_delong_when_every_row_is_a_patient():
    from mtl_meniscus.evaluation.metrics import delong_test, paired_cluster_test

    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.4).astype(float)
    a, b = y + rng.normal(0, 1.0, 300), y + rng.normal(0, 1.4, 300)
    delong = delong_test(y, a, b)
    cluster = paired_cluster_test(y, a, b, [f"p{k}" for k in range(300)], n_resamples=2000, seed=1)
    assert cluster["difference"] == pytest.approx(delong["difference"])
    assert cluster["z"] == pytest.approx(delong["z"], rel=0.15)


@pytest.mark.slow  # 100 simulated test sets x 200 resamples, ~6 s
def test_the_paired_cluster_test_keeps_its_level_where_delong_does_not():
    from mtl_meniscus.evaluation.metrics import delong_test, paired_cluster_test

    rejected = {"delong": 0, "cluster": 0}
    rng = np.random.default_rng(0)
    for k in range(100):  # no true difference; a knee effect that the two models share and see apart
        targets, _, patients = _clustered_draw(rng, patients=20, slices=10)
        y = targets[:, 0]
        knee_a, knee_b = (np.repeat(rng.normal(0, 1.0, 20), 10) for _ in range(2))
        a = y + knee_a + rng.normal(0, 0.3, len(y))
        b = y + knee_b + rng.normal(0, 0.3, len(y))
        rejected["delong"] += delong_test(y, a, b)["p_value"] < 0.05
        rejected["cluster"] += (
            paired_cluster_test(y, a, b, patients, n_resamples=200, seed=k)["p_value"] < 0.05
        )
    assert rejected["cluster"] <= 12  # about 5 of 100 expected
    assert rejected["delong"] >= 2 * rejected["cluster"]  # slices taken as independent: far more
