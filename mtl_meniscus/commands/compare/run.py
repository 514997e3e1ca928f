"""Training and scoring the variants: one after another or in a process pool, each scored on the same test split with the same test-time augmentation."""

from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from mtl_meniscus.commands.compare.plan import (
    RESULT_FILE,
    Variant,
    check_pretrained_weights,
    plan_variants,
    training_flops,
    variant_config,
    variant_status,
)
from mtl_meniscus.commands.compare.report import log_summary, write_report
from mtl_meniscus.commands.compare.settings import CompareConfig
from mtl_meniscus.commands.compare.statistics import ScoredVariant, summarize
from mtl_meniscus.config import SEGMENTATION, Config, saved_run_config
from mtl_meniscus.data.load import prepare_data, with_train_fraction
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.roi import HornCentres, horn_source
from mtl_meniscus.engine.data_source import resolve_data_dir
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.run import start_run, train_network, train_run
from mtl_meniscus.engine.runtime import Runtime, resolve_runtime
from mtl_meniscus.engine.tracking import resolve_wandb_mode
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.evaluation.metrics import (
    challenge_score,
    task_aucs,
)
from mtl_meniscus.io.outputs import atomic_csv_file, json_text, nan_for_null, write_text_atomic
from mtl_meniscus.io.runlock import RunLock
from mtl_meniscus.labels import TaskTable
from mtl_meniscus.networks.models import (
    cascade_networks,
    count_parameters,
    reset_roi_fallbacks,
    roi_fallback_counts,
    trains_per_task,
)

PREDICTIONS_FILE = "test_predictions.csv"

TTA_SEED = 0  # one seed for every variant: each sees the same augmented copies of each test image


def score_variant(
    variant: Variant, run_dir: Path, data: PreparedData, config: Config, runtime: Runtime
) -> ScoredVariant:
    """Predict the test split with the comparison's TTA; time it; write test_predictions.csv and result.json."""
    own = with_train_fraction(data, config.data.train_fraction, config.data.split_seed)
    if not own.same_splits_as(run_dir / "splits.csv"):
        raise MeniscusError(f"{run_dir} was trained on other splits than this comparison's data")
    trained = load_trained(run_dir, runtime)
    test = data.indices("test")
    images = data.view(test)
    horns = _test_horns(config, data)
    warm_up = horns.subset(range(min(8, len(test)))) if horns is not None else None
    trained.predict(images[:8], runtime, horns=warm_up)  # warm-up: the first batch pays one-off kernel setup
    reset_roi_fallbacks(trained.model)
    ms_per_input: list[float] = []  # per batch: preparation + forward, per network input
    last = time.perf_counter()

    def time_batch(n_inputs: int) -> None:
        nonlocal last
        now = time.perf_counter()
        ms_per_input.append(1000 * (now - last) / n_inputs)
        last = now

    probs = trained.predict(images, runtime, tta=config.tta, seed=TTA_SEED, on_batch=time_batch, horns=horns)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    aucs = task_aucs(data.targets[test], probs, data.tasks)
    result = {
        "variant": {
            "mode": variant.mode,
            "trunk": variant.trunk,
            "seed": variant.seed,
            "roi": variant.roi,
            "segmentation": variant.segmentation,
        },
        "test_auc": aucs,
        "test_score": challenge_score(aucs, data.tasks),
        "n_test": len(test),
        "n_train": len(own.indices("train")),  # the training images it had (its share of the split)
        "tta_copies": config.tta.copies,
        "params": count_parameters(trained.model),
        "train_seconds": metrics["train_seconds"],
        "train_wall_seconds": metrics["train_wall_seconds"],
        "train_images": metrics["train_images"],
        "train_images_per_s": metrics["train_images"] / max(metrics["train_seconds"], 1e-9),
        # An image is 1 + copies network inputs. The median over batches is robust to a moment of
        # other load on the machine, which the total time is not.
        "infer_ms_per_image": float(np.median(ms_per_input)) * (1 + config.tta.copies),
        "best": metrics["members"],
        "max_epochs": config.train.max_epochs,  # the budget, for the "still improving" flag
        **_training_compute(config, metrics["members"]),
        "learned": metrics.get("learned", True),
        "warnings": metrics.get("warnings", []),
        "precision": runtime.precision,
        **_roi_fallbacks(trained.model, config.model.roi),
    }
    names = [data.records[i].image for i in test]
    _write_predictions(run_dir / PREDICTIONS_FILE, names, data.targets[test], probs, data.tasks)
    write_text_atomic(run_dir / RESULT_FILE, json_text(result))  # complete or absent: marks it done
    return ScoredVariant(variant, result, names, probs)


