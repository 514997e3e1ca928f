"""`tune`: hyper-parameter search with Optuna, maximizing the validation score (never the test split).

OUT/
    study.db                  the study (default storage: SQLite); --storage URL for a shared database
    trials/trial-NNNN/        one ordinary run folder per trial (train --resume works on it), with
                              train.log (the training's output)
    trials.csv                every trial of the study: number, state, value, params, duration, folder
    best.yaml                 the best trial's resolved config, a preset for `train --config`
    history.png, importance.png   Optuna's optimization history and parameter importances

The objective is the run's best validation score as training reports it in metrics.json: the shared
model's `members.shared.val_score` (the challenge-weighted mean of its validation AUCs), or for the
cascade the challenge-weighted mean (the task table's weights) of its three networks' best validation AUCs.
The best trial's value is optimistic (the maximum over trials on one validation split); training
best.yaml and scoring the test split gives the unbiased figure.

Pruning: after each epoch the network's validation score is reported to the trial at a step that
means the same network and epoch in every trial: step = index of the network x max_epochs + epoch
- 1 (the shared model is network 0; the cascade trains fissure, orientation, position in that order,
after its segmentation network with model.segmentation, judged on its mean validation Dice).
PerNetworkMedianPruner judges the network a trial trains now on that network's steps alone, so a
cascade's good fissure network cannot carry a stuck orientation network. No network is pruned in
its first `warmup_epochs`.

Every trial sees the same number of images per epoch: a sampled `train.batch_size` sets
`train.steps_per_epoch` to the base preset's batch_size x steps_per_epoch / batch_size.

A study holds the trials of one setup: its fixed config (everything the search does not vary, the
data folder included) is recorded in the study when it is created, and a later search (a rerun, or
another worker on the same storage) with another is refused, naming the keys that differ. An --out
folder holds the outputs of one study: a search of another study there is refused before its study
is created.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from mtl_meniscus.config import MAX_SEED, Config, DataConfig, check_option, dotted_keys, load_config
from mtl_meniscus.engine.checkpoint import load_checkpoint
from mtl_meniscus.engine.data_source import resolve_data_dir
from mtl_meniscus.engine.members import JOINT
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.run import check_registered, train_run
from mtl_meniscus.engine.tracking import resolve_wandb_mode
from mtl_meniscus.engine.trainer import TrainingDivergedError
from mtl_meniscus.errors import ConfigError, DataError, MeniscusError
from mtl_meniscus.evaluation.metrics import monitor_score
from mtl_meniscus.io.outputs import atomic_write, check_output_dir, is_data_folder, some_of, write_text_atomic
from mtl_meniscus.io.secrets import mask_url, scrub
from mtl_meniscus.networks.losses import WEIGHTINGS
from mtl_meniscus.networks.models import cascade_networks, trains_per_task

try:
    from optuna.pruners import BasePruner
except ImportError:  # the [tune] extra is missing: TuneSearch says how to install it
    BasePruner = object

# No network is pruned before it has finished this many epochs: at least the latest documented
# onset of the shared preset plus one (docs/results.md, the floor table; a test reads it). The
# complete table (5 training seeds per row) has onsets up to 13: outside-a, training seed 4, a run
# restarted at epoch 7 whose new weights left 0.7 at epoch 13 (the plain floor with that seed: 12).
# A network still at chance before its onset is no sign of a bad setting.
WARMUP_EPOCHS = 14
HEARTBEAT_S = 60  # a running trial's heartbeat; one silent for 3 heartbeats is marked FAIL
JOB_TYPE = "tune-trial"
SCORED_BECAUSE = "tune compares trials by their validation score"  # why a trial needs one (train_run)
STEPS_KEY = "train.steps_per_epoch"  # set per trial from its batch size (steps_at_fixed_images)
SETUP_ATTR = "fixed_config"  # the study's user attribute holding its fixed config (fixed_setup)
# With a searched batch size, what stays fixed is the product (steps_at_fixed_images' images per epoch)
IMAGES_KEY = "train.batch_size x train.steps_per_epoch"
# Keys that say where and how a trial runs, not what it learns: workers on other machines may set
# them otherwise (a GPU here, DataLoader workers or a smaller evaluation batch there) and still add
# comparable trials, so a study's fixed config leaves them out, as it leaves out wandb.*.
RUNTIME_KEYS = frozenset({"train.device", "train.num_workers", "train.eval_batch_size", "data.load"})
OPTION_OF_KEY = {"model.name": "--mode", "data.path": "--data", "train.seed": "--seed"}  # named in a refusal


@dataclass(frozen=True)
class Param:
    """One searched config key: a float range (`low`..`high`, log-uniform if `log`) or `choices`."""

    key: str  # dotted config key, also the parameter's name in the study
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()  # categorical: primitives only (Optuna stores them); lists as "a,b,c"

    def describe(self) -> str:
        if self.choices:
            return ", ".join(str(decode(self.key, c)) for c in self.choices)
        return f"{self.low:g} .. {self.high:g}" + (" (log)" if self.log else "")


# The search space, one row per config key (README, "Tune", shows the same table).
SEARCH_SPACE: tuple[Param, ...] = (
    Param("train.lr", 1e-4, 3e-3, log=True),
    Param("train.batch_size", choices=(16, 32, 64)),
    Param("train.weighting", choices=WEIGHTINGS.names()),  # every registered task weighting
    Param("train.pos_weights.position", 1.0, 10.0, log=True),  # BCE positive-class weight (anterior)
    Param("model.widths", choices=("8,16,24,32", "16,32,48,64", "24,48,64,96")),  # filters per block
    Param("model.conv_dropout", 0.0, 0.3),
    Param("model.dense_dropout", 0.0, 0.5),
    Param("augment.rotation_deg", 0.0, 45.0),
    Param("augment.translate_frac", 0.0, 0.2),
)

LIST_KEYS = {"model.widths"}  # categorical values stored as "a,b,c" strings, decoded to lists of int


def decode(key: str, value: Any) -> Any:
    """A study parameter as the config value it stands for ("16,32,48,64" -> [16, 32, 48, 64])."""
    if key in LIST_KEYS:
        return [int(part) for part in str(value).split(",")]
    return value


def suggest(trial, space: tuple[Param, ...]) -> dict[str, Any]:
    """Config overrides sampled for one trial, keyed by dotted config key."""
    overrides = {}
    for param in space:
        if param.choices:
            value = trial.suggest_categorical(param.key, list(param.choices))
        else:
            value = trial.suggest_float(param.key, param.low, param.high, log=param.log)
        overrides[param.key] = decode(param.key, value)
    return overrides


def search_distribution(optuna, param: Param):
    """The Optuna distribution that suggest() samples `param` from."""
    if param.choices:
        return optuna.distributions.CategoricalDistribution(list(param.choices))
    return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log)


def _distribution_text(distribution) -> str:
    """An Optuna distribution as Param.describe() writes one."""
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return ", ".join(str(choice) for choice in choices)
    log = " (log)" if getattr(distribution, "log", False) else ""
    return f"{getattr(distribution, 'low', '?'):g} .. {getattr(distribution, 'high', '?'):g}{log}"


def objective_value(metrics: dict[str, Any], config: Config) -> float | None:
    """The trial's value: the best validation score (challenge-weighted over the cascade's networks).

    None when a network has no defined validation score (e.g. a validation split with one class)."""
    members = metrics["members"]
    if not trains_per_task(config.model.name):
        return members[JOINT]["val_score"]
    scores = {task: members[task]["val_score"] for task in config.model.tasks}
    if any(score is None for score in scores.values()):
        return None
    return monitor_score(scores, config.data.task_table())  # the tasks' challenge weights


def member_folder(run_dir: Path, member: str) -> Path:
    """Where a network writes last.pt (train.py's layout: the run folder, or members/<task>/)."""
    return run_dir if member == JOINT else run_dir / "members" / member


def epoch_score(run_dir: Path, member: str, epoch: int) -> float | None:
    """The validation score of `member` at `epoch`, from the history in its last.pt (written before
    train_run calls on_epoch_end); None when it is not a finite number."""
    payload = load_checkpoint(member_folder(run_dir, member) / "last.pt")
    rows = [row for row in payload["training_state"]["history"] if row["epoch"] == epoch]
    score = rows[-1]["val_score"] if rows else None
    return float(score) if score is not None and math.isfinite(score) else None


class PerNetworkMedianPruner(BasePruner):
    """Optuna's MedianPruner, judged on the network the trial trains now.

    Steps come in segments of `epochs_per_network` (one per network, `_pruning_callback`'s steps).
    At step s of segment k = s // epochs_per_network the trial's best value over segment k's steps
    is compared with the median, over completed trials, of their values at step s (the same network
    and epoch). MedianPruner takes the best over all steps instead, so a cascade whose fissure
    network scored 0.97 kept a stuck orientation network. With one segment (the shared model) it
    decides as MedianPruner(n_startup_trials, n_warmup_steps=n_warmup_epochs)."""

    def __init__(self, epochs_per_network: int, n_startup_trials: int = 5, n_warmup_epochs: int = 0):
        if epochs_per_network < 1 or n_startup_trials < 0 or n_warmup_epochs < 0:
            raise ValueError(
                f"PerNetworkMedianPruner: epochs_per_network {epochs_per_network} (>= 1), "
                f"n_startup_trials {n_startup_trials} and n_warmup_epochs {n_warmup_epochs} (>= 0)"
            )
        self.epochs_per_network = epochs_per_network
        self.n_startup_trials = n_startup_trials
        self.n_warmup_epochs = n_warmup_epochs  # per network: the first epochs of each segment

    def prune(self, study, trial) -> bool:
        import optuna

        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        step = trial.last_step
        if not completed or len(completed) < self.n_startup_trials or step is None:
            return False
        first = step - step % self.epochs_per_network  # the current network's first step
        if step - first < self.n_warmup_epochs:
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        values = [
            v for s, v in trial.intermediate_values.items() if first <= s < first + self.epochs_per_network
        ]
        best = _nan_best(values, maximize)
        if math.isnan(best):
            return True  # as MedianPruner: a network with no number so far is pruned
        others = [t.intermediate_values[step] for t in completed if step in t.intermediate_values]
        if all(math.isnan(v) for v in others):  # none, or none with a number: no median to judge by
            return False
        median = float(np.nanmedian(others))
        return best < median if maximize else best > median


def _nan_best(values: list[float], maximize: bool) -> float:
    """The largest (or smallest) value that is not NaN; NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return max(finite) if maximize else min(finite)


def default_storage(out_dir: Path) -> str:
    """sqlite:///OUT/study.db with the path escaped: in a URL a raw '?' or '#' would end the path
    and a '%' start an escape, putting the database elsewhere or refusing a fine folder name."""
    from sqlalchemy.engine import URL

    database = (Path(out_dir).resolve() / "study.db").as_posix()
    return URL.create("sqlite", database=database).render_as_string(hide_password=False)


def check_kept_storage(url: str) -> None:
    """Refuse an in-memory SQLite --storage: the study would end with this process (a rerun cannot
    add trials to it), and Optuna's heartbeat thread finds no tables in its own connection."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return  # not a URL: open_storage says so
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if parsed.get_backend_name() == "sqlite" and (in_memory or parsed.query.get("mode") == "memory"):
        raise ConfigError(
            f"--storage {mask_url(url)}: an in-memory database ends with this process, so a rerun "
            "could not add trials to the study; give a file (sqlite:///path/study.db), or leave "
            "--storage out for OUT/study.db"
        )


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, attempts: int = 3):
    """An Optuna RDB storage with heartbeats: a trial whose worker died (no heartbeat for 3 x
    `heartbeat_s`) is marked FAIL by the next trial any worker starts, instead of staying RUNNING."""
    import optuna

    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s
                )
        except Exception as err:  # malformed URL, unknown dialect, missing driver, unreachable server
            if attempt < attempts and _lost_schema_race(err):
                time.sleep(attempt)  # the tables now exist: the next attempt finds them
                continue
            reason = scrub(str(err).splitlines()[0] if str(err) else "", url)
            raise MeniscusError(
                f"--storage {mask_url(url)}: cannot open the study storage ({type(err).__name__}: {reason[:300]}); "
                "expected a database URL such as sqlite:///path/study.db or "
                "postgresql+psycopg://user:password@host/database (its driver installed: psycopg)"
            ) from None


