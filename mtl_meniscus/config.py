"""Typed run configuration: pydantic models, checked when loaded from YAML.

Loading is strict (a YAML `true` is not an integer, a string is not a number, unknown keys fail at
once, a key given twice in a file fails) and every error names the key, the value, what is allowed
and where the value was written (the file, or the option when its caller names it: Origins);
ranges and cross-field rules are the `validate()` methods below.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
import typing
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtl_meniscus.errors import ConfigError, ConfigValueError
from mtl_meniscus.labels import DEFAULT_TASKS, TASKS, Task, TaskTable

# Upper bounds that keep one bad value from exhausting memory or hanging (a batch of 1e8 images,
# 1e9 TTA copies); far above any useful setting.
MAX_SEED = 2**32 - 1
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")  # train.device and --device
MAX_BATCH = 4096
MAX_EPOCH_SAMPLES = 1_000_000  # steps_per_epoch x batch_size: the sampler draws an epoch at once
MAX_TTA_COPIES = 100
MAX_BOOTSTRAP = 100_000
MAX_IMAGE_SIZE = 4096


class Section(BaseModel):
    """A config section: unknown keys are refused, numbers must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskConfig(Section):
    """A task beyond the built-in three (`data.extra_tasks: {NAME: {...}}`), e.g. a per-image flag
    gated by fissure. Its labels.csv column is NAME; see labels.Task for what each key means."""

    values: dict[str, float] = Field(
        default_factory=dict
    )  # text -> 1 (positive) or 0: {displaced: 1, stable: 0}
    gated_by: str | None = "fissure"  # null: defined on every image
    weight: float = 0.0  # weight in the challenge score (0: reported, not scored)
    positive: str = ""  # what a positive row is called in messages

    def read_values(self) -> dict[str, float]:
        """`values` as labels.csv's values of such a task are read: stripped, in lower case ('Yes'
        was refused as not one of 'Yes, no')."""
        return {text.strip().lower(): target for text, target in self.values.items()}


# labels.csv's columns other than the tasks' (data/folder.py): no task may take one's name, e.g. a
# task "split" would read the split column as labels.
LABELS_COLUMNS = ("image", "patient_id", "split", "slice", "mask")


class DataConfig(Section):
    """Where the images are and which ones are kept."""

    path: str | None = None  # folder with labels.csv; None = the embedded phantom (generated on first use)
    # How the folder is laid out: labels-csv (labels.csv naming slices or volumes, one row per
    # slice) or mrnet (MRNet's train|valid/sagittal/NNNN.npy with *-meniscus.csv: one label per exam).
    layout: Literal["labels-csv", "mrnet"] = "labels-csv"
    image_size: int = 256  # expected height and width
    size_policy: Literal["exclude", "resize"] = "exclude"  # images of another size: set aside or resize
    exclude_double_tears: bool = True  # position 'both' cannot be one binary label
    split_fractions: tuple[float, float, float] = (0.7, 0.2, 0.1)  # train, val, test
    split_seed: int = 0
    # Share of the training split trained on (compare --train-fraction: learning curves): a nested,
    # stratified, patient-grouped subset; the rest of the training split is left unused.
    train_fraction: float = 1.0
    phantom_n: int = 1128
    phantom_seed: int = 0
    phantom_difficulty: Literal["easy", "realistic", "hard"] = "easy"  # of the built-in phantom (path: null)
    max_pixels: int | None = None  # decoded-size limit per file; None: $MTL_MENISCUS_MAX_PIXELS or 64e6
    # memory: decode every image once into memory (fast); lazy: read each image from its file when
    # a batch needs it (memory does not grow with the data set); auto: lazy above 2 GiB of images.
    load: Literal["auto", "memory", "lazy"] = "auto"
    # The plane the model reads: DICOM and NIfTI of another plane (from their geometry) are refused.
    plane: Literal["sagittal", "coronal", "axial"] = "sagittal"
    extra_tasks: dict[str, TaskConfig] = Field(default_factory=dict)  # tasks after the built-in three
    # A tear may leave orientation/position (any task gated by fissure) empty: unknown, so masked in
    # the loss and the metrics. Off by default, so that a forgotten label is still an error.
    allow_unknown_subtype: bool = False

    def task_table(self) -> TaskTable:
        """The built-in tasks followed by `extra_tasks`, in output order."""
        return DEFAULT_TASKS.extended(
            Task(name, extra.read_values(), extra.gated_by, extra.weight, extra.positive)
            for name, extra in self.extra_tasks.items()
        )

    def validate(self) -> None:
        known = list(DEFAULT_TASKS.names)
        for name, extra in self.extra_tasks.items():
            key = f"data.extra_tasks.{name}"
            check_value(
                bool(re.fullmatch(r"[a-z][a-z0-9_]*", name)) and name not in (*known, *LABELS_COLUMNS),
                "data.extra_tasks",
                name,
                "a new task name: lower-case letters, digits and '_', not one of "
                + ", ".join((*known, *LABELS_COLUMNS))
                + " (a task is read from the labels.csv column of its name)",
            )
            targets = sorted(extra.values.values())
            texts = extra.read_values()
            check_value(
                targets.count(1.0) == 1
                and targets.count(0.0) >= 1
                and set(targets) <= {0.0, 1.0}
                and len(texts) == len(extra.values)
                and all(texts),
                f"{key}.values",
                extra.values,
                "texts (case is ignored, each once) mapped to 1 (exactly one) and 0, e.g. {displaced: 1, stable: 0}",
            )
            check_value(
                extra.gated_by is None or extra.gated_by in known,
                f"{key}.gated_by",
                extra.gated_by,
                "null or a task declared before it: " + ", ".join(known),
            )
            check_value(extra.weight >= 0, f"{key}.weight", extra.weight, ">= 0")
            known.append(name)
        check_value(
            32 <= self.image_size <= MAX_IMAGE_SIZE,
            "data.image_size",
            self.image_size,
            f"an integer 32..{MAX_IMAGE_SIZE}",
        )
        check_value(0 <= self.split_seed <= MAX_SEED, "data.split_seed", self.split_seed, f"0..{MAX_SEED}")
        check_value(
            0 <= self.phantom_seed <= MAX_SEED, "data.phantom_seed", self.phantom_seed, f"0..{MAX_SEED}"
        )
        check_value(
            self.max_pixels is None or self.max_pixels >= 1,
            "data.max_pixels",
            self.max_pixels,
            "a number of pixels >= 1, or null for the default",
        )
        fractions = self.split_fractions
        check_value(
            len(fractions) == 3 and all(f >= 0 for f in fractions) and abs(sum(fractions) - 1) < 1e-6,
            "data.split_fractions",
            fractions,
            "three non-negative fractions summing to 1",
        )
        check_value(self.phantom_n >= 20, "data.phantom_n", self.phantom_n, "an integer >= 20")
        check_value(
            0 < self.train_fraction <= 1, "data.train_fraction", self.train_fraction, "a fraction in (0, 1]"
        )


