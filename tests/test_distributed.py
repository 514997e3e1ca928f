"""torchrun: two CPU processes (gloo) train one model as one process would, rank 0 alone writes,
and a run resumes under torchrun. Each torchrun call starts two fresh interpreters (~10 s).

Random streams: without dropout (and BatchNorm, which gloo cannot synchronise) two processes'
steps give one process's weights; with dropout each process draws its own masks, rank 0 those of
one process, and a resumed run continues each process's own stream."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from mtl_meniscus.config import load_config
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.engine.distributed import SINGLE, Distributed, stream_seed
from mtl_meniscus.engine.members import Member, plan_members
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.tracking import RunLogger
from mtl_meniscus.engine.trainer import MemberTrainer
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# The tiny preset with a global batch of 16: 8 images per process.
SETTINGS = ["--set", "train.batch_size=16", "--max-epochs", "3"]
LOSS_TOLERANCE = 0.05  # relative, per epoch: on the CPU each process's BatchNorm sees its half batch


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(ROOT / "cli.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_data")
    write_phantom(folder, n=120, seed=4, size=64)
    return folder


def _one_process(data: Path, run: Path, **overrides) -> dict:
    config = load_config(
        TINY, {"data.path": str(data), "train.batch_size": 16, "train.max_epochs": 3} | overrides
    )
    return train_run(config, run, console=Console(quiet=True))


@pytest.mark.slow  # torchrun with two training processes, twice
def test_two_processes_train_like_one_with_the_same_global_batch(data, tmp_path):
    """The tiny preset as it is (dropout, BatchNorm): each epoch's training loss of 2 processes
    within 5% of 1 process's. Statistically, not numerically, the same training: each process
    draws its own dropout masks and normalises by its own half batch (gloo: no SyncBatchNorm).
    The exact comparison is test_without_dropout_two_processes_take_one_process_steps."""
    _one_process(data, tmp_path / "one", **{"wandb.mode": "offline"})
    result = torchrun(
        "train", "--config", str(TINY), "--data", str(data), "--out", str(tmp_path / "two"),
        "--wandb", "offline", *SETTINGS,
    )  # fmt: skip
    assert "2 processes, torchrun" in result.stdout
    assert result.stdout.count("test + TTA") == 1  # rank 0 alone prints
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == ["1", "2", "3"]
    for a, b in zip(one, two):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= LOSS_TOLERANCE * float(a["train_loss"])
    # rank 0 alone wrote: the same files as one process, one wandb run
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow  # torchrun with two training processes
def test_a_killed_run_resumes_under_torchrun(data, tmp_path):
    """A one-process run, killed after epoch 1, finishes under torchrun. Its last.pt holds one
    stream: rank 0 continues it, rank 1 starts its own (test_rank_0_keeps_its_stream_... checks
    the seeds)."""
    run = tmp_path / "run"

    def killed(member: str, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    config = load_config(TINY, {"data.path": str(data), "train.batch_size": 16, "train.max_epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        train_run(config, run, console=Console(quiet=True), on_epoch_end=killed)
    assert not (run / "metrics.json").exists()
    result = torchrun("train", "--resume", str(run))
    assert "resumed after epoch 1" in result.stdout
    assert [r["epoch"] for r in history(run)] == ["1", "2", "3"]
    assert (run / "metrics.json").is_file() and not list(run.glob("*.tmp*"))


@pytest.mark.slow  # torchrun, twice
def test_the_batch_must_split_evenly_and_the_folder_be_named(data, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "cli.py"),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    odd = subprocess.run(
        [*command, "train", "--config", str(TINY), "--data", str(data), "--out", str(tmp_path / "odd"),
         "--set", "train.batch_size=7"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert odd.returncode != 0 and "a multiple of the 2 processes" in odd.stdout
    assert "Traceback" not in odd.stdout
    unnamed = subprocess.run(
        [*command, "train", "--config", str(TINY), "--data", str(data)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert unnamed.returncode != 0 and "give --out" in unnamed.stdout


# ---- random streams: two processes started by torch.multiprocessing (gloo), no torchrun --------

STEPS = 2  # training steps compared: two batches of 16 images, 8 per process


class MemberWithoutBatchNorm(Member):
    """The member's network with its BatchNorm layers left out: on the CPU each process's BatchNorm
    normalises by its own half batch (gloo has no SyncBatchNorm), which no step could equal."""

    def build(self, config) -> nn.Module:
        model = super().build(config)
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, name, nn.Identity())
        return model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def tiny_trainer(processes: Distributed, data_dir: Path, folder: Path, dropout: float) -> MemberTrainer:
    """This process's trainer of the tiny preset without BatchNorm: fp32, STEPS steps of a global
    batch of 16, `dropout` in the conv blocks and the heads."""
    config = load_config(
        TINY,
        {"data.path": str(data_dir), "train.batch_size": 16, "train.steps_per_epoch": STEPS}
        | {"train.precision": "fp32", "model.conv_dropout": dropout, "model.dense_dropout": dropout},
    )
    data = prepare_data(data_dir, config.data)
    folder.mkdir(parents=True, exist_ok=True)
    member = MemberWithoutBatchNorm(**vars(plan_members(config, data, folder)[0]))
    logger = RunLogger(config.wandb, folder, "steps", {})
    runtime = resolve_runtime("fp32", "cpu")
    return MemberTrainer(member, config, data, runtime, logger, Console(quiet=True), processes)


def first_steps(processes: Distributed, data_dir: Path, folder: Path, dropout: float):
    """(trainer, record) after this process's share of STEPS steps: record holds the initial
    weights, the torch RNG state right before the first step, the first dropout layer's mask in
    the first step and the trained weights."""
    trainer = tiny_trainer(processes, data_dir, folder, dropout)
    record = {"initial": weights_of(trainer.state.model), "stream": torch.get_rng_state()}
    masks = []
    layer = next(m for m in trainer.state.model.modules() if isinstance(m, nn.Dropout))
    hook = layer.register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    trainer.state.epoch = 1  # as fit() counts it
    trainer._train_epoch()
    hook.remove()
    return trainer, record | {"first_mask": masks[0], "trained": weights_of(trainer.state.model)}


def _worker(rank: int, world: int, data_dir: Path, folder: Path) -> None:
    """One of two processes: both settings' first steps, then a save and resume of last.pt."""
    torch.set_num_threads(1)
    rendezvous = f"file://{folder / 'rendezvous'}"
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    processes = Distributed(rank, world)
    _, plain = first_steps(processes, data_dir, folder / "plain", dropout=0.0)
    trainer, dropout = first_steps(processes, data_dir, folder / "dropout", dropout=0.3)
    trainer.checkpoints.save_last(trainer.state, trainer.config)  # every process's stream
    saved = torch.get_rng_state()
    processes.barrier()  # rank 0 has written last.pt
    assert tiny_trainer(processes, data_dir, folder / "dropout", dropout=0.3).try_resume()
    dropout["resumed_own_stream"] = torch.equal(torch.get_rng_state(), saved)
    torch.save({"plain": plain, "dropout": dropout}, folder / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def streams(data, tmp_path_factory) -> tuple[dict, list[dict]]:
    """(one process's records, [rank 0's, rank 1's]) of first_steps, without and with dropout."""
    folder = tmp_path_factory.mktemp("streams")
    torch.multiprocessing.spawn(_worker, args=(2, data, folder), nprocs=2)
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    one = {
        "plain": first_steps(SINGLE, data, folder / "one_plain", dropout=0.0)[1],
        "dropout": first_steps(SINGLE, data, folder / "one_dropout", dropout=0.3)[1],
    }
    return one, ranks


@pytest.mark.slow  # two spawned processes (~10 s on 2 cores)
def test_without_dropout_two_processes_take_one_process_steps(streams):
    """Dropout 0 and no BatchNorm: the weights of 2 processes (8 images each) after STEPS steps are
    one process's on the whole batch of 16, up to the float summation order."""
    one, ranks = streams
    for rank in ranks:
        assert rank["plain"]["initial"].keys() == one["plain"]["trained"].keys()
        for name, weights in one["plain"]["trained"].items():
            assert not torch.equal(weights, one["plain"]["initial"][name]), name  # the steps moved it
            torch.testing.assert_close(rank["plain"]["trained"][name], weights, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # shares the spawned processes of the test above
def test_with_dropout_each_process_draws_its_own_masks(streams):
    """Dropout 0.3: the same initial weights in both processes and in one process, but each process
    its own torch stream and masks; rank 0's stream is one process's (seed_own_stream leaves one
    process's stream as it is); a resumed run continues each process's own stream."""
    one, (rank0, rank1) = streams
    for name, weights in one["dropout"]["initial"].items():
        assert torch.equal(rank0["dropout"]["initial"][name], weights), name
        assert torch.equal(rank1["dropout"]["initial"][name], weights), name
    assert torch.equal(rank0["dropout"]["stream"], one["dropout"]["stream"])
    assert not torch.equal(rank1["dropout"]["stream"], rank0["dropout"]["stream"])
    assert rank0["dropout"]["first_mask"].shape == rank1["dropout"]["first_mask"].shape == (8, 8)
    assert not torch.equal(rank0["dropout"]["first_mask"], rank1["dropout"]["first_mask"])
    assert rank0["dropout"]["resumed_own_stream"] and rank1["dropout"]["resumed_own_stream"]


def test_rank_0_keeps_its_stream_and_a_missing_saved_stream_starts_anew():
    """seed_own_stream leaves rank 0 (and one process) on its stream and gives rank r its own from
    (seed, r); on resume a rank that last.pt holds no stream for starts from (seed, r, epoch)."""

    def state_after(action) -> torch.Tensor:
        torch.manual_seed(7)
        action()
        return torch.get_rng_state()

    def seeded(seed: int) -> torch.Tensor:
        return state_after(lambda: torch.manual_seed(seed))

    unchanged = state_after(lambda: None)
    assert torch.equal(state_after(lambda: SINGLE.seed_own_stream(7)), unchanged)
    assert torch.equal(state_after(lambda: Distributed(0, 2).seed_own_stream(7)), unchanged)
    assert torch.equal(state_after(lambda: Distributed(1, 2).seed_own_stream(7)), seeded(stream_seed(7, 1)))
    assert len({stream_seed(7, r, e) for r in (1, 2) for e in (0, 1, 2)} | {7}) == 7
    saved = [seeded(1), seeded(2)]
    assert torch.equal(state_after(lambda: Distributed(1, 2).restore_own_stream(saved, 7, 3)), saved[1])
    assert torch.equal(state_after(lambda: Distributed(0, 2).restore_own_stream(saved[:1], 7, 3)), saved[0])
    started = state_after(lambda: Distributed(1, 2).restore_own_stream(saved[:1], 7, 3))
    assert torch.equal(started, seeded(stream_seed(7, 1, 3)))
