"""The one rule for "the run improved", and what follows from it: restoring the best weights,
cutting the learning rate, stopping early. Every report reads its best epoch from here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Tracks the best validation score of one network.

    An epoch improves when its score is defined and beats the best so far by more than
    `min_delta`. The learning rate is due for a cut after `lr_patience` epochs without
    improvement (counted again from zero after each cut), training stops after `patience`.
    """

    patience: int
    lr_patience: int
    min_delta: float = 1e-4
    best_score: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    epochs_since_cut: int = 0  # epochs without improvement since the best one or the last cut

    def improves(self, score: float) -> bool:
        return not math.isnan(score) and (self.best_score is None or score > self.best_score + self.min_delta)

    def update(self, epoch: int, score: float) -> bool:
        """Record an epoch's validation score; True if it is the new best."""
        score = float(score)  # a plain float: the state is saved in checkpoints loaded with weights_only
        if self.improves(score):
            self.best_score, self.best_epoch = score, epoch
            self.bad_epochs = self.epochs_since_cut = 0
            return True
        self.bad_epochs += 1
        self.epochs_since_cut += 1
        return False

    @property
    def lr_cut_due(self) -> bool:
        return self.epochs_since_cut >= self.lr_patience

    def lr_was_cut(self) -> None:
        self.epochs_since_cut = 0

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)
