"""A trained model loaded from a run folder or a checkpoint, and the fissure threshold it applies.

Used by every command that scores or exports a trained model (evaluate, predict, compare, export).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from mtl_meniscus.config import Config, TTAConfig, tta_words
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mtl_meniscus.engine.inference import model_horns, predict_logits
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.calibration import scaled_probability
from mtl_meniscus.io.runlock import lock_holder
from mtl_meniscus.labels import TaskTable

THRESHOLD_FILE = "threshold.json"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling saved in a run by `evaluate --calibrate` (see evaluation.calibration)."""

    temperatures: dict[str, float]  # {task: T}: p = sigmoid(logit / T)
    source: Path

    def describe(self) -> str:
        values = ", ".join(f"{task} T={t:.2f}" for task, t in self.temperatures.items())
        return f"calibrated by temperature scaling ({values}; {self.source})"

    def temperature(self, task: str) -> float:
        return self.temperatures.get(task, 1.0)


def read_calibration(run_dir: Path | None, checkpoint: Path, checkpoint_sha256: str) -> Calibration | None:
    """The run's calibration.json if it was fitted on this checkpoint (a run's best.pt; another
    checkpoint of the run, e.g. last.pt, is scored uncalibrated), whose loaded bytes hash to
    `checkpoint_sha256`. Refused when best.pt has changed since (the run was trained further) or
    the file is malformed: no probability is silently off."""
    path = run_dir / CALIBRATION_FILE if run_dir else None
    if path is None or not path.is_file():
        return None
    fix = f"fit it again with evaluate {run_dir} --calibrate, or delete it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        temperatures = {str(task): float(t) for task, t in record["temperatures"].items()}
        if not all(math.isfinite(t) and t > 0 for t in temperatures.values()):
            raise ValueError("every temperature must be a positive number")
        fitted_name, fitted_on = str(record["checkpoint"]), record["checkpoint_sha256"]
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
    ) as err:
        raise MeniscusError(
            f"{path}: malformed ({type(err).__name__}: {err}); it should hold "
            f'{{"temperatures": {{"fissure": <T>, ...}}, "checkpoint": "best.pt", "checkpoint_sha256": ...}}: {fix}'
        ) from None
    if fitted_name != checkpoint.name:
        return None
    if fitted_on != checkpoint_sha256:
        raise MeniscusError(
            f"{path} was fitted on another {checkpoint.name} than the run's current one: {fix}"
        )
    return Calibration(temperatures, path)


@dataclass(frozen=True)
class ExamPrediction:
    slices: dict[str, np.ndarray]  # {task: (S,) probability of every slice}
    exam: dict[str, float]  # {task: the exam's probability}
    top_slice: int  # the most suspicious slice (highest fissure probability), 0-based