class AugmentConfig(Section):
    """Random transforms of one raw image; geometric first, then intensity."""

    rotation_deg: float = 45.0  # uniform in [-r, r]; small because 90 deg turns a vertical tear horizontal
    translate_frac: float = 0.2  # uniform in [-t, t] of width and height
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    noise_prob: float = 0.0
    noise_std: float = 0.05  # Gaussian noise, as a fraction of the image's standard deviation
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def validate(self, prefix: str = "augment") -> None:
        check_value(0 <= self.rotation_deg <= 180, f"{prefix}.rotation_deg", self.rotation_deg, "0..180")
        check_value(0 <= self.translate_frac < 1, f"{prefix}.translate_frac", self.translate_frac, "0..1")
        for name in ("blur_prob", "noise_prob", "gamma_prob"):
            value = getattr(self, name)
            check_value(0 <= value <= 1, f"{prefix}.{name}", value, "a probability 0..1")
        for name in ("blur_sigma", "gamma_range"):
            low, high = getattr(self, name)
            check_value(0 < low <= high, f"{prefix}.{name}", (low, high), "0 < low <= high")
        check_value(self.noise_std >= 0, f"{prefix}.noise_std", self.noise_std, ">= 0")


class PreprocessConfig(Section):
    """How a raw slice becomes the network input (2, H, W)."""

    edge_filter: Literal["sobel", "scharr", "laplace", "none"] = "sobel"  # second channel


FISSURE_KERNELS = (7, 5, 3)  # reference fissure network: 3 blocks
DEEP_KERNELS = (7, 5, 3, 3)  # reference orientation/position networks: 4 blocks


# Trunks of this package (random initial weights); any other model.trunk is a timm model name.
OWN_TRUNKS = ("reference", "plain")
# The segmentation loss's name among the task losses (weighting, train.task_weights, history.csv).
SEGMENTATION = "segmentation"
# What model.roi an exam model (model.exam_pooling, data.layout mrnet) takes, for both checks.
ROI_ON_EXAMS = (
    "none or classical with model.exam_pooling or data.layout mrnet (an exam's slices have no masks "
    "for truth, and an exam model has no segmentation decoder for predicted)"
)
# model.roi_crop is given in pixels of an image this size (data.image_size scales it).
ROI_REFERENCE_SIZE = 256