def _lost_schema_race(err: Exception) -> bool:
    """Workers started together on a new database each create Optuna's tables; all but one fail
    (duplicate key in pg_type, "already exists"), a known Optuna limitation (optuna#1092)."""
    import sqlalchemy.exc

    return isinstance(err, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError) or (
        "already exists" in str(err)
    )


def searched_keys(space: tuple[Param, ...]) -> set[str]:
    """The config keys a trial sets: the searched ones, and the steps derived from a searched batch size."""
    keys = {param.key for param in space}
    return keys | {STEPS_KEY} if "train.batch_size" in keys else keys


def fixed_setup(config: Config, space: tuple[Param, ...]) -> dict[str, Any]:
    """What every trial of a study shares: the resolved base config as dotted keys, without the
    searched keys, wandb.* and RUNTIME_KEYS; with a searched batch size, its images per epoch.
    JSON-plain (as the study stores it), so that a recorded setup compares equal to a new one."""
    searched = searched_keys(space)
    flat = dotted_keys(config.to_dict())
    fixed = {
        key: value
        for key, value in flat.items()
        if key not in searched and key not in RUNTIME_KEYS and not key.startswith("wandb.")
    }
    if STEPS_KEY in searched:
        fixed[IMAGES_KEY] = config.train.batch_size * config.train.steps_per_epoch
    return json.loads(json.dumps(fixed))