def _test_horns(config: Config, data: PreparedData) -> HornCentres | None:
    """A ROI model's horns of the test images from outside it (roi truth: from the masks, which
    _shared_data reads for it; classical: the classical pipeline's); None for other models."""
    test = data.indices("test")
    masks = [data.masks[i] for i in test] if data.masks is not None else None
    return horn_source(config.model.roi, data.view(test), masks)


def _roi_fallbacks(model, roi: str) -> dict[str, Any]:
    """A ROI model's {"roi_images": crops of the test split (every TTA copy's), "roi_fallbacks": of
    which at a fallback window (no horn found)}; {} for other models."""
    if roi == "none":
        return {}
    images, fallbacks = roi_fallback_counts(model)
    return {"roi_images": images, "roi_fallbacks": fallbacks}


def _training_compute(config: Config, members: dict[str, dict]) -> dict[str, Any]:
    """Each network's training FLOPs per image (networks/flops.py) and the run's training FLOPs:
    the sum over networks of epochs trained x steps per epoch x batch x FLOPs per image."""
    flops = training_flops(config)
    images_per_epoch = config.train.steps_per_epoch * config.train.batch_size
    # the networks the run trained: a task without labels in the data (fastMRI+) trained none
    total = sum(best["epochs"] * images_per_epoch * flops[network] for network, best in members.items())
    return {"train_flops_per_image": flops, "train_flops": total}


def _write_predictions(
    path: Path, names: list[str], targets: np.ndarray, probs: dict[str, np.ndarray], tasks: TaskTable
) -> None:
    tasks_out = [t for t in tasks.names if t in probs]
    with atomic_csv_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *tasks_out, *(f"p_{t}" for t in tasks_out)])
        for k, name in enumerate(names):
            labels = [
                "" if math.isnan(v) else int(v) for v in targets[k, [tasks.index(t) for t in tasks_out]]
            ]
            # Full precision: rounded probabilities would tie and change the AUCs recomputed from this file.
            writer.writerow([name, *labels, *(repr(float(probs[t][k])) for t in tasks_out)])


def _training_changes(config: Config, data: PreparedData, run_dir: Path) -> str:
    """What differs between the data a scored variant trained on (its splits.csv) and this
    comparison's (PreparedData.splits_changes), '' when nothing does; a kept copy without
    splits.csv (compare_table.py keep) is checked on its test split only."""
    if not (run_dir / "splits.csv").is_file():
        return ""
    own = with_train_fraction(data, config.data.train_fraction, config.data.split_seed)
    return own.splits_changes(run_dir / "splits.csv")


def _same_test_split(scored: ScoredVariant, test_names: list[str], data: PreparedData) -> bool:
    """Whether a variant scored earlier was scored on this data's test split: the same images in
    the same order, with the same label of each task (NaN where undefined, in both)."""
    if scored.images != test_names:
        return False
    targets = data.targets[data.indices("test")]
    return all(
        np.array_equal(labels, targets[:, data.tasks.index(task)], equal_nan=True)
        for task, labels in scored.labels.items()
    )