class ModelConfig(Section):
    """Architecture choices; saved in checkpoints so a model can be rebuilt without the YAML."""

    name: str = "shared"  # a registered model (networks/models.py, MODELS): 'shared' or 'separate'
    # 'reference' (the conv blocks below), 'plain' (the fixed floor: models.PlainTrunk) or a timm model
    trunk: str = "reference"
    # timm trunks: 'default' (timm's weights from the local cache, never downloaded), 'none', or a file
    pretrained: str = "default"
    freeze_backbone: bool = False  # timm trunks: train only the heads
    widths: tuple[int, ...] = (16, 32, 48, 64)  # filters per conv block (not published; ours)
    kernels: tuple[int, ...] = DEEP_KERNELS  # trunk of the shared model and of orientation/position nets
    fissure_kernels: tuple[int, ...] = FISSURE_KERNELS  # fissure network of the separate cascade
    strided_blocks: int = (
        0  # leading conv blocks that downsample with a stride-2 conv instead of conv + max-pool
    )
    pool_grid: int = 4  # trunk maps are max- and average-pooled to a pool_grid x pool_grid grid (1 = global)
    conv_dropout: float = 0.2
    dense: tuple[int, ...] = (32, 16)
    dense_dropout: float = 0.4
    in_chans: int = 2
    tasks: tuple[str, ...] = TASKS
    # None: a slice model. max or attention: an exam model, the trunk run on every slice of an exam
    # and its features pooled over the slices (max as in MRNet; attention as in Ilse et al. 2018).
    exam_pooling: Literal["max", "attention"] | None = None
    # A decoder on the trunk's stages predicting background / meniscus / tear per pixel from the
    # labels.csv `mask` column (rows without one are masked out of its loss): an auxiliary task of
    # the shared model; the cascade (separate) gets a segmentation network of its own instead.
    segmentation: bool = False
    # ROI-first classification: a fixed-size crop around each meniscus horn, classified together
    # with the whole image. The horns come from the run's own segmentation decoder (predicted), the
    # classical pipeline (data/roi.py, no learning) or the true mask (truth: an upper bound).
    roi: Literal["none", "predicted", "classical", "truth"] = "none"
    # Side of each horn's crop in pixels of a ROI_REFERENCE_SIZE-pixel image, scaled with the input:
    # at 256 px, classical horn boxes' 96-pixel windows held the whole tear in 0.988 of the
    # realistic phantom's tear images (issue 29).
    roi_crop: int = 96

    @property
    def reads_masks(self) -> bool:
        """True when a run of this model reads labels.csv's masks: to train its decoder, or to find
        the true horns (roi truth)."""
        return self.segmentation or self.roi == "truth"

    def validate(self) -> None:
        for name in ("kernels", "fissure_kernels"):
            kernels = getattr(self, name)
            check_value(
                len(kernels) >= 1 and all(1 <= k <= 31 and k % 2 == 1 for k in kernels),
                f"model.{name}",
                kernels,
                "one or more odd kernel sizes 1..31",
            )
        # Exactly one width per block: a network takes the first len(kernels) widths, so one more
        # would be dropped without a word (the fissure network, with fewer blocks, takes the first).
        blocks = max(len(self.kernels), len(self.fissure_kernels))
        check_value(
            len(self.widths) == blocks,
            "model.widths",
            self.widths,
            f"{blocks} widths, one per conv block (model.kernels has {len(self.kernels)}, "
            f"model.fissure_kernels {len(self.fissure_kernels)}); this has {len(self.widths)}",
        )
        check_value(all(1 <= w <= 2048 for w in self.widths), "model.widths", self.widths, "integers 1..2048")
        check_value(1 <= self.pool_grid <= 64, "model.pool_grid", self.pool_grid, "1..64")
        check_value(all(1 <= d <= 4096 for d in self.dense), "model.dense", self.dense, "integers 1..4096")
        if self.trunk in OWN_TRUNKS:
            # Weights files are for timm trunks; our own trunks always start from random weights.
            check_value(
                self.pretrained in ("default", "none"),
                "model.pretrained",
                self.pretrained,
                f"'default' or 'none' with model.trunk {self.trunk!r} (a weights file needs a timm trunk, "
                "e.g. --trunk resnet50)",
            )
            check_value(
                not self.freeze_backbone,
                "model.freeze_backbone",
                self.freeze_backbone,
                f"false with model.trunk {self.trunk!r} (it has no pretrained backbone to freeze)",
            )
        check_value(0 <= self.conv_dropout < 1, "model.conv_dropout", self.conv_dropout, "0..1")
        check_value(0 <= self.dense_dropout < 1, "model.dense_dropout", self.dense_dropout, "0..1")
        check_value(len(self.tasks) > 0, "model.tasks", self.tasks, "one or more task names")
        if self.segmentation:
            self._validate_segmentation()
        if self.roi != "none":
            self._validate_roi()

    def _validate_segmentation(self) -> None:
        """What the segmentation decoder is built for so far: slice models (the shared model's
        auxiliary task, or the cascade's own segmentation network) with one of the package's own
        trunks (their stages are known; a timm trunk's are not wired yet)."""
        check_value(
            self.trunk in OWN_TRUNKS,
            "model.segmentation",
            self.segmentation,
            f"false with model.trunk {self.trunk!r}: the decoder is built on the trunks "
            f"{', '.join(OWN_TRUNKS)} only",
        )
        check_value(
            self.exam_pooling is None,
            "model.segmentation",
            self.segmentation,
            "false with model.exam_pooling (an exam model has no per-slice masks)",
        )

    def _validate_roi(self) -> None:
        """What ROI-first classification is built for so far: slice models, and exam models with
        the classical horns of every slice; 'predicted' needs the run's own segmentation decoder."""
        check_value(
            16 <= self.roi_crop <= MAX_IMAGE_SIZE,
            "model.roi_crop",
            self.roi_crop,
            f"an integer 16..{MAX_IMAGE_SIZE} (pixels at {ROI_REFERENCE_SIZE} px)",
        )
        check_value(
            self.roi != "predicted" or self.segmentation,
            "model.roi",
            self.roi,
            "none, classical or truth without model.segmentation: 'predicted' crops around the horns "
            "that the run's own segmentation decoder (or the cascade's segmentation network) finds "
            "(set model.segmentation: true)",
        )
        check_value(self.exam_pooling is None or self.roi == "classical", "model.roi", self.roi, ROI_ON_EXAMS)