def setup_differences(saved: dict[str, Any], wanted: dict[str, Any], keys: set[str]) -> list[str]:
    """'key: saved -> wanted' for each of `keys` whose values differ, the key followed by the option
    that sets it, if one does; a key one side lacks shows as (absent)."""
    absent = object()

    def shown(value: Any) -> str:
        return "(absent)" if value is absent else repr(value)

    return [
        key
        + (f" ({OPTION_OF_KEY[key]})" if key in OPTION_OF_KEY else "")
        + f": {shown(saved.get(key, absent))} -> {shown(wanted.get(key, absent))}"
        for key in sorted(keys)
        if saved.get(key, absent) != wanted.get(key, absent)
    ]


def steps_at_fixed_images(batch_size: int, images_per_epoch: int) -> int:
    """Steps per epoch that show `images_per_epoch` images at `batch_size` (rounded, at least 1)."""
    return max(1, round(images_per_epoch / batch_size))


def check_tune_options(
    n_trials: int, timeout: float | None, n_jobs: int, seed: int, study_name: str | None
) -> None:
    check_option(n_trials >= 1, "--n-trials", n_trials, "an integer >= 1")
    check_option(
        timeout is None or (math.isfinite(timeout) and timeout > 0), "--timeout", timeout, "seconds > 0"
    )
    check_option(n_jobs >= 1, "--n-jobs", n_jobs, "an integer >= 1")
    check_option(0 <= seed <= MAX_SEED, "--seed", seed, f"an integer 0..{MAX_SEED}")
    check_option(
        study_name is None or bool(study_name.strip()), "--study-name", study_name, "a non-empty name"
    )


