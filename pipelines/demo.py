"""`qarm demo --out DIR`: the whole cascade on a dataset (synthetic by default), then the ranker ablation, then a
report: report.md, report.json and PNG plots (per-level codebook utilization, items-per-code histogram, held-out
pair recall aligned vs unaligned), all written atomically under DIR.

    qarm demo --out runs/demo                                   # synthetic, about 10 minutes on 2 cores
    qarm demo --out runs/demo-ml --dataset movielens --data ../shared/data/movielens --require-image
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("pipelines.demo")

ACCEPTS_EXTRA_ARGS = True  # Beam flags pass through to the cascade


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Demo flags: every `qarm pipeline` flag (with demo-sized defaults) plus --out, --seeds, --ranker_epochs."""
    from pipelines.transforms.options import cli_parser_flags

    cli_parser_flags(parser)
    g = parser.add_argument_group("demo")
    g.add_argument("--out", type=Path, required=True, help="report folder (the store goes to OUT/store by default)")
    g.add_argument("--seeds", type=int, default=1, help="ranker seeds per ablation row")
    g.add_argument("--ranker_epochs", type=int, default=2, help="ranker epochs per ablation run")
    g.add_argument("--skip_ablation", action="store_true", help="cascade and codebook report only")
    # CPU-sized defaults: the real-weights encoder on small images, IISAN side-mode alignment
    parser.set_defaults(encoder="minilm-effnet", encoder_image_size=64, align_mode="side", align_epochs=2)


def _plots(version, metrics: dict, out: Path) -> dict:
    """Write the three PNGs; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from feature_store.io import atomic_write_bytes

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return str(atomic_write_bytes(out / name, buf.getvalue()))

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    names = [n for n in ("aligned", "unaligned") if metrics.get(f"codes_{n}")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        util = metrics[f"codes_{name}"]["utilization"]
        ax.bar(np.arange(len(util)) + k * width, util, width, label=name)
    ax.set_xlabel("RQ level")
    ax.set_ylabel("share of centroids used")
    ax.set_ylim(0, 1.05)
    ax.set_title("Codebook utilization per level")
    ax.legend()
    files["utilization"] = save(fig, "utilization.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, table in (("aligned", "item_codes"), ("unaligned", "item_codes_unaligned")):
        if not version.has(f"{table}.parquet"):
            continue
        rq = version.codes(table).rq
        _, sizes = np.unique(rq, axis=0, return_counts=True)
        ax.hist(sizes, bins=np.arange(1, sizes.max() + 2) - 0.5, alpha=0.6, label=name)
    ax.set_xlabel("items sharing one full RQ code")
    ax.set_ylabel("codes")
    ax.set_yscale("log")
    ax.set_title("Items per code")
    ax.legend()
    files["items_per_code"] = save(fig, "items_per_code.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = ["recall@10", "recall@50", "mrr"]
    for k, name in enumerate(names):
        vals = [metrics.get(f"heldout_{name}", {}).get(key) or 0.0 for key in keys]
        ax.bar(np.arange(len(keys)) + k * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2, keys)
    ax.set_title("Held-out pair retrieval: aligned vs unaligned encoder")
    ax.legend()
    files["heldout_recall"] = save(fig, "heldout_recall.png")
    return files


def _markdown(summary: dict, ablation: dict | None, ablation_note: str, plots: dict) -> str:
    from pipelines.transforms.report import format_summary

    m = summary["metrics"]
    lines = [f"# QARM demo — {summary['dataset']}", "",
             f"Store `{summary['store']}`, version `{summary['version']}` (config sha256 "
             f"`{summary['config_sha256'][:12]}`), runner {summary['runner']}, job {summary['seconds']:.0f} s.", "",
             "## Job summary", "", "```", format_summary(summary), "```", "", "## Codes", "",
             "| encoder | items | unique codes | collision rate | items/code | max items/code | utilization |",
             "|---|---|---|---|---|---|---|"]
    for name in ("aligned", "unaligned"):
        c = m.get(f"codes_{name}")
        if c:
            lines.append(f"| {name} | {c['items']} | {c['unique_codes']} | {c['collision_rate']:.3f} | "
                         f"{c['items_per_code']:.3f} | {c['max_items_per_code']} | "
                         f"{', '.join(f'{u:.2f}' for u in c['utilization'])} |")
    lines += ["", "## Held-out pair retrieval (pairs later in time than training)", "",
              "| encoder | recall@10 | recall@50 | MRR | queries |", "|---|---|---|---|---|"]
    for name in ("aligned", "unaligned"):
        r = m.get(f"heldout_{name}")
        if r:
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {name} | {fmt(r.get('recall@10'))} | {fmt(r.get('recall@50'))} | {fmt(r.get('mrr'))} "
                         f"| {r.get('n_queries')} |")
    lines += ["", "## Ranker ablation", ""]
    lines += [ablation["table"]] if ablation else [ablation_note]
    lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Run the demo. Returns the report dict (also written as report.json)."""
    from feature_store import FeatureStore
    from feature_store.io import atomic_write_json, atomic_write_text
    from pipelines.cascade import _options_from_namespace, run_job

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.store:
        args.store = str(out / "store")
    demo_keys = ("out", "seeds", "ranker_epochs", "skip_ablation")
    job_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in demo_keys})
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    summary = run_job(_options_from_namespace(job_args), save_main_session=False)
    version = FeatureStore(summary["store"]).read(summary["version"])
    plots = _plots(version, summary["metrics"], out)

    ablation, note = None, ""
    if args.skip_ablation:
        note = "Skipped (--skip_ablation)."
    else:
        try:
            from ranker.ablation import run_ablation
            from ranker.config import RankerConfig
        except ModuleNotFoundError as exc:
            note = f"The ranker ablation is not built yet ({exc.name} missing); codes and metrics above are real."
        else:
            from pipelines.transforms.options import data_spec

            spec = data_spec(_options_from_namespace(job_args))
            ablation = run_ablation(Path(summary["store"]), spec, args.seeds, out / "ablation",
                                    version=summary["version"],
                                    base_cfg=RankerConfig(epochs=args.ranker_epochs, seed=args.seed))
            plots["ablation"] = ablation["files"]["png"]
    report = {"dataset": summary["dataset"], "store": summary["store"], "version": summary["version"],
              "job": summary, "ablation": {k: v for k, v in (ablation or {}).items() if k != "table"} or None,
              "ablation_note": note or None, "plots": plots, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "report.md", _markdown(summary, ablation, note, plots))
    atomic_write_json(out / "report.json", json.loads(json.dumps(report, default=str)))
    return {"out": str(out), "report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
            "version": summary["version"], "store": summary["store"], "plots": plots,
            "heldout_aligned": summary["metrics"].get("heldout_aligned"),
            "heldout_unaligned": summary["metrics"].get("heldout_unaligned"),
            "ablation_rows": (ablation or {}).get("rows"), "seconds": report["seconds"]}
