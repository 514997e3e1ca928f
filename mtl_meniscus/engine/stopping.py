"""The one rule for "the run improved", and what follows from it: restoring the best weights,
cutting the learning rate, stopping early. Every report reads its best epoch from here.

A network often sits at chance for several epochs before it starts to learn (measured in
the README, "Learning on data it was not tuned on"). Epochs before validation has left chance
are therefore not counted against the learning-rate and early-stopping patience: a run that has
not started is never slowed down or stopped early; `train.max_epochs` still bounds it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

CHANCE = 0.5  # AUC, and every challenge-weighted mean of AUCs, of a model that has learned nothing


def chance_sd(n_positive: int, n_negative: int) -> float:
    """Standard deviation of the AUC of random scores on this many positives and negatives
    (Mann-Whitney under the null: sqrt((n1 + n0 + 1) / (12 n1 n0))); NaN if a class is missing."""
    if n_positive < 1 or n_negative < 1:
        return math.nan
    return math.sqrt((n_positive + n_negative + 1) / (12 * n_positive * n_negative))


def learning_score(
    weighted_chance_sds: list[tuple[float, float]], cap: float, margin_sd: float = 3.0
) -> float:
    """Validation score that counts as "has left chance": chance + margin_sd null standard
    deviations of the monitored score, at most `cap`.

    `weighted_chance_sds` holds (challenge weight, chance sd) of each task the score averages;
    the score's null sd is that of the weighted mean of independent AUCs. With a small validation
    set (three anterior tears, say) chance alone can reach 0.7, hence the cap.
    """
    defined = [(w, sd) for w, sd in weighted_chance_sds if not math.isnan(sd)]
    if not defined:
        return cap
    total = sum(w for w, _ in defined)
    sd = math.sqrt(sum((w / total) ** 2 * s**2 for w, s in defined))
    return min(cap, CHANCE + margin_sd * sd)


@dataclass
class EarlyStopping:
    """Tracks the best validation score of one network.

    An epoch improves when its score is defined and beats the best so far by more than
    `min_delta`. Once a score has reached `start_score` (the network has left chance), the
    learning rate is due for a cut after `lr_patience` epochs without improvement (counted
    again from zero after each cut) and training stops after `patience`.
    """

    patience: int
    lr_patience: int
    start_score: float = CHANCE
    min_delta: float = 1e-4
    best_score: float | None = None
    best_epoch: int = 0
    started_epoch: int = 0  # first epoch whose score reached start_score; 0 = not yet
    bad_epochs: int = 0  # counted epochs since the best one
    epochs_since_cut: int = 0  # counted epochs without improvement since the best one or the last cut

    def improves(self, score: float) -> bool:
        return not math.isnan(score) and (self.best_score is None or score > self.best_score + self.min_delta)

    @property
    def started(self) -> bool:
        return self.started_epoch > 0

    def update(self, epoch: int, score: float) -> bool:
        """Record an epoch's validation score; True if it is the new best."""
        score = float(score)  # a plain float: the state is saved in checkpoints loaded with weights_only
        if not self.started and not math.isnan(score) and score >= self.start_score:
            self.started_epoch = epoch
        if self.improves(score):
            self.best_score, self.best_epoch = score, epoch
            self.bad_epochs = self.epochs_since_cut = 0
            return True
        if self.started:
            self.bad_epochs += 1
            self.epochs_since_cut += 1
        return False

    @property
    def lr_cut_due(self) -> bool:
        return self.started and self.epochs_since_cut >= self.lr_patience

    def lr_was_cut(self) -> None:
        self.epochs_since_cut = 0

    @property
    def should_stop(self) -> bool:
        return self.started and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):  # a missing key raises KeyError: the saved state is damaged
            setattr(self, f.name, state[f.name])


@dataclass(frozen=True)
class EpochDecision:
    """What follows an epoch: keep its weights as the best, cut the learning rate, stop training."""

    improved: bool
    cut_lr: bool
    finished: bool


def decide_after_epoch(
    stopping: EarlyStopping, epoch: int, score: float, lr: float, min_lr: float, max_epochs: int
) -> EpochDecision:
    """Record the epoch's validation score in `stopping` and decide what follows.

    A cut that falls due at the floor of the learning rate ends the run instead; the budget
    (max_epochs) and early stopping end it too.
    """
    improved = stopping.update(epoch, score)
    lr_exhausted = lr <= min_lr * 1.0001 and stopping.lr_cut_due
    return EpochDecision(
        improved=improved,
        cut_lr=not improved and stopping.lr_cut_due and not lr_exhausted,
        finished=epoch >= max_epochs or stopping.should_stop or lr_exhausted,
    )