def check_space(preset: Path | None, base: dict[str, Any], space: tuple[Param, ...]) -> None:
    """Every bound and choice of the search space gives a valid config with this preset, checked
    before anything trains (e.g. 4 widths with a preset of 5 conv blocks is refused here)."""
    for param in space:
        values = param.choices or (param.low, param.high)
        for value in values:
            try:
                load_config(preset, base | {param.key: decode(param.key, value)})
            except ConfigError as err:
                raise ConfigError(
                    f"search space: {param.key} = {value!r} does not fit the preset {preset}: {err}"
                ) from None


def sampler_seed(seed: int, trials_before: int) -> int:
    """The sampler's seed: --seed for a new study (same seed, same trials), mixed with the number of
    trials already in the study when it continues, so that a rerun draws new points instead of
    replaying the first ones."""
    return int(np.random.SeedSequence([seed, trials_before]).generate_state(1)[0])


def _trial_rows(study, space: tuple[Param, ...]) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        row = {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "learned": trial.user_attrs.get("learned"),
            "epochs": trial.user_attrs.get("epochs"),
            "duration_s": round(duration, 1) if duration is not None else None,
            "run_dir": trial.user_attrs.get("run_dir", ""),
            "error": trial.user_attrs.get("error", _stale_error(trial)),
        }
        row |= {param.key: trial.params.get(param.key) for param in space}
        row[STEPS_KEY] = trial.user_attrs.get(STEPS_KEY)  # derived from train.batch_size
        rows.append(row)
    return rows


def _stale_error(trial) -> str:
    """A FAIL without an error of its own: the heartbeat check failed it (its worker stopped)."""
    return "its worker stopped (no heartbeat)" if trial.state.name == "FAIL" else ""


def best_trial(study):
    """The best COMPLETE trial, or None while there is none."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    return max(done, key=lambda t: t.value) if done else None


def best_preset_text(trial, study_name: str) -> str:
    """best.yaml: the best trial's resolved config in config.yaml's YAML form, with a header.

    The same as the trial's config.yaml but for wandb.group and wandb.job_type, cleared: a training
    from best.yaml is not a trial of the study."""
    config = json.loads(trial.user_attrs["config"])
    config["wandb"] |= {"group": None, "job_type": None}
    header = (
        f"# Best trial of the Optuna study '{study_name}': trial {trial.number}, validation score "
        f"{trial.value:.4f}.\n# Its resolved config (its run folder's config.yaml, without the study's "
        "wandb group and job type);\n# train with: train --config best.yaml\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def write_outputs(study, out_dir: Path, space: tuple[Param, ...]) -> None:
    """trials.csv and best.yaml, written atomically (a killed search keeps the last complete ones)."""
    rows = _trial_rows(study, space)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["number"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "trials.csv", buffer.getvalue())
    best = best_trial(study)
    if best is not None and "config" in best.user_attrs:
        write_text_atomic(out_dir / "best.yaml", best_preset_text(best, study.study_name))


def write_plots(study, out_dir: Path, console: Console) -> None:
    """history.png always (once a trial has completed); importance.png with >= 2 completed trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        console.print("no completed trial yet: history.png and importance.png not written")
        return
    plots = [("history.png", optuna_plots.plot_optimization_history)]
    if len(completed) >= 2:
        plots.append(("importance.png", optuna_plots.plot_param_importances))
    else:
        console.print("importance.png not written: parameter importances need >= 2 completed trials")
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
            figure = axes.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            with atomic_write(out_dir / name) as tmp:
                figure.savefig(tmp, format="png", dpi=120)
            plt.close(figure)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. parameters that never varied
            console.print(f"{name} not written: {err}")


