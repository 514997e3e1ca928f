"""Masked multi-task loss and task-weighting strategies.

Targets are (B, T) in the task table's order with NaN where a task does not apply. A gated task
(orientation, position) counts only where its gating task's target (fissure) is 1 and its own
target is known.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable
from mtl_meniscus.registry import Registry


def task_mask(targets: torch.Tensor, task: str, tasks: TaskTable = DEFAULT_TASKS) -> torch.Tensor:
    """(B,) bool: rows where `task` is supervised (all rows for fissure, true tears otherwise): the
    rows the metrics score (TaskTable.scored_rows), so loss and metrics cannot disagree."""
    return tasks.scored_rows(targets, task)


def masked_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: float | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE-with-logits summed over rows where mask is True, divided by `denominator` (default: the
    number of those rows, a mean); 0 (still attached to the graph) if none.

    task_losses passes the count of the task's loss_rows; under torchrun, the whole global
    batch's count divided by the processes, so that DDP's average of the processes' losses is the
    mean over the global batch, as in one process."""
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))  # NaN * 0 would still be NaN
    # float32 like the loss itself: built in the logits' dtype under bf16 autocast, 10.1 became 10.125.
    weight = (
        None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    )
    per_row = F.binary_cross_entropy_with_logits(
        logits.float(), safe_targets.float(), pos_weight=weight, reduction="none"
    )
    per_row = per_row * mask.float()
    return per_row.sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)


GATED_LOSS_MEANS = ("per-image", "per-gated-row")


def loss_rows(
    targets: torch.Tensor, task: str, gated_mean: str, tasks: TaskTable = DEFAULT_TASKS
) -> torch.Tensor:
    """(B,) bool: the rows a task's masked BCE is averaged over (its denominator's rows).

    "per-image": the rows the task's question is asked of (TaskTable.asked_rows), so a gated task
    (orientation) sums over the tears and divides by every image with a fissure label: the total
    is then the mean per image of BCE(fissure) + [torn] (BCE(orientation) + BCE(position)), the
    labels' joint log-likelihood. "per-gated-row": the supervised rows themselves (the tears)."""
    if gated_mean == "per-gated-row":
        return task_mask(targets, task, tasks)
    if gated_mean == "per-image":
        return tasks.asked_rows(targets, task)
    raise ValueError(f"unknown gated loss mean {gated_mean!r} (allowed: {', '.join(GATED_LOSS_MEANS)})")


def task_losses(
    outputs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    pos_weights: dict[str, float] | None = None,
    tasks: TaskTable = DEFAULT_TASKS,
    denominators: dict[str, torch.Tensor] | None = None,
    gated_mean: str = "per-image",
) -> dict[str, torch.Tensor]:
    """Masked BCE of each task the model predicts, each averaged over its loss_rows (`denominators`
    replace those counts under torchrun: see masked_bce)."""
    pos_weights, denominators = pos_weights or {}, denominators or {}
    return {
        task: masked_bce(
            logits,
            targets[:, tasks.index(task)],
            task_mask(targets, task, tasks),
            pos_weights.get(task),
            denominators.get(task, loss_rows(targets, task, gated_mean, tasks).sum().clamp(min=1)),
        )
        for task, logits in outputs.items()
    }


DICE_SMOOTHING = 1.0  # pixels: a class absent from both truth and prediction scores Dice 1, not 0/0
DICE_CLASSES = (1, 2)  # meniscus, tear: Dice of the structures; background is left to the CE


def segmentation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    denominator: torch.Tensor | None = None,
    ignore_value: int = -1,
) -> torch.Tensor:
    """Soft Dice loss (meniscus and tear where the image has them) plus pixel cross-entropy (mean over each
    image's pixels), summed over the rows with a mask and divided by `denominator` (default: their
    count, a mean per image); exactly 0, still attached to the graph, when no row has one.

    logits (B, 3, H, W); masks (B, H, W) int64 with 0 background, 1 meniscus, 2 tear and
    `ignore_value` on every pixel of a row without a mask (data/torch_dataset.py NO_MASK). Such a
    row's logits get exactly zero gradient. Under torchrun `denominator` is the global batch's
    count of rows with a mask over the processes, as for masked_bce."""
    valid = masks != ignore_value  # (B, H, W)
    rows = valid.flatten(1).any(1)  # (B,) rows with a mask
    logits = logits.float()  # the loss in float32 under bf16 autocast, as masked_bce
    truth = torch.where(valid, masks, torch.zeros_like(masks))  # (B, H, W) a label on every pixel
    pixels = valid.flatten(1).sum(1).clamp(min=1)  # (B,)
    cross_entropy = (F.cross_entropy(logits, truth, reduction="none") * valid).flatten(1).sum(1) / pixels
    per_row = cross_entropy + 1 - _soft_dice(logits, truth, valid)  # (B,)
    per_row = torch.where(rows, per_row, torch.zeros_like(per_row))  # no gradient to rows without one
    return per_row.sum() / (rows.sum().clamp(min=1) if denominator is None else denominator)


