"""The load check of `serve`: N requests from C concurrent clients on 127.0.0.1, and its table.

    python scripts/serve_load.py run RUN [--requests 200] [--clients 8] [--image SLICE] [--label TEXT]
    python scripts/serve_load.py render [--page docs/cli.md]

`run` starts `python cli.py serve RUN` on a free port of 127.0.0.1 (its default limits), sends 10
warm-up requests, then `--requests` POST /predict of one slice (default: the first image of the
run's own data folder) from `--clients` threads, each on its own keep-alive connection, within a
time bound (--max-seconds). It records every status, p50/p95/max latency, requests per second and
the server process's resident memory (VmRSS) after the warm-up, halfway and at the end, with the
machine (lscpu's model name and CPU count) and the load average, into results/serve/load.json.
`render` writes the table between the serve-load markers of docs/cli.md (Serve) from that file.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "serve" / "load.json"
PAGE = ROOT / "docs" / "cli.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import read_json, replace_between  # noqa: E402  (scripts/results_page.py)


def machine() -> dict:
    """lscpu's model name and CPU count (os.cpu_count() where lscpu is missing)."""
    fields = {}
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in listing.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": fields.get("Model name") or platform.processor() or platform.machine(),
        "cpus": int(fields.get("CPU(s)") or os.cpu_count() or 0),
        "python": platform.python_version(),
    }


def rss_mib(pid: int) -> float:
    """The process's resident memory (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(run: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`serve RUN --port 0` on 127.0.0.1 (a port it chose, named in its first line), once /health answers."""
    command = [sys.executable, "cli.py", "serve", str(run), "--port", "0"]
    env = os.environ | {"WANDB_MODE": "disabled"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline, port = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve stopped: {log.read_text()}")
        port = port or next(map(int, re.findall(r" on http://127\.0\.0\.1:(\d+)/", log.read_text())), None)
        try:
            if port is not None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return process, port
        except OSError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise SystemExit("serve did not answer /health within 120 s")


def client(port: int, body: bytes, content_type: str, todo: list, results: list, stop_at: float) -> None:
    """Send requests until `todo` is empty or the time is up; (status, seconds) into `results`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while time.monotonic() < stop_at:
        try:
            todo.pop()
        except IndexError:
            return
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as err:
            status = f"{type(err).__name__}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        results.append((status, time.perf_counter() - start))


def load(port: int, pid: int, body, content_type, requests: int, clients: int, max_seconds: float) -> dict:
    """The timed run: `requests` in two halves (RSS read after each), `clients` threads."""
    results: list = []
    rss = [rss_mib(pid)]
    start = time.perf_counter()
    stop_at = time.monotonic() + max_seconds
    for half in (requests // 2, requests - requests // 2):
        todo = list(range(half))
        threads = [
            threading.Thread(target=client, args=(port, body, content_type, todo, results, stop_at))
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rss.append(rss_mib(pid))
    elapsed = time.perf_counter() - start
    latencies = np.array([seconds for _, seconds in results]) * 1000
    errors = [status for status, _ in results if status != 200]
    return {
        "requests": len(results),
        "clients": clients,
        "errors": len(errors),
        "error_statuses": sorted({str(s) for s in errors}),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "max_ms": round(float(latencies.max()), 1),
        "requests_per_s": round(len(results) / elapsed, 1),
        "seconds": round(elapsed, 2),
        "rss_mib": [round(value, 1) for value in rss],  # after warm-up, halfway, at the end
    }


def default_image(run: Path) -> Path:
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    folder = Path(config["data"]["path"] or "")
    images = sorted((folder / "images").glob("*.png")) if config["data"]["path"] else []
    if not images:
        raise SystemExit(f"{run}: its data folder has no images/*.png; pass --image SLICE")
    return images[0]


def run_check(args) -> dict:
    image = args.image or default_image(args.run)
    body, content_type = multipart(image.name, image.read_bytes())
    log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "serve.log"
    process, port = start_server(args.run, log)
    try:
        warm = list(range(10))
        client(port, body, content_type, warm, [], time.monotonic() + 120)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/model")
        model = json.loads(connection.getresponse().read())
        figures = load(port, process.pid, body, content_type, args.requests, args.clients, args.max_seconds)
    finally:
        process.terminate()
        process.wait(30)
    result = {
        "machine": machine(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "model": args.label or f"{model['model']} ({model['image_size']} px)",
        "image": f"{image.name} ({image.stat().st_size:,} bytes)",
        "limits": model["limits"],
        **figures,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def render(page: Path = PAGE) -> str:
    result = read_json(OUT, "python scripts/serve_load.py run RUN")  # missing: refused, nothing written
    cpu = result["machine"]
    rss = result["rss_mib"]
    table = "\n".join(
        [
            "| machine (load average before) | model | requests, clients | errors | p50 | p95 | requests/s "
            "| server RSS (MiB): warm, half, end |",
            "|---|---|---|---|---|---|---|---|",
            f"| {cpu['cpu']}, {cpu['cpus']} CPUs ({result['load_average_before'][0]:.1f}) | {result['model']} "
            f"| {result['requests']}, {result['clients']} "
            f"| {result['errors']} | {result['p50_ms']:.0f} ms | {result['p95_ms']:.0f} ms "
            f"| {result['requests_per_s']:.1f} | {rss[0]:.0f}, {rss[1]:.0f}, {rss[2]:.0f} |",
        ]
    )
    if not replace_between(page, "serve-load", table):
        raise SystemExit(f"{page}: no <!-- serve-load:start --> / <!-- serve-load:end --> markers")
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("run", help="run the load check")
    check.add_argument("run", type=Path, help="a trained run folder")
    check.add_argument("--requests", type=int, default=200)
    check.add_argument("--clients", type=int, default=8)
    check.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long")
    check.add_argument("--image", type=Path, help="the slice to send (default: the run's first image)")
    check.add_argument("--label", help="the model as the table names it")
    show = commands.add_parser("render", help="write the table into docs/cli.md")
    show.add_argument("--page", type=Path, default=PAGE, help="a page with the serve-load markers")
    args = parser.parse_args()
    if args.command == "run":
        run_check(args)
    else:
        render(args.page)


if __name__ == "__main__":
    main()