def roi_crop_pixels(roi_crop: int, image_size: int) -> int:
    """The side in pixels of a horn's crop (model.roi_crop, given at ROI_REFERENCE_SIZE px) in an
    image of `image_size` pixels."""
    return max(1, round(roi_crop * image_size / ROI_REFERENCE_SIZE))


class TrainConfig(Section):
    """Optimisation; defaults from the reference method (Adam, lr 0.001, batch 32, 80 steps/epoch)."""

    max_epochs: int = 30
    steps_per_epoch: int = 80
    batch_size: int = 32
    lr: float = 1e-3
    lr_factor: float = 0.5  # learning rate multiplied by this when the monitored score plateaus
    lr_patience: int = 2  # epochs without improvement before the learning rate is cut
    early_stopping_patience: int = 6  # epochs without improvement before training stops
    # Unused: "left chance" is now decided per task against each task's own null (stopping.py),
    # with no cap. Kept so that older configs and runs, which set it, still load.
    left_chance_max: float = 0.7
    # A network none of whose tasks is above chance this many epochs after its start starts again
    # from new initial weights, as often as the budget leaves it this many epochs (0 = never):
    # when a network starts is partly the luck of its initial weights (engine/stopping.py).
    restart_if_at_chance_after: int = 0
    min_lr: float = 1e-5
    backbone_lr_factor: float = 1.0  # timm trunks: backbone learning rate = lr * this factor
    weighting: str = "fixed"  # a registered task weighting (networks/losses.py, WEIGHTINGS)
    task_weights: dict[str, float] = Field(default_factory=dict)  # fixed weighting; missing tasks get 1
    pos_weights: dict[str, float] = Field(default_factory=dict)  # BCE positive-class weight per task
    # What a gated task's (orientation, position) masked BCE is averaged over: "per-image" divides
    # the sum over the tears by every image of the batch, so the loss is the mean per image of the
    # labels' joint log-likelihood; "per-gated-row" (the earlier default) divides by the tears only,
    # which weighs each tear's gated terms 1 / (tear fraction) times its fissure term and kept the
    # shared trunk at chance on data with 25% tears (README, "What makes the defaults learn").
    gated_loss_mean: Literal["per-image", "per-gated-row"] = "per-image"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str | None = None  # cpu, cuda or cuda:N; None: the first GPU when there is one, else the CPU
    num_workers: int = 0  # DataLoader worker processes for augmentation (0 = in the training process)
    eval_batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        for name in ("max_epochs", "steps_per_epoch"):
            check_value(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "an integer >= 1")
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            check_value(1 <= value <= MAX_BATCH, f"train.{name}", value, f"an integer 1..{MAX_BATCH}")
        check_value(
            self.steps_per_epoch * self.batch_size <= MAX_EPOCH_SAMPLES,
            "train.steps_per_epoch",
            self.steps_per_epoch,
            f"steps_per_epoch x batch_size ({self.batch_size}) at most {MAX_EPOCH_SAMPLES:,} images per epoch",
        )
        check_value(self.lr > 0, "train.lr", self.lr, "> 0")
        check_value(
            self.device is None or bool(DEVICE_PATTERN.fullmatch(str(self.device))),
            "train.device",
            self.device,
            "cpu, cuda, cuda:N or null",
        )
        check_value(0 < self.lr_factor < 1, "train.lr_factor", self.lr_factor, "0 < factor < 1")
        check_value(
            0.5 < self.left_chance_max <= 1, "train.left_chance_max", self.left_chance_max, "0.5 < value <= 1"
        )
        check_value(self.lr_patience >= 0, "train.lr_patience", self.lr_patience, "an integer >= 0")
        check_value(
            self.early_stopping_patience >= 1,
            "train.early_stopping_patience",
            self.early_stopping_patience,
            "an integer >= 1",
        )
        check_value(self.min_lr >= 0, "train.min_lr", self.min_lr, ">= 0")
        check_value(
            self.restart_if_at_chance_after >= 0,
            "train.restart_if_at_chance_after",
            self.restart_if_at_chance_after,
            "an integer >= 0 (0 = never)",
        )
        check_value(self.backbone_lr_factor >= 0, "train.backbone_lr_factor", self.backbone_lr_factor, ">= 0")
        check_value(self.num_workers >= 0, "train.num_workers", self.num_workers, ">= 0")
        check_value(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"an integer 0..{MAX_SEED}")
        for task, weight in self.task_weights.items():
            check_value(weight >= 0, f"train.task_weights.{task}", weight, ">= 0")
        for task, weight in self.pos_weights.items():
            check_value(weight > 0, f"train.pos_weights.{task}", weight, "> 0")


class WandbConfig(Section):
    """Weights & Biases logging; offline by default, into the run folder."""

    mode: Literal["offline", "online", "disabled"] | None = None  # None: $WANDB_MODE, else offline
    project: str = "mtl_meniscus"
    group: str | None = None  # compare runs share a group
    job_type: str | None = None


def _tta_augment() -> AugmentConfig:
    return AugmentConfig(rotation_deg=15.0, translate_frac=0.1)


def tta_words(copies: int) -> str:
    """'TTA 1 copy', 'TTA 5 copies': the copies a prediction averaged, as messages say it."""
    return f"TTA {copies} {'copy' if copies == 1 else 'copies'}"