def load_scored(variant: Variant, run_dir: Path) -> ScoredVariant:
    """A scored variant read back from its folder; a damaged result.json or test_predictions.csv
    is named (MeniscusError), with how to score the variant again."""
    try:
        result = json.loads((run_dir / RESULT_FILE).read_text())
        result["test_auc"] = {task: nan_for_null(auc) for task, auc in result["test_auc"].items()}
        result["test_score"] = nan_for_null(result["test_score"])  # null: undefined (json_text)
        with (run_dir / PREDICTIONS_FILE).open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        tasks = [column[2:] for column in (rows[0] if rows else {}) if column.startswith("p_")]
        probs = {t: np.array([float(r[f"p_{t}"]) for r in rows]) for t in tasks}
        labels = {t: np.array([float(r[t]) if r[t] else math.nan for r in rows]) for t in tasks}
        images = [r["image"] for r in rows]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError: a ValueError
        raise MeniscusError(
            f"{run_dir}: its {RESULT_FILE} or {PREDICTIONS_FILE} is damaged ({type(err).__name__}: "
            f"{str(err)[:200]}); delete both and rerun the same command: the variant is scored again "
            "from its best.pt"
        ) from None
    if not rows or any(None in r or None in r.values() for r in rows):  # cut short: a row lacks values
        raise MeniscusError(
            f"{run_dir / PREDICTIONS_FILE}: damaged (no rows, or a row cut short); delete it and "
            f"{RESULT_FILE} and rerun the same command: the variant is scored again"
        )
    return ScoredVariant(variant, result, images, probs, labels)


