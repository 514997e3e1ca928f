"""The task table: what the package learns, how labels.csv writes it, how it is scored and reported.

Every module that needs to know a task (data validation, losses, models, metrics, the cascade
view, predict's columns, plots, compare) reads it from a TaskTable. The built-in table holds the
reference method's three tasks; `data.extra_tasks` in a config adds more (see config.TaskConfig).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

DOUBLE_TEAR = "both"  # position of a tear in both horns; excluded by default, as in the reference method


@dataclass(frozen=True)
class Task:
    """One binary task and everything the package needs to know about it."""

    name: str  # the output's key, the metric's name and the labels.csv column
    values: Mapping[str, float]  # text in labels.csv -> target (1 = the positive class), in message order
    gated_by: str | None = None  # defined only where that task's target is 1 (orientation: on a tear)
    weight: float = 0.0  # weight in the challenge score (0: reported, not part of the score)
    positive: str = ""  # what a row whose target is 1 is called in messages ('a tear needs ...')
    prob_column: str = ""  # predict's probability column (default p_<name>)
    unscored: tuple[str, ...] = ()  # texts accepted without a target (position 'both', a double tear)

    @property
    def noun(self) -> str:
        return self.positive or f"{self.name} = {self.text(1.0)}"

    @property
    def p_column(self) -> str:
        return self.prob_column or f"p_{self.name}"

    def text(self, target: float) -> str:
        """The labels.csv text of a target (>= 0.5: the positive class)."""
        wanted = 1.0 if target >= 0.5 else 0.0
        return next(text for text, value in self.values.items() if value == wanted)

    def class_name(self, target: float) -> str:
        """A class as a reader says it, for figures: 'tear' / 'no tear', 'horizontal' / 'vertical'."""
        if self.positive:
            return self.positive if target >= 0.5 else f"no {self.positive}"
        return self.text(target)

    def target(self, text: str) -> float:
        """The target of a labels.csv text: 1, 0, or NaN for an accepted text without one."""
        return float(self.values[text]) if text in self.values else float("nan")


@dataclass(frozen=True)
class TaskTable:
    """The tasks in output order. Targets arrays are (N, len(table)) in this order, NaN where a
    task does not apply (not a tear) or its label is unknown."""

    tasks: tuple[Task, ...] = field(default_factory=tuple)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"unknown task {name!r} (tasks: {', '.join(self.names)})")

    def __contains__(self, name: object) -> bool:
        return name in self.names

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def root(self) -> Task:
        """The first task, which gates no other's definition: the cascade's gate (fissure)."""
        return self.tasks[0]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def weight(self, name: str) -> float:
        return self[name].weight

    def scored_rows(self, targets, name: str):
        """(N,) bool: rows where `name` is supervised and scored: its label is known and, for a
        gated task, the gating task's target is 1 (orientation and position: true tears only).

        `targets` is a numpy array (metrics) or a torch tensor (the loss's mask); the answer is of
        the same kind."""
        task = self[name]
        column = targets[:, self.index(name)]
        known = column == column  # False where NaN: unknown or not applicable
        if task.gated_by is None:
            return known
        return known & (targets[:, self.index(task.gated_by)] == 1)

    def asked_rows(self, targets, name: str):
        """(N,) bool: rows the task's question is asked of: for a gated task every row whose
        gating label is known ("if torn, how?" is asked of every image with a fissure label and
        answered only by the tears), for the root task its scored rows. The per-image loss
        (networks/losses.py) is a mean over these rows."""
        task = self[name]
        if task.gated_by is None:
            return self.scored_rows(targets, name)
        return self.scored_rows(targets, task.gated_by)

    def extended(self, extra: Iterable[Task]) -> TaskTable:
        return TaskTable((*self.tasks, *extra))

    def predicted_labels(self, probs: Mapping[str, float], threshold: float) -> dict[str, str]:
        """The cascade's gating: each task's predicted text, '' where its gating task was not
        predicted positive. The root task (fissure) is cut at `threshold`, the others at 0.5."""
        labels: dict[str, str] = {}
        for task in self.tasks:
            if task.name not in probs:
                continue
            if task.gated_by is not None and labels.get(task.gated_by, "") != self[task.gated_by].text(1.0):
                labels[task.name] = ""
                continue
            cut = threshold if task is self.root else 0.5
            labels[task.name] = task.text(1.0 if probs[task.name] >= cut else 0.0)
        return labels


FISSURE = Task("fissure", {"0": 0.0, "1": 1.0}, weight=0.4, positive="tear")
ORIENTATION = Task(
    "orientation",
    {"horizontal": 1.0, "vertical": 0.0},
    gated_by="fissure",
    weight=0.3,
    prob_column="p_horizontal",
)
POSITION = Task(
    "position",
    {"anterior": 1.0, "posterior": 0.0},
    gated_by="fissure",
    weight=0.3,
    prob_column="p_anterior",
    unscored=(DOUBLE_TEAR,),
)
# The reference method's tasks and challenge weights: score = 0.4 AUC(fissure) + 0.3 AUC(orientation)
# + 0.3 AUC(position).
DEFAULT_TASKS = TaskTable((FISSURE, ORIENTATION, POSITION))
TASKS: tuple[str, ...] = DEFAULT_TASKS.names
