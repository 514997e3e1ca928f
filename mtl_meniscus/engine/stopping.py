"""The one rule for "the run improved", and what follows from it: restoring the best weights,
cutting the learning rate, stopping early. Every report reads its best epoch from here.

A network often sits at chance for several epochs before it starts to learn (measured in
the README, "Learning on data it was not tuned on"). Epochs before validation has left chance
are therefore not counted against the learning-rate and early-stopping patience: a run that has
not started is never slowed down or stopped early; `train.max_epochs` still bounds it.

"Left chance" is decided per task, each against the null of its own validation rows: a task is
above chance in an epoch when its AUC reaches its bar (chance_bar), and the network has left
chance once one task was above chance in CONFIRMING_EPOCHS consecutive epochs. Per task, because
a network that learned fissure (AUC 0.75 on 223 images) while the other tasks sat at chance
scored 0.60 combined, below the combined threshold it was held to, and was called "did not
learn". The improvement rule itself still judges the monitored (challenge-weighted) score.

When a network starts is partly luck: on the outside phantom's third draw the shared preset with
a learning rate of 0.002 left chance at epoch 2 or 3 with three training seeds, at 7 with one, and
not in 15 epochs with another, where it fitted its training images (training AUCs 0.62-0.72) while
validation stayed at 0.5: it memorised instead of finding the tear (at 0.001, the preset's rate
since, every seed started by epoch 5: docs/results.md, "When the start comes"). `train.restart_if_at_chance_after` K starts a network
again from new initial weights when none of its tasks is above its bar K epochs after its (re)start
(restart_due): a second draw of that luck, logged, at most as often as the budget leaves K epochs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from statistics import NormalDist
from typing import Any

import numpy as np

CHANCE = 0.5  # AUC, and every challenge-weighted mean of AUCs, of a model that has learned nothing
# Per task and epoch, the chance that a task at chance reaches its bar. With two consecutive epochs
# required, a 20-epoch run whose tasks all sit at chance (independent epochs) leaves chance falsely
# with probability about 19 x 0.01^2 = 0.2% per task, 0.6% for three; with 3 positives too (the
# exact null keeps the bar's level: tests/test_left_chance.py simulates it). The margin is for
# consecutive epochs of a real network being correlated, which makes a false pair likelier.
CHANCE_ALPHA = 0.01
CONFIRMING_EPOCHS = 2  # one noisy epoch above the bar is not enough: the same task must stay there
# The exact null up to this many rows in the smaller class, where the AUC's null is discrete; the
# float error of its product grows with it (4e-15 at 60, 3e-11 at 100), and at 50 the normal
# approximation's bar is within 3e-4 of the exact one.
EXACT_NULL_MAX_MINORITY = 50
BAR_TOLERANCE = 1e-9  # an AUC equal to the bar reaches it, whatever its last bits


def chance_sd(n_positive: int, n_negative: int) -> float:
    """Standard deviation of the AUC of random scores on this many positives and negatives
    (Mann-Whitney under the null: sqrt((n1 + n0 + 1) / (12 n1 n0))); NaN if a class is missing."""
    if n_positive < 1 or n_negative < 1:
        return math.nan
    return math.sqrt((n_positive + n_negative + 1) / (12 * n_positive * n_negative))


def auc_null_tail(n_positive: int, n_negative: int) -> np.ndarray:
    """(n_positive n_negative + 1,): P(U >= u) for u = 0, 1, ..., with U = AUC x n_positive x
    n_negative of random untied scores: the exact Mann-Whitney null.

    U's counts are the coefficients of the Gaussian binomial [m + n choose m]_q, built one factor
    (1 - q^(n+i)) / (1 - q^i) at a time; dividing by (1 - q^i) is a running sum with stride i.
    """
    m, n = sorted((n_positive, n_negative))  # the same distribution, with fewer factors
    pairs = m * n
    counts = np.zeros(pairs + 1)
    counts[0] = 1.0
    for i in range(1, m + 1):
        # terms beyond degree m n are dropped: every step is causal, and the result's are zero
        counts[n + i :] -= counts[: pairs + 1 - n - i].copy()
        padded = np.concatenate([counts, np.zeros(-len(counts) % i)])
        counts = np.cumsum(padded.reshape(-1, i), axis=0).reshape(-1)[: pairs + 1]
        counts /= counts.sum()  # probabilities: the raw counts overflow for large m
    return np.clip(np.cumsum(counts[::-1])[::-1], 0.0, 1.0)


def chance_bar(n_positive: int, n_negative: int, alpha: float = CHANCE_ALPHA) -> float | None:
    """The lowest AUC that random scores reach with probability at most `alpha` on this many
    positives and negatives; None when a class is missing or even an AUC of 1 is that likely
    (too few rows to tell learning from chance)."""
    if n_positive < 1 or n_negative < 1:
        return None
    if min(n_positive, n_negative) > EXACT_NULL_MAX_MINORITY:
        return CHANCE + NormalDist().inv_cdf(1 - alpha) * chance_sd(n_positive, n_negative)
    reachable = np.flatnonzero(auc_null_tail(n_positive, n_negative) <= alpha * (1 + BAR_TOLERANCE))
    return float(reachable[0] / (n_positive * n_negative)) if len(reachable) else None


# Saved state that checkpoints from before the per-task rule lack: the bars computed for this run
# stay, the streaks start from zero.
PER_TASK_STATE = ("chance_bars", "above_bar_streaks", "left_chance_epochs")
NEWER_STATE = ("restarts",)  # absent from checkpoints saved before restarts existed: none happened


@dataclass
class EarlyStopping:
    """Tracks the best validation score of one network and whether it has left chance.

    An epoch improves when its score is defined and beats the best so far by more than
    `min_delta`. Once the network has left chance (module docstring), the learning rate is due
    for a cut after `lr_patience` epochs without improvement (counted again from zero after each
    cut) and training stops after `patience`; counting starts with the epoch that confirms it.
    A network none of whose tasks has a bar (too few validation rows to tell) counts from its
    first defined score, as if there were no such rule.
    """

    patience: int
    lr_patience: int
    chance_bars: dict[str, float] = field(default_factory=dict)  # {task: AUC that is above chance}
    min_delta: float = 1e-4
    best_score: float | None = None
    best_epoch: int = 0
    started_epoch: int = 0  # first epoch of the first task's confirming pair; 0 = not yet
    bad_epochs: int = 0  # counted epochs since the best one
    epochs_since_cut: int = 0  # counted epochs without improvement since the best one or the last cut
    above_bar_streaks: dict[str, int] = field(default_factory=dict)  # {task: epochs running, to the last}
    left_chance_epochs: dict[str, int] = field(default_factory=dict)  # {task: first of its confirming pair}
    restarts: list[int] = field(default_factory=list)  # epochs after which the network started again

    def restarted(self, epoch: int) -> EarlyStopping:
        """The state of a network that starts again from new weights after `epoch`: the same
        settings and bars, nothing measured, the restart recorded."""
        return EarlyStopping(
            self.patience,
            self.lr_patience,
            dict(self.chance_bars),
            self.min_delta,
            restarts=[*self.restarts, epoch],
        )

    @property
    def start_epoch(self) -> int:
        """The last epoch before the network's current weights were drawn (0 = the run's start)."""
        return self.restarts[-1] if self.restarts else 0

    def improves(self, score: float) -> bool:
        return not math.isnan(score) and (self.best_score is None or score > self.best_score + self.min_delta)

    @property
    def can_tell_chance(self) -> bool:
        """Whether some task has enough validation rows to show that the network left chance."""
        return bool(self.chance_bars)

    @property
    def started(self) -> bool:
        """Whether the patience counts: the network left chance (or cannot tell, and has a score)."""
        return self.started_epoch > 0 or (not self.can_tell_chance and self.best_score is not None)

    def update(self, epoch: int, score: float, task_aucs: Mapping[str, float] | None = None) -> bool:
        """Record an epoch's validation score and per-task AUCs; True if it is the new best."""
        score = float(score)  # a plain float: the state is saved in checkpoints loaded with weights_only
        self._track_chance(epoch, task_aucs or {})
        if self.improves(score):
            self.best_score, self.best_epoch = score, epoch
            self.bad_epochs = self.epochs_since_cut = 0
            return True
        if self.started:
            self.bad_epochs += 1
            self.epochs_since_cut += 1
        return False

    def _track_chance(self, epoch: int, task_aucs: Mapping[str, float]) -> None:
        """Extend or break each task's run of epochs at or above its bar (a missing or undefined
        AUC breaks it); a run of CONFIRMING_EPOCHS confirms that the task left chance."""
        for task, bar in self.chance_bars.items():
            auc = float(task_aucs.get(task, math.nan))
            above = auc >= bar - BAR_TOLERANCE  # False for NaN
            self.above_bar_streaks[task] = self.above_bar_streaks.get(task, 0) + 1 if above else 0
            if self.above_bar_streaks[task] >= CONFIRMING_EPOCHS and task not in self.left_chance_epochs:
                self.left_chance_epochs[task] = epoch - CONFIRMING_EPOCHS + 1
        if not self.started_epoch and self.left_chance_epochs:
            self.started_epoch = min(self.left_chance_epochs.values())

    @property
    def tasks_at_chance(self) -> list[str]:
        """Tasks with a bar that never left chance ([] after a pre-per-task checkpoint that had
        started: which task left chance is not known there)."""
        if self.started_epoch and not self.left_chance_epochs:
            return []
        return [task for task in self.chance_bars if task not in self.left_chance_epochs]

    @property
    def lr_cut_due(self) -> bool:
        return self.started and self.epochs_since_cut >= self.lr_patience

    def lr_was_cut(self) -> None:
        self.epochs_since_cut = 0

    @property
    def should_stop(self) -> bool:
        return self.started and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)  # plain ints, floats, strings and dicts of them (copies)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, copy.deepcopy(state[f.name]))
            elif f.name in PER_TASK_STATE:  # an older checkpoint (it has start_score, now unused)
                if f.name != "chance_bars":
                    setattr(self, f.name, {})
            elif f.name in NEWER_STATE:
                setattr(self, f.name, [])
            else:  # any other missing key: the saved state is damaged
                raise KeyError(f.name)