@dataclass
class TrainedModel:
    """A model loaded from a run folder or a checkpoint file, with what it was trained with."""

    model: nn.Module
    config: Config
    checkpoint: Path
    run_dir: Path | None
    # the SHA-256 of the bytes the model was loaded from (what a saved threshold or calibration is
    # fitted on): hashed from the file later, a best.pt that training replaced meanwhile would have
    # named another checkpoint than the one fitted
    checkpoint_sha256: str
    calibration: Calibration | None = None

    @property
    def tasks(self) -> TaskTable:
        """The task table the model was trained with (built-in tasks plus its data.extra_tasks)."""
        return self.config.data.task_table()

    @property
    def outputs(self) -> list[str]:
        """The tasks the model predicts, in the task table's order."""
        return [name for name in self.tasks.names if name in self.config.model.tasks]

    def tta(self, copies: int | None = None) -> TTAConfig:
        """The model's test-time augmentation, with `copies` (e.g. --tta) instead of its own if given."""
        own = self.config.tta
        return TTAConfig(copies=own.copies if copies is None else copies, augment=own.augment)

    def predict(
        self,
        images: list[np.ndarray],
        runtime: Runtime,
        tta: TTAConfig | None = None,
        seed: int = 0,
        calibrated: bool = True,
        **kwargs,
    ) -> dict[str, np.ndarray]:
        """{task: (N,) probabilities}: the mean over the TTA copies (if any) of sigmoid(logit / T),
        T the run's calibration temperature (1 without calibration or with calibrated=False)."""
        return self.probabilities(self.predict_logits(images, runtime, tta, seed, **kwargs), calibrated)

    def predict_logits(
        self,
        images: list[np.ndarray],
        runtime: Runtime,
        tta: TTAConfig | None = None,
        seed: int = 0,
        **kwargs,
    ) -> dict[str, np.ndarray]:
        """{task: (copies + 1, N) logits} with this model's preprocessing (see inference.predict_logits);
        row 0 is the images as they are. An exam model takes exams (S, H, W); a single slice (H, W)
        is to it an exam of one slice."""
        from mtl_meniscus.networks.models import takes_exams

        if takes_exams(self.model):
            images = [image if image.ndim == 3 else image[None] for image in images]
        kwargs.setdefault("batch_size", self.config.train.eval_batch_size)
        return predict_logits(
            self.model, images, self.config.preprocess.edge_filter, runtime, tta=tta, seed=seed, **kwargs
        )

    def probabilities(self, logits: dict[str, np.ndarray], calibrated: bool = True) -> dict[str, np.ndarray]:
        """{task: (N,)} from predict_logits' (copies + 1, N) logits; predict's probabilities."""
        use = self.calibration if calibrated and self.calibration is not None else None
        return {
            task: scaled_probability(z, use.temperature(task) if use else 1.0) for task, z in logits.items()
        }

    @property
    def calibration_note(self) -> str:
        """What the probabilities are, for the terminal of every command that prints them."""
        if self.calibration is None:
            return (
                "probabilities: the network's own, uncalibrated (evaluate RUN --calibrate fits a calibration)"
            )
        return f"probabilities: {self.calibration.describe()}"

    def trained_on(self, folder: str | Path) -> bool:
        """Whether `folder` is the data folder the run was trained on (its config's data.path)."""
        own = self.config.data.path
        return own is not None and Path(folder).resolve() == Path(own).resolve()

    @property
    def training_record(self) -> dict:
        """The run's metrics.json as train wrote it ({} without a run folder, or when it is not
        readable: what it adds here are warnings, never needed to answer)."""
        metrics = self.run_dir / "metrics.json" if self.run_dir is not None else None
        try:
            record = json.loads(metrics.read_text()) if metrics and metrics.is_file() else {}
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    @property
    def in_training_note(self) -> str:
        """A note when a training is still writing the run ('' otherwise): best.pt is then the best
        epoch so far, and may be replaced while this command runs."""
        writer = lock_holder(self.run_dir) if self.run_dir is not None else None
        if writer is None:
            return ""
        return f"note: a training (pid {writer}) is still writing {self.run_dir}: its best.pt is the best epoch so far"

    @property
    def did_not_learn_note(self) -> str:
        """A warning when the run's metrics.json says it did not learn ('' otherwise, or without one):
        its answers are then no better than chance, and predict says so (evaluate prints the run's
        warnings, the did-not-learn one among them: training_record)."""
        if self.training_record.get("learned") is not False:
            return ""
        return (
            f"warning: {self.run_dir} did not learn (its metrics.json: learned false): its answers are chance"
        )

    @property
    def exam_rule(self) -> str:
        """How predict_exam turns an exam into its probabilities, for messages and metrics.json."""
        pooling = self.config.model.exam_pooling
        if pooling:
            return f"the exam model's output ({pooling} pooling over its slices)"
        return "its most suspicious slice (the highest fissure probability over its slices)"

    def predict_exam(
        self, volume: np.ndarray, runtime: Runtime, tta: TTAConfig | None = None, seed: int = 0, **kwargs
    ) -> ExamPrediction:
        """An exam (S, H, W): every slice's probabilities, and the exam's. Slices are resized to the
        model's size.

        A slice model gives the exam the highest fissure probability over its slices (max pooling,
        as in MRNet) and the other tasks' probabilities at that most suspicious slice. An exam model
        (trained on exam labels) gives the exam its own output; each slice's probabilities are its
        output on that slice alone, and the most suspicious slice is again the highest fissure one."""
        from mtl_meniscus.io.exams import resized_slices
        from mtl_meniscus.networks.models import takes_exams

        slices = resized_slices(volume, self.config.data.image_size)
        root = self.tasks.root.name
        if takes_exams(self.model):
            exam = self.predict([slices], runtime, tta=tta, seed=seed, **kwargs)  # {task: (1,)}
            per_slice = self.predict([s[None] for s in slices], runtime, tta=tta, seed=seed, **kwargs)
            top = int(np.argmax(per_slice[root]))
            return ExamPrediction(per_slice, {task: float(p[0]) for task, p in exam.items()}, top)
        probs = self.predict(list(slices), runtime, tta=tta, seed=seed, **kwargs)  # {task: (S,)}
        top = int(np.argmax(probs[root]))
        return ExamPrediction(probs, {task: float(p[top]) for task, p in probs.items()}, top)

    def saliency(
        self, image: np.ndarray, runtime: Runtime, tasks: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """{task: (H, W) saliency map in [0, 1]} of one raw slice, for `tasks` (default: all)."""
        import torch

        if self.saliency_refusal:
            raise MeniscusError(self.saliency_refusal)

        from mtl_meniscus.data.preprocess import make_input
        from mtl_meniscus.networks.cam import saliency_maps

        x = runtime.prepare_input(
            torch.from_numpy(make_input(image, self.config.preprocess.edge_filter))[None]
        )
        found = model_horns(self.model, [image])  # a ROI model's horns from outside it, else None
        horns = (
            torch.from_numpy(found[0])[None].to(runtime.device) if found is not None else None
        )  # (1, 2, 3)
        # x: (1, C, H, W)
        maps = saliency_maps(self.model, x, tasks or self.config.model.tasks, horns=horns)
        return {task: task_maps[0] for task, task_maps in maps.items()}

    @property
    def saliency_refusal(self) -> str:
        """Why this model has no saliency maps ('' when it has them): a model of whole exams, or a
        plug-in model, whose feature maps the maps do not know (networks/cam.py cam_layer)."""
        from mtl_meniscus.networks.cam import knows_layers
        from mtl_meniscus.networks.models import takes_exams

        if takes_exams(self.model):
            return (
                f"{self.checkpoint}: saliency maps are for slice models; this one was trained on whole "
                "exams (model.exam_pooling), and predict --exams names each exam's most suspicious slice"
            )
        if not all(knows_layers(self.model, task) for task in self.config.model.tasks):
            return (
                f"{self.checkpoint}: saliency maps know the layers of this package's networks only, and its "
                f"model {self.config.model.name!r} is a plug-in"
            )
        return ""

    @property
    def saved_threshold(self) -> Threshold | None:
        """The fissure threshold saved in the run by `evaluate --youden`, if any. It belongs to the
        checkpoint it was chosen with: another checkpoint of the run (last.pt) gets 0.5 with a note
        saying why, and a best.pt changed since (the run was trained further) is refused."""
        path = self.run_dir / THRESHOLD_FILE if self.run_dir else None
        if path is None or not path.is_file():
            return None
        fix = f"choose it again with evaluate {self.run_dir} --youden, or delete it"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            value = record["fissure_threshold"]
            if isinstance(value, bool) or not 0 <= float(value) <= 1:  # NaN fails too
                raise ValueError(f"fissure_threshold {value!r} is not a probability 0..1")
            # Files written before the threshold was chosen with TTA carry no tta_copies: it was 0;
            # those written before calibration existed were chosen on the network's own probabilities,
            # and those written before checkpoints were hashed say only the checkpoint's name.
            copies = int(record.get("tta_copies", 0))
            chosen_at = float(record.get("fissure_temperature", 1.0))
            chosen_for, digest = (
                str(record.get("checkpoint", self.checkpoint.name)),
                record.get("checkpoint_sha256"),
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise MeniscusError(
                f"{path}: malformed ({type(err).__name__}: {err}); it should hold "
                f'{{"fissure_threshold": <0..1>}}: {fix}'
            ) from None
        if chosen_for != self.checkpoint.name:
            return Threshold(
                0.5, f"the default: {path} was chosen for {chosen_for}, not {self.checkpoint.name}"
            )
        if digest is not None and digest != self.checkpoint_sha256:
            raise MeniscusError(
                f"{path} was chosen for another {chosen_for} than the run's current one: {fix}"
            )
        applied = self.calibration.temperature(self.tasks.root.name) if self.calibration else 1.0
        if not math.isclose(chosen_at, applied):
            raise MeniscusError(
                f"{path} was chosen on probabilities with fissure temperature {chosen_at:.3g}, and the run's "
                f"probabilities now have temperature {applied:.3g} ({CALIBRATION_FILE}): {fix}"
            )
        kind = "calibrated" if self.calibration else "uncalibrated"
        return Threshold(
            float(value),
            f"Youden's J on the run's validation split, {tta_words(copies)}, {kind} probabilities ({path})",
            tta_copies=copies,
        )


@dataclass(frozen=True)
class Threshold:
    """The fissure threshold a command applies, and where it came from (printed on every run)."""

    value: float
    source: str
    tta_copies: int | None = None  # TTA copies of the probabilities it was chosen on, if chosen on data

    def describe(self, applied_tta_copies: int) -> str:
        text = f"fissure threshold {self.value:.3f}: {self.source}"
        if self.tta_copies is not None and self.tta_copies != applied_tta_copies:
            text += (
                f"; note: chosen on probabilities with {tta_words(self.tta_copies)}, "
                f"applied here with {applied_tta_copies}"
            )
        return text


DEFAULT_THRESHOLD = Threshold(0.5, "the default (no --threshold given, no threshold.json in the run)")


def resolve_threshold(trained: TrainedModel, given: float | None) -> Threshold:
    """--threshold if given, else the run's saved threshold.json, else 0.5."""
    if given is not None:
        return Threshold(given, "--threshold")
    return trained.saved_threshold or DEFAULT_THRESHOLD


def load_trained(run_or_checkpoint: str | Path, runtime: Runtime, calibration: bool = True) -> TrainedModel:
    """A run folder (uses its best.pt) or a .pt checkpoint file, placed on the runtime's device, with
    the run's calibration (calibration=False: without it, e.g. to fit it again)."""
    path = Path(run_or_checkpoint)
    checkpoint = path / "best.pt" if path.is_dir() else path
    if path.is_dir() and not checkpoint.is_file():
        if (path / "labels.csv").is_file():
            raise MeniscusError(
                f"{path} is a data folder (labels.csv), not a run: give the folder that train wrote"
            )
        writer = lock_holder(path)
        if writer is not None:
            raise MeniscusError(
                f"{path}: no best.pt yet: a training (pid {writer}) is writing it; its first best.pt comes "
                "with its first epoch"
            )
        if not (path / "config.yaml").is_file():
            raise MeniscusError(
                f"{path}: not a run folder (no best.pt, no config.yaml): give the folder that train wrote"
            )
        raise MeniscusError(
            f"{path}: no best.pt here; is the run finished? (resume it with train --resume {path})"
        )
    content = _read_checkpoint(checkpoint)  # once: the hash is of the weights loaded
    digest = hashlib.sha256(content).hexdigest()
    model, config = model_from_checkpoint(load_checkpoint(checkpoint, content), source=checkpoint)
    model = runtime.prepare_model(model)
    run_dir = checkpoint.parent if (checkpoint.parent / "config.yaml").is_file() else None
    calibrated = read_calibration(run_dir, checkpoint, digest) if calibration else None
    unknown = sorted(set(calibrated.temperatures) - set(config.model.tasks)) if calibrated else []
    if unknown:
        raise MeniscusError(
            f"{calibrated.source}: temperatures for {', '.join(unknown)}, which the model does not predict "
            f"(it predicts {', '.join(config.model.tasks)}): fit it again with evaluate {run_dir} --calibrate, "
            "or delete it"
        )
    return TrainedModel(model, config, checkpoint, run_dir, digest, calibrated)


def _read_checkpoint(checkpoint: Path) -> bytes:
    """The checkpoint file's bytes; a missing or unreadable one is named."""
    try:
        return checkpoint.read_bytes()
    except FileNotFoundError:
        raise MeniscusError(f"checkpoint not found: {checkpoint}") from None
    except OSError as err:
        raise MeniscusError(f"{checkpoint}: cannot read the checkpoint ({err.strerror or err})") from None


# What a split of the run's own data says about the model, where it is not a held-out figure.
NOT_HELD_OUT = {
    "train": "these are the run's training images: not a held-out figure",
    "all": "all images, the run's training images among them: not a held-out figure",
    "val": "the val split chose the best epoch (and any calibration and threshold): an optimistic figure",
}


def evaluation_data(
    trained: TrainedModel, data_dir: Path | None, split: str, scored: bool = True
) -> tuple[PreparedData, str]:
    """The data to score and a note on it.

    The run's own data (no --data, or --data naming the run's folder) keeps the splits the run
    was trained with, read from its splits.csv: a recomputed split can move training images
    into the test split when labels.csv has changed. So does another folder that holds most of the
    images the run listed with their labels (a moved or copied data folder, _holds_run_images):
    split by its own rules, its "test" split could be the run's training images. Any other folder
    is split by its own rules. With
    `scored` the note says when the split is no held-out figure (NOT_HELD_OUT); a fit on it
    (--calibrate, --youden) is not scored.
    """
    from rich.console import Console

    from mtl_meniscus.data.folder import SIZE_ADVICE
    from mtl_meniscus.data.load import prepare_data
    from mtl_meniscus.engine.progress import counted_progress

    config = trained.config
    own_dir = Path(config.data.path) if config.data.path else None
    folder = data_dir if data_dir is not None else own_dir
    if folder is None:
        raise MeniscusError("this checkpoint does not record its data folder; pass --data DIR")
    if data_dir is None and not Path(folder).is_dir():
        raise MeniscusError(
            f"the run's data folder {folder} is gone (moved?): pass --data with where it is now (a "
            "folder holding the run's images keeps the run's splits)"
        )
    with counted_progress(Console(soft_wrap=True), "reading the data") as on_row:
        try:
            data = prepare_data(folder, config.data, on_row=on_row, masks=config.model.segmentation)
        except MeniscusError as err:  # the run's settings are fixed here: no config key to change
            advice = (
                "the run's model takes images of that size: resize yours to it (predict resizes each itself)"
            )
            raise type(err)(str(err).replace(SIZE_ADVICE, advice)) from None
    is_own = trained.trained_on(folder)
    note = ""
    if not is_own:
        is_own, note = _holds_run_images(trained, data, folder)
    if is_own and split in NOT_HELD_OUT and scored:  # a fit on the split (--calibrate) is no figure
        note = "; ".join(filter(None, [note, NOT_HELD_OUT[split]]))
    if not is_own or split == "all":
        return data, note
    if trained.run_dir is None:
        folder = trained.checkpoint.parent
        if (folder / "splits.csv").is_file():  # a run folder that lost its config.yaml
            raise MeniscusError(
                f"{folder} has no config.yaml, so it is not read as a run folder and its {split} split "
                "is unknown: restore config.yaml (train wrote it), or pass --data DIR --split all"
            )
        raise MeniscusError(
            f"{trained.checkpoint} is not in a run folder, so its {split} split is unknown: evaluate the run "
            "folder (its splits.csv lists the split of every image), or pass --data DIR --split all"
        )
    return data, "; ".join(filter(None, [note, data.restore_splits(trained.run_dir / "splits.csv")]))


def _holds_run_images(trained: TrainedModel, data, folder: Path) -> tuple[bool, str]:
    """(is it the run's data, moved or copied?, a note): yes when it holds at least half of the
    images (with their slices) that the run's splits.csv lists, at most a tenth of them relabelled.
    Names alone say little: two phantoms, or two hospitals' case001..., share names but not pixels
    or labels; taken for the run's data, such a folder was scored on the run's test split's names.
    A folder sharing fewer names is split by its own rules, and the note says so."""
    from mtl_meniscus.data.records import read_saved_splits

    splits = trained.run_dir / "splits.csv" if trained.run_dir is not None else None
    if splits is None or not splits.is_file():
        return False, ""
    saved = read_saved_splits(splits)
    gone, _, _, relabelled = data.differences(saved)
    present = len(saved) - len(gone)
    if not present:
        return False, ""
    if 2 * present >= len(saved) and 10 * len(relabelled) <= present:
        return True, f"{folder} holds images of the run's data (moved or copied?): the run's splits are kept"
    return False, (
        f"{folder} shares {present} of the run's {len(saved)} image names ({len(relabelled)} of them "
        "labelled otherwise): taken as another data set, split by its own rules (the run's data moved "
        "or copied keeps at least half of its images and nine in ten of their labels)"
    )
