"""The results page's "larger than memory" table: one epoch on a fastMRI+-sized data set, read lazily.

    python scripts/lazy_bench.py run LABEL [--slices 20000] [--size 320]
    python scripts/lazy_bench.py render

`run` writes a labels.csv folder of fastMRI-like `.h5` volumes (40 slices each, float32, random
pixels and labels: this measures memory and speed, not learning) into a temporary folder, trains
`python cli.py train --mode shared --max-epochs 1` on it (data.load auto, which reads it lazily),
then the same one epoch on the default phantom (held in memory), each in a fresh interpreter, and
writes results/lazy/LABEL.json: peak RSS, wall time, training images/s, the load mode, CPU and
ISA. `render` writes the table between the results page's lazy-bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from results_page import RESULTS_PAGE, read_json, result_files, write_table  # scripts/results_page.py

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "lazy"
SLICES_PER_VOLUME = 40
PEAK = "PEAK_RSS_KIB"


def write_volumes(folder: Path, slices: int, size: int) -> None:
    rng = np.random.default_rng(0)
    (folder / "volumes").mkdir(parents=True)
    rows = ["image,slice,fissure,orientation,position,patient_id"]
    for v in range(slices // SLICES_PER_VOLUME):
        name = f"volumes/knee{v:04d}.h5"
        with h5py.File(folder / name, "w") as handle:
            data = rng.random((SLICES_PER_VOLUME, size, size), dtype=np.float32)
            handle.create_dataset("reconstruction_rss", data=data, chunks=(1, size, size))
        for s in range(SLICES_PER_VOLUME):
            tear = rng.random() < 0.3
            labels = f"1,{rng.choice(['horizontal', 'vertical'])},{rng.choice(['anterior', 'posterior'])}"
            rows.append(f"{name},{s},{labels if tear else '0,,'},knee{v:04d}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def train_once(args: list[str], env: dict[str, str]) -> dict:
    """One `train` in a fresh interpreter: its peak RSS, wall time and metrics.json."""
    program = (
        "import atexit, resource, sys; "
        f"atexit.register(lambda: print('{PEAK}', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
        "from mtl_meniscus.cli import app; sys.argv = ['mtl-meniscus', *sys.argv[1:]]; app()"
    )
    out = Path(tempfile.mkdtemp(prefix="lazy-bench-run-")) / "run"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", program, "train", *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    summary = next((line for line in result.stdout.splitlines() if line.startswith("data ")), "")
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "peak_rss_mib": int(result.stdout.split(PEAK)[1].split()[0]) / 1024,
        "wall_seconds": wall,
        "train_images_per_s": metrics["train_images"] / metrics["train_seconds"],
        "data_summary": summary,
    }


def run(label: str, slices: int, size: int) -> dict:
    from mtl_meniscus.commands.bench import machine_info
    from mtl_meniscus.config import DataConfig
    from mtl_meniscus.data.folder import reads_lazily

    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    folder = Path(tempfile.mkdtemp(prefix="lazy-bench-data-"))
    try:
        write_volumes(folder, slices, size)
        common = ["--mode", "shared", "--max-epochs", "1"]
        large = train_once([*common, "--data", str(folder), "--set", f"data.image_size={size}"], env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    phantom = train_once(common, env)
    load = "lazy" if reads_lazily(DataConfig(image_size=size), slices) else "memory"
    result = {
        "label": label,
        "cpu": machine_info()["cpu"],
        "isa": machine_info()["isa"],
        "large": {"slices": slices, "size": size, "load": load, **large},
        "phantom": {"slices": 1128, "size": 256, "load": "memory", **phantom},
        "command": f"python scripts/lazy_bench.py run {label} --slices {slices} --size {size}",
        "date": time.strftime("%Y-%m-%d"),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{label}.json").write_text(json.dumps(result, indent=2))
    return result


def render(page: Path = RESULTS_PAGE) -> str:
    files = result_files(
        OUT,
        "*.json",
        "a LABEL.json per lazy-loading run",
        "python scripts/lazy_bench.py run LABEL",
        str(page),
    )  # none: refused, nothing written
    lines = [
        "| machine | data set | images held | peak RSS | one epoch, wall (with data checks and test) | training images/s |",
        "|---|---|---|---|---|---|",
    ]
    for path in files:
        r = read_json(path)
        for key, what in (("large", "fastMRI+-sized `.h5` folder"), ("phantom", "default phantom")):
            d = r[key]
            lines.append(
                f"| {r['label']}: {r['cpu']}, ISA {r['isa']} | {what}: {d['slices']:,} slices of "
                f"{d['size']}x{d['size']} | {d['load']} | {d['peak_rss_mib']:,.0f} MiB | "
                f"{d['wall_seconds']:.0f} s | {d['train_images_per_s']:.0f} |"
            )
    table = "\n".join(lines)
    write_table(page, "lazy-bench", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "render"])
    parser.add_argument("label", nargs="?")
    parser.add_argument("--slices", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE)
    args = parser.parse_args()
    if args.action == "run":
        if not args.label:
            parser.error("run needs a LABEL")
        print(json.dumps(run(args.label, args.slices, args.size), indent=2))
    print(render(args.page))


if __name__ == "__main__":
    main()
