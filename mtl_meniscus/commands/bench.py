"""Benchmark: the package against bare PyTorch and itself, measured side by side in one run.

    python cli.py bench [--quick] [--out bench]     (or mtl-meniscus bench, python -m mtl_meniscus bench)

Reports medians of several repetitions and ratios, with the machine, as JSON and markdown.
Speed targets are printed next to the measured ratios; nothing here fails on a slow machine.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mtl_meniscus.config import Config, ModelConfig, TTAConfig
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.torch_dataset import EpochBatchSampler, SliceDataset, training_batches
from mtl_meniscus.engine.inference import predict_probs
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.runtime import Runtime, cpu_bf16_pays_off, cpu_features, resolve_runtime
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.outputs import check_output_dir, json_text, write_text_atomic
from mtl_meniscus.networks.losses import FixedWeighting, task_losses
from mtl_meniscus.networks.models import MODELS, build_model, trains_per_task
from mtl_meniscus.phantom.slices import write_phantom


@dataclass
class BenchSettings:
    """Sizes of one benchmark run; --quick shrinks everything to finish in seconds."""

    image_size: int = 256
    n_images: int = 200
    batch_size: int = 32
    steps: int = 8  # timed training steps per repetition
    repeats: int = 5
    warmup: int = 2
    tta_images: int = 64
    widths: tuple[int, ...] = (16, 32, 48, 64)

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            image_size=64,
            n_images=40,
            batch_size=8,
            steps=2,
            repeats=2,
            warmup=1,
            tta_images=8,
            widths=(4, 8, 8, 8),
        )


def machine_info() -> dict[str, Any]:
    """CPU model, cores, clock, vector ISA and bf16 support, torch version and GPU, for the report header."""
    fields: dict[str, str] = {}  # the first value of each /proc/cpuinfo field (the first core's)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    try:
        mhz = float(fields["cpu MHz"])
    except (KeyError, ValueError):
        mhz = None
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "mhz": mhz,
        "cores": torch.get_num_threads(),
        **cpu_features(),  # isa (what ATen runs: AVX2 when held there with ATEN_CPU_CAPABILITY), amx, ...
        "bf16_pays_off": cpu_bf16_pays_off(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


# Nominal peak FLOPs per cycle and core (multiply-add = 2 FLOPs): AMX's TDPBF16PS does 16x16x32
# bf16 multiply-adds in 16 cycles (1024 FLOPs); AVX-512 two 16-lane fp32 FMA ports (64), AVX2 two
# 8-lane ports (32). Turbo clocks are not known inside a VM: the peak uses /proc/cpuinfo's MHz.
FLOPS_PER_CYCLE = {("AMX", "bf16"): 1024, ("AVX512", "fp32"): 64, ("AVX2", "fp32"): 32}


def peak_flops(machine: dict[str, Any], precision: str) -> tuple[float | None, str]:
    """(nominal peak FLOP/s of the CPU for this precision, the unit that gives it), None if unknown."""
    isa = "AMX" if precision == "bf16" and machine.get("amx") else machine.get("isa")
    per_cycle = FLOPS_PER_CYCLE.get((isa, precision))
    if machine.get("gpu") or per_cycle is None or not machine.get("mhz"):
        return None, f"{isa} {precision}"
    return machine["cores"] * machine["mhz"] * 1e6 * per_cycle, f"{isa} {precision}"


def training_step_flops(config: Config, batch_size: int, image_size: int) -> float:
    """FLOPs of one training step (forward and backward; convolutions and matrix products, as
    torch.utils.flop_counter counts them) of the config's model on a batch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config.model).train()
    x = torch.randn(batch_size, config.model.in_chans, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        outputs = model(x)
        sum(logits.sum() for logits in outputs.values()).backward()
    return float(counter.get_total_flops())


def flops_report(achieved: float, machine: dict[str, Any], precision: str) -> dict[str, Any]:
    """Achieved FLOP/s beside the CPU's nominal peak for the precision, and their ratio."""
    peak, unit = peak_flops(machine, precision)
    return {
        "achieved_gflops": achieved / 1e9,
        "peak_gflops": peak / 1e9 if peak else None,
        "of_peak": achieved / peak if peak else None,
        "peak_unit": unit,
    }


def _median_time(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    return interleaved_medians({"one": fn}, repeats, warmup)["one"]


def interleaved_medians(
    workloads: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds of each workload, run in alternating rounds (A B C, A B C, ...) so that a
    noisy neighbour on a shared machine slows every contender alike rather than one of them."""
    for _ in range(warmup):
        for fn in workloads.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        for name, fn in workloads.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _train_step(model, optimizer, weighting, runtime: Runtime, x, y) -> None:
    with runtime.autocast():
        outputs = model(x)
    loss = weighting(task_losses(outputs, y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bare_training(config: Config, runtime: Runtime, settings: BenchSettings) -> Callable[[], None]:
    """Workload of a bare loop: `steps` training steps of the same model on tensors already in memory."""
    torch.manual_seed(0)
    model = runtime.prepare_model(build_model(config.model)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weighting = FixedWeighting(config.model.tasks)
    size = settings.image_size
    x = runtime.prepare_input(torch.randn(settings.batch_size, config.model.in_chans, size, size))
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, float("nan"), float("nan")]]).repeat(
        settings.batch_size // 2 + 1, 1
    )
    y = y[: settings.batch_size].to(runtime.device)

    def run() -> None:
        for _ in range(settings.steps):
            _train_step(model, optimizer, weighting, runtime, x, y)

    return run


def package_training(
    config: Config, data, runtime: Runtime, settings: BenchSettings, num_workers: int
) -> float:
    """Images/s of the package's loop: sampler, augmentation, edge filter, standardization, DataLoader."""
    torch.manual_seed(0)
    model = runtime.prepare_model(build_model(config.model)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weighting = FixedWeighting(config.model.tasks)
    dataset = SliceDataset(data.images, data.targets, config.preprocess.edge_filter, config.augment)
    sampler = EpochBatchSampler(data.indices("train"), settings.steps, settings.batch_size, seed=0)
    epoch = [0]

    def run() -> None:
        epoch[0] += 1
        sampler.set_epoch(epoch[0])
        batches = training_batches(dataset, sampler, num_workers, runtime.channels_last, pin_memory=False)
        for (x,), y in batches:
            _train_step(model, optimizer, weighting, runtime, runtime.prepare_input(x), y.to(runtime.device))

    return run


def data_pipeline(config: Config, data_dir: Path, settings: BenchSettings) -> dict[str, float]:
    """Read + augment + filter + standardize alone: images/s of each stage and peak memory."""
    data = prepare_data(data_dir, config.data)  # warm the file cache so reads are not disk-bound
    start = time.perf_counter()
    data = prepare_data(data_dir, config.data)
    read_seconds = time.perf_counter() - start
    dataset = SliceDataset(data.images, data.targets, config.preprocess.edge_filter, config.augment)
    keys = [(i % len(data.images), i) for i in range(settings.n_images)]

    def run() -> None:
        for key in keys:
            dataset[key]

    seconds = _median_time(run, settings.repeats, 1)
    return {
        "read_images_per_s": len(data.records) / read_seconds,
        "augment_filter_standardize_images_per_s": len(keys) / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def tta_inference(config: Config, runtime: Runtime, images) -> Callable[[], None]:
    """Workload of predict with the original + 5 TTA copies over `images`."""
    torch.manual_seed(0)
    model = runtime.prepare_model(build_model(config.model)).eval()
    tta = TTAConfig(copies=5, augment=config.tta.augment)

    def run() -> None:
        predict_probs(model, images, config.preprocess.edge_filter, runtime, 64, tta=tta)

    return run


def run_benchmark(
    quick: bool = False,
    out_dir: Path = Path("bench"),
    console: Console | None = None,
    runs: tuple[Path, Path] | None = None,
    models: dict[str, ModelConfig] | None = None,
) -> dict[str, Any]:
    """Run every measurement, write bench.json and bench.md into out_dir, return the results.

    `models` holds the model of each mode ('shared', 'separate'), e.g. from the presets; the
    code defaults otherwise. Quick mode shrinks their widths.
    """
    console = console or Console(soft_wrap=True)
    settings = BenchSettings.quick() if quick else BenchSettings()
    models = {mode: (models or {}).get(mode) or ModelConfig(name=mode) for mode in ("shared", "separate")}
    _refuse_roi(models)
    check_output_dir(out_dir, "--out")
    # before the measurements: a run that cannot be read must not cost them
    compute = training_compute(*runs) if runs is not None else {}
    if quick:
        models = {
            mode: model.model_copy(update={"widths": settings.widths}) for mode, model in models.items()
        }
    config = Config()
    config.data.image_size = settings.image_size
    config.model = models["shared"]
    results: dict[str, Any] = {"machine": machine_info(), "settings": settings.__dict__ | {"quick": quick}}
    with tempfile.TemporaryDirectory() as tmp, progress_bar(console) as progress:
        data_dir = Path(tmp) / "phantom"
        write_phantom(data_dir, n=settings.n_images, seed=0, size=settings.image_size)
        data = prepare_data(data_dir, config.data)
        bar = progress.add_task("measurements", total=4)
        console.print(
            "1/4 + 2/4 training throughput: package loop vs bare loop, auto precision vs fp32, "
            "the preset vs the plain floor"
        )
        results |= training_throughput(config, data, settings, results["machine"])
        progress.advance(bar, 2)  # measurements 1 and 2, taken side by side
        console.print("3/4 shared vs separate: inference with 6-pass TTA")
        results["shared_vs_separate"] = shared_vs_separate(config, models, data, settings)
        results["shared_vs_separate"].update(compute)
        progress.advance(bar)
        console.print("4/4 data pipeline alone")
        results["data_pipeline"] = data_pipeline(config, data_dir, settings) | {
            "num_workers": config.train.num_workers
        }
        progress.advance(bar)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "bench.json", json_text(results))
    markdown = to_markdown(results)
    write_text_atomic(out_dir / "bench.md", markdown)
    console.print(markdown, markup=False, highlight=False)
    return results


def _refuse_roi(models: dict[str, ModelConfig]) -> None:
    """bench times models called as model(x): a ROI model (model.roi) is refused by name."""
    for mode, model in models.items():
        if model.roi != "none":
            raise MeniscusError(
                f"bench of ROI models is not supported yet: the {mode} preset sets model.roi {model.roi}"
            )


def training_throughput(
    config: Config, data: PreparedData, settings: BenchSettings, machine: dict[str, Any]
) -> dict[str, Any]:
    """Training images/s measured side by side: the package loop vs a bare loop, auto precision vs
    fp32, the preset vs the plain floor; with the FLOP/s each reaches against the CPU's peak."""
    auto, fp32 = resolve_runtime("auto"), resolve_runtime("fp32")
    floor = config.model_copy(deep=True)
    floor.model = floor.model.model_copy(update={"trunk": "plain"})
    seconds = interleaved_medians(
        {
            "bare": bare_training(config, auto, settings),
            "package": package_training(config, data, auto, settings, config.train.num_workers),
            "package_1_worker": package_training(config, data, auto, settings, 1),
            "bare_fp32": bare_training(config, fp32, settings),
            "bare_plain": bare_training(floor, auto, settings),
        },
        settings.repeats,
        settings.warmup,
    )
    rate = {name: settings.steps * settings.batch_size / value for name, value in seconds.items()}
    return {
        "flops": _flops_section(config, floor, seconds, settings, machine, auto.precision),
        "floor": {
            "preset_images_per_s": rate["bare"],
            "plain_images_per_s": rate["bare_plain"],
            "preset_over_plain": rate["bare"] / rate["bare_plain"],
        },
        "training": {
            "precision": auto.precision,
            "bare_images_per_s": rate["bare"],
            "package_images_per_s": rate["package"],
            "package_over_bare": rate["package"] / rate["bare"],
            "num_workers": config.train.num_workers,
            "package_1_worker_images_per_s": rate["package_1_worker"],
            "package_1_worker_over_bare": rate["package_1_worker"] / rate["bare"],
            "target": ">= 0.95",
        },
        "precision": {
            "auto": auto.describe(),
            "auto_images_per_s": rate["bare"],
            "fp32_images_per_s": rate["bare_fp32"],
            "auto_over_fp32": rate["bare"] / rate["bare_fp32"],
            "target": (
                ">= 3 on CPUs with AMX"
                if auto.precision != "fp32"
                else "none: auto is fp32 on this CPU, so this is the same path twice (the ratio shows the noise)"
            ),
        },
    }


def _flops_section(
    config: Config,
    floor: Config,
    seconds: dict[str, float],
    settings: BenchSettings,
    machine: dict[str, Any],
    precision: str,
) -> dict[str, Any]:
    """GFLOP per training step of the preset and the floor, and the GFLOP/s each measured loop
    reached against the CPU's nominal peak."""
    step_flops = {
        "preset": training_step_flops(config, settings.batch_size, settings.image_size),
        "plain": training_step_flops(floor, settings.batch_size, settings.image_size),
    }
    rows = [
        {"what": f"{'the plain floor' if model == 'plain' else 'the preset'}, {run_precision}"}
        | flops_report(step_flops[model] * settings.steps / seconds[name], machine, run_precision)
        for name, model, run_precision in (
            ("bare", "preset", precision),
            ("bare_fp32", "preset", "fp32"),
            ("bare_plain", "plain", precision),
        )
        if not (name == "bare_fp32" and precision == "fp32")  # the same path as "bare": one row
    ]
    return {
        "step_gflop_preset": step_flops["preset"] / 1e9,
        "step_gflop_plain": step_flops["plain"] / 1e9,
        "rows": rows,
    }


def shared_vs_separate(
    config: Config, models: dict[str, ModelConfig], data: PreparedData, settings: BenchSettings
) -> dict[str, Any]:
    """Inference ms per image with 6-pass TTA, the shared model against the three-network cascade."""
    auto = resolve_runtime("auto")
    images = [data.images[i % len(data.images)] for i in range(settings.tta_images)]
    workloads = {}
    for mode in ("shared", "separate"):
        workloads[mode] = tta_inference(config.model_copy(update={"model": models[mode]}), auto, images)
    ms = {
        name: 1000 * value / len(images)
        for name, value in interleaved_medians(workloads, settings.repeats, 1).items()
    }
    return {
        "shared_ms_per_image": ms["shared"],
        "separate_ms_per_image": ms["separate"],
        "shared_speedup": ms["separate"] / ms["shared"],
        "target": ">= 2.5",
    }


def training_compute(shared_run: Path, separate_run: Path) -> dict[str, Any]:
    """Training images and seconds until the best validation score, from two finished runs."""
    out = {}
    for label, run in (("shared", shared_run), ("separate", separate_run)):
        out[f"{label}_epochs_to_best"], out[f"{label}_seconds_to_best"] = _time_to_best(Path(run), label)
    out["shared_over_separate_epochs"] = out["shared_epochs_to_best"] / max(out["separate_epochs_to_best"], 1)
    out["shared_over_separate_seconds"] = out["shared_seconds_to_best"] / max(
        out["separate_seconds_to_best"], 1e-9
    )
    out["compute_target"] = "<= 0.5"
    return out


def _time_to_best(run: Path, label: str) -> tuple[float, float]:
    """(epochs, seconds) a finished run trained until each network's best epoch (separate: three
    networks, summed), from its metrics.json and history.csv; MeniscusError naming the file that
    is missing or damaged."""
    import csv

    metrics_file, history_file = run / "metrics.json", run / "history.csv"
    try:
        metrics = json.loads(metrics_file.read_text())
        _check_mode(run, label, str(metrics["model"]))
        members = metrics["members"]
        with history_file.open(newline="", encoding="utf-8") as handle:
            history = list(csv.DictReader(handle))
        epochs = seconds = 0.0
        for member, best in members.items():
            rows = [r for r in history if r["member"] == member and int(r["epoch"]) <= best["best_epoch"]]
            seconds += sum(float(r["seconds"]) for r in rows)
            epochs += len(rows)
    except OSError as err:
        raise MeniscusError(f"--{label}-run: cannot read {err.filename} ({err.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MeniscusError(
            f"--{label}-run {run}: metrics.json or history.csv is not a finished training's "
            f"({type(err).__name__}: {err}); give the folder of a run that `train` finished"
        ) from None
    return epochs, seconds


def _check_mode(run: Path, label: str, model: str) -> None:
    """Refuse a run of the other kind for --shared-run / --separate-run: its figures would be read
    as the other mode's (a shared run's epochs as the cascade's)."""
    if model not in MODELS.names():
        raise MeniscusError(f"--{label}-run {run}: its metrics.json names an unknown model {model!r}")
    if trains_per_task(model) != (label == "separate"):
        kind = "a cascade of one network per task" if trains_per_task(model) else "one network for all tasks"
        raise MeniscusError(
            f"--{label}-run {run} is a run of model '{model}' ({kind}); --shared-run takes a run of "
            "train --mode shared, --separate-run one of train --mode separate"
        )


def _flops_line(row: dict[str, Any]) -> str:
    peak = (
        f"{row['achieved_gflops']:.0f} / {row['peak_gflops']:.0f} ({row['peak_unit']}) | {row['of_peak']:.1%}"
        if row["peak_gflops"]
        else f"{row['achieved_gflops']:.0f} / unknown ({row['peak_unit']}) |"
    )
    return f"| training GFLOP/s achieved / nominal peak: {row['what']} | {peak} | |"


def to_markdown(results: dict[str, Any]) -> str:
    """The report as a markdown table with the machine in its header."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} threads, ISA {m['isa']}, AMX: {m['amx']}, "
        f"AVX512-BF16: {m['avx512_bf16']}, torch {m['torch']}, GPU: {m['gpu'] or 'none'}"
        + ("  (quick mode: tiny sizes, not for the targets)" if results["settings"]["quick"] else ""),
        "",
        "| measurement | value | ratio | target |",
        "|---|---|---|---|",
    ]
    t = results["training"]
    lines.append(
        f"| training images/s ({t['precision']}): package ({t['num_workers']} workers, the default) / bare loop | "
        f"{t['package_images_per_s']:.1f} / {t['bare_images_per_s']:.1f} | {t['package_over_bare']:.2f}x | "
        f"{t['target']} |"
    )
    lines.append(
        f"| training images/s: package with 1 worker process / bare loop | "
        f"{t['package_1_worker_images_per_s']:.1f} / {t['bare_images_per_s']:.1f} | "
        f"{t['package_1_worker_over_bare']:.2f}x | {t['target']} |"
    )
    p = results["precision"]
    lines.append(
        f"| training images/s: {p['auto']} / fp32 | {p['auto_images_per_s']:.1f} / {p['fp32_images_per_s']:.1f} "
        f"| {p['auto_over_fp32']:.2f}x | {p['target']} |"
    )
    f = results["flops"]
    lines += [_flops_line(row) for row in f["rows"]]
    fl = results["floor"]
    lines.append(
        f"| training images/s: preset / plain floor (bare loops, {p['auto']}; "
        f"GFLOP per step {f['step_gflop_preset']:.1f} / {f['step_gflop_plain']:.1f}) | "
        f"{fl['preset_images_per_s']:.1f} / {fl['plain_images_per_s']:.1f} | {fl['preset_over_plain']:.2f}x | |"
    )
    s = results["shared_vs_separate"]
    lines.append(
        f"| inference ms/image with 6-pass TTA: separate / shared | {s['separate_ms_per_image']:.2f} / "
        f"{s['shared_ms_per_image']:.2f} | {s['shared_speedup']:.2f}x | {s['target']} |"
    )
    if "shared_over_separate_epochs" in s:
        lines.append(
            f"| training epochs to best validation: shared / separate (all networks) | "
            f"{s['shared_epochs_to_best']:.0f} / {s['separate_epochs_to_best']:.0f} | "
            f"{s['shared_over_separate_epochs']:.2f}x | {s['compute_target']} |"
        )
        lines.append(
            f"| training seconds to best validation: shared / separate | {s['shared_seconds_to_best']:.0f} / "
            f"{s['separate_seconds_to_best']:.0f} | {s['shared_over_separate_seconds']:.2f}x | {s['compute_target']} |"
        )
    d = results["data_pipeline"]
    lines.append(
        f"| data pipeline images/s: read / augment+filter+standardize (workers: {d['num_workers']}) | "
        f"{d['read_images_per_s']:.0f} / {d['augment_filter_standardize_images_per_s']:.0f} | | |"
    )
    lines.append(f"| peak memory (RSS, MiB) | {d['peak_rss_mib']:.0f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    run_benchmark(quick="--quick" in sys.argv)
