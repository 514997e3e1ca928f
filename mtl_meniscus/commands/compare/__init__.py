"""The `compare` command: does one shared representation beat three separate networks?

Every variant (mode x trunk x seed, and the other axes asked for: training share, ROI crops,
segmentation) trains on the same data and splits with the same seeds, then
is scored on the same test split with the same test-time augmentation (same copies of the same
images). The table gives per-task AUC and challenge score as mean +- sd over seeds, a stratified
bootstrap CI of the seed-mean score, and the paired difference against the baseline (the
`separate` cascade, reference trunk when present) with its bootstrap CI.

Output folder:
    compare.yaml                          the comparison's settings
    variants/<mode>-<trunk>-seed<k>/      a normal run folder (`train --resume` works on it), plus
        test_predictions.csv, result.json   written when the variant is scored
    results.csv, results_per_seed.csv, results.md, results.json, score_bars.png, roc_overlay.png
    wandb/                                the summary run (each variant's run is in its own folder)

A variant with result.json is done and is not retrained when compare is rerun on the folder; a
variant that was interrupted resumes from its last finished epoch."""

# The parts, in the order a comparison uses them: plan -> run (train and score) -> statistics -> report.
from mtl_meniscus.commands.compare.plan import (
    Variant,
    baseline_group,
    parse_list,
    parse_on_off,
    parse_pretrained,
    plan_variants,
    steps_per_network,
    variant_config,
)
from mtl_meniscus.commands.compare.report import display_cells
from mtl_meniscus.commands.compare.run import run_compare
from mtl_meniscus.commands.compare.statistics import ScoredVariant, floor_findings, summarize

__all__ = [
    "ScoredVariant",
    "Variant",
    "baseline_group",
    "display_cells",
    "floor_findings",
    "parse_list",
    "parse_on_off",
    "parse_pretrained",
    "plan_variants",
    "run_compare",
    "steps_per_network",
    "summarize",
    "variant_config",
]
