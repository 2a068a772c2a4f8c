"""The distillation study behind `qarm distill`: every row × seed on one split, summaries, paired intervals,
and the JSON / Markdown / PNG report.

Rows (ranker.retrieval.config.ROWS): student (ids only), student+codes (ids + RQ code tables), student+listwise,
student+modality, student+prompt (list-wise KD from a prompt-tuned teacher), student+all, teacher. For each seed
one teacher is trained and every KD row of that seed distils from it; all rows see the same data and split.
Reported on the test window; epochs are chosen on the validation window.

    report = run_distill(data, feats, seeds=3, out_dir=Path("runs/distill"))
    report["rows"]["student+all"]["recall@20_diff_ci95"]     # [lo, hi] vs student, paired by user and seed
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ranker.retrieval.config import DEFAULT_ROWS, ROWS, DistillConfig, RetrievalConfig
from ranker.retrieval.data import ItemFeatures, RetrievalData
from ranker.retrieval.fit import evaluate, fit_student, fit_teacher
from ranker.retrieval.index import serving_ms_per_1k
from ranker.retrieval.metrics import paired_bootstrap_ci

log = logging.getLogger(__name__)

ROW_LABELS = {
    "student": "ids only (light student)",
    "student+codes": "ids + RQ code tables",
    "student+listwise": "+ list-wise KD",
    "student+modality": "+ per-modality KD (reliability-weighted)",
    "student+prompt": "+ list-wise KD from a prompt-tuned teacher",
    "student+all": "+ list-wise + modality KD + prompts",
    "teacher": "multimodal teacher",
}


def _serving(model, data: RetrievalData, users: np.ndarray, k: int) -> dict:
    """Params, table bytes and measured top-k serving time of one model on the given users."""
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        uv, iv = model.serving_vectors(torch.as_tensor(users))
    vec_ms = (time.perf_counter() - t0) * 1000.0
    train = data.positives("train")
    timing = serving_ms_per_1k(uv.numpy(), iv.numpy(), k, exclude=[train[u] for u in users])
    inputs = sum(int(b.numel()) * b.element_size() for n, b in model.named_buffers() if n.startswith("x_"))
    return {"params": int(sum(p.numel() for p in model.parameters())),
            "serve_ms_per_1k_users": timing["serve_ms_per_1k_users"],
            "search_ms_per_1k_users": timing["search_ms_per_1k_users"],
            "index_build_ms": timing["index_build_ms"], "vectors_ms": vec_ms, "serve_dim": timing["dim"],
            "serve_table_bytes": int((data.n_users + data.n_items) * timing["dim"] * 4),
            "multimodal_input_bytes": int(inputs)}


def run_rows(data: RetrievalData, feats: ItemFeatures, seeds: int = 3, rows=DEFAULT_ROWS,
             cfg: RetrievalConfig = RetrievalConfig(), distill: DistillConfig = DistillConfig(), k: int = 20,
             progress: bool = False) -> tuple[dict, dict]:
    """Train every (row, seed). Returns ({row: [run record per seed]}, {row: reason skipped})."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown distill rows {unknown}; choose from {list(ROWS)}")
    runs, skipped = {r: [] for r in rows}, {}
    if "student+codes" in rows and feats.codes is None:
        skipped["student+codes"] = "the store version has no item_codes table"
        runs.pop("student+codes")
    need_teacher = any(r == "teacher" or ROWS[r][1] for r in runs)
    for s in range(seeds):
        scfg = cfg.replace(seed=cfg.seed + s)
        teacher = fit_teacher(data, feats, scfg, progress=progress) if need_teacher else None
        for row in runs:
            t0 = time.perf_counter()
            if row == "teacher":
                res = teacher
            else:
                overrides, parts = ROWS[row]
                d = distill.replace(**{"listwise": False, "modality": False, "prompt": False, **parts})
                res = fit_student(data, scfg.replace(**overrides), d, teacher=teacher if d.any else None, feats=feats,
                                  progress=progress)
            test = evaluate(res.model, data, "test", k)
            rec = {"seed": scfg.seed, "test": test, "valid": res.valid, "best_epoch": res.best_epoch,
                   "epochs_run": len(res.history), "train_seconds": res.seconds,
                   "seconds": time.perf_counter() - t0 if row != "teacher" else res.seconds,
                   **_serving(res.model, data, test["users"], k)}
            log.info("distill %-17s seed %d: test recall@%d %.4f ndcg@%d %.4f (valid recall %.4f, best epoch %d, %.0fs)",
                     row, scfg.seed, k, test[f"recall@{k}"] or 0, k, test[f"ndcg@{k}"] or 0,
                     res.valid.get(f"recall@{cfg.eval_k}") or 0, res.best_epoch, rec["seconds"])
            runs[row].append(rec)
    return runs, skipped


