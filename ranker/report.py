"""The ablation report as a person reads it: a Markdown table and a PNG with the paired intervals.

Pure formatting over the summary rows of `ranker.stats.summarize_runs`; no training, no statistics, no I/O.
"""
from __future__ import annotations

import io

import numpy as np

from ranker.metrics import format_metric

ROW_LABELS = {
    "id": "(a) ids only",
    "frozen": "(b) + frozen aligned embedding",
    "frozen+sim": "(b') + frozen embedding + its target-history similarity (control of the cross feature)",
    "vq": "(c) + VQ code",
    "rq": "(d) + RQ code",
    "vq+rq": "(e) + VQ and RQ codes",
    "vq+rq-unaligned": "(f) + VQ and RQ codes, unaligned encoder",
    "vq+rq+cross": "(g) + VQ and RQ codes + RQ-prefix cross feature",
    "random": "(h) + random codes, vq+rq's table shapes (capacity control)",
    "vq+rq+frozen": "(i) + VQ and RQ codes + frozen embedding",
}
QARM_REFERENCE_PT = {"frozen": 0.02, "vq": 0.11, "rq": 0.10, "vq+rq": 0.18}


def _ci(row: dict, metric: str) -> str:
    """The paired difference with its interval; "n/a" where the metric is undefined, "—" where none was computed
    (the baseline row)."""
    key = f"{metric}_diff_ci95"
    ci = row.get(key)
    if ci is None:
        return "n/a" if key in row else "—"
    mark = " **↑**" if ci[0] > 0 else (" **↓**" if ci[1] < 0 else "")
    return f"{format_metric(row.get(f'{metric}_diff'), '+.4f')} [{ci[0]:+.4f}, {ci[1]:+.4f}]{mark}"


def _mean_std(row: dict, metric: str) -> str:
    """"mean ± std", or "n/a" for a metric the test events cannot define."""
    if row.get(f"{metric}_mean") is None:
        return "n/a"
    return f"{row[f'{metric}_mean']:.4f} ± {row[f'{metric}_std']:.4f}"


def undefined_notes(rows: dict) -> list:
    """One line per undefined metric (the reason is the same for every row: it depends on the events only)."""
    reasons = {}
    for r in rows.values():
        for metric, why in r.get("undefined", {}).items():
            reasons.setdefault(metric, why)
    return [f"n/a: {metric} is undefined here: {why}." for metric, why in reasons.items()]


def markdown_table(rows: dict, title: str = "", notes: tuple = ()) -> str:
    """The ablation as Markdown: AUC / GAUC mean ± std, and each row's paired difference to ids with its
    bootstrap 95% interval in AUC units (↑ / ↓ marks an interval that excludes zero).

    Args:
        rows: ranker.stats.summarize_runs output.
        title: heading.
        notes: lines printed under the heading (protocol, negatives, seeds).
    """
    lines = [f"### {title}", ""] if title else []
    notes = tuple(notes) + tuple(undefined_notes(rows))
    lines += [f"{n}" for n in notes] + ([""] if notes else [])
    lines += ["| row | features | AUC | GAUC | logloss | ΔAUC vs ids [95% CI] | ΔGAUC vs ids [95% CI] | QARM ΔAUC (pt) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ref = f"{QARM_REFERENCE_PT[name]:+.2f}" if name in QARM_REFERENCE_PT else "—"
        lines.append(f"| {name} | {ROW_LABELS.get(name, name)} | {_mean_std(r, 'auc')} | {_mean_std(r, 'gauc')} | "
                     f"{format_metric(r['logloss_mean'])} | {_ci(r, 'auc')} | {_ci(r, 'gauc')} | {ref} |")
    buckets = [b for b in ("<5", "5-19", ">=20") if any(b in r.get("auc_by_popularity", {}) for r in rows.values())]
    if buckets:
        lines += ["", "Test AUC by the target item's training positives (mean over runs; n = test rows):", "",
                  "| row | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
        for name, r in rows.items():
            cells = [format_metric(r["auc_by_popularity"][b]["auc_mean"]) if b in r.get("auc_by_popularity", {})
                     else "—" for b in buckets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        first = next(r for r in rows.values() if "auc_by_popularity" in r)
        lines.append("| n | " + " | ".join(str(first["auc_by_popularity"].get(b, {}).get("n", "—")) for b in buckets) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: dict) -> str:
    """The ablation for a terminal: one aligned line per row (AUC / GAUC mean ± std, paired ΔAUC / ΔGAUC vs ids with
    the 95% interval, ↑ / ↓ where it excludes zero), undefined metrics noted below. The Markdown has the rest."""
    header = ("row", "AUC", "GAUC", "ΔAUC vs ids [95% CI]", "ΔGAUC vs ids [95% CI]")
    body = [(name, _mean_std(r, "auc"), _mean_std(r, "gauc"), _ci(r, "auc").replace("**", ""),
             _ci(r, "gauc").replace("**", "")) for name, r in rows.items()]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + undefined_notes(rows)) + "\n"


def bar_chart_png(rows: dict, title: str, baseline: str = "id") -> bytes:
    """PNG bytes: per row, the paired AUC and GAUC difference to the baseline with its 95% interval (rows
    without an interval show mean ± std of the difference over runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if n != baseline]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2), sharey=True)
    for ax, metric in zip(axes, ("auc", "gauc")):
        for yi, name in zip(y, names):
            r = rows[name]
            if r.get(f"{metric}_diff_ci95") is not None:
                mean, (lo, hi) = r[f"{metric}_diff"], r[f"{metric}_diff_ci95"]
            elif r.get(f"delta_{metric}_pt_mean") is not None:
                mean = r[f"delta_{metric}_pt_mean"] / 100.0
                lo, hi = mean - r[f"delta_{metric}_pt_std"] / 100.0, mean + r[f"delta_{metric}_pt_std"] / 100.0
            else:
                continue
            color = "#2a9d4b" if lo > 0 else ("#c0392b" if hi < 0 else "#6a8caf")
            ax.errorbar(mean, yi, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=4)
            ax.text(hi, yi, f"  {mean:+.4f}", va="center", fontsize=8)
        ax.axvline(0.0, color="#555555", lw=1, ls="--")
        ax.set_yticks(y, names)
        ax.set_title(f"{metric.upper()} − {baseline} (95% paired bootstrap CI)")
        ax.set_xlabel("difference in AUC units")
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def cascade_table(cascade: dict) -> str:
    """Retrieval alone vs retrieval + each ranker row re-ranking its candidates (Recall@K / NDCG@K)."""
    k = cascade["k"]
    lines = [f"Cascade on the test window: retrieval's top candidates re-ranked by each row, Recall@{k} / NDCG@{k} "
             f"({cascade.get('users')} users, {cascade.get('candidates_per_user')} candidates each; candidate "
             f"recall {format_metric(cascade.get('candidate_recall'))}):", "",
             f"| pipeline | Recall@{k} | NDCG@{k} |", "|---|---|---|"]
    ret = cascade.get("retrieval", {})
    lines.append(f"| retrieval alone | {format_metric(ret.get(f'recall@{k}'))} | {format_metric(ret.get(f'ndcg@{k}'))} |")
    for row, r in cascade["rows"].items():
        lines.append(f"| retrieval + ranker ({row}) | {r[f'recall@{k}_mean']:.4f} ± {r[f'recall@{k}_std']:.4f} | "
                     f"{r[f'ndcg@{k}_mean']:.4f} ± {r[f'ndcg@{k}_std']:.4f} |")
    return "\n".join(lines) + "\n"