def run_compare(
    compare: CompareConfig,
    out_dir: Path,
    presets: dict[str, Path],
    data_dir: Path | None = None,
    wandb_mode: str | None = None,
    wandb_group: str | None = None,
    console: Console | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Train and score every variant not yet done in `out_dir`, then write the tables and plots.

    `jobs` > 1 trains that many variants at once in worker processes with `threads` CPU threads
    each (default: this process's threads divided among them). `out_dir` is locked once the checks
    pass: a second comparison on the same folder is refused."""
    limit = max_jobs()
    if not 1 <= jobs <= limit:
        raise ConfigError(
            f"--jobs: bad value {jobs} (expected an integer 1..{limit}: one process per CPU core or GPU "
            "of this machine at most)"
        )
    locks: list[RunLock] = []
    try:
        return _compare_locked(
            compare, Path(out_dir), presets, data_dir, wandb_mode, wandb_group, console, locks, jobs, threads
        )
    finally:
        for lock in locks:
            lock.release()


def max_jobs() -> int:
    """The most worker processes `compare --jobs` starts: this machine's CPU cores, or its GPUs
    when it has more of them."""
    import torch

    return max(os.cpu_count() or 1, torch.cuda.device_count())


def _compare_locked(
    compare: CompareConfig,
    out_dir: Path,
    presets: dict[str, Path],
    data_dir: Path | None,
    wandb_mode: str | None,
    wandb_group: str | None,
    console: Console | None,
    locks: list[RunLock],
    jobs: int,
    threads: int | None,
) -> list[dict[str, Any]]:
    console = console or Console(soft_wrap=True)
    group = wandb_group or out_dir.resolve().name
    variants = plan_variants(compare)
    data_path = str(Path(data_dir).resolve()) if data_dir else None
    configs = {v: variant_config(compare, v, presets, data_path, wandb_mode, group) for v in variants}
    for config in configs.values():  # a bad $WANDB_MODE stops here, before any work
        resolve_wandb_mode(config.wandb)
    data, statuses = _shared_data(compare, variants, configs, out_dir, locks, console)
    reference = configs[variants[0]]
    runtime = resolve_runtime(reference.train.precision, reference.train.device)
    pending = [v for v in variants if statuses[v] != "scored"]
    with progress_bar(console) as progress:
        bar = progress.add_task("variants trained and scored", total=len(pending))
        advance = functools.partial(progress.advance, bar)
        if jobs > 1 and pending:  # even one cascade: its networks train at once
            _run_in_parallel(pending, statuses, configs, out_dir, jobs, threads, console, advance)
            statuses = {v: "scored" for v in variants}  # every pending variant now has its result.json
        scored = _score_in_turn(
            variants, pending, statuses, configs, out_dir, data, runtime, console, advance
        )
    test = data.indices("test")
    with progress_bar(console) as progress:
        bar = progress.add_task("bootstrap of the test split", total=compare.bootstrap)
        table = summarize(
            scored,
            data.targets[test],
            compare.bootstrap,
            compare.budget,
            data.tasks,
            data.patients(test),
            on_resample=functools.partial(progress.advance, bar),
        )
    write_report(out_dir, table, scored, data.targets[test], console, data.tasks, data.patients(test))
    log_summary(reference, group, out_dir, table, compare)
    return table


def _shared_data(
    compare: CompareConfig,
    variants: list[Variant],
    configs: dict[Variant, Config],
    out_dir: Path,
    locks: list[RunLock],
    console: Console,
) -> tuple[PreparedData, dict[Variant, str]]:
    """The one data set every variant trains and is scored on (the presets must agree on it), and
    each variant's status (new, started, trained, scored); takes the --out folder's lock."""
    # The full training split: each variant cuts its own share (data.train_fraction) of it.
    reference = configs[variants[0]].model_copy(deep=True)
    reference.data.train_fraction = 1.0
    for variant, config in configs.items():
        # the same data setup up to each variant's share of the training split, or the variants
        # would not share their splits
        if config.data.model_copy(update={"train_fraction": 1.0}) != reference.data:
            raise MeniscusError(
                f"the presets of {variants[0].mode} and {variant.mode} disagree on the data section; "
                "a comparison needs one data setup (same images, same splits)"
            )
    data_dir = resolve_data_dir(reference.data, console)
    for config in configs.values():
        config.data.path = str(data_dir.resolve())
    statuses = {v: variant_status(out_dir / "variants" / v.name, configs[v]) for v in variants}
    check_pretrained_weights([configs[v] for v in variants if statuses[v] in ("new", "started")])
    truth = any(config.model.roi == "truth" for config in configs.values())  # scored on the true horns
    data = prepare_data(data_dir, reference.data, report_dir=out_dir, masks=truth)
    if truth and not len(data.rows_with_mask(range(len(data.records)))):
        raise MeniscusError(
            f"--roi truth: no row of {data_dir} has a mask (labels.csv's mask column), and the true horns "
            "come from the masks; leave truth out of --roi, or give masks"
        )
    if not len(data.indices("test")):
        raise MeniscusError(
            f"the test split of {data_dir} is empty ({data.split_summary()}): compare scores every "
            "variant on it"
        )
    locks.append(RunLock(out_dir, "--out"))  # creates out_dir; refuses one that another process holds
    write_text_atomic(out_dir / "compare.yaml", yaml.safe_dump(compare.to_dict(), sort_keys=False))
    console.print(f"data {data_dir}: {data.exclusion_summary()}; splits: {data.split_summary()}")
    console.print(
        f"comparison: {len(variants)} variants ({', '.join(compare.modes)} x {', '.join(compare.trunks)} "
        + (f"x roi {', '.join(compare.rois)} " if compare.rois != ("none",) else "")
        + (
            f"x segmentation {', '.join(map(_on_off, compare.segmentation))} "
            if compare.segmentation != (False,)
            else ""
        )
        + (
            f"x training share {', '.join(f'{f:g}' for f in compare.train_fractions)} "
            if compare.train_fractions != (1.0,)
            else ""
        )
        + f"x seeds {', '.join(map(str, compare.seeds))}); "
        f"{sum(s == 'scored' for s in statuses.values())} already done -> {out_dir}"
    )
    return data, statuses


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _score_in_turn(
    variants: list[Variant],
    pending: list[Variant],
    statuses: dict[Variant, str],
    configs: dict[Variant, Config],
    out_dir: Path,
    data: PreparedData,
    runtime: Runtime,
    console: Console,
    on_variant: Callable[[], None],
) -> list[ScoredVariant]:
    """Every variant's scores in plan order: read where it was scored before, else trained (or
    resumed) and scored now, with an estimate of the time left; `on_variant()` after each one
    trained and scored here."""
    test_names = [data.records[i].image for i in data.indices("test")]
    scored = []
    seconds_by_mode: dict[str, list[float]] = {}
    for k, variant in enumerate(variants, 1):
        run_dir = out_dir / "variants" / variant.name
        status = statuses[variant]
        if status == "scored":
            if variant not in pending:
                console.print(f"variant {k}/{len(variants)}: {variant.name} scored earlier; kept")
            scored.append(load_scored(variant, run_dir))
            if not _same_test_split(scored[-1], test_names, data):
                raise MeniscusError(
                    f"{run_dir} was scored on another test split than this comparison's data (other "
                    "images or labels)"
                )
            changes = _training_changes(configs[variant], data, run_dir)
            if changes:  # kept, it would be averaged with variants trained on this data
                raise MeniscusError(
                    f"{run_dir} was trained on other data than this comparison's ({changes}): restore "
                    "the data, or compare into another --out"
                )
            continue
        to_go = [v for v in variants[k - 1 :] if statuses[v] != "scored"]
        console.print(
            f"[bold]── variant {k}/{len(variants)}: {variant.name}[/] ({status}; {_to_go(to_go, seconds_by_mode)})",
            highlight=False,
            markup=True,  # the variant's name is letters, digits, '-', '_' and '.' only
        )
        start = time.perf_counter()
        try:
            scored.append(
                _train_and_score(variant, status, configs[variant], run_dir, data, runtime, console)
            )
        except MeniscusError as err:
            raise MeniscusError(f"variant {variant.name}: {err}") from None
        on_variant()
        if status == "new":  # resumed or score-only variants would skew the estimate of what is left
            seconds_by_mode.setdefault(variant.mode, []).append(time.perf_counter() - start)
    return scored


def _train_and_score(
    variant: Variant,
    status: str,
    config: Config,
    run_dir: Path,
    data: PreparedData,
    runtime: Runtime,
    console: Console,
) -> ScoredVariant:
    """Train a new variant (or resume a started one), then score it."""
    if status == "new":
        train_run(config, run_dir, console=console)
    elif status == "started":
        train_run(None, run_dir, resume=True, console=console)
    return score_variant(variant, run_dir, data, config, runtime)


def _run_in_parallel(
    pending: list[Variant],
    statuses: dict[Variant, str],
    configs: dict[Variant, Config],
    out_dir: Path,
    jobs: int,
    threads: int | None,
    console: Console,
    on_variant: Callable[[], None],
) -> None:
    """`compare --jobs N`: train and score the pending variants in N worker processes;
    `on_variant()` as each one is done.

    A cascade's networks are jobs of their own (they train on their own images, with their own
    seeds and stopping rule: engine/run.py train_network), and once all of them have trained one
    more job assembles and scores the cascade; so the comparison waits for a cascade's longest
    network, not for the sum of its three (with roi predicted: for its segmentation network, which
    trains first, and then its longest classifier). Each worker gets `threads` CPU threads
    (default: this process's threads divided by N, N at most the jobs that can run at once) and,
    when GPUs are visible, one GPU of its own (round robin).
    A job's output goes to variants/<variant>.log (a network's: variants/<variant>.<network>.log);
    results land in the variant folders exactly as in a sequential run.
    """
    from concurrent.futures import ProcessPoolExecutor

    import torch

    groups = {v: _network_groups(statuses[v], configs[v], out_dir / "variants" / v.name) for v in pending}
    # a worker per job at most: per cascade its widest group of networks at once, else one
    jobs = min(jobs, sum(max(map(len, groups[v]), default=1) for v in pending))
    threads = threads or max(1, torch.get_num_threads() // jobs)
    context = _WorkerContext()  # fresh interpreters: no forked OpenMP/CUDA state
    gpus = torch.cuda.device_count()
    slots = _gpu_slots(context, jobs, gpus)
    console.print(
        f"training {len(pending)} variants in {jobs} processes, {threads} CPU thread(s) each"
        + (f", one of {gpus} GPUs each" if gpus else "")
        + ("; the cascades' networks at once" if any(groups.values()) else "")
        + f"; their output: {out_dir / 'variants'}/<variant>.log"
    )
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(threads, slots, os.getpid())
    ) as pool:
        try:
            _JobQueue(pool, jobs, configs, out_dir, groups).run(pending, statuses, console, on_variant)
        except BaseException:  # Ctrl-C, a failed job: stop the others, which resume when rerun
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():  # the pool's: they ignore Ctrl-C
                worker.terminate()
            raise
        finally:
            slots.close()
            slots.cancel_join_thread()  # slots no worker took must not hold this process at exit


def end_with_parent(parent: int, every: float = 2.0) -> None:
    """A worker's watch on the main process `parent`: a worker whose main process was killed
    (kill -9) trained on, then waited for work for good, holding its memory and its variant's
    lock. It ends itself instead; its job resumes from its last finished epoch on a rerun."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A worker that leaves Ctrl-C to the main process: it starts with SIGINT ignored (inherited
    across exec). Otherwise a Ctrl-C while it imports the package printed its traceback, and one
    while it trains left the main process's shutdown racing its own. The main process ends the
    workers itself (_run_in_parallel); their jobs resume from their last finished epoch."""

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal() is main-thread only
            return super().start()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            super().start()
        finally:
            signal.signal(signal.SIGINT, previous)


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


class _JobQueue:
    """The jobs of `compare --jobs` in a process pool of `workers`: whole variants, and a cascade's
    networks (`groups`: each variant's groups of networks still to train, one group after another)
    followed by its scoring job. Jobs go to the pool only as workers come free, so that a job made
    ready by a finished one (a cascade's next group, its scoring job) runs before those waiting."""

    def __init__(
        self,
        pool,
        workers: int,
        configs: dict[Variant, Config],
        out_dir: Path,
        groups: dict[Variant, list[list[str]]],
    ):
        self.pool, self.workers, self.configs, self.out_dir = pool, workers, configs, out_dir
        self.groups = groups
        self.waiting: list[tuple[Variant, str | None, str]] = []  # (variant, network, status) in order
        self.futures: dict[Any, tuple[Variant, str | None]] = {}

    def run(
        self,
        pending: list[Variant],
        statuses: dict[Variant, str],
        console: Console,
        on_variant: Callable[[], None],
    ) -> None:
        """Run every job; a cascade's next group of networks once the group before has trained,
        its scoring job once its last network has."""
        from concurrent.futures import FIRST_COMPLETED, wait

        # the cascades' networks first: they are the long jobs
        for variant in sorted(pending, key=lambda v: not self.groups[v]):
            self.waiting += self._next_jobs(variant, statuses[variant])
        done = 0
        while self._submit_waiting():
            finished, _ = wait(self.futures, return_when=FIRST_COMPLETED)
            for future in finished:
                variant, network = self.futures.pop(future)
                seconds = _worker_seconds(future, variant, self.out_dir, network)
                if network is None:
                    done += 1
                    console.print(f"variant {variant.name} done in {seconds:.0f} s ({done}/{len(pending)})")
                    on_variant()
                    continue
                console.print(f"variant {variant.name}: network {network} trained in {seconds:.0f} s")
                group = self.groups[variant][0]
                group.remove(network)
                if not group:  # the next group, or the scoring job, goes before the waiting jobs
                    self.groups[variant].pop(0)
                    self.waiting[:0] = self._next_jobs(variant, "started")

    def _next_jobs(self, variant: Variant, status: str) -> list[tuple[Variant, str | None, str]]:
        """The variant's next group of networks, or once none is left its job that trains and
        scores it (a cascade's: assembles and scores it)."""
        if self.groups[variant]:
            return [(variant, network, status) for network in self.groups[variant][0]]
        return [(variant, None, status)]

    def _submit_waiting(self) -> bool:
        """Give free workers the waiting jobs in order; False when nothing is left to run."""
        while self.waiting and len(self.futures) < self.workers:
            variant, network, status = self.waiting.pop(0)
            run_dir = self.out_dir / "variants" / variant.name
            if network is None:
                future = self.pool.submit(_variant_worker, variant, status, self.configs[variant], run_dir)
            else:
                future = self.pool.submit(_network_worker, variant.name, network, run_dir)
            self.futures[future] = (variant, network)
        return bool(self.futures)


def _network_groups(status: str, config: Config, run_dir: Path) -> list[list[str]]:
    """The networks of a cascade variant that train as jobs of their own, in groups that train one
    after another (its run folder begun here when new): with roi predicted its segmentation network
    first, then its classifiers, which crop around the segmentation network's horns; else all of
    them at once. [] for a variant trained in one job: a one-network model, a trained one (only
    scored)."""
    if not trains_per_task(config.model.name) or status not in ("new", "started"):
        return []
    if status == "new":
        start_run(config.model_copy(deep=True), run_dir, console=Console(quiet=True))
    # the networks of the saved config: a task the data has no label for has none
    networks = list(cascade_networks(saved_run_config(run_dir / "config.yaml").model))
    if config.model.roi == "predicted":
        groups = [[SEGMENTATION], [n for n in networks if n != SEGMENTATION]]
        return [group for group in groups if group]  # an empty group would never be done
    return [networks] if networks else []  # no network to split off: the variant's one job, as before


def _worker_seconds(future, variant: Variant, out_dir: Path, network: str | None = None) -> float:
    """The seconds a worker took for `variant` (or one of its networks); its failure as a
    MeniscusError naming the variant and the job's log."""
    from concurrent.futures.process import BrokenProcessPool

    job = variant.name if network is None else f"{variant.name}.{network}"
    try:
        return future.result()
    except MeniscusError as err:
        raise MeniscusError(
            f"variant {variant.name}: {err} (log: {out_dir / 'variants' / job}.log)"
        ) from None
    except BrokenProcessPool:
        raise MeniscusError(
            f"a worker process died (out of memory, or killed) while {job} or another job was running; "
            "rerun the same command to continue, with fewer --jobs"
        ) from None


def _gpu_slots(context, jobs: int, gpus: int):
    """A queue with each worker's GPU (round robin), or None for each when there is no GPU."""
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot % gpus if gpus else None)
    return slots


def _init_worker(threads: int, slots, parent: int) -> None:
    import torch

    threading.Thread(target=end_with_parent, args=(parent,), daemon=True).start()

    torch.set_num_threads(threads)
    gpu = slots.get()
    if gpu is not None:  # before CUDA starts in this process: it then sees only its own GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def _variant_worker(variant: Variant, status: str, config: Config, run_dir: Path) -> float:
    """One variant in a worker process: its own copy of the data, its own log; seconds taken."""
    start = time.perf_counter()
    log = run_dir.parent / f"{variant.name}.log"
    with _open_log(log) as handle:
        console = Console(file=handle, soft_wrap=True)
        # the whole training split, as _shared_data reads it: score_variant cuts the variant's share
        whole = config.data.model_copy(update={"train_fraction": 1.0})
        data = prepare_data(Path(config.data.path), whole, masks=config.model.roi == "truth")
        runtime = resolve_runtime(config.train.precision, config.train.device)
        _train_and_score(variant, status, config, run_dir, data, runtime, console)
    return time.perf_counter() - start


def _open_log(log: Path):
    """A job's log, appended to: a resumed job continues the log of the one it resumes."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return log.open("a", encoding="utf-8")


def _network_worker(variant_name: str, network: str, run_dir: Path) -> float:
    """One network of a cascade variant in a worker process, with its own log; seconds taken."""
    start = time.perf_counter()
    log = run_dir.parent / f"{variant_name}.{network}.log"
    with _open_log(log) as handle:
        train_network(run_dir, network, console=Console(file=handle, soft_wrap=True))
    return time.perf_counter() - start


def _to_go(to_go: list[Variant], seconds_by_mode: dict[str, list[float]]) -> str:
    """'4 to go with this one, about 27 min', from the mean time of each mode's variants so far."""
    text = f"{len(to_go)} to go with this one" if len(to_go) > 1 else "the last one"
    if all(v.mode in seconds_by_mode for v in to_go):
        seconds = sum(float(np.mean(seconds_by_mode[v.mode])) for v in to_go)
        text += f", about {seconds / 60:.0f} min" if seconds >= 90 else f", about {seconds:.0f} s"
    return text
