"""Command-line interface: `mtl-meniscus --help` (or `python -m mtl_meniscus`, or `python cli.py` in a
checkout). Each command parses options and makes one call."""

from __future__ import annotations

import errno
import functools
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from mtl_meniscus import __version__
from mtl_meniscus.config import preset_path
from mtl_meniscus.engine.progress import counted_progress, set_quiet
from mtl_meniscus.engine.runtime import keep_freed_memory
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.networks.models import MODELS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Meniscus tear classification on sagittal knee MRI: shared trunk vs three-CNN cascade.",
    epilog=(
        "Examples: train --mode shared (the built-in phantom) | train --mode separate --data DIR | "
        "train --mode shared --show-config | evaluate RUN --cam RUN/cams | "
        "predict RUN scans/ --out predictions.csv | export RUN --out model.onnx | serve RUN | "
        "compare --seeds 0,1,2"
    ),
)
# markup=False: messages carry user text (paths, names in brackets) that must print as it is;
# the few styled lines ask for markup themselves.
console = Console(soft_wrap=True, markup=False)
keep_freed_memory()  # the process is the CLI's: set before the first large allocation (runtime.py)
WIDE = 1000  # columns when not on a terminal: tables in a log file or a pipe are never cut


# --mode: the registered models (networks/models.py, MODELS, and $MTL_MENISCUS_PLUGINS' models);
# reading them imports torch
try:
    Mode = Enum("Mode", {name: name for name in MODELS.names()}, type=str)
except MeniscusError as plugin_error:  # a plug-in module that cannot be imported: said, no traceback
    console.print(f"error: {plugin_error}", highlight=False)
    raise SystemExit(1) from None


# Fixed choices as Enums: shown in --help, and a bad value is typer's usage error (exit 2).
Difficulty = Enum("Difficulty", {name: name for name in ("easy", "realistic", "hard")}, type=str)
ExamFormat = Enum("ExamFormat", {name: name for name in ("mrnet", "dicom-series", "nifti")}, type=str)
Split = Enum("Split", {name: name for name in ("test", "val", "train", "all", "valid")}, type=str)
Budget = Enum("Budget", {name: name for name in ("per-network", "equal-images", "equal-flops")}, type=str)


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"mtl_meniscus {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", metavar="", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Meniscus tear classification on sagittal knee MRI: shared trunk vs three-CNN cascade."""
    if not console.is_terminal:
        console.width = WIDE  # rich would cut tables to 80 columns in a file or a pipe
    # A truncated or damaged image is reported per file with its reason; OpenCV's own warning
    # ("[ WARN:0@0.05] ... PNG input buffer is incomplete") would add an unexplained line. Read when
    # cv2 is first imported, which no command has done yet.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    # So would pydicom's and Pillow's warnings on a damaged or nonconforming file ("Expected explicit
    # VR, but found implicit VR", "Corrupt EXIF data"), printed with their site-packages paths.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(pydicom|PIL)(\.|$)")


def command_name() -> str:
    """How the user started us, for hints: `python cli.py`, `python -m mtl_meniscus` or `mtl-meniscus`."""
    import sys

    started_as = Path(sys.argv[0]).name
    if started_as == "cli.py":
        return "python cli.py"
    return "python -m mtl_meniscus" if started_as == "__main__.py" else "mtl-meniscus"


# Options several commands share, declared once.
DataOption = Annotated[
    Path | None, typer.Option(help="Data folder with labels.csv (default: the built-in phantom).")
]
WandbOption = Annotated[WandbMode | None, typer.Option(help="wandb mode (default: $WANDB_MODE or offline).")]
DeviceOption = Annotated[
    str | None, typer.Option(help="cpu, cuda or cuda:N (default: the first GPU if any, else the CPU).")
]
RunArgument = Annotated[Path, typer.Argument(help="Run folder (uses its best.pt) or a checkpoint file.")]
PrecisionOption = Annotated[Precision, typer.Option(help="auto: bf16 + channels_last where native.")]
# Every command that can take more than a few seconds has it; command() below applies it.
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet",
        metavar="",
        help="No progress bars (they are off anyway when the output is not a terminal).",
    ),
]


def command(name: str | None = None):
    """app.command(name), with the rules of every command: `--quiet` (where the command has it)
    turns the progress bars off, and a domain error (MeniscusError) or a file-system error is
    printed as a clear message and exits 1, never a traceback."""

    def register(func):
        @functools.wraps(func)  # typer reads the options from the wrapped signature
        def run(*args, **kwargs):
            set_quiet(kwargs.get("quiet", False))  # also resets it: one process may run several commands
            try:
                return func(*args, **kwargs)
            except MeniscusError as err:
                fail(err)
            except OSError as err:
                fail(os_error(err, name or func.__name__))

        return app.command(name)(run)

    return register


def fail(err: Exception) -> None:
    """Print a domain error as a clear message and exit 1 (no traceback)."""
    console.print(f"[bold red]error:[/] {escape(own_message(err))}", highlight=False, markup=True)
    raise typer.Exit(code=1)


def own_message(err: Exception) -> str:
    """The error's own message. One raised in a DataLoader worker process (train.num_workers > 0)
    comes back as PyTorch's 'Caught ImageReadError in DataLoader worker process 0. Original
    Traceback ...' text, the message being the traceback's end, after the class's full name."""
    text, name = str(err), f"{type(err).__module__}.{type(err).__name__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and name in text:
        return text.rsplit(name, 1)[1].rstrip()
    return text