def summarize(runs: dict, k: int = 20, baseline: str = "student", n_boot: int = 2000) -> dict:
    """Mean ± std over seeds and the paired bootstrap interval of the difference vs `baseline` per row."""
    out = {}
    base = runs.get(baseline)
    for row, recs in runs.items():
        r = {}
        for metric, per_user in ((f"recall@{k}", "per_user_recall"), (f"ndcg@{k}", "per_user_ndcg")):
            vals = np.array([x["test"][metric] for x in recs], dtype=np.float64)
            r[f"{metric}_mean"] = float(vals.mean())
            r[f"{metric}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            r[f"{metric}_per_seed"] = vals.tolist()
            if base is not None and row != baseline and len(base) == len(recs):
                diff = np.stack([a["test"][per_user] - b["test"][per_user] for a, b in zip(recs, base)])  # (S, U)
                r[f"{metric}_diff_mean"] = float(np.nanmean(diff))
                r[f"{metric}_diff_ci95"] = paired_bootstrap_ci(diff, n_boot=n_boot)
            else:
                r[f"{metric}_diff_mean"] = 0.0 if row == baseline else None
                r[f"{metric}_diff_ci95"] = [0.0, 0.0] if row == baseline else [None, None]
            r[f"valid_{metric}_mean"] = float(np.mean([x["valid"].get(metric) or 0.0 for x in recs]))
        for key in ("params", "serve_table_bytes", "multimodal_input_bytes", "serve_dim"):
            r[key] = int(recs[0][key])
        for key in ("serve_ms_per_1k_users", "search_ms_per_1k_users", "index_build_ms", "vectors_ms",
                    "train_seconds"):
            r[key] = float(np.mean([x[key] for x in recs]))
        r["best_epochs"] = [x["best_epoch"] for x in recs]
        r["seeds"] = len(recs)
        r["test_users"] = int(recs[0]["test"]["n_users"])
        out[row] = r
    if "teacher" in out and baseline in out:
        gap = out["teacher"][f"recall@{k}_mean"] - out[baseline][f"recall@{k}_mean"]
        for row, r in out.items():
            r[f"recall@{k}_gap_closed"] = (float((r[f"recall@{k}_mean"] - out[baseline][f"recall@{k}_mean"]) / gap)
                                           if gap > 0 else None)
    return out


def markdown_table(rows: dict, k: int = 20, title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += [f"| row | model | Recall@{k} | NDCG@{k} | ΔRecall vs student [95% CI] | ΔNDCG vs student [95% CI] | "
              f"gap closed | params | serve ms / 1k users (faiss only) |", "|---|---|---|---|---|---|---|---|---|"]

    def ci(r, m):
        lo, hi = r[f"{m}_diff_ci95"]
        d = r[f"{m}_diff_mean"]
        return "—" if lo is None or d is None else f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    for name, r in rows.items():
        gap = r.get(f"recall@{k}_gap_closed")
        lines.append(f"| {name} | {ROW_LABELS.get(name, name)} | {r[f'recall@{k}_mean']:.4f} ± {r[f'recall@{k}_std']:.4f} | "
                     f"{r[f'ndcg@{k}_mean']:.4f} ± {r[f'ndcg@{k}_std']:.4f} | "
                     f"{ci(r, f'recall@{k}') if name != 'student' else '—'} | {ci(r, f'ndcg@{k}') if name != 'student' else '—'} | "
                     f"{'—' if gap is None or name in ('student', 'teacher') else f'{gap:.0%}'} | {r['params']:,} | "
                     f"{r['serve_ms_per_1k_users']:.1f} ({r['search_ms_per_1k_users']:.1f}) |")
    return "\n".join(lines) + "\n"


def bar_chart_png(rows: dict, k: int, title: str) -> bytes:
    """PNG bytes: Recall@k and NDCG@k per row, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = np.arange(len(names))
    colours = ["#999999" if n.startswith("student") and n in ("student", "student+codes") else
               "#6a8caf" if n == "teacher" else "#d9822b" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric in zip(axes, (f"recall@{k}", f"ndcg@{k}")):
        means = np.array([rows[n][f"{metric}_mean"] for n in names])
        stds = np.array([rows[n][f"{metric}_std"] for n in names])
        ax.bar(x, means, yerr=stds, capsize=4, color=colours)
        ax.set_xticks(x, names, rotation=25, ha="right")
        ax.set_title(metric.replace("@", "@").upper() + " (test, full ranking)")
        for xi, m in zip(x, means):
            ax.text(xi, m, f"{m:.4f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_distill(data: RetrievalData, feats: ItemFeatures, seeds: int = 3, out_dir: Path | None = None,
                rows=DEFAULT_ROWS, cfg: RetrievalConfig = RetrievalConfig(),
                distill: DistillConfig = DistillConfig(), k: int = 20, title: str = "", n_boot: int = 2000,
                progress: bool = False, extra: dict | None = None) -> dict:
    """The whole study. Returns the report dict; with out_dir writes distill.json / .md / .png atomically.

    Returns:
        {"rows": {row: {recall@k_mean, recall@k_std, ndcg@k_mean, ndcg@k_std, params, serve_ms_per_1k_users,
                        recall@k_diff_ci95, ndcg@k_diff_ci95, ...}}, "skipped", "table", "files", "config", ...}
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    t0 = time.perf_counter()
    runs, skipped = run_rows(data, feats, seeds, rows, cfg, distill, k, progress)
    summary = summarize(runs, k, n_boot=n_boot)
    title = title or f"PromptMM-style distillation, store version {feats.version_id}, {seeds} seed(s), test window"
    report = {"store_version": feats.version_id, "seeds": seeds, "k": k, "rows": summary, "skipped": skipped,
              "data": data.info, "modalities": {m: int(x.shape[1]) for m, x in feats.modalities.items()},
              "modality_coverage": feats.coverage(), "config": cfg.to_dict(), "distill": distill.to_dict(),
              "seconds": time.perf_counter() - t0, **(extra or {}),
              "runs": {row: [{key: v for key, v in rec.items() if key != "test"}
                             | {"test": {m: rec["test"][m] for m in (f"recall@{k}", f"ndcg@{k}", "n_users")}}
                             for rec in recs] for row, recs in runs.items()}}
    md = markdown_table(summary, k, title)
    if skipped:
        md += "\nSkipped rows: " + "; ".join(f"{r}: {why}" for r, why in skipped.items()) + "\n"
    report["table"] = md
    if out_dir is not None:
        from feature_store.io import atomic_write_bytes, atomic_write_json, atomic_write_text

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report["files"] = {x: str(out_dir / f"distill.{x}") for x in ("json", "md", "png")}
        atomic_write_text(out_dir / "distill.md", md)
        atomic_write_bytes(out_dir / "distill.png", bar_chart_png(summary, k, title))
        atomic_write_json(out_dir / "distill.json", report)
    return report
