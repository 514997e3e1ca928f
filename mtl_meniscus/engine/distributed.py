"""Training across processes under torchrun (DistributedDataParallel); a no-op in one process.

`torchrun --nproc_per_node N cli.py train ...` starts N copies of the command, with RANK,
WORLD_SIZE and LOCAL_RANK in their environment. Each copy trains the same model on its share of
every global batch (the batch's rows rank, rank + N, ...), DDP averages the gradients, and every
copy therefore holds the same weights after each step. Validation images are shared out the same
way and the probabilities gathered, so every copy takes the same decisions (best epoch, learning
rate cuts, stopping). Rank 0 alone writes files, checkpoints and wandb.

Random streams: the initial weights are drawn alike in every copy (the same seed; DDP also
broadcasts rank 0's); the batch order and each image's augmentation come from (seed, epoch,
position in the global batch), so they do not depend on the rank; the torch stream that draws the
dropout masks is each copy's own (seed_own_stream), rank 0 keeping the one a single process draws.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from mtl_meniscus.errors import ConfigError
from mtl_meniscus.networks.losses import loss_rows


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes files, checkpoints and wandb, and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def agree(self, ok: bool) -> bool:
        """True when `ok` holds in every process (one failing process stops them all together)."""
        if not self.active:
            return ok
        flag = torch.tensor(int(ok), device=self._collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the processes (NaN if any process's value is NaN)."""
        if not self.active:
            return value.detach()
        total = value.detach().float().to(self._collective_device()).clone()  # all_reduce works in place
        torch.distributed.all_reduce(total)
        return total / self.world

    def loss_denominators(
        self, targets: torch.Tensor, names, tasks, gated_mean: str
    ) -> dict[str, torch.Tensor] | None:
        """{task: its loss rows in the whole global batch / processes (at least 1 / processes)}:
        the denominators that make the processes' averaged masked means the global batch's mean.
        None in one process (the batch's own count is right there); {} for a network without a
        task (the cascade's segmentation network: its loss has rows_denominator's)."""
        if not self.active:
            return None
        if not names:
            return {}
        masks = [loss_rows(targets, name, gated_mean, tasks) for name in names]
        counts = torch.stack([mask.sum() for mask in masks]).float().to(self._collective_device())
        torch.distributed.all_reduce(counts)
        counts = counts.clamp(min=1).to(targets.device) / self.world
        return dict(zip(names, counts))

    def rows_denominator(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The global batch's count of `rows` (B,) bool over the processes (at least 1 / processes),
        as loss_denominators gives a task's; None in one process."""
        if not self.active:
            return None
        count = rows.sum().float().to(self._collective_device())
        torch.distributed.all_reduce(count)
        return count.clamp(min=1).to(rows.device) / self.world

    def average_gradients(self, parameters) -> None:
        """Average the gradients of parameters outside the DDP-wrapped model (task weighting)."""
        if not self.active:
            return
        for parameter in parameters:
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= self.world

    def seed_own_stream(self, seed: int, epoch: int = 0) -> None:
        """Give this process its own torch random stream (dropout masks), once every weight the
        processes share is drawn. Rank 0 keeps the stream it is on, so one process draws what it
        always drew; rank r > 0 starts from stream_seed(seed, r, epoch)."""
        if self.rank:
            torch.manual_seed(stream_seed(seed, self.rank, epoch))

    def rng_states(self) -> list[torch.Tensor]:
        """Every process's torch RNG state (CPU), in rank order; every process must call it."""
        own = torch.get_rng_state()
        if not self.active:
            return [own]
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, own)
        return gathered

    def restore_own_stream(self, saved: list[torch.Tensor], seed: int, epoch: int) -> None:
        """Continue this process's stream from its saved state (`saved[rank]`). A process without one
        (a run saved by fewer processes) starts its own stream anew from (seed, rank, epoch)."""
        if self.rank < len(saved):
            torch.set_rng_state(saved[self.rank])
        else:
            self.seed_own_stream(seed, epoch)

    def _collective_device(self) -> torch.device:
        """nccl reduces CUDA tensors only; gloo CPU ones."""
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as DDP sees it (the model itself in one process)."""
        if not self.active:
            return model
        if device.type == "cuda":
            # BatchNorm statistics over the global batch, as in one process (in place: the
            # parameters stay the ones the optimizer holds). gloo has no SyncBatchNorm: on the CPU
            # each process normalizes by its own share of the batch.
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
        return nn.parallel.DistributedDataParallel(model)

    def gather_probs(self, local: dict[str, np.ndarray], shards: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Probabilities of every process's share (`shards[r]`: positions in the full list),
        put back in the full list's order."""
        if not self.active:
            return local
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, local)
        total = sum(len(s) for s in shards)
        out = {task: np.empty(total, np.float64) for task in local}
        for positions, probs in zip(shards, gathered):
            for task in out:
                out[task][positions] = probs[task]
        return out

    def shards(self, n: int) -> list[np.ndarray]:
        """Positions 0..n-1 shared out: process r gets r, r + world, r + 2 world, ..."""
        return [np.arange(r, n, self.world) for r in range(self.world)]


SINGLE = Distributed()


def stream_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of process `rank`'s own torch stream: from (seed, rank), or (seed, rank, epoch) for
    a stream started anew on resume after `epoch` epochs (a 32-bit integer)."""
    entropy = [seed, rank, epoch] if epoch else [seed, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 when it is not set)."""
    if not os.environ.get("WORLD_SIZE"):
        return 1
    return _environment_int("WORLD_SIZE", 1, 1_000_000)


def _environment_int(name: str, low: int, high: int) -> int:
    """An integer environment variable of torchrun's, low..high, with a message naming it."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        raise ConfigError(
            _torchrun_hint(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {name} is not")
        )
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(_torchrun_hint(f"{name}={text!r} is not an integer")) from None
    if not low <= value <= high:
        raise ConfigError(_torchrun_hint(f"{name}={value} is outside {low}..{high}"))
    return value


def _torchrun_hint(problem: str) -> str:
    return (
        f"torchrun environment: {problem}. Start several processes with torchrun (it sets WORLD_SIZE, "
        "RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE for one process"
    )


def start(device_type: str) -> Distributed:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else one process.

    Backend gloo on the CPU, nccl on CUDA."""
    world = world_size()
    if world <= 1:
        return SINGLE
    rank, local_rank = (_environment_int(name, 0, world - 1) for name in ("RANK", "LOCAL_RANK"))
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # what init_process_group's env:// reads
        if not os.environ.get(name):
            raise ConfigError(_torchrun_hint(f"WORLD_SIZE={world} is set but {name} is not"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # this process's GPU (all_gather_object uses it too)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(minutes=30))
    return Distributed(rank, world, local_rank)


def stop(context: Distributed) -> None:
    if context.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_batch(context: Distributed, batch_size: int) -> None:
    """Every process takes an equal share of each global batch."""
    if context.active and batch_size % context.world:
        raise ConfigError(
            f"config key 'train.batch_size': bad value {batch_size} (allowed: a multiple of the "
            f"{context.world} processes torchrun started, so each takes an equal share of every batch)"
        )
