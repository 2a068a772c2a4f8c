"""`qarm demo --out DIR`: the whole cascade on a dataset (synthetic by default), then the ranker ablation, then a
report: report.md, report.json and PNG plots (per-level codebook utilization, items-per-code histogram, held-out
pair recall aligned vs unaligned), all written atomically under DIR.

    qarm demo --out runs/demo                                   # synthetic, about 10 minutes on 2 cores
    qarm demo --out runs/demo-ml --dataset movielens --data ../shared/data/movielens --require-image
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from feature_store.config_tree import knob
from pipelines.config.cascade import CascadeConfig

log = logging.getLogger("pipelines.jobs.demo")

ACCEPTS_EXTRA_ARGS = True  # Beam flags pass through to the cascade


@dataclass(frozen=True)
class DemoSection:
    """What the demo adds after the cascade: a short ablation."""

    seeds: int = knob(1, "ranker seeds per ablation row")
    ranker_epochs: int = knob(2, "ranker epochs per ablation run")
    skip_ablation: bool = knob(False, "cascade and codebook report only")


@dataclass(frozen=True)
class DemoConfig(CascadeConfig):
    """Every `qarm pipeline` knob and the demo's own."""

    demo: DemoSection = field(default_factory=DemoSection)


CONFIG_TREE = DemoConfig  # the dispatcher generates the flags, --config and --print-config
# CPU-sized defaults: the real-weights encoder on small images, IISAN side-mode alignment (below a --config file)
CONFIG_DEFAULTS = {"encoder": "minilm-effnet", "encoder_image_size": 64, "align_mode": "side", "align_epochs": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Besides the config tree's flags: where the report goes."""
    parser.add_argument("--out", type=Path, required=True,
                        help="report folder (the store goes to OUT/store by default)")


def run(args: argparse.Namespace) -> dict:
    """Run the demo. Returns the report dict (also written as report.json)."""
    from feature_store import FeatureStore
    from feature_store.io import atomic_write_json, atomic_write_text
    from pipelines.beam.options import options_for
    from feature_store.config_tree import with_values
    from pipelines.jobs.cascade import run_job
    from pipelines.jobs.demo_report import markdown, write_plots

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = args.config_tree.cascade()
    if not config.runtime.store:
        config = with_values(config, {"store": str(out / "store")})
    summary = run_job(options_for(config, getattr(args, "extra_args", None) or ()), save_main_session=False)
    version = FeatureStore(summary["store"]).read(summary["version"])
    plots = write_plots(version, summary["metrics"], out)

    ablation, note = None, ""
    if args.skip_ablation:
        note = "Skipped (--skip-ablation)."
    else:
        from feature_store.split import split_from_args
        from pipelines.jobs.ablation import EvalPlan, run_eval
        from pipelines.data import load_dataset
        from ranker.config import RankerConfig

        dataset = load_dataset(config.data.spec())
        plan = EvalPlan(seeds=args.seeds, split=split_from_args(args))
        ablation = run_eval(dataset, plan, RankerConfig(epochs=args.ranker_epochs, seed=args.seed),
                            out / "ablation", [(None, Path(summary["store"]), summary["version"])])
        plots["ablation"] = ablation["files"]["png"]
    report = {"dataset": summary["dataset"], "store": summary["store"], "version": summary["version"],
              "job": summary, "ablation": {k: v for k, v in (ablation or {}).items() if k != "table"} or None,
              "ablation_note": note or None, "plots": plots, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "report.md", markdown(summary, ablation, note, plots))
    atomic_write_json(out / "report.json", report)
    return {"out": str(out), "report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
            "version": summary["version"], "store": summary["store"], "plots": plots,
            "next_item_test_aligned": summary["metrics"].get("next_item_test_aligned"),
            "next_item_test_unaligned": summary["metrics"].get("next_item_test_unaligned"),
            "ablation_rows": (ablation or {}).get("rows"),
            "ablation": {k: ablation[k] for k in ("dataset", "seeds", "cascade_seeds", "protocol_mismatch", "skipped",
                                                  "files")} if ablation else None,
            "ablation_note": note or None, "seconds": report["seconds"]}


def human_summary(result: dict) -> str:
    """What the terminal shows at the end without --json (pipelines.jobs.demo_report.terminal_summary)."""
    from pipelines.jobs.demo_report import terminal_summary

    return terminal_summary(result)
