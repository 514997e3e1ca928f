"""The CLI through typer's CliRunner: commands work, domain errors give a message and exit 1, a bad
option value is refused naming the option, and tables are printed in full outside a terminal."""

import sys
from pathlib import Path

import pytest
from support import _clean, _copy_run
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

runner = CliRunner()
TINY = str(ROOT / "configs" / "tiny.yaml")


def tiny_train(data, out, *options: str) -> list[str]:
    """Arguments of a one-epoch tiny training run on `data` into `out`, plus extra options."""
    return ["train", "--config", TINY, "--data", str(data), "--out", str(out), "--max-epochs", "1", *options]


def test_make_phantom(tmp_path):
    result = runner.invoke(
        app, ["make-phantom", str(tmp_path / "ph"), "--n", "30", "--seed", "2", "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 30 images" in result.output and "double_tear: 1" in result.output
    assert len(list((tmp_path / "ph" / "images").glob("*.png"))) == 30


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_phantom")
    result = runner.invoke(app, ["make-phantom", str(folder), "--n", "80", "--seed", "4", "--size", "64"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_train_both_modes(phantom, tmp_path, mode):
    out = tmp_path / "run"
    options = [
        "--mode",
        mode,
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--precision",
        "fp32",
        "--wandb",
        "disabled",
    ]
    args = tiny_train(phantom, out, *options)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "challenge score" in result.output and "kept 78 of 80 images" in result.output
    assert (out / "best.pt").is_file()
    config = (out / "config.yaml").read_text()
    assert f"name: {mode}" in config and "steps_per_epoch: 2" in config and "lr: 0.01" in config
    assert "precision: fp32" in config and "seed: 3" in config

    written = {name: (out / name).read_bytes() for name in ("best.pt", "metrics.json")}
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "(finished)" in resumed.output and "kept as they are" in resumed.output
    # the same bytes: a calibration or threshold fitted on best.pt (its SHA-256) stays valid
    assert all((out / name).read_bytes() == before for name, before in written.items())


def test_bad_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "labels.csv").write_text("image,fissure,orientation,position\nmissing.png,3,,\n")
    result = runner.invoke(
        app, ["train", "--config", TINY, "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    assert "row 2, column 'fissure': bad value '3'" in result.output
    assert "Traceback" not in result.output


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 1
    assert "unknown config key(s) train.learning_rate" in result.output


def test_evaluate_predict_and_bench_commands(phantom, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, tiny_train(phantom, out, "--wandb", "disabled")).exit_code == 0

    result = runner.invoke(
        app,
        ["evaluate", str(out), "--split", "all", "--bootstrap", "20", "--tta", "0", "--wandb", "disabled"],
    )
    assert result.exit_code == 0, result.output
    assert "challenge score" in result.output and "cascade:" in result.output
    assert (out / "eval-all" / "metrics.json").is_file() and (out / "eval-all" / "roc.png").is_file()

    images = sorted((phantom / "images").glob("*.png"))[:2]
    (tmp_path / "bad.png").write_bytes(b"broken")
    result = runner.invoke(
        app,
        [
            "predict",
            str(out / "best.pt"),
            *map(str, images),
            str(tmp_path / "bad.png"),
            "--out",
            str(tmp_path / "p.csv"),
            "--tta",
            "0",
        ],
    )
    assert result.exit_code == 1  # one input failed; the others are still in the file
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 4 and "cannot decode" in lines[3]

    result = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "checkpoint not found" in result.output

    result = runner.invoke(app, ["bench", "--quick", "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench" / "bench.md").is_file()


def test_interrupted_training_says_how_to_resume(tmp_path, monkeypatch):
    import mtl_meniscus.engine.run as train_module

    def interrupted(config, run_dir, console=None):  # a run that had begun: its config.yaml is written
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text("model: {name: shared}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_run", interrupted)
    # The hint repeats the way the user started the command.
    for started_as, command in (
        ("/repo/cli.py", "python cli.py"),
        ("/venv/lib/python3.11/site-packages/mtl_meniscus/__main__.py", "python -m mtl_meniscus"),
        ("/venv/bin/mtl-meniscus", "mtl-meniscus"),
    ):
        monkeypatch.setattr(sys, "argv", [started_as])
        result = runner.invoke(app, ["train", "--config", TINY, "--out", str(tmp_path / "run")])
        assert result.exit_code == 130
        assert f"continue with: {command} train --resume {tmp_path / 'run'}" in result.output


def test_train_with_a_timm_trunk(phantom, tmp_path):
    out = tmp_path / "run"
    options = ["--trunk", "resnet18", "--pretrained", "none", "--freeze-backbone", "--wandb", "disabled"]
    result = runner.invoke(app, tiny_train(phantom, out, *options))
    assert result.exit_code == 0, result.output
    config = (out / "config.yaml").read_text()
    assert "trunk: resnet18" in config and "freeze_backbone: true" in config
    missing_file = str(tmp_path / "none.pth")
    missing = runner.invoke(
        app, tiny_train(phantom, tmp_path / "r2", "--trunk", "resnet18", "--pretrained", missing_file)
    )
    assert missing.exit_code == 1 and "pretrained weights file not found" in missing.output


def test_set_overrides_any_config_key_and_named_options_win(tmp_path, monkeypatch):
    import mtl_meniscus.engine.run as train_module

    seen = {}
    monkeypatch.setattr(
        train_module, "train_run", lambda config, run_dir, **kwargs: seen.update(config=config)
    )
    sets = [
        "train.weighting=uncertainty",
        "augment.rotation_deg=45",
        "model.widths=[4, 8, 8, 8]",
        "train.lr=0.5",
    ]
    args = ["train", "--config", TINY, "--out", str(tmp_path / "run"), "--lr", "0.002"]
    result = runner.invoke(app, [*args, *(part for text in sets for part in ("--set", text))])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.train.weighting == "uncertainty" and config.augment.rotation_deg == 45
    assert tuple(config.model.widths) == (4, 8, 8, 8)
    assert config.train.lr == 0.002  # --lr beats --set train.lr

    for bad, message in (
        ("train.nope=1", "train.nope"),
        ("trainlr", "KEY=VALUE"),
        ("train.lr.x=1", "'train.lr' is a value, not a section"),
        ("train.weighting=gradnorm", "train.weighting"),
        ("augment.rotation_deg=", "empty or null value"),
        ("augment.rotation_deg=[1, 2", "not valid YAML"),
    ):
        result = runner.invoke(app, [*args, "--set", bad])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, bad
    # --resume continues the saved config.yaml: every option that would change it is refused by name
    for extra, named in (
        (["--set", "train.lr=0.1"], "--set: not with --resume"),
        (
            ["--max-epochs", "5", "--lr", "0.5", "--out", "elsewhere"],
            "--max-epochs, --lr, --out: not with --resume",
        ),
    ):
        resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), *extra])
        assert resumed.exit_code == 1 and named in resumed.output, resumed.output
    assert not (tmp_path / "run").exists() and not Path("elsewhere").exists()


def test_device_option_names_a_missing_gpu_before_any_work(phantom, tmp_path):
    import torch

    # --device cpu trains on the CPU and records it in the run's config.
    result = runner.invoke(app, tiny_train(phantom, tmp_path / "cpu", "--device", "cpu"))
    assert result.exit_code == 0, result.output
    assert "device: cpu" in (tmp_path / "cpu" / "config.yaml").read_text()
    if not torch.cuda.is_available():  # this CI: a GPU that is not there is named, never a traceback
        for command in (
            tiny_train(phantom, tmp_path / "gpu", "--device", "cuda"),
            ["evaluate", str(tmp_path / "cpu"), "--device", "cuda:0"],
            [
                "predict",
                str(tmp_path / "cpu"),
                str(phantom / "images"),
                "--out",
                str(tmp_path / "p.csv"),
                "--device",
                "cuda",
            ],
        ):
            result = runner.invoke(app, command)
            assert result.exit_code == 1 and "PyTorch sees no CUDA GPU" in result.output, command[0]
            assert "Traceback" not in result.output
        assert not (tmp_path / "gpu" / "config.yaml").exists()  # refused before the run started
    bad = runner.invoke(app, tiny_train(phantom, tmp_path / "bad", "--device", "gpu"))
    assert bad.exit_code == 1 and "train.device" in bad.output and "cpu, cuda, cuda:N" in bad.output


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "command,expected",
    [
        (["predict", "RUN", "IMG", "--batch-size", "0"], "--batch-size: bad value 0"),
        (["predict", "RUN", "IMG", "--batch-size", "-3"], "--batch-size: bad value -3"),
        (["predict", "RUN", "IMG", "--tta", "-1"], "--tta: bad value -1"),
        (["predict", "RUN", "IMG", "--tta", "-2"], "--tta: bad value -2"),
        (["predict", "RUN", "IMG", "--threshold", "nan"], "--threshold: bad value nan"),
        (["predict", "RUN", "IMG", "--threshold", "-0.5"], "--threshold: bad value -0.5"),
        (["evaluate", "RUN", "--bootstrap", "-5"], "--bootstrap: bad value -5"),
        (["evaluate", "RUN", "--tta", "-2"], "--tta: bad value -2"),
        (["evaluate", "RUN", "--threshold", "nan"], "--threshold: bad value nan"),
        (["evaluate", "RUN", "--seed", "-1"], "--seed: bad value -1"),
        (["train", "--config", "TINY", "--seed", "-1"], "'train.seed': bad value -1"),
        (
            ["train", "--config", "TINY", "--batch-size", "100000000"],
            "'train.batch_size': bad value 100000000",
        ),
        (["train", "--config", "TINY", "--lr", "nan"], "'train.lr': bad value nan"),
        (["train", "--config", "YAML:model:\n  widths: [0, 0, 0, 0]\n"], "'model.widths'"),
        (["train", "--config", "YAML:model:\n  dense: [-3]\n"], "'model.dense'"),
        (["train", "--config", "YAML:model:\n  kernels: [-1]\n"], "'model.kernels'"),
        (["train", "--config", "YAML:tta:\n  copies: 1000000000\n"], "'tta.copies'"),
        (["train", "--config", "BINARY"], "not a text file"),
        (["compare", "--seeds", "-1", "--out", "OUT"], "'seeds': bad value"),
        (["compare", "--bootstrap", "-5", "--out", "OUT"], "'bootstrap': bad value -5"),
        (["make-phantom", "OUT", "--size", "0"], "--size: bad value 0"),
        (["make-phantom", "OUT", "--n", "3"], "--n: bad value 3"),
        (["make-phantom", "OUT", "--n", "10000000000"], "--n: bad value 10000000000 (allowed: 20..1,000,000"),
        (
            ["make-phantom", "OUT", "--slices-per-exam", "5"],
            "--slices-per-exam: for whole exams: add --n-exams",
        ),
        (["make-phantom", "OUT", "--exam-format", "nifti"], "--exam-format: for whole exams"),
        (["make-phantom", "OUT", "--n-exams", "20", "--n", "50"], "--n: counts single slices, not exams"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(run64, data64, tmp_path, command, expected):
    image = next((data64 / "images").glob("*.png"))
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    args = []
    for arg in command:
        if arg.startswith("YAML:"):
            arg = _yaml(tmp_path, arg[5:])
        arg = {"RUN": str(run64), "IMG": str(image), "TINY": str(TINY), "OUT": str(tmp_path / "o")}.get(
            arg, arg
        )
        args.append(str(tmp_path / "binary.yaml") if arg == "BINARY" else arg)
    if command[0] == "train":
        args += ["--data", str(data64), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_tables_are_not_cut_and_member_prefixes_survive(run64, tmp_path):
    evaluate = ["evaluate", str(run64), "--bootstrap", "20", "--tta", "0", "--split", "all"]
    result = runner.invoke(app, [*evaluate, "--out", str(tmp_path / "eval")])  # not into the shared run
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "TP/FP/TN/FN" in result.output
    fissure_row = next(line for line in result.output.splitlines() if "fissure " in line and "│" in line)
    assert fissure_row.count("/") == 3  # TP/FP/TN/FN in full

    run = _copy_run(run64, tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "[shared] resumed after epoch 1 (finished)" in result.output


def test_resume_refuses_a_config_yaml_edited_since_the_checkpoint(run64, tmp_path):
    """The epochs after a resume must train what last.pt trained: an edited config.yaml (another
    learning rate, other layer widths) is refused by key, before any weights are loaded; where
    the run computes (its worker count, wandb) may change."""
    run = _copy_run(run64, tmp_path)
    saved = (run / "config.yaml").read_text()
    for old, new, named in (
        ("  lr: 0.001", "  lr: 0.01", "train.lr: 0.001 -> 0.01"),
        ("- 4\n  - 8", "- 4\n  - 6", "model.widths: [4, 8, 8, 8] -> [4, 6, 8, 8]"),
        # a mapping whose entries are names: a weight added where there was none
        ("task_weights: {}", "task_weights: {fissure: 2.0}", "train.task_weights: {} -> {'fissure': 2.0}"),
    ):
        assert old in saved, old
        (run / "config.yaml").write_text(saved.replace(old, new, 1))
        result = runner.invoke(app, ["train", "--resume", str(run)])
        assert result.exit_code == 1 and named in result.output, result.output
        assert "config.yaml was changed since" in result.output and "Traceback" not in result.output
    (run / "config.yaml").write_text(saved.replace("num_workers: 0", "num_workers: 1"))
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0 and "resumed after epoch 1 (finished)" in result.output, result.output


def test_a_cascade_refused_on_resume_names_the_run_folders_config_yaml(data64, tmp_path):
    """A cascade member's last.pt lies in members/NAME/; the config.yaml to restore is the run's."""
    run = tmp_path / "run"
    train = ["train", "--config", str(TINY), "--data", str(data64), "--out", str(run), "--mode", "separate"]
    assert runner.invoke(app, [*train, "--max-epochs", "1"]).exit_code == 0
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved.replace("  lr: 0.001", "  lr: 0.01", 1))
    result = runner.invoke(app, ["train", "--resume", str(run)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"cannot resume {run}: its config.yaml was changed" in text, text
    assert f"--config {run / 'config.yaml'} and another --out" in text


@pytest.mark.parametrize(
    "args",
    [
        ["make-phantom", "OUT", "--difficulty", "medium"],
        ["make-phantom", "OUT", "--n-exams", "20", "--exam-format", "png"],
        ["evaluate", "RUN", "--split", "everything"],
        ["compare", "--budget", "equal"],
        ["compare", "--difficulty", "medium"],
        ["train", "--mode", "joint"],
        ["train", "--precision", "fp8"],
        ["export", "RUN", "--format", "tflite"],
    ],
)
def test_every_fixed_choice_refuses_a_bad_value_with_exit_2(args, tmp_path):
    result = runner.invoke(app, [str(tmp_path / a) if a in ("OUT", "RUN") else a for a in args])
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output


def test_show_config_prints_the_resolved_config_without_training(tmp_path):
    import yaml

    result = runner.invoke(
        app, ["train", "--mode", "separate", "--lr", "0.0005", "--set", "train.max_epochs=3", "--show-config"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["name"] == "separate" and shown["train"]["lr"] == 0.0005
    assert shown["train"]["max_epochs"] == 3 and shown["train"]["steps_per_epoch"] > 0  # from the preset
    assert "] epoch" not in result.output and "wrote" not in result.output  # nothing trained


# An option name that several commands use means one thing in all of them. A name shared by two
# commands must be listed here with that one meaning; a name with another meaning gets another
# name (make-phantom's --set, --exams, --slices and --format became --phantom-setting, --n-exams,
# --slices-per-exam and --exam-format: --set is a config key, predict's --exams and --slices are
# switches, export's --format is the export format).
SHARED_OPTIONS = {
    "--out": "where the command writes (a run, output folder or file)",
    "--config": "the command's YAML settings file",
    "--set": "a config key, KEY=VALUE read as YAML",
    "--data": "a data folder with labels.csv",
    "--mrnet": "a folder in MRNet's layout",
    "--mode": "the model, by its registered name",
    "--seed": "a random seed",
    "--difficulty": "the built-in phantom's level",
    "--max-epochs": "the training budget in epochs",
    "--steps-per-epoch": "the training budget in steps per epoch",
    "--batch-size": "images per batch",
    "--pretrained": "timm trunk weights",
    "--tta": "test-time augmented copies",
    "--threshold": "the fissure probability threshold",
    "--bootstrap": "bootstrap resamples for the CIs",
    "--cam": "a folder for saliency overlays",
    "--precision": "auto, fp32 or bf16",
    "--device": "cpu, cuda or cuda:N",
    "--wandb": "the wandb mode",
    "--quiet": "no progress bars",
}


def _options_by_command() -> dict[str, set[str]]:
    import typer.main

    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in param.opts if opt.startswith("--")}
        for name, command in group.commands.items()
    }


def test_an_option_name_shared_by_commands_has_one_meaning():
    users: dict[str, list[str]] = {}
    for command, options in _options_by_command().items():
        for option in options:
            users.setdefault(option, []).append(command)
    shared = {option: commands for option, commands in users.items() if len(commands) > 1}
    unlisted = {option: commands for option, commands in shared.items() if option not in SHARED_OPTIONS}
    assert unlisted == {}, "an option name used by several commands must mean one thing: list it or rename it"
    assert {"--exams", "--slices", "--format", "--set"}.isdisjoint(_options_by_command()["make-phantom"])


def test_make_phantom_exams_with_the_renamed_options(tmp_path):
    out = tmp_path / "exams"
    options = ["--n-exams", "20", "--slices-per-exam", "3", "--exam-format", "nifti", "--size", "32"]
    result = runner.invoke(
        app, ["make-phantom", str(out), *options, "--phantom-setting", "noise_sigma=0.05,0.09"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 20 exams of 3 slices (nifti)" in result.output
    assert len(list(out.glob("exam_*.nii.gz"))) == 20 and (out / "phantom-exams.csv").is_file()

    too_few = runner.invoke(app, ["make-phantom", str(tmp_path / "few"), "--n-exams", "2"])
    assert too_few.exit_code == 1 and "--n-exams: bad value 2" in too_few.output
    bad_setting = runner.invoke(
        app, ["make-phantom", str(tmp_path / "s"), "--phantom-setting", "noise_sigma"]
    )
    assert bad_setting.exit_code == 1 and "--phantom-setting 'noise_sigma'" in bad_setting.output
    again = runner.invoke(app, ["make-phantom", str(out), *options, "--overwrite"])
    assert again.exit_code == 1 and "--overwrite writes single slices only" in again.output
    assert len(list(out.glob("exam_*.nii.gz"))) == 20  # the exams written before are as they were


@pytest.mark.parametrize(
    "old", [["--exams", "20"], ["--slices", "3"], ["--format", "nifti"], ["--set", "noise_sigma=0.05,0.09"]]
)
def test_make_phantoms_old_option_names_are_usage_errors(tmp_path, old):
    result = runner.invoke(app, ["make-phantom", str(tmp_path / "out"), *old])
    assert result.exit_code == 2 and "No such option" in result.output
    assert not (tmp_path / "out").exists()


LONG_RUNNING = ["train", "evaluate", "predict", "compare", "tune", "bench", "make-phantom", "import-fastmri"]


@pytest.mark.parametrize("command", LONG_RUNNING)
def test_every_long_running_command_takes_quiet(command):
    assert "--quiet" in _options_by_command()[command]
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--quiet" in result.output


def test_quiet_turns_the_progress_bars_of_that_command_off(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import mtl_meniscus.cli

    # each command sets it anew: --quiet does not outlive its command
    for k, quiet in enumerate((False, True, False)):
        terminal = Console(force_terminal=True, file=io.StringIO(), width=100)
        monkeypatch.setattr(mtl_meniscus.cli, "console", terminal)
        args = ["make-phantom", str(tmp_path / f"ph{k}"), "--n", "20", "--size", "32"]
        args += ["--quiet"] if quiet else []
        assert runner.invoke(app, args).exit_code == 0
        shown = terminal.file.getvalue()
        assert "wrote 20 images" in shown  # --quiet keeps the messages
        assert ("writing images" in shown) is not quiet and ("20/20" in shown) is not quiet


def test_switches_show_no_bool_metavar_in_help():
    """A flag reads `--json`, not `--json <bool>`: the type of a switch says nothing."""
    import typer.main

    for name in typer.main.get_command(app).commands:
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, name
        options = [line for line in result.output.splitlines() if "--help" not in line]  # typer's own
        assert not [line for line in options if "<bool>" in line], name


def test_an_error_from_a_dataloader_worker_is_printed_as_its_own_message():
    """With train.num_workers > 0 a file that became unreadable mid-run came back through
    PyTorch's worker wrapper, whose text carries the worker's traceback: printed whole before."""
    from torch._utils import ExceptionWrapper

    from mtl_meniscus.cli import own_message
    from mtl_meniscus.errors import ImageReadError

    message = "a.png: cannot decode image (corrupt or truncated file?)\nsecond line"
    try:
        raise ImageReadError(message)
    except ImageReadError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what the worker sends back
    with pytest.raises(ImageReadError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value) and own_message(raised.value) == message
    assert own_message(ImageReadError(message)) == message  # raised in this process: as it is


def test_compare_refuses_an_out_folder_that_holds_no_comparison(tmp_path, monkeypatch):
    """results.md, results.csv and the figures would replace files of those names: `--out ''`
    (the current folder) replaced a user's own results.md."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.md").write_text("my own notes\n")
    monkeypatch.chdir(notes)
    for out in (str(notes), ""):
        result = runner.invoke(app, ["compare", "--seeds", "0", "--out", out])
        _clean(result)
        assert (
            result.exit_code == 1
            and "holds files (results.md) but no comparison (compare.yaml)" in result.output
        )
    assert (notes / "results.md").read_text() == "my own notes\n"


def test_compare_takes_an_out_folder_holding_only_hidden_files(tmp_path):
    """A folder a file browser opened (.DS_Store) is as good as empty, as for train --out."""
    from mtl_meniscus.cli import _check_comparison_folder
    from mtl_meniscus.io.outputs import OutputError

    (tmp_path / ".DS_Store").write_bytes(b"Finder's")
    _check_comparison_folder(tmp_path)  # no error
    (tmp_path / "notes.md").write_text("mine\n")
    with pytest.raises(OutputError, match=r"holds files \(notes.md\) but no comparison"):
        _check_comparison_folder(tmp_path)


def test_compare_takes_an_out_folder_of_variants_copied_from_other_comparisons(tmp_path):
    """docs/cli.md "Across machines" and scripts/gpu-compare.sh copy variant folders into a new
    folder's variants/ and run compare on it: that folder holds no compare.yaml yet (refusing it
    stopped every GPU sweep before its first training). Anything else beside them is refused."""
    from mtl_meniscus.cli import _check_comparison_folder
    from mtl_meniscus.io.outputs import OutputError

    variant = tmp_path / "variants" / "shared-reference-seed0"
    variant.mkdir(parents=True)
    (variant / "config.yaml").write_text("model: {name: shared}\n")
    (tmp_path / "variants" / "shared-reference-seed0.log").write_text("epoch 1\n")
    _check_comparison_folder(tmp_path)  # no error
    (tmp_path / "variants" / "notes.md").write_text("mine\n")
    with pytest.raises(OutputError, match=r"holds files \(variants\) but no comparison"):
        _check_comparison_folder(tmp_path)
    (tmp_path / "variants" / "notes.md").unlink()
    (tmp_path / "variants" / "holiday").mkdir()  # a folder without a variant's config.yaml
    with pytest.raises(OutputError, match=r"holds files \(variants\) but no comparison"):
        _check_comparison_folder(tmp_path)
    (tmp_path / "variants" / "holiday").rmdir()
    (tmp_path / "results.md").write_text("my own notes\n")
    with pytest.raises(OutputError, match=r"holds files \(results.md, variants\) but no comparison"):
        _check_comparison_folder(tmp_path)


def test_a_failed_write_says_what_rerunning_this_command_does():
    """Every command told 'train --resume RUN continues ..., predict its OUT.partial', also
    evaluate, and a training that had not begun (no config.yaml to resume)."""
    import errno

    from mtl_meniscus.cli import os_error

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r/best.pt")
    assert str(os_error(full, "evaluate")) == (
        "cannot access /runs/r/best.pt: No space left on device; free space (or raise the file-size "
        "limit) and rerun: the same command writes its files again"
    )
    assert "`train --resume RUN` continues" in str(os_error(full, "train"))
    assert "continues its OUT.partial" in str(os_error(full, "predict"))
    gone = OSError(errno.ENOENT, "No such file or directory", "/data/x.png")
    assert str(os_error(gone, "train")) == "cannot access /data/x.png: No such file or directory"


def test_ctrl_c_before_the_run_began_does_not_advise_resume(tmp_path, monkeypatch):
    """Ctrl-C while the phantom was generated said 'continue with: train --resume RUN', which then
    failed ('no config.yaml there'): before the run's config.yaml there is nothing to resume
    (after it: test_interrupted_training_says_how_to_resume)."""
    import mtl_meniscus.engine.run as engine_run

    def interrupted(config, run_dir, console=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_run, "train_run", interrupted)
    result = runner.invoke(
        app, ["train", "--mode", "shared", "--out", str(tmp_path / "run"), "--wandb", "disabled"]
    )
    _clean(result)
    assert result.exit_code == 130
    assert "interrupted before the run began" in result.output and "--resume" not in result.output