# A write that failed for want of room (or a failing disk): what was written before it is kept
WRITE_FAILED = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}


# What the same command again does after a write failed, by command (RERUN_ADVICE.get: the rest)
RERUN_ADVICE = {
    "train": "`train --resume RUN` continues from the last finished epoch (a run that had not begun: "
    "the same command)",
    "predict": "the same command continues its OUT.partial",
    "compare": "the same command keeps the scored variants and resumes the one in progress",
    "tune": "the same command adds trials to the study",
}


def os_error(err: OSError, command: str = "") -> MeniscusError:
    """A file-system error that escaped the checks (disk full, a file removed meanwhile) as a
    message; after a failed write, what rerunning `command` does."""
    where = f" {err.filename}" if err.filename else ""
    advice = (
        "; free space (or raise the file-size limit) and rerun: "
        + RERUN_ADVICE.get(command, "the same command writes its files again")
        if err.errno in WRITE_FAILED
        else ""
    )
    return MeniscusError(f"cannot access{where}: {err.strerror or err}{advice}")


def check_options(
    tta: int | None = None,
    threshold: float | None = None,
    bootstrap: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
) -> None:
    """Ranges of the options that are not config keys, each named in its message."""
    from mtl_meniscus.config import MAX_BATCH, MAX_BOOTSTRAP, MAX_SEED, MAX_TTA_COPIES, check_option

    if tta is not None:
        check_option(0 <= tta <= MAX_TTA_COPIES, "--tta", tta, f"an integer 0..{MAX_TTA_COPIES}")
    if threshold is not None:
        check_option(0 <= threshold <= 1, "--threshold", threshold, "a probability 0..1")  # NaN fails too
    if bootstrap is not None:
        check_option(
            0 <= bootstrap <= MAX_BOOTSTRAP, "--bootstrap", bootstrap, f"an integer 0..{MAX_BOOTSTRAP}"
        )
    if seed is not None:
        check_option(0 <= seed <= MAX_SEED, "--seed", seed, f"an integer 0..{MAX_SEED}")
    if batch_size is not None:
        check_option(1 <= batch_size <= MAX_BATCH, "--batch-size", batch_size, f"an integer 1..{MAX_BATCH}")


@command("make-phantom")
def make_phantom(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Folder to write images/, masks/ and labels.csv into.")],
    n: Annotated[
        int, typer.Option(help="Number of images, wrong-size and double-tear ones included.")
    ] = 1128,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option(help="Height and width of the regular images.")] = 256,
    difficulty: Annotated[
        Difficulty,
        typer.Option(
            help="easy (clear tears), realistic (calibrated against the reference method; the default of compare) or hard."
        ),
    ] = "easy",
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--phantom-setting",
            help="Override a generator setting, e.g. --phantom-setting tear_contrast=0.3,0.6 "
            "--phantom-setting noise_sigma=0.05,0.09 (repeatable; names in mtl_meniscus/phantom/slices.py, "
            "PhantomSettings).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Write into a folder that is not empty (same-named files are replaced); single slices only.",
        ),
    ] = False,
    n_exams: Annotated[
        int | None,
        typer.Option(
            help="Write this many whole exams (slice stacks) instead of single slices; see --exam-format."
        ),
    ] = None,
    slices_per_exam: Annotated[int, typer.Option(help="With --n-exams: slices per exam.")] = 24,
    exam_format: Annotated[
        ExamFormat,
        typer.Option(
            help="With --n-exams: mrnet (train|valid/sagittal/NNNN.npy + *-meniscus.csv), dicom-series "
            "(exam_NNNN/ folders of DICOM slices) or nifti (exam_NNNN.nii.gz).",
        ),
    ] = "mrnet",
    quiet: QuietOption = False,
) -> None:
    """Write the synthetic knee MRI phantom in the folder format (or, with --n-exams, whole exams)."""
    from mtl_meniscus.phantom.slices import parse_setting, phantom_settings, summarize_cases, write_phantom

    # an option of the other kind of phantom would be ignored without a word
    other_kind = ("--slices-per-exam", "--exam-format") if n_exams is None else ("--n",)
    ignored = [name for name in _options_given(ctx, but=()) if name in other_kind]
    if ignored:
        why = "for whole exams: add --n-exams" if n_exams is None else "counts single slices, not exams"
        raise ConfigError(f"{', '.join(ignored)}: {why} (it would be ignored)")
    chosen = phantom_settings(difficulty.value, dict(parse_setting(text) for text in settings or []))
    if n_exams is not None:
        from mtl_meniscus.phantom.exams import write_phantom_exams

        if overwrite:  # a volume's slices must not mix with an earlier exam's files of the same name
            raise ConfigError(
                "--overwrite writes single slices only: phantom exams are written into an empty folder"
            )

        with counted_progress(console, "writing exams") as on_exam:
            written = write_phantom_exams(
                out,
                n=n_exams,
                n_slices=slices_per_exam,
                seed=seed,
                size=size,
                fmt=exam_format.value,
                settings=chosen,
                on_exam=on_exam,
            )
        tears = sum(exam.case.fissure for exam in written)
        console.print(
            f"wrote {len(written)} exams of {slices_per_exam} slices ({exam_format.value}) to {out}; "
            f"{tears} with a tear"
        )
        return
    with counted_progress(console, "writing images") as on_image:
        cases = write_phantom(
            out, n=n, seed=seed, size=size, settings=chosen, overwrite=overwrite, on_image=on_image
        )
    summary = summarize_cases(cases, size=size)
    console.print(f"wrote {len(cases)} images to {out}", highlight=False)
    console.print(", ".join(f"{k}: {v}" for k, v in summary.items()), highlight=False)