@dataclass(frozen=True)
class EpochDecision:
    """What follows an epoch: keep its weights as the best, cut the learning rate, stop training."""

    improved: bool
    cut_lr: bool
    finished: bool
    restart: bool = False  # start again from new initial weights (restart_due)


def restart_due(stopping: EarlyStopping, epoch: int, after: int, max_epochs: int) -> bool:
    """Whether a network should start again from new weights after `epoch`: `after` > 0 epochs since
    its current weights were drawn, no task has left chance or is above its bar in the latest epoch
    (a pair may be about to confirm), and the budget leaves it at least `after` more epochs. Never
    for a network whose validation rows are too few to tell chance."""
    return (
        after > 0
        and stopping.can_tell_chance
        and not stopping.started
        and not any(stopping.above_bar_streaks.values())
        and epoch - stopping.start_epoch >= after
        and max_epochs - epoch >= after
    )


def decide_after_epoch(
    stopping: EarlyStopping,
    epoch: int,
    score: float,
    lr: float,
    min_lr: float,
    max_epochs: int,
    task_aucs: Mapping[str, float] | None = None,
    restart_after: int = 0,
) -> EpochDecision:
    """Record the epoch's validation score and per-task AUCs in `stopping` and decide what follows.

    A cut that falls due at the floor of the learning rate ends the run instead; the budget
    (max_epochs) and early stopping end it too. With `restart_after` > 0 a network still at
    chance that long after its start starts again (restart_due); the caller draws the new weights
    and replaces `stopping` with stopping.restarted(epoch).
    """
    improved = stopping.update(epoch, score, task_aucs)
    lr_exhausted = lr <= min_lr * 1.0001 and stopping.lr_cut_due
    return EpochDecision(
        improved=improved,
        cut_lr=not improved and stopping.lr_cut_due and not lr_exhausted,
        finished=epoch >= max_epochs or stopping.should_stop or lr_exhausted,
        restart=restart_due(stopping, epoch, restart_after, max_epochs),
    )
