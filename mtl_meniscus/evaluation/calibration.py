"""Calibration: how far predicted probabilities are from observed frequencies, and temperature scaling.

A model is calibrated when, of the images it gives probability ~0.8, about 80% are positive. The
Youden threshold and the cascade's gating act on probabilities, so a user reading them as chances
needs to know how far off they are:
- Brier score: mean squared difference between probability and label (0 is perfect; always
  predicting the prevalence p scores p(1 - p)).
- Expected calibration error (ECE): the images are put in `n_bins` equal-width probability bins;
  ECE = sum over bins of (bin's share of images) x |observed positive rate - mean probability|.
- Temperature scaling (Guo et al., 2017): one scalar T > 0 per task divides the network's logits,
  p = sigmoid(logit / T), fitted by minimising the negative log-likelihood on the validation split.
  T > 1 softens an over-confident model; the order of the images, and so every AUC, is unchanged.
  With test-time augmentation the probability is the mean over the copies of sigmoid(logit_k / T),
  so T is fitted on exactly the quantity it is applied to.
"""

from __future__ import annotations

import math

import numpy as np

TEMPERATURE_RANGE = (0.05, 20.0)  # the search interval; a fitted T at an end says the fit is degenerate
_EPS = 1e-12  # keeps log() finite for probabilities of exactly 0 or 1


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean of (p - y)^2; NaN for no rows."""
    y, p = np.asarray(y_true, float), np.asarray(y_prob, float)
    return float(np.mean((p - y) ** 2)) if len(y) else math.nan


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin of [0, 1]: its edges, number of images, mean probability and observed
    positive rate (None for an empty bin). A probability of exactly 1 falls in the last bin."""
    y, p = np.asarray(y_true, float), np.asarray(y_prob, float)
    which = np.clip((p * n_bins).astype(int), 0, n_bins - 1)  # (N,) bin index of every image
    bins = []
    for k in range(n_bins):
        inside = which == k
        n = int(inside.sum())
        bins.append(
            {
                "low": k / n_bins,
                "high": (k + 1) / n_bins,
                "n": n,
                "mean_probability": float(p[inside].mean()) if n else None,
                "positive_rate": float(y[inside].mean()) if n else None,
            }
        )
    return bins


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """sum_b (n_b / N) |positive rate_b - mean probability_b| over non-empty equal-width bins."""
    n = len(y_true)
    if not n:
        return math.nan
    return float(
        sum(
            b["n"] / n * abs(b["positive_rate"] - b["mean_probability"])
            for b in reliability_bins(y_true, y_prob, n_bins)
            if b["n"]
        )
    )


def calibration_summary(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> dict:
    """Brier score, ECE and the reliability bins of one task's scored rows."""
    return {
        "brier": brier_score(y_true, y_prob),
        "ece": expected_calibration_error(y_true, y_prob, n_bins),
        "bins": reliability_bins(y_true, y_prob, n_bins),
    }


def scaled_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(K, N) logits of K test-time copies of N images -> (N,) mean of sigmoid(logit / T) over the copies."""
    z = np.asarray(logits, float) / temperature
    return np.mean(0.5 * (1.0 + np.tanh(0.5 * z)), axis=0)  # tanh form: no overflow for large |z|


def negative_log_likelihood(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities against 0/1 labels."""
    y, p = np.asarray(y_true, float), np.clip(np.asarray(y_prob, float), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(y_true: np.ndarray, logits: np.ndarray, iterations: int = 80) -> float:
    """The T in TEMPERATURE_RANGE minimising the NLL of scaled_probability(logits, T) against y.

    `logits` is (K, N) (K test-time copies; K = 1 without TTA) or (N,). A golden-section search on
    log T: for one copy the NLL is convex in 1/T (a logistic regression on the logit without an
    intercept), so it has one minimum; 80 steps narrow the interval to ~1e-16 of its width.
    """
    logits = np.atleast_2d(np.asarray(logits, float))
    y = np.asarray(y_true, float)
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise ValueError("temperature scaling needs both classes among the rows it is fitted on")

    def loss(log_t: float) -> float:
        return negative_log_likelihood(y, scaled_probability(logits, math.exp(log_t)))

    ratio = (math.sqrt(5) - 1) / 2
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(iterations):
        if loss_a <= loss_b:  # the minimum lies in [low, b]
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:  # in [a, high]
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)