@dataclass
class TuneRequest:
    """What one `tune` call asks for (the CLI's options; tests pass a small `space` and a `pruner`).

    `preset` is the base config (a YAML preset); each trial is it plus `overrides` plus the sampled
    values, trained into OUT/trials/trial-NNNN with train.seed = `seed`. `pruner` defaults to
    PerNetworkMedianPruner(max_epochs, n_warmup_epochs=warmup_epochs); `heartbeat_s` is the
    storage's heartbeat (tests shorten it)."""

    out_dir: Path
    preset: Path | None
    mode: str | None = None
    data_dir: Path | None = None
    n_trials: int = 20
    timeout: float | None = None
    n_jobs: int = 1
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    wandb_mode: str | None = None
    space: tuple[Param, ...] = SEARCH_SPACE
    pruner: Any = None
    warmup_epochs: int = WARMUP_EPOCHS
    overrides: dict[str, Any] | None = None
    heartbeat_s: int = HEARTBEAT_S


def run_tune(out_dir: Path, preset: Path | None, console: Console | None = None, **options: Any):
    """Run `n_trials` more trials of the study (created, or continued when it exists) and return it;
    `options` are TuneRequest's fields."""
    return TuneSearch(TuneRequest(out_dir, preset, **options), console).run()


class TuneSearch:
    """One `tune` call: checks, the base config, the study, the trials and the files they leave."""

    def __init__(self, request: TuneRequest, console: Console | None = None):
        try:
            import optuna
        except ImportError:
            raise MeniscusError("tune needs optuna: pip install 'mtl_meniscus[tune]'") from None
        self.optuna, self.request = optuna, request
        check_tune_options(
            request.n_trials, request.timeout, request.n_jobs, request.seed, request.study_name
        )
        if request.storage is not None:
            check_kept_storage(request.storage)
        self.console = console or Console(soft_wrap=True)
        self.study_name = request.study_name or Path(request.out_dir).resolve().name
        # a bad preset, option, $WANDB_MODE or search space is refused before --out and its study.db
        # are made
        self.base, base_data = self._checked_settings()
        self.out_dir = check_output_dir(request.out_dir, "--out")
        self.trials_dir = self.out_dir / "trials"
        self.storage_url = request.storage or default_storage(self.out_dir)
        # a bad URL, or an --out of another study, is refused before the data is read or generated
        self.rdb = open_storage(self.storage_url, request.heartbeat_s)
        self._check_out_dir_study()
        self._resolve_data(base_data)
        self.write_lock = threading.Lock()  # n_jobs threads finish trials concurrently; one writer at a time
        self.errors: list[MeniscusError] = []  # a trial's error stops the search, also from a worker thread

    def _check_out_dir_study(self) -> None:
        """--out holds the outputs of one study: trials.csv and best.yaml are rewritten after every
        trial, and trial folders are numbered from 0 in each study. A search of another study there
        is refused before its study or a trial is created, so nothing of the first is replaced."""
        optuna = self.optuna
        names = optuna.get_all_study_names(storage=self.rdb)
        if self.request.storage is None and names and self.study_name not in names:
            held = ", ".join(f"'{name}'" for name in names)
            raise MeniscusError(
                f"--out {self.out_dir}: its study.db holds the study {held}, not '{self.study_name}' "
                "(--study-name), and its trials.csv, best.yaml and trials/ are that study's; use another "
                f"--out for a new study, or --study-name '{names[0]}' to add trials to that one"
            )
        ours = set()
        if self.study_name in names:
            study = optuna.load_study(study_name=self.study_name, storage=self.rdb)
            ours = {self._run_dir(trial.number) for trial in study.get_trials(deepcopy=False)}
        # a folder with a run (config.yaml) whose number is no trial of this study: another study's
        others = [
            folder.name
            for folder in sorted(self.trials_dir.glob("trial-*"))
            if (folder / "config.yaml").exists() and folder not in ours
        ]
        if others:
            raise MeniscusError(
                f"--out {self.out_dir}: trials/ holds runs of another study ({some_of(others)}), no "
                f"trials of the study '{self.study_name}' in "
                f"{mask_url(self.storage_url)}, and trial numbers start at 0 in each study; use another "
                "--out for this study, or the --study-name and --storage of that one"
            )

    def _checked_settings(self) -> tuple[dict[str, Any], DataConfig]:
        """The overrides every trial shares, checked with the preset, $WANDB_MODE and every bound of
        the search space, and the data config they give (the data's path comes later, from
        _resolve_data)."""
        request = self.request
        base = {
            "model.name": request.mode,
            "train.seed": request.seed,
            "wandb.mode": request.wandb_mode,
            "wandb.group": self.study_name,
            "wandb.job_type": JOB_TYPE,
            **(request.overrides or {}),
        }
        # a bad preset or option stops here, a misspelt model or weighting too
        config = load_config(request.preset, base, check=check_registered)
        # and a bad $WANDB_MODE, unless --wandb, --set or the preset disable wandb
        wandb_mode = resolve_wandb_mode(config.wandb)
        if request.n_jobs > 1 and wandb_mode != "disabled":
            raise ConfigError(
                f"--n-jobs {request.n_jobs} with wandb ({wandb_mode}): wandb keeps one run per process, so "
                "trials in parallel threads would end each other's runs; use --wandb disabled, or start "
                "several tune processes on the same --storage (each with --n-jobs 1)"
            )
        check_space(request.preset, base, request.space)
        if request.data_dir is not None and not is_data_folder(request.data_dir):  # a typo in --data
            raise DataError(
                f"--data {request.data_dir}: not a data folder (no labels.csv, nor MRNet's label files; "
                "docs/data.md)"
            )
        return base, config.data

    def _resolve_data(self, data_config: DataConfig) -> None:
        """The data's path in the shared overrides (the built-in phantom generated once, before
        trials, possibly threads, would race to) and the study's setup resolved with it."""
        request = self.request
        data = request.data_dir or resolve_data_dir(data_config)
        self.base["data.path"] = str(Path(data).resolve())
        resolved = load_config(request.preset, self.base)
        self.mode, self.max_epochs = resolved.model.name, resolved.train.max_epochs
        self.fixed = fixed_setup(resolved, request.space)
        self.images_per_epoch = resolved.train.batch_size * resolved.train.steps_per_epoch

    def _open_study(self):
        """The study, created or loaded from the storage; refuses one of another direction or setup."""
        optuna, request = self.optuna, self.request
        try:
            study = optuna.create_study(
                storage=self.rdb,
                study_name=self.study_name,
                direction="maximize",
                load_if_exists=True,
                pruner=request.pruner
                or PerNetworkMedianPruner(self.max_epochs, n_warmup_epochs=request.warmup_epochs),
            )
        except Exception as err:  # e.g. a database that is not an Optuna one, or read-only
            raise MeniscusError(
                f"--storage {mask_url(self.storage_url)}: cannot create or load the study '{self.study_name}' "
                f"({type(err).__name__}: {scrub(str(err).splitlines()[0], self.storage_url)[:300] if str(err) else ''})"
            ) from None
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise MeniscusError(
                f"study '{self.study_name}' in {mask_url(self.storage_url)} minimizes; tune maximizes"
            )
        self._check_study_setup(study)
        self._check_search_space(study)
        return study

    def _check_search_space(self, study) -> None:
        """The study's trials chose each categorical key among the choices this search has: Optuna
        refuses other choices (train.weighting's are the registered weightings, so a plug-in
        registered since changes them) only when a trial samples the key, after it has started."""
        wanted = {param.key: param for param in self.request.space if param.choices}
        for trial in study.get_trials(deepcopy=False):
            for key, used in trial.distributions.items():
                param = wanted.get(key)
                if param is not None and used != search_distribution(self.optuna, param):
                    raise ConfigError(
                        f"study '{self.study_name}' in {mask_url(self.storage_url)}: its trials searched "
                        f"{key} over {_distribution_text(used)}, this search over {param.describe()} "
                        "(a task weighting registered or removed since changes train.weighting's choices): "
                        "use another --out (or --study-name) for a new study"
                    )

    def _check_study_setup(self, study) -> None:
        """A study holds the trials of one setup, so that their scores compare and best.yaml is a
        trial of this data: the study's recorded fixed config must equal this search's."""
        saved = study.user_attrs.get(SETUP_ATTR)
        if saved is None:
            # A new study, or one created before tune recorded its setup: such a study recorded its
            # mode and epochs per network only, which are checked; the rest is accepted as it is and
            # this search's setup recorded from now on.
            legacy = {"model.name": study.user_attrs.get("mode")}
            legacy["train.max_epochs"] = study.user_attrs.get("epochs_per_network")
            legacy = {key: value for key, value in legacy.items() if value is not None}
            self._refuse_differences(setup_differences(legacy, self.fixed, set(legacy)))
            study.set_user_attr(SETUP_ATTR, self.fixed)
            # still written for tune of earlier versions, which checks these two only
            study.set_user_attr("mode", self.mode)
            study.set_user_attr("epochs_per_network", self.max_epochs)
            study.set_user_attr("objective", "best validation score (challenge-weighted)")
            # read back: a worker that started at the same moment may have recorded another setup
            # (the last one written wins, and the other worker is refused here)
            saved = study.user_attrs[SETUP_ATTR]
        # A key searched now is set by each trial, whatever the study's earlier trials fixed it to.
        keys = (set(saved) | set(self.fixed)) - searched_keys(self.request.space)
        # A key the record lacks was added to the config since (a newer version): the study's
        # trials ran with its default, so only another value differs.
        defaults = fixed_setup(Config(), self.request.space)
        saved = {key: defaults[key] for key in keys if key not in saved and key in defaults} | saved
        self._refuse_differences(setup_differences(saved, self.fixed, keys))

    def _refuse_differences(self, differences: list[str], shown: int = 8) -> None:
        """Stop before anything trains, naming the first `shown` differences (compare's style)."""
        if not differences:
            return
        more = len(differences) - shown
        raise ConfigError(
            f"study '{self.study_name}' in {mask_url(self.storage_url)} holds trials of other settings "
            f"({'; '.join(differences[:shown])}{f'; and {more} more' if more > 0 else ''}): its trials "
            "differ in the searched keys only, so that their scores compare; rerun with the study's "
            "settings, or use another --out (or --study-name) for a new study"
        )

    def run(self):
        request = self.request
        study = self._open_study()
        trials_before = len(study.get_trials(deepcopy=False))
        study.sampler = self.optuna.samplers.TPESampler(seed=sampler_seed(request.seed, trials_before))
        self._announce(trials_before)
        started = time.perf_counter()
        try:
            with progress_bar(self.console) as progress:
                bar = progress.add_task("trials", total=request.n_trials)
                study.optimize(
                    self._objective,
                    n_trials=request.n_trials,
                    timeout=request.timeout,
                    n_jobs=request.n_jobs,
                    callbacks=[self._after_trial, lambda _study, _trial: progress.advance(bar)],
                    gc_after_trial=False,
                )
        except (MeniscusError, KeyboardInterrupt):
            self._write_outputs_after_failure(study)
            raise
        except Exception as err:  # Optuna's storage failing under a trial (a full disk, a lost server)
            self._write_outputs_after_failure(study)
            raise self._search_failure(err) from err
        with self.write_lock:
            write_outputs(study, self.out_dir, request.space)
        if self.errors:  # with n_jobs > 1 Optuna does not re-raise the errors of the last trials
            raise self.errors[0]
        write_plots(study, self.out_dir, self.console)
        self._report_best(study, time.perf_counter() - started)
        return study

    def _report_best(self, study, seconds: float) -> None:
        """The best trial, and why its validation score is not the figure to publish."""
        best = best_trial(study)
        if best is None:
            return
        n_done = len(study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,)))
        trials = f"{n_done} completed trial" + ("s" if n_done != 1 else "")
        best_yaml = self.out_dir / "best.yaml"
        self.console.print(
            f"best: trial {best.number}, validation score {best.value:.4f}; its config: {best_yaml} "
            f"({seconds:.0f} s for this search)\n"
            f"That score is optimistic: it is the maximum over {trials} on the same validation split "
            f"(selection bias). For an unbiased figure, train the config and score its test split: "
            f"train --config {best_yaml} --out RUN, then evaluate RUN",
            highlight=False,
            markup=False,
        )

    def _announce(self, trials_before: int) -> None:
        request = self.request
        self.console.print(
            f"study '{self.study_name}' ({self.mode}, maximizes the validation score) in "
            f"{mask_url(self.storage_url)}: {trials_before} trials so far; running {request.n_trials} more"
            + (f" or for {request.timeout:g} s" if request.timeout else "")
            + (
                f", {request.n_jobs} at a time (threads sharing this process's {os.cpu_count()} CPU cores)"
                if request.n_jobs > 1
                else ""
            )
            + f" -> {self.trials_dir}",
            highlight=False,
            markup=False,
        )

    def _objective(self, trial) -> float:
        try:
            return self._train_trial(trial)
        except self.optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
            with contextlib.suppress(Exception):  # the storage may fail as the trial did (a full disk)
                trial.set_user_attr("error", reason)
            if isinstance(err, MeniscusError):
                self.errors.append(err)
                raise
            # A bug or a library's failure: as a MeniscusError naming the trial, the CLI prints it
            # as a message, not a traceback (with n_jobs > 1 run() re-raises it after the search).
            folder = self._run_dir(trial.number)
            where = f"its folder: {folder}" if folder.exists() else "before its run folder was made"
            failed = MeniscusError(f"trial {trial.number} failed ({reason}); {where}")
            self.errors.append(failed)
            raise failed from err  # the cause stays attached for a debugger

    def _write_outputs_after_failure(self, study) -> None:
        """trials.csv and best.yaml of the trials so far, where they can be written: reading the
        study and writing the files may fail as the search did (the storage, a full disk), and
        that must not hide why the search stopped."""
        with contextlib.suppress(Exception), self.write_lock:
            write_outputs(study, self.out_dir, self.request.space)

    def _search_failure(self, err: Exception) -> MeniscusError:
        """What stopped the search when Optuna raised: a trial's own error if one failed (recording
        its failure in the storage can fail the same way, a full disk), else the storage named."""
        if self.errors:
            return self.errors[0]
        reason = " ".join(str(err).split())[:300]
        return MeniscusError(
            f"the search stopped: the study's storage {mask_url(self.storage_url)} failed ({type(err).__name__}: "
            f"{reason}); a full disk or a lost database connection? the same command continues the study"
        )

    def _train_trial(self, trial) -> float:
        sampled = suggest(trial, self.request.space)
        if "train.batch_size" in sampled:  # the same images per epoch at every batch size
            sampled[STEPS_KEY] = steps_at_fixed_images(sampled["train.batch_size"], self.images_per_epoch)
            trial.set_user_attr(STEPS_KEY, sampled[STEPS_KEY])
        run_dir = self._run_dir(trial.number)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        if (run_dir / "config.yaml").exists():
            raise MeniscusError(
                f"{run_dir} already holds a run, from another study in the same --out (trial numbers "
                "start at 0 in each study): use another --out, or this folder's --study-name"
            )
        config = load_config(self.request.preset, self.base | sampled)
        run_dir.mkdir(parents=True, exist_ok=True)
        report = _pruning_callback(trial, run_dir, config, self.request.warmup_epochs)
        with (run_dir / "train.log").open("w", encoding="utf-8") as log:
            log_console = Console(file=log, soft_wrap=True, width=200)
            try:
                metrics = train_run(
                    config, run_dir, console=log_console, on_epoch_end=report, scored_because=SCORED_BECAUSE
                )
            except TrainingDivergedError as err:  # this trial's setting (a high lr): the search goes on
                trial.set_user_attr("error", str(err))
                return float("nan")  # Optuna marks the trial FAIL
        saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
        trial.set_user_attr("config", json.dumps(yaml.safe_load(saved)))
        trial.set_user_attr("learned", metrics.get("learned"))
        trial.set_user_attr("epochs", sum(m["epochs"] for m in metrics["members"].values()))
        value = objective_value(metrics, config)
        if value is None:
            raise MeniscusError(
                f"{run_dir}: no defined validation score (a validation split with one class?); "
                "tune needs one to compare trials (see its metrics.json warnings)"
            )
        return value

    def _run_dir(self, number: int) -> Path:
        return self.trials_dir / f"trial-{number:04d}"

    def _after_trial(self, study, trial) -> None:
        with self.write_lock:
            write_outputs(study, self.out_dir, self.request.space)
        best = best_trial(study)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best is not None else "no best yet"
        duration = trial.duration.total_seconds() if trial.duration is not None else float("nan")
        self.console.print(
            f"trial {trial.number}: {_trial_outcome(self.optuna, trial)}  {duration:.0f}s  "
            f"[{trial.state.name.lower()}]  {best_text}",
            highlight=False,
            markup=False,
        )