class TTAConfig(Section):
    """Test-time augmentation: the original plus `copies` milder random copies, averaged."""

    copies: int = 5
    augment: AugmentConfig = Field(default_factory=_tta_augment)

    def validate(self) -> None:
        check_value(
            0 <= self.copies <= MAX_TTA_COPIES, "tta.copies", self.copies, f"an integer 0..{MAX_TTA_COPIES}"
        )
        self.augment.validate("tta.augment")


class Config(Section):
    """Everything a run needs; saved into each run folder and each checkpoint."""

    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    def validate(self) -> Config:
        self.data.validate()
        self.augment.validate()
        self.tta.validate()
        self.model.validate()
        self.train.validate()
        check_value(
            self.data.layout != "mrnet" or bool(self.data.path),
            "data.path",
            self.data.path,
            "an MRNet folder with data.layout mrnet (there is no built-in one: make-phantom OUT --n-exams 600 "
            "--exam-format mrnet writes phantom exams)",
        )
        check_value(
            not self.model.segmentation or self.data.layout == "labels-csv",
            "model.segmentation",
            self.model.segmentation,
            "false with data.layout mrnet (masks come from labels.csv's mask column)",
        )
        if self.data.layout == "mrnet" and self.model.exam_pooling is None:
            self.model.exam_pooling = "max"  # MRNet labels whole exams: only an exam model can learn them
        check_value(  # again: data.layout mrnet has just made it an exam model
            self.model.exam_pooling is None or self.model.roi in ("none", "classical"),
            "model.roi",
            self.model.roi,
            ROI_ON_EXAMS,
        )
        check_value(
            self.model.exam_pooling is None or self.data.layout == "mrnet",
            "model.exam_pooling",
            self.model.exam_pooling,
            "null unless data.layout is mrnet (an exam model trains on exam labels)",
        )
        tasks = self.data.task_table()
        if self.data.extra_tasks and self.model.tasks == TASKS:  # the default: every task of the table
            self.model.tasks = tasks.names
        check_value(
            set(self.model.tasks) <= set(tasks.names),
            "model.tasks",
            self.model.tasks,
            "tasks of the table: " + ", ".join(tasks.names),
        )
        for name in ("task_weights", "pos_weights"):
            # the segmentation loss is weighed as one more task (networks/losses.py)
            known = (
                (*tasks.names, SEGMENTATION)
                if name == "task_weights" and self.model.segmentation
                else tasks.names
            )
            unknown = set(getattr(self.train, name)) - set(known)
            check_value(
                not unknown,
                f"train.{name}",
                getattr(self.train, name),
                f"keys among {', '.join(known)}",
            )
        if self.model.trunk == "reference":  # (the plain floor's five blocks fit the smallest size, 32)
            blocks = max(len(self.model.kernels), len(self.model.fissure_kernels))
            check_value(
                self.data.image_size >> blocks >= 1,
                "data.image_size",
                self.data.image_size,
                f"at least {2**blocks} for {blocks} conv blocks (each halves the image)",
            )
        if self.model.roi != "none":
            self._validate_roi_crop()
        expected = 1 if self.preprocess.edge_filter == "none" else 2
        check_value(
            self.model.in_chans == expected,
            "model.in_chans",
            self.model.in_chans,
            f"{expected} with preprocess.edge_filter '{self.preprocess.edge_filter}'",
        )
        return self

    def _validate_roi_crop(self) -> None:
        """A horn's crop at this image size must survive the crop trunk's downsampling (the same
        trunk as the image's)."""
        crop = roi_crop_pixels(self.model.roi_crop, self.data.image_size)
        if self.model.trunk == "reference":
            blocks = max(len(self.model.kernels), len(self.model.fissure_kernels))
            needed, trunk = 2**blocks, f"{blocks} conv blocks"
        else:
            needed, trunk = 32, f"the {self.model.trunk} trunk"
        check_value(
            crop >= needed,
            "model.roi_crop",
            self.model.roi_crop,
            f"a crop of at least {needed} px for {trunk}: at data.image_size {self.data.image_size} "
            f"this one is {crop} px (model.roi_crop is given at {ROI_REFERENCE_SIZE} px), so at least "
            f"{math.ceil(needed * ROI_REFERENCE_SIZE / self.data.image_size)}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples), ready for YAML, JSON and torch.save(weights_only)."""
        return plain(self.model_dump())


def check_value(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(key, f"config key '{key}': bad value {value!r} (allowed: {allowed})")


def check_option(ok: bool, option: str, value: Any, allowed: str) -> None:
    """The same check for a command-line option that is not a config key (e.g. predict's --tta)."""
    if not ok:
        raise ConfigError(f"{option}: bad value {value!r} (allowed: {allowed})")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives a key twice (see _ConfigLoader); `key` is its dotted path."""

    def __init__(self, key: str, line: int, first_line: int, mark):
        super().__init__(None, None, f"key '{key}' is given twice; YAML would keep only the last one", mark)
        self.key, self.line, self.first_line = key, line, first_line


class _ConfigLoader(yaml.SafeLoader):
    """The YAML reader of every config (presets, compare configs, a run's config.yaml, --set values).

    Without aliases: `*name` is refused where it is read, so a few hundred bytes of nested aliases
    cannot expand into gigabytes ("billion laughs") or a recursive structure. Without duplicate
    keys: PyYAML keeps the last of a repeated key and drops the other without a word, so a second
    `train:` section would silently undo the first one's settings. With YAML 1.2's floats: PyYAML
    reads `lr: 1e-3` as the text '1e-3', which the strict load then refuses as not a number."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a config; write the value out", mark
            )
        return super().compose_node(parent, index)

    def construct_document(self, node):
        self._refuse_duplicate_keys(node, ())
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_duplicate_keys(item, (*path, str(index)))
        if not isinstance(node, yaml.MappingNode):
            return
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<:` merges another mapping's keys in, which the mapping's own keys may override
                self._refuse_duplicate_keys(value_node, path)
                continue
            if not isinstance(key_node, yaml.ScalarNode):  # a list as key: the constructor refuses it
                continue
            # compared as constructed, as the dict would: `1` and `01`, `lr` and 'lr' are one key
            key = self.construct_object(key_node)
            dotted = ".".join((*path, str(key)))
            if key in first_lines:
                line = key_node.start_mark.line + 1
                raise DuplicateKeyError(dotted, line, first_lines[key], key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
            self._refuse_duplicate_keys(value_node, (*path, str(key)))

    def construct_yaml12_float(self, node: yaml.ScalarNode) -> float:
        return float(self.construct_scalar(node))


# The YAML 1.2 floats that YAML 1.1's resolver misses: an exponent without a dot or without a sign,
# a sign before a leading dot. Tried after YAML 1.1's resolvers, so every other scalar reads as before.
_YAML12_FLOAT = "tag:mtl-meniscus,2024:yaml12-float"
_ConfigLoader.add_implicit_resolver(
    _YAML12_FLOAT,
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+|\.[0-9]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)
_ConfigLoader.add_constructor(_YAML12_FLOAT, _ConfigLoader.construct_yaml12_float)
# YAML 1.2 booleans: true and false only. YAML 1.1's yes/no/on/off made an extra task's values
# `{yes: 1, no: 0}` the booleans true/false, and every labels.csv row saying yes was then refused
# ("a tear needs one of: true, false"); a bool setting written `yes` is refused by key (strict).
_YAML_BOOL = "tag:yaml.org,2002:bool"
for _first, _resolvers in _ConfigLoader.yaml_implicit_resolvers.items():  # the class's own copy
    _resolvers[:] = [(tag, pattern) for tag, pattern in _resolvers if tag != _YAML_BOOL]
_ConfigLoader.add_implicit_resolver(
    _YAML_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """yaml.safe_load without aliases and duplicate keys, with YAML 1.2 floats (see _ConfigLoader);
    raises yaml.YAMLError."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


class Origins:
    """Where each value of a config was written: a tree shaped like the config's nested dict with,
    at each value, the file or option that wrote it ('' where it is not known, e.g. an override
    given without a label). A message about a bad value names its origin, so that a bad `--set`
    value is not blamed on the preset it was set over, nor a base file's value on its child."""

    def __init__(self, tree: dict[str, Any]):
        self.tree = tree

    @classmethod
    def of(cls, data: dict[str, Any], label: str) -> Origins:
        """Every value of `data` written by `label`."""
        return cls(_labelled(data, label))

    def where(self, loc: tuple) -> str:
        """The origin of the value at `loc` (a key path such as ('train', 'lr') or ('rois', 0)):
        the label at it or at a value above it (an item of a list); for a section, the labels of its
        values; '' for a default value, which no file or option wrote."""
        node: Any = self.tree
        for part in loc:
            if not isinstance(node, dict):
                break  # a value holding `loc` (a list)
            if part not in node:
                return ""
            node = node[part]
        labels = dict.fromkeys([node] if isinstance(node, str) else _labels_in(node))
        if "" in labels:  # partly unnamed: naming the rest could blame a file for an override's part
            return ""
        return " + ".join(labels)


def _labelled(data: Any, label: str) -> Any:
    """`data`'s sections with `label` in place of each value. An empty section stays an empty
    section, so that _merged treats the label tree exactly as it treats the data."""
    if isinstance(data, dict):
        return {key: _labelled(value, label) for key, value in data.items()}
    return label


def _labels_in(tree: dict[str, Any]) -> list[str]:
    """Every label of an Origins tree, in order."""
    labels = []
    for value in tree.values():
        labels += _labels_in(value) if isinstance(value, dict) else [value]
    return labels


def _with_origin(message: str, where: str) -> str:
    """'WHERE: MESSAGE', or the message alone when nothing named wrote the value (a default)."""
    return f"{where}: {message}" if where else message


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, with a message naming the file when it is not one.

    A file may start from another: `base: other.yaml` (relative to the file's folder) is read
    first and the file's own sections are merged over it, key by key (a preset as its differences
    from a base; see configs/base.yaml)."""
    return _read_config_file(Path(path), ())[0]


def _read_config_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """read_config_file's mapping and its Origins tree: each value labelled with the file that
    holds it, a base file's values with the base file (`chain`: the files that named it base)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML text)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except DuplicateKeyError as err:
        raise ConfigError(
            f"{path}, line {err.line}: key '{err.key}' is given twice (first on line {err.first_line}); "
            "YAML would silently keep only the last one, so merge the two"
        ) from None
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err)[:500]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if "base" not in data:
        return data, _labelled(data, str(path))
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must name a YAML file (relative to {path.parent}), got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        raise ConfigError(
            f"{path}: 'base: {base}' makes a cycle ({' -> '.join(p.name for p in (*chain, base_path))})"
        )
    base_data, base_origins = _read_config_file(base_path, chain)
    return _merged(base_data, data), _merged(base_origins, _labelled(data, str(path)))


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged over it: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in changes.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_sections else value
    return out


def dotted_keys(values: dict[str, Any], prefix: str = "", whole: Collection[str] = ()) -> dict[str, Any]:
    """A nested config dict as {dotted key: value}; an empty section stays one key (its value {}),
    and so does each of the `whole` keys, whatever it holds."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and prefix + key not in whole:
            out.update(dotted_keys(value, f"{prefix}{key}.", whole))
        else:
            out[prefix + key] = value
    return out


def mapping_keys(section: type[Section] = Config, prefix: str = "") -> set[str]:
    """The dotted keys whose values are the user's own mappings (data.extra_tasks: task name ->
    settings; train.task_weights), not config sections: their keys are names, not settings."""
    keys = set()
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys |= mapping_keys(annotation, f"{prefix}{name}.")
        elif typing.get_origin(annotation) is dict:
            keys.add(prefix + name)
    return keys


def config_differences(
    saved: dict[str, Any], wanted: dict[str, Any], ignored: Collection[str] = (), common_only: bool = False
) -> list[str]:
    """'key: saved -> wanted' for each dotted key whose values differ, in key order; wandb's settings
    and the `ignored` keys do not count. With common_only, a key that one side lacks is skipped (a
    checkpoint of an older version lacks the keys added since). A mapping of the user's own (an
    added extra task, a changed task weight) is compared whole, as one key."""
    mappings = mapping_keys()
    before, after = dotted_keys(saved, whole=mappings), dotted_keys(wanted, whole=mappings)
    keys = before.keys() & after.keys() if common_only else before.keys() | after.keys()
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(keys)
        if before.get(key) != after.get(key) and key not in ignored and not key.startswith("wandb.")
    ]


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_from_dict(
    data: dict[str, Any] | None,
    source: str | Origins = "config",
    check: Callable[[Config], None] | None = None,
) -> Config:
    """Build and validate a Config from a nested dict; unknown keys and bad values name the key and
    where the value came from (`source`: one name for all of `data`, or the Origins of each value).
    `check` adds checks this module cannot make (names in the registries: engine.run.check_registered),
    whose bad values are named so too."""
    data = with_tta_defaults(data or {})
    origins = source if isinstance(source, Origins) else Origins.of(data, source)
    config = parse_section(Config, data, origins)
    try:
        config = config.validate()
        if check is not None:
            check(config)
        return config
    except ConfigValueError as err:
        where = origins.where(tuple(err.key.split(".")))
        raise ConfigValueError(err.key, _with_origin(str(err), where)) from None


def with_tta_defaults(data: dict[str, Any], defaults: AugmentConfig | None = None) -> dict[str, Any]:
    """`data` with a partial tta.augment completed from the test-time defaults (`defaults`, else
    _tta_augment; compare has its own), not from AugmentConfig's training ones: `tta: {augment:
    {noise_prob: 0.3}}` turned the copies' rotation from 15 to 45 degrees without a word. (The
    presets give rotation and translation, the only keys where the two differ.)"""
    tta = data.get("tta")
    if not isinstance(tta, dict) or not isinstance(tta.get("augment"), dict):
        return data
    augment = (defaults or _tta_augment()).model_dump(mode="json") | tta["augment"]
    return {**data, "tta": {**tta, "augment": augment}}


# Keys whose default changed after runs were saved without them: a run folder's config.yaml that
# lacks one ran with the old value, which resuming it (and compare's check of a variant folder) must
# keep. train.gated_loss_mean: every run before it existed divided a gated task's BCE by its tears.
SAVED_RUN_DEFAULTS = {("train", "gated_loss_mean"): "per-gated-row"}


def saved_run_config(path: str | Path) -> Config:
    """The Config of a run folder's config.yaml as that run trained: SAVED_RUN_DEFAULTS where the
    file lacks the key, any other key added since at its default."""
    data = read_config_file(path)
    for (section, key), value in SAVED_RUN_DEFAULTS.items():
        if isinstance(data.get(section, {}), dict) and key not in data.get(section, {}):
            data[section] = {**data.get(section, {}), key: value}
    return config_from_dict(data, source=str(path))


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    overlay: str | Path | None = None,
    origins: dict[str, str] | None = None,
    check: Callable[[Config], None] | None = None,
) -> Config:
    """Load a YAML preset (or the defaults), merge `overlay` over it (another YAML file, e.g.
    configs/exams.yaml for training on exams) and apply dotted-key overrides like {'train.lr': 0.01}.

    `origins` says what gave each override, e.g. {'train.lr': '--set train.lr=fast'}: a message
    about a bad value names that, or the file that holds the value, or nothing for a default
    (`check`'s too: config_from_dict)."""
    data, where = read_yaml(path, overrides, overlay, origins)
    return config_from_dict(data, where, check)


def read_yaml(
    path: str | Path | None,
    overrides: dict[str, Any] | None,
    overlay: str | Path | None = None,
    origins: dict[str, str] | None = None,
) -> tuple[dict[str, Any], Origins]:
    """(nested dict, the Origins of its values) of a YAML file (or {} for None), `overlay` merged
    over it, with dotted-key overrides applied in order; overrides whose value is None are skipped.
    An override that gives a section (`{'train': {'lr': 0.1}}`) merges into it key by key, as a
    file's section merges over its base's. An override's origin is its entry in `origins`, else
    unnamed ('')."""
    data: dict[str, Any] = {}
    tree: dict[str, Any] = {}  # data's shape, each value's origin in its place (Origins)
    if path is not None:
        data, tree = _read_config_file(Path(path), ())
    if overlay is not None:
        overlay_data, overlay_tree = _read_config_file(Path(overlay), ())
        data, tree = _merged(data, overlay_data), _merged(tree, overlay_tree)
    given = [key for key, value in (overrides or {}).items() if value is not None]
    for key in given:
        inside = [other for other in given if other.startswith(key + ".")]
        if inside and not isinstance(overrides[key], dict):  # (a section given whole merges with them)
            raise ConfigError(f"{inside[0]}: '{key}' is a value, not a section")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node, labels = data, tree
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: '{'.'.join(parents[:depth])}' is a value, not a section")
            labels = labels.setdefault(part, {})  # a section in data is one in its tree (_labelled)
        # merged, not assigned: `--set train={lr: 0.1}` would otherwise reset the preset's other
        # train values to the code defaults without a word
        node.update(_merged(node, {leaf: value}))
        labels.update(_merged(labels, {leaf: _labelled(value, (origins or {}).get(dotted, ""))}))
    return data, Origins(tree)


def parse_set_option(text: str) -> tuple[str, Any]:
    """`--set train.lr=0.0005` -> ('train.lr', 0.0005); the value is read as YAML (numbers, lists, booleans)."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not key or not all(key.split(".")):
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=0.0005")
    try:
        parsed = load_yaml(value)
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(
            f"--set {text[:200]}: the value is not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if parsed is None:
        raise ConfigError(
            f"--set {text}: an empty or null value cannot be set here; put it in a --config file"
        )
    return key, parsed


def preset_path(name: str) -> Path:
    """A shipped preset by name, e.g. 'shared' -> <presets>/shared.yaml.

    Installed from a wheel, the presets are package data (`mtl_meniscus/configs/`, from the
    repository's `configs/`); in a checkout or an editable install, the repository's `configs/`.
    """
    packaged = Path(str(importlib.resources.files("mtl_meniscus") / "configs"))
    checkout = Path(__file__).resolve().parents[1] / "configs"
    for folder in (packaged, checkout):
        if (folder / "shared.yaml").is_file():
            return folder / f"{name}.yaml"
    raise ConfigError(
        f"the presets were not found (looked in {packaged} and {checkout}); reinstall mtl_meniscus"
    )


def parse_section(cls: type[Section], data: dict[str, Any], source: str | Origins) -> Any:
    """`cls` from YAML data, strictly typed (validated as JSON: lists may stand for tuples, but a
    bool is not a number and a number not a string); the first problem as a ConfigError naming
    where the value came from (`source`: one name for all of `data`, or each value's Origins)."""
    try:
        return cls.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as err:
        origins = source if isinstance(source, Origins) else Origins.of(data, source)
        raise _config_error(err, cls, origins) from None


def _config_error(err: ValidationError, cls: type[Section], origins: Origins) -> ConfigError:
    """'ORIGIN: config key 'train.lr': bad value 'x' (Input should be a valid number)', or, for
    unknown keys, every unknown key of the first such section from the same origin as the first
    one, with the keys the section allows."""
    problems = err.errors()
    unknown = [p for p in problems if p["type"] == "extra_forbidden"]
    if unknown:
        section = unknown[0]["loc"][:-1]
        where = origins.where(unknown[0]["loc"])
        keys = [
            ".".join(map(str, p["loc"]))
            for p in unknown
            if p["loc"][:-1] == section and origins.where(p["loc"]) == where
        ]
        allowed = ", ".join(sorted(_section_class(cls, section).model_fields))
        name = ".".join(map(str, section)) or "top level"
        return ConfigError(
            _with_origin(f"unknown config key(s) {', '.join(keys)} (allowed in {name}: {allowed})", where)
        )
    first = problems[0]
    loc, message = first["loc"], first["msg"]
    if first["type"] == "missing" and loc and isinstance(loc[-1], int):  # a tuple given too few values
        loc, message = loc[:-1], f"too few values: no item {loc[-1]}"
    key = ".".join(map(str, loc)) or "top level"
    return ConfigError(
        _with_origin(f"config key '{key}': bad value {first['input']!r} ({message})", origins.where(loc))
    )


def _section_class(cls: type[Section], loc: tuple) -> type[Section]:
    """The section class at a location, e.g. ('data', 'extra_tasks', 'displaced') -> TaskConfig."""
    for part in loc:
        if isinstance(part, str) and part in cls.model_fields:
            annotation = cls.model_fields[part].annotation
            inner = getattr(annotation, "__args__", ())
            cls = (
                annotation
                if isinstance(annotation, type)
                else next((a for a in inner if isinstance(a, type) and issubclass(a, Section)), cls)
            )
    return cls
