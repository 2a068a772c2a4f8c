"""`qarm eval`: QARM Table 1 on public data — one ranker, one dataset, six feature sets, several seeds.

Rows: id | frozen (cascade baseline: frozen aligned embedding) | vq | rq | vq+rq | vq+rq-unaligned
(codes from the unaligned encoder: isolates the effect of alignment). Every row sees the same examples
(same split, same sampled negatives) and differs only in its features and the model seed.

    qarm eval --store DIR --dataset movielens --data ../shared/data/movielens --require-image --seeds 3 \
        --out runs/ablation --json

Writes ablation.json, ablation.md and ablation.png into --out, atomically.

Example:
    >>> report = run_ablation(store_root, dataset, seeds=3, out_dir=Path("runs/ablation"))
    >>> report["rows"]["vq+rq"]["auc_mean"] - report["rows"]["id"]["auc_mean"]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import time
from pathlib import Path

import numpy as np

from ranker.config import ABLATION_ROWS, FEATURE_SETS, RankerConfig
from ranker.data import PreparedData, SplitConfig, items_for, load_store_items, prepare_examples

log = logging.getLogger(__name__)

ROW_LABELS = {
    "id": "(a) ids only",
    "frozen": "(b) + frozen aligned embedding",
    "vq": "(c) + VQ code",
    "rq": "(d) + RQ code",
    "vq+rq": "(e) + VQ and RQ codes",
    "vq+rq-unaligned": "(f) + VQ and RQ codes, unaligned encoder",
}
QARM_REFERENCE_PT = {"frozen": 0.02, "vq": 0.11, "rq": 0.10, "vq+rq": 0.18}


def summarize_runs(runs: dict, baseline: str = "id") -> dict:
    """Mean / std over seeds per row, plus the paired AUC gain over the baseline row (same seed).

    Args:
        runs: {row: [fit result, ... one per seed]}.
    Returns:
        {row: {auc_mean, auc_std, gauc_mean, gauc_std, logloss_mean, logloss_std, auc_per_seed,
               gauc_per_seed, delta_auc_pt_mean, delta_auc_pt_std, seeds}}
    """
    rows = {}
    base = [r["test"]["auc"] for r in runs.get(baseline, [])]
    for name, results in runs.items():
        aucs = np.array([r["test"]["auc"] for r in results])
        gaucs = np.array([r["test"]["gauc"] for r in results])
        losses = np.array([r["test"]["logloss"] for r in results])
        row = {"auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
               "gauc_mean": float(gaucs.mean()), "gauc_std": float(gaucs.std(ddof=1)) if len(gaucs) > 1 else 0.0,
               "logloss_mean": float(losses.mean()),
               "logloss_std": float(losses.std(ddof=1)) if len(losses) > 1 else 0.0,
               "auc_per_seed": aucs.tolist(), "gauc_per_seed": gaucs.tolist(), "seeds": len(results),
               "best_epochs": [r["best_epoch"] for r in results]}
        buckets = {}
        for r in results:
            for bucket, m in r.get("test_by_popularity", {}).items():
                buckets.setdefault(bucket, {"auc": [], "n": m["n"]})["auc"].append(m["auc"])
        if buckets:
            row["auc_by_popularity"] = {b: {"auc_mean": float(np.nanmean(v["auc"])), "n": v["n"]}
                                        for b, v in buckets.items()}
        if len(base) == len(aucs) and base:
            delta = (aucs - np.array(base)) * 100.0  # AUC points, paired by seed
            row["delta_auc_pt_mean"] = float(delta.mean())
            row["delta_auc_pt_std"] = float(delta.std(ddof=1)) if len(delta) > 1 else 0.0
        rows[name] = row
    return rows


def markdown_table(rows: dict, title: str = "") -> str:
    """The ablation as a Markdown table (AUC / GAUC mean ± std, paired gain over ids in points)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| row | features | AUC | GAUC | logloss | ΔAUC vs ids (pt) | QARM ΔAUC (pt) |",
              "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        delta = (f"{r['delta_auc_pt_mean']:+.2f} ± {r['delta_auc_pt_std']:.2f}"
                 if "delta_auc_pt_mean" in r and name != "id" else "—")
        ref = f"{QARM_REFERENCE_PT[name]:+.2f}" if name in QARM_REFERENCE_PT else "—"
        lines.append(f"| {name} | {ROW_LABELS.get(name, name)} | {r['auc_mean']:.4f} ± {r['auc_std']:.4f} | "
                     f"{r['gauc_mean']:.4f} ± {r['gauc_std']:.4f} | {r['logloss_mean']:.4f} | {delta} | {ref} |")
    buckets = [b for b in ("<5", "5-19", ">=20") if any(b in r.get("auc_by_popularity", {}) for r in rows.values())]
    if buckets:
        lines += ["", "Test AUC by the target item's training positives (mean over seeds; n = test rows):", "",
                  "| row | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
        for name, r in rows.items():
            cells = [f"{r['auc_by_popularity'][b]['auc_mean']:.4f}" if b in r.get("auc_by_popularity", {}) else "—"
                     for b in buckets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        first = next(r for r in rows.values() if "auc_by_popularity" in r)
        lines.append("| n | " + " | ".join(str(first["auc_by_popularity"].get(b, {}).get("n", "—")) for b in buckets) + " |")
    return "\n".join(lines) + "\n"


def bar_chart_png(rows: dict, title: str) -> bytes:
    """PNG bytes: AUC and GAUC per row, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("auc", "gauc")):
        means = np.array([rows[n][f"{metric}_mean"] for n in names])
        stds = np.array([rows[n][f"{metric}_std"] for n in names])
        ax.bar(x, means, yerr=stds, capsize=4, color=["#999999", "#6a8caf"] + ["#d9822b"] * (len(names) - 2))
        lo = float(np.nanmin(means - stds))
        hi = float(np.nanmax(means + stds))
        pad = max(hi - lo, 0.005)
        ax.set_ylim(lo - 0.6 * pad, hi + 0.4 * pad)
        ax.set_xticks(x, names, rotation=25, ha="right")
        ax.set_title(metric.upper())
        for xi, m in zip(x, means):
            ax.text(xi, m, f"{m:.4f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_rows(data: PreparedData, items_by_table: dict, base_cfg: RankerConfig, seeds: int,
             rows: tuple = ABLATION_ROWS, progress: bool = True) -> tuple[dict, dict]:
    """Train every (row, seed). Returns ({row: [results]}, {row: reason} for rows skipped)."""
    from ranker.train import fit

    runs, skipped = {}, {}
    for name in rows:
        try:
            items = items_for(items_by_table, name)
        except FileNotFoundError as exc:
            skipped[name] = str(exc)
            log.warning("ablation row %s skipped: %s", name, exc)
            continue
        runs[name] = []
        for seed in range(seeds):
            cfg = RankerConfig.from_dict({**base_cfg.to_dict(), "features": name, "seed": base_cfg.seed + seed})
            t0 = time.perf_counter()
            result = fit(data, items, cfg, progress=progress)
            result["seconds"] = time.perf_counter() - t0
            log.info("ablation %-16s seed %d: test auc %.4f gauc %.4f (%d epochs, %.0fs)", name, cfg.seed,
                     result["test"]["auc"], result["test"]["gauc"], len(result["history"]), result["seconds"])
            runs[name].append(result)
    return runs, skipped


def run_ablation(store_root: Path, dataset, seeds: int, out_dir: Path, version: str | None = None,
                 base_cfg: RankerConfig | None = None, split: SplitConfig = SplitConfig(),
                 rows: tuple = ABLATION_ROWS, progress: bool = True) -> dict:
    """The whole ablation: examples once, every row × seed, report files.

    Args:
        store_root: feature-store root; `version` (default CURRENT) supplies codes / embeddings.
        dataset: a loaded pipelines.data.Dataset, or a DataSpec to load.
        seeds: model seeds per row (base_cfg.seed, +1, ...).
        out_dir: ablation.json / .md / .png go here.
        base_cfg: shared settings (features is overridden per row).
        split: time split.
        rows: subset of ABLATION_ROWS.
    Returns:
        {"rows": {row: {auc_mean, auc_std, gauc_mean, gauc_std, logloss_mean, ...}}, "skipped", "files", ...}
    """
    from feature_store.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    unknown = [r for r in rows if r not in FEATURE_SETS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; choose from {list(FEATURE_SETS)}")
    base_cfg = base_cfg or RankerConfig()
    from pipelines.data import DataSpec, load_dataset

    if isinstance(dataset, DataSpec):  # (a DataSpec also has `items` / `interactions` fields: paths)
        dataset = load_dataset(dataset)
    catalog = dataset.items["item_id"].to_numpy()
    data = prepare_examples(dataset.interactions, catalog, base_cfg.history_len, split, base_cfg.negatives)
    items_by_table, version_id = load_store_items(Path(store_root), version, catalog)
    t0 = time.perf_counter()
    runs, skipped = run_rows(data, items_by_table, base_cfg, seeds, rows, progress)
    summary = summarize_runs(runs)
    name = getattr(dataset, "name", "") or "dataset"
    title = f"QARM ablation — {name}, store version {version_id}, {seeds} seed(s), test split ({split.method})"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    coverage = {row: results[0]["coverage"] for row, results in runs.items() if results}
    report = {
        "store": str(store_root), "store_version": version_id, "dataset": name, "seeds": seeds,
        "rows": summary, "skipped": skipped, "data": data.info, "coverage": coverage,
        "config": base_cfg.to_dict(), "split": dataclasses.asdict(split), "seconds": time.perf_counter() - t0,
        "runs": {row: [{k: r.get(k) for k in ("test", "valid", "test_by_popularity", "best_epoch", "history", "seconds")}
                       for r in results]
                 for row, results in runs.items()},
        "files": {k: str(out_dir / f"ablation.{k}") for k in ("json", "md", "png")},
    }
    md = markdown_table(summary, title)
    if skipped:
        md += "\nSkipped rows: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "\n"
    atomic_write_text(out_dir / "ablation.md", md)
    atomic_write_bytes(out_dir / "ablation.png", bar_chart_png(summary, title))
    atomic_write_json(out_dir / "ablation.json", report)
    report["table"] = md
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.data import add_data_arguments
    from ranker.cli import add_ranker_arguments

    add_data_arguments(parser)
    add_ranker_arguments(parser, with_features=False)
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per row")
    parser.add_argument("--rows", default=",".join(ABLATION_ROWS), help="comma-separated subset of rows")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="report folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def run(args: argparse.Namespace) -> dict:
    from pipelines.data import data_spec_from_args
    from ranker.cli import config_from_args, split_from_args

    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    report = run_ablation(args.store, data_spec_from_args(args), args.seeds, args.out, version=args.version,
                          base_cfg=config_from_args(args, features="id"), split=split_from_args(args), rows=rows)
    print(report["table"])
    return {k: report[k] for k in ("store_version", "dataset", "seeds", "rows", "skipped", "coverage", "files")}
