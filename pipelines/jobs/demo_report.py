"""The demo's report as a person reads it: PNG plots of the codes and the alignment, and report.md."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def write_plots(version, metrics: dict, out: Path) -> dict:
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
        vals = [metrics.get(f"next_item_test_{name}", {}).get(key) or 0.0 for key in keys]
        ax.bar(np.arange(len(keys)) + k * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2, keys)
    ax.set_title("Next-item retrieval, test window: aligned vs unaligned encoder")
    ax.legend()
    files["next_item_recall"] = save(fig, "next_item_recall.png")
    return files


def markdown(summary: dict, ablation: dict | None, ablation_note: str, plots: dict) -> str:
    from pipelines.beam.job_report import format_summary

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
    lines += ["", "## Alignment on the protocol's test window (no behaviour-learned stage saw it)", "",
              "| encoder | evaluation | recall@10 | recall@50 | MRR | queries |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for key, label in (("next_item_test", "next item"), ("coconsumption_test", "co-consumption pairs")):
        for name in ("aligned", "unaligned"):
            r = m.get(f"{key}_{name}")
            if r:
                lines.append(f"| {name} | {label} | {fmt(r.get('recall@10'))} | {fmt(r.get('recall@50'))} | "
                             f"{fmt(r.get('mrr'))} | {r.get('n_queries')} |")
    lines += ["", "## Ranker ablation", ""]
    lines += [ablation["table"]] if ablation else [ablation_note]
    lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


def terminal_summary(result: dict) -> str:
    """The demo's last words on the terminal: the version, alignment on the test window, the ablation table as text,
    and where the report and the plots are. ``result``: what ``pipelines.jobs.demo.run`` returns."""
    from pipelines.jobs.ablation import ablation_text

    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"QARM demo done in {result['seconds']:.0f} s: version {result['version']} in {result['store']}", "",
             "Next-item retrieval on the test window   recall@10  recall@50  MRR"]
    for name in ("aligned", "unaligned"):
        r = result.get(f"next_item_test_{name}")
        if r:
            lines.append(f"  {name:<38} {fmt(r.get('recall@10')):<10} {fmt(r.get('recall@50')):<10} "
                         f"{fmt(r.get('mrr'))}")
    lines.append("")
    if result.get("ablation") and result.get("ablation_rows") is not None:
        lines.append(ablation_text({**result["ablation"], "rows": result["ablation_rows"]}))
    else:
        lines.append(f"Ranker ablation: {result.get('ablation_note') or 'not run'}")
    lines += ["", f"report: {result['report_md']} (JSON {result['report_json']})", "plots:"]
    lines += [f"  {name:<17} {path}" for name, path in (result.get("plots") or {}).items()]
    return "\n".join(lines)
