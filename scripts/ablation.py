"""Ablation runs: train one model variant for a fixed number of steps and validate every epoch.

    python scripts/ablation.py DATA --tag NAME [--preset configs/shared.yaml] [--set KEY=VALUE ...]
                               [--lr 0.001] [--steps 960] [--seed 1] [--sched const|cosine]
                               [--out results/ablation]
    python scripts/ablation.py --render [--out results/ablation] [--page docs/results.md]

The same pieces as `train` (a preset with --set overrides, the data folder's splits, augmentation,
masked loss with train.task_weights, validation score), without its stopping rules and LR cuts, so that variants are
compared step for step. Each run writes OUT/<tag>.json (validation score after every 80 steps,
onset epoch = first score above 0.7, the command and the machine); --render prints the table of
docs/results.md from those files (and writes it between that page's ablation-table markers, --page);
an OUT without any <tag>.json is refused (exit 1) and the page is left as it was.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from results_page import RESULTS_PAGE, read_json, result_files, write_table  # scripts/results_page.py

ROOT = Path(__file__).resolve().parent.parent
EPOCH = 80  # steps between validations: the presets' steps_per_epoch


def train_variant(args: argparse.Namespace) -> dict:
    import torch

    from mtl_meniscus.config import load_config, parse_set_option
    from mtl_meniscus.data.load import prepare_data
    from mtl_meniscus.data.torch_dataset import EpochBatchSampler, SliceDataset, training_batches
    from mtl_meniscus.engine.inference import predict_probs
    from mtl_meniscus.engine.runtime import cpu_features, resolve_runtime
    from mtl_meniscus.evaluation.metrics import monitor_score, task_aucs
    from mtl_meniscus.networks.losses import FixedWeighting, task_losses
    from mtl_meniscus.networks.models import build_model

    config = load_config(args.preset, dict(parse_set_option(text) for text in args.set))
    data = prepare_data(args.data, config.data)
    runtime = resolve_runtime(args.precision)
    torch.manual_seed(args.seed)
    model = runtime.prepare_model(build_model(config.model))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    weighting = FixedWeighting(data.tasks.names, config.train.task_weights)  # train's `fixed` weighting
    schedule = None
    if args.sched == "cosine":  # 50 warm-up steps, then cosine decay to 0 at the last step
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
        )
    train, val = data.indices("train"), data.indices("val")
    dataset = SliceDataset(data.images, data.targets, config.preprocess.edge_filter, config.augment)
    sampler = EpochBatchSampler(train, EPOCH, config.train.batch_size, args.seed)
    scores, task_scores, start = [], [], time.perf_counter()
    for epoch in range(1, args.steps // EPOCH + 1):
        sampler.set_epoch(epoch)
        model.train()
        for (x,), y in training_batches(dataset, sampler, 0, runtime.channels_last, pin_memory=False):
            with runtime.autocast():
                outputs = model(runtime.prepare_input(x))
            loss = weighting(task_losses(outputs, y, {}, data.tasks, None, config.train.gated_loss_mean))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        images = [data.images[i] for i in val]
        probs = predict_probs(model, images, config.preprocess.edge_filter, runtime, 64)
        aucs = task_aucs(data.targets[val], probs, data.tasks)
        scores.append(round(float(monitor_score(aucs, data.tasks)), 3))
        task_scores.append({task: round(float(auc), 3) for task, auc in aucs.items()})
        print(
            f"{args.tag} step {epoch * EPOCH} val {scores[-1]:.3f} "
            + " ".join(f"{task} {auc:.3f}" for task, auc in aucs.items()),
            flush=True,
        )
    return {
        "tag": args.tag,
        "command": "python scripts/ablation.py " + shlex.join(sys.argv[1:]),
        "params": sum(p.numel() for p in model.parameters()),
        "gated_loss_mean": config.train.gated_loss_mean,
        "val_scores": scores,
        "val_task_aucs": task_scores,  # per epoch {task: AUC}: a task weighted 0 stays at chance
        "onset_epoch": next((k for k, s in enumerate(scores, 1) if s > 0.7), None),
        "final": scores[-1],
        "best": max(scores),
        "seconds": round(time.perf_counter() - start),
        "machine": f"{runtime.describe()}, ISA {torch.backends.cpu.get_cpu_capability()}, AMX {cpu_features()['amx']}",
        "order": time.time(),  # the table lists runs in the order they finished
    }


def render(out: Path, page: Path = RESULTS_PAGE) -> str:
    """The table from OUT's <tag>.json files (`page` is only named in a refusal: the caller writes it)."""
    made_by = "python scripts/ablation.py DATA --tag NAME"
    files = result_files(out, "*.json", "a <tag>.json per ablation run", made_by, str(page))
    # gated_loss_mean is optional: runs from before it existed have none
    keys = ("tag", "command", "val_scores", "onset_epoch", "final", "order")
    rows = sorted((read_json(p, made_by, keys) for p in files), key=lambda r: r["order"])
    lines = [
        "| variant | command | gated loss mean | validation score every 80 steps | onset epoch (> 0.7) "
        "| at the last step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        # runs from before train.gated_loss_mean existed used what is now "per-gated-row"
        gated = r.get("gated_loss_mean", "per-gated-row")
        lines.append(
            f"| {r['tag']} | `{r['command']}` | {gated} | {' '.join(f'{s:.2f}' for s in r['val_scores'])} | "
            f"{r['onset_epoch'] or 'never'} | {r['final']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?")
    parser.add_argument("--tag")
    parser.add_argument("--preset", default=str(ROOT / "configs" / "shared.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=960)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sched", choices=["const", "cosine"], default="const")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ablation")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE)
    args = parser.parse_args()
    if not args.render:
        if not args.data or not args.tag:
            parser.error("DATA and --tag are needed to train a variant")
        result = train_variant(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=2))
    table = render(args.out, args.page)
    write_table(args.page, "ablation-table", table)
    print(table)


if __name__ == "__main__":
    main()