@command("import-fastmri")
def import_fastmri(
    annotations: Annotated[
        Path, typer.Argument(help="fastMRI+ knee.csv (file,slice,study_level,x,y,width,height,label).")
    ],
    volumes: Annotated[Path, typer.Argument(help="Folder of the fastMRI knee .h5 files.")],
    out: Annotated[
        Path, typer.Argument(help="Empty folder for the data folder (labels.csv, volumes/, masks/).")
    ],
    reviewed: Annotated[
        Path | None,
        typer.Option(
            help="fastMRI+'s knee_file_list.csv: the volumes it lists without an annotation row were "
            "reviewed with no findings, and are imported with fissure 0 on every slice."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Turn fastMRI+ annotations into a data folder: a row per slice, tear where a "Meniscus Tear" box lies."""
    from mtl_meniscus.data.fastmri import import_fastmri_plus

    with counted_progress(console, "reading volumes") as on_volume:
        counts = import_fastmri_plus(annotations, volumes, out, on_volume=on_volume, reviewed=reviewed)
    console.print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {out}", highlight=False)
    console.print(
        "orientation and position are unknown in fastMRI+: train with --data "
        f"{out} --set data.allow_unknown_subtype=true --set data.image_size=320 --set data.plane=coronal "
        "(its reconstructions are 320x320 coronal slices)",
        highlight=False,
    )


@command()
def train(
    ctx: typer.Context,
    mode: Annotated[
        Mode | None,
        typer.Option(help="; ".join(f"{name}: {MODELS.describe(name)}" for name in MODELS.names())),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML preset (default: configs/<mode>.yaml).")] = None,
    data: DataOption = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<mode>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the killed run in this folder.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Maximum number of epochs.")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Training steps per epoch.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per training step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Initial Adam learning rate.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of initialisation, sampling and augmentation.")
    ] = None,
    precision: Annotated[
        Precision | None, typer.Option(help="auto: bf16 + channels_last where native.")
    ] = None,
    wandb: WandbOption = None,
    trunk: Annotated[
        str | None,
        typer.Option(help="'reference', 'plain' (the floor) or a timm model: resnet50, vgg16, vgg19, ..."),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(help="timm trunk weights: 'default' (timm's, local cache only), 'none', or a file."),
    ] = None,
    freeze_backbone: Annotated[
        bool, typer.Option(metavar="", help="timm trunk: train the heads only.")
    ] = False,
    backbone_lr_factor: Annotated[
        float | None, typer.Option(help="timm trunk: backbone learning rate = lr * factor.")
    ] = None,
    device: DeviceOption = None,
    mrnet: Annotated[
        Path | None,
        typer.Option(
            help="Train on whole exams in MRNet's layout (train|valid/sagittal/*.npy + *-meniscus.csv): "
            "an exam model (slice features max-pooled over each exam) with configs/exams.yaml's budget "
            "(merged over the mode's preset; a --config file is taken as it is)."
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any config key, e.g. --set train.weighting=uncertainty --set augment.rotation_deg=45 "
            "(repeatable; the value is read as YAML; the named options above win).",
        ),
    ] = None,
    show_config: Annotated[
        bool,
        typer.Option(
            "--show-config",
            metavar="",
            help="Print the resolved config (the preset with every option applied: the defaults the "
            "options above leave to the preset) and exit without training.",
        ),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Train a model on a data folder (or the built-in phantom) and evaluate it on the test split."""
    from mtl_meniscus.engine.run import (
        check_new_run_folder,
        resume_run,
        run_folder,
        train_run,
        training_config,
    )

    run_dir = resume
    try:
        if resume is not None:
            resume_run(resume, _options_given(ctx, but=("resume", "quiet")), console=console)
            return
        if mrnet is not None and data is not None:
            raise ConfigError("give --data (a labels.csv folder) or --mrnet (an MRNet folder), not both")
        named = [  # (option, config key, value): None when not given
            ("--mode", "model.name", mode.value if mode else None),
            ("--mrnet" if mrnet else "--data", "data.path", str(data or mrnet) if data or mrnet else None),
            ("--mrnet", "data.layout", "mrnet" if mrnet else None),
            ("--max-epochs", "train.max_epochs", max_epochs),
            ("--steps-per-epoch", "train.steps_per_epoch", steps_per_epoch),
            ("--batch-size", "train.batch_size", batch_size),
            ("--lr", "train.lr", lr),
            ("--seed", "train.seed", seed),
            ("--precision", "train.precision", precision.value if precision else None),
            ("--wandb", "wandb.mode", wandb.value if wandb else None),
            ("--trunk", "model.trunk", trunk),
            ("--pretrained", "model.pretrained", pretrained),
            ("--freeze-backbone", "model.freeze_backbone", True if freeze_backbone else None),
            ("--backbone-lr-factor", "train.backbone_lr_factor", backbone_lr_factor),
            ("--device", "train.device", device),
        ]
        run_config = training_config(
            config, mode.value if mode else None, named, settings or [], exams=mrnet is not None
        )
        if show_config:
            import yaml

            console.print(yaml.safe_dump(run_config.to_dict(), sort_keys=False), highlight=False, end="")
            return
        run_dir = run_folder(out, run_config)
        check_new_run_folder(run_dir)
        train_run(run_config, run_dir, console=console)
        _print_next_steps(run_dir, exams=run_config.model.exam_pooling is not None)
    except KeyboardInterrupt:
        # Every finished epoch is in last.pt; nothing is lost but the epoch in progress. Before the
        # run's config.yaml (reading the data, making the phantom) there is nothing to resume.
        if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
            console.print(f"interrupted; continue with: {command_name()} train --resume {run_dir}")
        else:
            console.print(
                "interrupted before the run began (nothing written to resume): run the same command again"
            )
        raise typer.Exit(code=130) from None


def _options_given(ctx: typer.Context, but: tuple[str, ...]) -> list[str]:
    """The options given on the command line (not left at their defaults), as typed ('--set'), in
    the order given; those named in `but` (parameter names) left out."""
    typed = {param.name: param.opts[0] for param in ctx.command.params}
    # by the source's name: typer may bring its own copy of click, whose ParameterSource is not click's
    return [
        typed[name]
        for name in ctx.params
        if name not in but and ctx.get_parameter_source(name).name != "DEFAULT"
    ]


def _print_next_steps(run_dir: Path, exams: bool) -> None:
    """The end of `train`: the files it wrote and the commands that use them (`exams`: a model of
    whole exams, which has no saliency maps and no ONNX export)."""
    if os.environ.get("RANK", "0") not in ("", "0") or not run_dir.is_dir():
        return  # under torchrun, rank 0 speaks
    written = sorted(
        p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if not p.name.startswith(".")
    )
    run = command_name()
    console.print(f"wrote {run_dir}: {', '.join(written)}", highlight=False)
    if not exams:
        console.print(
            f"next: {run} evaluate {run_dir}    # AUCs with CIs, figures; --calibrate, --youden, --cam\n"
            f"      {run} predict {run_dir} IMAGES... --out predictions.csv\n"
            f"      {run} export {run_dir} --out model.onnx",
            highlight=False,
        )
    else:
        console.print(
            f"next: {run} evaluate {run_dir}    # exam-level AUCs with CIs; --calibrate, --youden\n"
            f"      {run} predict {run_dir} EXAMS... --exams --out predictions.csv",
            highlight=False,
        )


@command()
def evaluate(
    run: RunArgument,
    data: Annotated[
        Path | None, typer.Option(help="External data folder (default: the run's own data).")
    ] = None,
    split: Annotated[
        Split,
        typer.Option(
            help="test, val, train, or all (every kept row of --data); with --mrnet: valid or train."
        ),
    ] = "test",
    tta: Annotated[
        int | None, typer.Option(help="Augmented copies averaged with the original (0 = off).")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Fissure probability threshold for gating.")] = None,
    youden: Annotated[
        bool, typer.Option(metavar="", help="Pick the threshold by Youden's J on validation; save it.")
    ] = False,
    calibrate: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Fit temperature scaling per task on the run's validation split and save it in the run "
            "(calibration.json): evaluate, predict and export apply it from then on.",
        ),
    ] = False,
    bootstrap: Annotated[int, typer.Option(help="Stratified bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of TTA and bootstrap (default: the run's training seed, as train scored its test split).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/eval-<split>).")] = None,
    cam: Annotated[
        Path | None, typer.Option(help="Write saliency (LayerCAM) overlays of the evaluated images here.")
    ] = None,
    precision: PrecisionOption = Precision.auto,
    wandb: Annotated[
        WandbMode | None, typer.Option(help="wandb mode (default: the run's, or $WANDB_MODE).")
    ] = None,
    device: DeviceOption = None,
    mrnet: Annotated[
        Path | None,
        typer.Option(
            help="An MRNet folder: exam-level tear AUC of the slice model (max over slices) on --split "
            "valid (the default here, MRNet's test split) or train."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a trained run: AUCs with bootstrap CIs, sensitivity/specificity, calibration, cascade view, figures."""
    from mtl_meniscus.commands.evaluate import EVALUATION_FILES, run_evaluation, run_exam_evaluation
    from mtl_meniscus.io.outputs import OutputError, check_output_dir, check_own_output_dir, is_run_folder

    check_options(tta=tta, threshold=threshold, bootstrap=bootstrap, seed=seed)
    if out is not None and is_run_folder(out):
        raise OutputError(
            f"--out: {out} is a training run's folder, whose metrics.json evaluate would replace; "
            "leave --out out (RUN/eval-<split>) or choose another folder"
        )
    if mrnet is not None:
        given = {"--data": data is not None, "--threshold": threshold is not None, "--youden": youden}
        given |= {"--cam": cam is not None, "--calibrate": calibrate}
        for name in (name for name, used in given.items() if used):
            raise ConfigError(f"{name}: not available with --mrnet (exam-level tear AUC only)")
        if out is not None:  # before the exams are scored: a bad one must not cost them
            check_own_output_dir(out, "--out", EVALUATION_FILES)
        run_exam_evaluation(
            run,
            mrnet,
            split="valid" if split.value == "test" else split.value,
            tta_copies=tta,
            n_bootstrap=bootstrap,
            seed=seed,
            out_dir=out,
            precision=precision.value,
            console=console,
            device=device,
        )
        return
    # Output locations first: a bad one must not cost the evaluation.
    if out is not None:
        check_own_output_dir(out, "--out", EVALUATION_FILES)
    elif run.exists():
        check_output_dir(run if run.is_dir() else run.parent, "the default output folder (use --out)")
    if youden and run.is_dir():
        check_output_dir(run, "--youden (writes RUN/threshold.json)")
    if calibrate and run.is_dir():
        check_output_dir(run, "--calibrate (writes RUN/calibration.json)")
    if cam is not None:
        check_own_output_dir(cam, "--cam")
    run_evaluation(
        run,
        data_dir=data,
        split=split.value,
        tta_copies=tta,
        threshold=threshold,
        youden=youden,
        n_bootstrap=bootstrap,
        seed=seed,
        out_dir=out,
        cam_dir=cam,
        precision=precision.value,
        console=console,
        wandb_mode=wandb.value if wandb else None,
        device=device,
        calibrate=calibrate,
    )


@command()
def predict(
    run: RunArgument,
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output file.")] = Path("predictions.csv"),
    json_lines: Annotated[
        bool, typer.Option("--json", metavar="", help="Write JSON lines instead of CSV.")
    ] = False,
    tta: Annotated[
        int | None, typer.Option(help="Augmented copies averaged with the original (0 = off).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Fissure threshold (default: the run's, else 0.5).")
    ] = None,
    strict_size: Annotated[
        bool, typer.Option(metavar="", help="Refuse images of another size instead of resizing.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    cam: Annotated[
        Path | None, typer.Option(help="Write saliency (LayerCAM) overlays per task into this folder.")
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Write each input's predicted mask (PNG at its own size and geometry) and an overlay with "
            "the horn boxes into this folder; the boxes go into the output (a run without a segmentation "
            "head: boxes from the classical horn finder, no mask).",
        ),
    ] = None,
    precision: PrecisionOption = Precision.auto,
    device: DeviceOption = None,
    exams: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Each input is one exam (a volume: .npy slices first, NIfTI, multi-frame DICOM; or a folder "
            "holding one DICOM series): one row per exam, from its most suspicious slice.",
        ),
    ] = False,
    slices: Annotated[bool, typer.Option(metavar="", help="With --exams: a row per slice as well.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Predict tear, orientation and position for image files or exams; exit code 1 if any input failed."""
    from mtl_meniscus.commands.predict import failed_rows, run_predict, run_predict_exams

    check_options(tta=tta, threshold=threshold, batch_size=batch_size)
    if slices and not exams:
        raise ConfigError("--slices: only with --exams (one row per slice of each exam)")
    for name, given in (("--cam", cam is not None), ("--strict-size", strict_size)):
        if exams and given:
            raise ConfigError(
                f"{name}: not available with --exams (exam slices are resized to the model's size)"
            )
    common = dict(
        as_json=json_lines,
        tta_copies=tta,
        threshold=threshold,
        batch_size=batch_size,
        precision=precision.value,
        console=console,
        device=device,
        masks_dir=masks,
    )
    if exams:
        run_predict_exams(run, inputs, out, with_slices=slices, **common)
    else:
        run_predict(run, inputs, out, strict_size=strict_size, cam_dir=cam, **common)
    if failed_rows(out):  # an interrupted earlier call's too, where this one continued it
        raise typer.Exit(code=1)


@command()
def compare(
    out: Annotated[
        Path, typer.Option(help="Comparison folder; rerunning on it skips the finished variants.")
    ] = Path("runs/compare"),
    config: Annotated[
        Path | None, typer.Option(help="Comparison YAML (default: configs/compare.yaml).")
    ] = None,
    modes: Annotated[str | None, typer.Option(help="Comma-separated: separate,shared.")] = None,
    trunks: Annotated[
        str | None, typer.Option(help="Comma-separated: reference and/or timm models (resnet50,vgg16,vgg19).")
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated training seeds, e.g. 0,1,2.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Training budget: epochs per network.")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Training budget: steps per epoch.")] = None,
    budget: Annotated[
        Budget | None,
        typer.Option(
            help="per-network: each cascade network gets the whole budget (default); equal-images: the "
            "cascade's networks share the shared model's steps; equal-flops: they share its training FLOPs."
        ),
    ] = None,
    train_fraction: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated shares of the training split, e.g. 0.1,0.25,0.5,1.0: every mode on "
            "nested, stratified, patient-grouped subsets (a learning curve)."
        ),
    ] = None,
    roi: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated ROI-first classification: none, classical, predicted, truth (an upper "
            "bound; needs masks). predicted trains what finds the horns: the shared model's decoder, "
            "the cascade's own segmentation network.",
        ),
    ] = None,
    segmentation: Annotated[
        str | None,
        typer.Option(help="Comma-separated off,on: segmentation as an auxiliary task of the shared model."),
    ] = None,
    same_regularization: Annotated[
        bool,
        typer.Option(
            "--same-regularization",
            metavar="",
            help="Every mode with the shared preset's dropout, optimiser, LR schedule, stopping and "
            "augmentation: the modes then differ in sharing (and its architecture) only.",
        ),
    ] = False,
    pretrained: Annotated[
        list[str] | None,
        typer.Option(help="timm trunk weights: TRUNK=FILE|default|none, or one value for all (repeatable)."),
    ] = None,
    data: DataOption = None,
    difficulty: Annotated[
        Difficulty | None,
        typer.Option(help="Level of the built-in phantom: easy, realistic (the default) or hard."),
    ] = None,
    tta: Annotated[int | None, typer.Option(help="Test-time augmented copies for every variant.")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for the CIs.")] = None,
    wandb: WandbOption = None,
    jobs: Annotated[
        int,
        typer.Option(
            help="Variants trained at once, each in its own process (CPU threads divided among them; "
            "one GPU each when several are visible). The same results as one at a time with as many threads "
            "per job; with fewer, CPU float sums may round otherwise."
        ),
    ] = 1,
    quiet: QuietOption = False,
) -> None:
    """Train and score separate vs shared (x trunks x seeds) on the same splits; write the table and plots."""
    from mtl_meniscus.commands.compare import parse_list, parse_on_off, parse_pretrained, run_compare
    from mtl_meniscus.commands.compare.settings import load_compare_config
    from mtl_meniscus.io.outputs import OutputError, is_data_folder, is_run_folder

    try:
        kind = "training run" if is_run_folder(out) else "data" if is_data_folder(out) else None
        if kind:
            raise OutputError(
                f"--out: {out} is a {kind} folder; a comparison writes its variants, tables and figures "
                "into a folder of its own"
            )
        _check_comparison_folder(out)
        if data is not None and difficulty is not None:  # it would be written into every variant's config
            raise ConfigError(
                "--difficulty: the built-in phantom's level, not with --data (your data has its own)"
            )
        path = config or preset_path("compare")
        overrides = {
            "modes": parse_list(modes, "--modes") if modes is not None else None,
            "trunks": parse_list(trunks, "--trunks") if trunks is not None else None,
            "seeds": parse_list(seeds, "--seeds", int) if seeds is not None else None,
            "max_epochs": max_epochs,
            "steps_per_epoch": steps_per_epoch,
            "budget": budget.value if budget else None,
            "train_fractions": parse_list(train_fraction, "--train-fraction", float)
            if train_fraction is not None
            else None,
            "rois": parse_list(roi, "--roi") if roi is not None else None,
            "segmentation": parse_on_off(segmentation, "--segmentation")
            if segmentation is not None
            else None,
            "same_regularization": True if same_regularization else None,
            "phantom_difficulty": difficulty.value if difficulty else None,
            "tta.copies": tta,
            "bootstrap": bootstrap,
        }
        settings = load_compare_config(path, overrides)
        settings.pretrained.update(parse_pretrained(pretrained or [], settings.trunks))
        # Preset paths in the YAML are relative to the YAML's folder; missing modes use configs/<mode>.yaml.
        presets = {mode: preset_path(mode) for mode in settings.modes}
        presets |= {mode: path.parent / preset for mode, preset in settings.presets.items()}
        run_compare(
            settings,
            out,
            presets,
            data_dir=data,
            wandb_mode=wandb.value if wandb else None,
            console=console,
            jobs=jobs,
        )
    except KeyboardInterrupt:
        console.print(
            "interrupted; rerun the same command to continue: scored variants are kept and the "
            "one in progress resumes from its last finished epoch"
        )
        raise typer.Exit(code=130) from None


def _check_comparison_folder(out: Path) -> None:
    """compare --out: a new or empty folder, a comparison's (its compare.yaml), which a rerun
    continues, or one holding only variants/ of variant folders copied from other comparisons
    (docs/cli.md, "Across machines"), which this one scores or keeps. Any other folder is refused:
    results.md, results.csv, the figures and variants/ would replace files of those names
    (`--out ''`, the current folder, replaced a user's notes)."""
    from mtl_meniscus.data.records import PROBLEMS_FILE
    from mtl_meniscus.io.outputs import OutputError, entries_besides, some_of

    if not out.is_dir() or (out / "compare.yaml").is_file():
        return
    held = entries_besides(out, {PROBLEMS_FILE})
    if held and not (held == ["variants"] and _only_variant_folders(out / "variants")):
        raise OutputError(
            f"--out: {out.resolve()} holds files ({some_of(held)}) "
            "but no comparison (compare.yaml): compare writes results.md, results.csv, its figures and "
            "variants/ there, replacing files of those names; choose a new or empty folder"
        )


def _only_variant_folders(variants: Path) -> bool:
    """Whether the folder `variants` holds only variant folders (each with the config.yaml compare
    wrote) and their logs."""
    return variants.is_dir() and all(
        (entry.is_dir() and (entry / "config.yaml").is_file()) or (entry.is_file() and entry.suffix == ".log")
        for entry in variants.iterdir()
        if not entry.name.startswith(".")
    )


@command()
def tune(
    mode: Annotated[
        Mode | None, typer.Option(help="shared or separate (default: the preset's model.name).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Base YAML preset (default: configs/<mode>.yaml).")
    ] = None,
    data: DataOption = None,
    out: Annotated[
        Path, typer.Option(help="Search folder: study.db, trials/, trials.csv, best.yaml, plots.")
    ] = Path("runs/tune"),
    n_trials: Annotated[int, typer.Option(help="Trials this process runs (added to the study's).")] = 20,
    timeout: Annotated[float | None, typer.Option(help="Start no new trial after this many seconds.")] = None,
    n_jobs: Annotated[
        int, typer.Option(help="Trials at once, as threads sharing this process's CPU cores (or GPU).")
    ] = 1,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL (default: sqlite:///OUT/study.db); e.g. postgresql+psycopg://user:pw@host/db "
            "for workers on several machines."
        ),
    ] = None,
    study_name: Annotated[
        str | None, typer.Option(help="Study name (default: the --out folder's name).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Training seed of every trial, and the sampler's seed.")] = 0,
    wandb: WandbOption = None,
    quiet: QuietOption = False,
) -> None:
    """Search hyper-parameters with Optuna, maximizing the validation score; rerun to add trials."""
    from mtl_meniscus.commands.tune import run_tune

    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed instead
    except ImportError:
        pass  # run_tune says how to install it
    try:
        run_tune(
            out,
            config or preset_path((mode or Mode.shared).value),
            mode=mode.value if mode else None,
            data_dir=data,
            n_trials=n_trials,
            timeout=timeout,
            n_jobs=n_jobs,
            storage=storage,
            study_name=study_name,
            seed=seed,
            wandb_mode=wandb.value if wandb else None,
            console=console,
        )
    except KeyboardInterrupt:
        console.print(
            f"interrupted; finished trials are kept in {out / 'trials.csv'} and the study: rerun the "
            "same command to add trials (the interrupted one is marked failed; its folder can be "
            f"continued with {command_name()} train --resume)"
        )
        raise typer.Exit(code=130) from None


@command()
def bench(
    quick: Annotated[
        bool, typer.Option(metavar="", help="Tiny sizes that finish in seconds (CI); not for the targets.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.md.")] = Path("bench"),
    shared_run: Annotated[
        Path | None, typer.Option(help="Finished shared run, for training compute to best.")
    ] = None,
    separate_run: Annotated[
        Path | None, typer.Option(help="Finished separate run, for the same comparison.")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Measure the package against bare PyTorch, bf16 against fp32, and shared against separate."""
    from mtl_meniscus.commands.bench import run_benchmark
    from mtl_meniscus.config import load_config

    runs = (shared_run, separate_run) if shared_run and separate_run else None
    try:
        if (shared_run is None) != (separate_run is None):
            raise ConfigError("--shared-run and --separate-run go together: the comparison needs both runs")
        models = {mode: load_config(preset_path(mode)).model for mode in ("shared", "separate")}
        run_benchmark(quick=quick, out_dir=out, console=console, runs=runs, models=models)
    except (MeniscusError, FileNotFoundError, KeyError) as err:
        fail(err)


class ExportFormat(str, Enum):
    onnx = "onnx"


@command()
def export(
    run: RunArgument,
    out: Annotated[
        Path, typer.Option(help="Output file; a .json with the same name is written next to it.")
    ] = Path("model.onnx"),
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="Export format.")
    ] = ExportFormat.onnx,
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline",
            metavar="",
            help="The whole pipeline in the graph: raw slices of any size in (resize, edge filter, "
            "standardisation inside), probabilities and gated predictions out.",
        ),
    ] = False,
) -> None:
    """Export a trained model (network, its calibration, sigmoid) to ONNX; checks it against PyTorch."""
    from mtl_meniscus.commands.export import export_onnx

    report = export_onnx(run, out, pipeline=pipeline)
    scaled = {task: t for task, t in report.temperatures.items() if t != 1.0}
    calibration = (
        "calibrated (" + ", ".join(f"{task} T={t:.2f}" for task, t in scaled.items()) + ")"
        if scaled
        else "uncalibrated (every temperature 1)"
    )
    shape = ", ".join(map(str, report.input_shape))
    if pipeline:
        given = (
            f"input image ({shape}): raw canonical-view slices of any size, resized to {report.image_size}"
        )
    else:
        given = (
            f"input x ({shape}) = preprocess.make_input(slice resized to {report.image_size}x"
            f"{report.image_size}, '{report.edge_filter}')"
        )
    console.print(
        f"wrote {report.path} ({export_format.value}): {given}; outputs {', '.join(report.outputs)}, "
        f"{calibration}; fissure threshold {report.fissure_threshold:.3f}; matches PyTorch within "
        f"{report.max_abs_difference:.1e} on {report.checked_inputs} inputs; details in {report.sidecar}",
        highlight=False,
    )
    if report.note:
        console.print(report.note, markup=False, highlight=False)


@command()
def serve(
    run: RunArgument,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 127.0.0.1 answers this machine only.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on; 0: any free port (the address printed at start names it).")
    ] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload in MiB (413 above).")] = 64.0,
    max_pixels: Annotated[
        int | None, typer.Option(help="Decoded pixels per input (413 above; default: predict's, 64 MP).")
    ] = None,
    max_in_flight: Annotated[int, typer.Option(help="Requests at work at once.")] = 2,
    max_waiting: Annotated[int, typer.Option(help="Requests queued behind them; more get 503.")] = 16,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds from a request's start to its answer (504 past it).")
    ] = 60.0,
    tta: Annotated[
        int | None, typer.Option(help="Augmented copies averaged with the original (0 = off).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Fissure threshold (default: the run's, else 0.5).")
    ] = None,
    precision: PrecisionOption = Precision.auto,
    device: DeviceOption = None,
) -> None:
    """Serve a trained model over HTTP: POST /predict, GET /model, GET /health, and a page at /."""
    from mtl_meniscus.config import check_option

    try:
        from mtl_meniscus.commands.serve import MiB, ServeLimits, run_serve
    except ImportError as err:
        raise MeniscusError(
            f"serve needs fastapi, uvicorn and python-multipart ({err.name} is missing): pip install -e "
            "'.[serve]' in a checkout (or pip install fastapi uvicorn python-multipart)"
        ) from None

    check_options(tta=tta, threshold=threshold)
    for name, value, ok, allowed in (
        ("--host", host, bool(host.strip()), "an address or host name (0.0.0.0: every network interface)"),
        ("--port", port, 0 <= port <= 65535, "a port 0..65535, 0: any free port"),
        ("--max-upload-mb", max_upload_mb, 0 < max_upload_mb <= 4096, "MiB, above 0 and at most 4096"),
        ("--max-pixels", max_pixels, max_pixels is None or max_pixels >= 1, "a number of pixels >= 1"),
        ("--max-in-flight", max_in_flight, 1 <= max_in_flight <= 64, "an integer 1..64"),
        ("--max-waiting", max_waiting, 0 <= max_waiting <= 1024, "an integer 0..1024"),
        ("--request-timeout", request_timeout, 0 < request_timeout <= 3600, "seconds, 0 < s <= 3600"),
    ):
        check_option(ok, name, value, allowed)
    limits = ServeLimits(
        upload_bytes=int(max_upload_mb * MiB),
        max_pixels=max_pixels,
        in_flight=max_in_flight,
        waiting=max_waiting,
        timeout_s=request_timeout,
    )
    options = dict(threshold=threshold, tta_copies=tta, precision=precision.value, device=device)
    run_serve(run, host, port, console, limits=limits, **options)


if __name__ == "__main__":
    app()