def _trial_outcome(optuna, trial) -> str:
    """'value 0.91', 'pruned after ...' or 'fail: <error>': what became of a finished trial."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return f"value {trial.value:.4f}" + (
            " (did not learn)" if trial.user_attrs.get("learned") is False else ""
        )
    if trial.state == optuna.trial.TrialState.PRUNED:
        last = trial.last_step
        value = trial.intermediate_values.get(last) if last is not None else None
        where = trial.user_attrs.get("pruned_at", f"step {last}")
        return f"pruned after {where}" + (f" (validation score {value:.4f})" if value is not None else "")
    return f"{trial.state.name.lower()}: {trial.user_attrs.get('error', 'see its train.log')}"


def _pruning_callback(trial, run_dir: Path, config: Config, warmup_epochs: int) -> Callable[[str, int], None]:
    """train_run's on_epoch_end: report the network's validation score at a step that means the
    same network and epoch in every trial, and stop the trial when the pruner says so."""
    import optuna

    # the cascade's networks in training order (its segmentation network first, judged on its Dice)
    members = list(cascade_networks(config.model)) if trains_per_task(config.model.name) else [JOINT]
    max_epochs = config.train.max_epochs

    def report(member: str, epoch: int) -> None:
        score = epoch_score(run_dir, member, epoch)
        if score is None:
            return
        step = members.index(member) * max_epochs + epoch - 1
        trial.report(score, step)
        if epoch > warmup_epochs and trial.should_prune():
            trial.set_user_attr("pruned_at", f"{member} epoch {epoch}")
            # train_run releases the folder's lock on the way out; last.pt keeps this epoch.
            raise optuna.TrialPruned(f"{member} epoch {epoch}: validation score {score:.4f}")

    return report
