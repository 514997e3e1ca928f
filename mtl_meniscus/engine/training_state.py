"""A network's training state, saved after every epoch (last.pt) so that a killed run resumes, and
its best epoch's weights (best.pt)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_meniscus.config import Config, config_differences
from mtl_meniscus.engine.checkpoint import atomic_torch_save, load_checkpoint, model_payload
from mtl_meniscus.engine.distributed import SINGLE, Distributed
from mtl_meniscus.engine.stopping import EarlyStopping
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.networks.losses import TaskWeighting


@dataclass
class TrainingState:
    """Everything a network's training needs to continue after a kill, saved in last.pt as one dict.

    Each field is saved and restored the same way: through state_dict()/load_state_dict() where it
    has them (model, weighting, optimizer, early stopping), as a plain value otherwise. The torch
    RNG goes with it so that a resumed run draws the same dropout masks as an uninterrupted one
    (this process's; under torchrun MemberCheckpoints adds every process's).
    """

    model: nn.Module
    weighting: TaskWeighting
    optimizer: torch.optim.Optimizer
    stopping: EarlyStopping
    epoch: int = 0  # epochs finished
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    train_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            saved[f.name] = value.state_dict() if hasattr(value, "state_dict") else value
        saved["torch_rng"] = torch.get_rng_state()
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(saved[f.name])
            else:
                setattr(self, f.name, saved[f.name])
        torch.set_rng_state(saved["torch_rng"])


@dataclass
class MemberCheckpoints:
    """A member's last.pt (the training state) and best.pt (its best epoch's weights, with the
    member's own config), written by the main process only.

    Under torchrun last.pt also holds every process's torch RNG state ("torch_rng_by_rank"): each
    process draws its own dropout masks, and a resumed run continues each process's own stream."""

    folder: Path
    member: str  # its name, saved in both files
    processes: Distributed = SINGLE  # under torchrun the processes other than rank 0 write nothing

    def __post_init__(self) -> None:
        if self.processes.main:  # a cascade's members/<network>: there from the start, gone only if deleted
            self.folder.mkdir(parents=True, exist_ok=True)

    def save_last(self, state: TrainingState, config: Config) -> None:
        streams = self.processes.rng_states()  # every process takes part
        if not self.processes.main:
            return
        training_state = state.state_dict()
        if self.processes.active:  # one process's last.pt stays as it was: its stream is torch_rng
            training_state["torch_rng_by_rank"] = streams
        payload = model_payload(
            state.model, config, {"member": self.member, "training_state": training_state}
        )
        atomic_torch_save(payload, self._path("last.pt"))

    def save_best(self, state: TrainingState, member_config: Config) -> None:
        if not self.processes.main:
            return
        extra = {
            "member": self.member,
            "best_epoch": state.stopping.best_epoch,
            "best_score": state.stopping.best_score,
        }
        atomic_torch_save(model_payload(state.model, member_config, extra), self._path("best.pt"))

    def _path(self, name: str) -> Path:
        """The checkpoint's path in the member's folder, which must still be there: written anew,
        it would hold checkpoints without the run's other files, which nothing could read."""
        if not self.folder.is_dir():
            raise MeniscusError(
                f"{self.folder}: the run folder is gone (deleted or moved while training?); training stopped"
            )
        return self.folder / name

    def finished(self) -> bool:
        """True when last.pt records that the member's training has ended (its best.pt, written
        before that last.pt, is then final); False without a last.pt."""
        last = self.folder / "last.pt"
        if not last.is_file():
            return False
        state = load_checkpoint(last).get("training_state")
        return isinstance(state, dict) and bool(state.get("finished"))

    def restore_best(self, model: nn.Module) -> None:
        model.load_state_dict(load_checkpoint(self.folder / "best.pt")["state_dict"])

    def resume(self, state: TrainingState, config: Config) -> bool:
        """Load last.pt into `state`, and this process's own random stream (a stream that last.pt
        does not hold starts anew from the seed, the rank and the epoch); False when there is no
        last.pt (the member had not started). A best.pt without a last.pt is refused: the member
        had trained, and starting it over would replace its best.pt; except a best.pt of the first
        epoch, written just before that epoch's last.pt (Ctrl-C or a kill between the two): that
        best.pt is deleted and the member starts over, to the same epoch 1 (same seed). A last.pt
        trained with other settings than `config` (the run's config.yaml, edited since) is refused."""
        last, best = self.folder / "last.pt", self.folder / "best.pt"
        if not last.is_file():
            if best.is_file() and _best_epoch(best) != 1:
                raise MeniscusError(
                    f"cannot resume {self.folder}: last.pt is missing, but best.pt shows that it trained; "
                    "starting it over would replace best.pt. Restore last.pt, or train a new run with "
                    "another --out"
                )
            best.unlink(missing_ok=True)  # epoch 1's, or none (under torchrun every rank gets here)
            return False
        payload = load_checkpoint(last)
        if not isinstance(payload.get("training_state"), dict):
            raise MeniscusError(
                f"{last}: holds no training state, so the run cannot resume from it "
                "(a last.pt is written by train after each epoch; best.pt files cannot be resumed)"
            )
        saved_config = payload.get("config")  # a last.pt of a version that did not save it: unchecked
        changed = (
            config_differences(saved_config, config.to_dict(), RESUMABLE_KEYS, common_only=True)
            if isinstance(saved_config, dict)
            else []
        )
        if changed:  # the epochs to come would train another setting than those before, unsaid
            # the run's config.yaml: in the run folder, above a cascade member's members/NAME/
            run = next(
                (p for p in (self.folder, *self.folder.parents) if (p / "config.yaml").is_file()), self.folder
            )
            raise MeniscusError(
                f"cannot resume {run}: its config.yaml was changed since {last} was written "
                f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}): restore those values, "
                f"or train a new run with them (--config {run / 'config.yaml'} and another --out)"
            )
        saved = payload["training_state"]
        try:
            state.load_state_dict(saved)
            streams = saved.get("torch_rng_by_rank") or [saved["torch_rng"]]
            self.processes.restore_own_stream(streams, config.train.seed, state.epoch)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else ""
            raise MeniscusError(
                f"{last}: damaged training state, cannot resume ({type(err).__name__}: {reason[:300]})"
            ) from None
        return True


# Where and how a run computes, not what it learns: a resumed run may change these in its config.yaml
# (data.path: the data folder moved; its splits.csv then checks that the data is the same); so may
# wandb's settings (config_differences skips them), and keys added since last.pt was written.
RESUMABLE_KEYS = (
    "data.path",
    "data.load",
    "data.max_pixels",
    "train.device",
    "train.precision",
    "train.num_workers",
    "train.eval_batch_size",
)


def _best_epoch(best: Path) -> int | None:
    """The epoch a best.pt was saved at (None for one that cannot be read or does not say)."""
    try:
        epoch = load_checkpoint(best).get("best_epoch")
    except MeniscusError:
        return None
    return epoch if isinstance(epoch, int) else None