def _soft_dice(logits: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) each image's soft Dice (2 sum(p g) + s) / (sum p + sum g + s), p the softmax probability
    of a class and g its one-hot truth over the valid pixels, averaged over the DICE_CLASSES present
    in the image's truth (1 for an image with none: no Dice term).

    Only present classes: the Dice of a class absent from the truth is s / (sum p + s), which
    rewards predicting none of it anywhere. Three in four phantom images have no tear, and with
    that term the decoder learned to label no pixel as tear (test tear Dice 0.000, realistic data
    seed 7; docs/results.md); the cross-entropy still penalises tear pixels on those images."""
    probs = torch.softmax(logits, dim=1)  # (B, 3, H, W)
    classes = list(DICE_CLASSES)
    p = probs[:, classes] * valid[:, None]  # (B, 2, H, W)
    g = F.one_hot(truth, probs.shape[1]).permute(0, 3, 1, 2)[:, classes].float() * valid[:, None]
    overlap = (p * g).flatten(2).sum(2)  # (B, 2)
    in_truth = g.flatten(2).sum(2)  # (B, 2) pixels of each class
    dice = (2 * overlap + DICE_SMOOTHING) / (p.flatten(2).sum(2) + in_truth + DICE_SMOOTHING)
    present = (in_truth > 0).float()
    count = present.sum(1)  # (B,)
    return torch.where(count > 0, (dice * present).sum(1) / count.clamp(min=1), torch.ones_like(count))


class TaskWeighting(nn.Module):
    """How the task losses become one training signal.

    As in LibMTL, the weighting owns the backward step: `backward` combines the losses,
    backpropagates and returns the weight each task got, so the weights can be logged per epoch and
    a strategy that works on gradients (GradNorm, PCGrad) fits behind the same call.
    """

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def current_weights(self) -> dict[str, float]:
        """{task: the factor its loss is multiplied by now}."""
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Combine and backpropagate; (the combined loss, detached; {task: weight applied})."""
        weights = self.current_weights()  # the ones this step uses, before the optimizer moves them
        loss = self(losses)
        loss.backward()
        return loss.detach(), weights


WEIGHTINGS = Registry("task weighting", key="train.weighting")


@WEIGHTINGS.register("fixed")
class FixedWeighting(TaskWeighting):
    """Weighted sum with constant weights (default 1 per task)."""

    def __init__(self, tasks: Sequence[str], weights: dict[str, float] | None = None):
        super().__init__()
        weights = weights or {}
        self.weights = {task: float(weights.get(task, 1.0)) for task in tasks}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[task] * loss for task, loss in losses.items())

    def current_weights(self) -> dict[str, float]:
        return dict(self.weights)


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(TaskWeighting):
    """Kendall, Gal & Cipolla 2018, classification form: sum of exp(-s_t) * L_t + s_t / 2 with
    learnable s_t = log sigma_t^2 (their 1/sigma^2 * L + log sigma for a softmax/sigmoid likelihood).

    The log-variances are nn.Parameters, so the optimizer sees and updates them. At the optimum
    exp(-s_t) = 1 / (2 L_t): each task's weight is inversely proportional to its loss.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.log_vars = nn.ParameterDict({task: nn.Parameter(torch.zeros(())) for task in tasks})

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for task, loss in losses.items():
            log_var = self.log_vars[task]
            total = total + torch.exp(-log_var) * loss + log_var / 2
        return total

    def current_weights(self) -> dict[str, float]:
        return {task: math.exp(-float(p.detach())) for task, p in self.log_vars.items()}


def check_weighting_contract(name: str, tasks: Sequence[str]) -> None:
    """A plug-in weighting (one not defined in this package) keeps the contract the trainer relies
    on, checked once on losses of 1 before any work: built for `tasks`, it combines them into one
    finite scalar that backpropagates, and current_weights() gives a number for each task. A broken
    one is named by what it broke, not by a traceback from the first training step."""
    module = WEIGHTINGS.plugin_module(name)
    if module is None:
        return
    what = f"task weighting {name!r} (a plug-in: {module})"
    losses = {task: torch.ones((), requires_grad=True) for task in tasks}
    try:
        built = build_weighting(name, tasks)
        loss, applied = built.backward(losses) if isinstance(built, TaskWeighting) else (None, None)
    except Exception as err:
        raise MeniscusError(f"{what}: failed on losses of 1 ({type(err).__name__}: {err})") from None
    if not isinstance(built, TaskWeighting):
        raise MeniscusError(f"{what}: builds a {type(built).__name__}, not a TaskWeighting")
    if not torch.is_tensor(loss) or loss.ndim != 0 or not torch.isfinite(loss):
        raise MeniscusError(
            f"{what}: backward(losses) must give the combined loss as one finite scalar tensor; it gave {loss!r}"
        )
    numbers = isinstance(applied, dict) and all(isinstance(applied.get(t), int | float) for t in tasks)
    if not numbers:
        raise MeniscusError(
            f"{what}: current_weights() must give a number for each of {', '.join(tasks)}; it gave {applied!r}"
        )


def build_weighting(
    name: str, tasks: Sequence[str], weights: dict[str, float] | None = None
) -> TaskWeighting:
    """The registered task weighting `name` for `tasks`; `weights` (train.task_weights) go to the ones
    that take them (a `weights` parameter), e.g. 'fixed'."""
    weighting = WEIGHTINGS.get(name)
    if "weights" in inspect.signature(weighting).parameters:
        return weighting(tasks, weights)
    return weighting(tasks)
