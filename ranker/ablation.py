"""QARM Table 1 on one set of examples: every (row, model seed) trained on exactly the same train / valid / test
events, differing only in the row's features.

Rows (ranker.config.FEATURE_SETS): id | frozen | vq | rq | vq+rq | vq+rq+cross | vq+rq+frozen | random |
vq+rq-unaligned. The variance over the upstream stages (pair mining, alignment, quantization) comes from running
this once per cascade seed on that seed's store version and pooling the runs (`pipelines.jobs.ablation`); the
statistics are in ranker.stats, the Markdown / PNG in ranker.report.

Example:
    >>> runs, skipped = run_rows(data, store_items(version, catalog), RankerConfig(), seeds=3)
    >>> [r["test"]["gauc"] for r in runs["vq+rq"]]
"""
from __future__ import annotations

import logging
import time

from feature_store.progress import Progress
from ranker.config import ABLATION_ROWS, FEATURE_SETS, RankerConfig
from ranker.data import PreparedData, items_for
from ranker.metrics import format_metric

log = logging.getLogger(__name__)


def check_rows(rows: tuple) -> tuple:
    unknown = [r for r in rows if r not in FEATURE_SETS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; choose from {list(FEATURE_SETS)}")
    return tuple(rows)


def run_rows(data: PreparedData, items_by_table: dict, base_cfg: RankerConfig, seeds: int,
             rows: tuple = ABLATION_ROWS, progress: bool = True, tag: str = "",
             score_examples=None) -> tuple[dict, dict]:
    """Train every (row, seed) and keep each run's test scores for the paired intervals.

    Args:
        data: examples shared by every row.
        items_by_table: ranker.data.store_items output for one store version.
        base_cfg: shared settings (features and seed are set per run: seed = base_cfg.seed + s).
        seeds: model seeds per row.
        rows: subset of ABLATION_ROWS.
        tag: prefix of the progress log lines (e.g. the cascade seed).
        score_examples: Examples every run also scores (retrieved candidates to re-rank): "extra_scores".
    Returns:
        ({row: [fit result with "test_scores", ...]}, {row: reason} for rows the version cannot serve)
    """
    from ranker.train import fit

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    runs, skipped = {}, {}
    rows = check_rows(rows)
    # one progress line per finished run at least every 30 s (each fit reports its own steps in between)
    bar = Progress(f"ablation {tag}rows", len(rows) * seeds, unit="run", bar=None if progress else False,
                   logger=log, final_line=False)
    for name in rows:
        try:
            items = items_for(items_by_table, name)
        except FileNotFoundError as exc:
            skipped[name] = str(exc)
            log.warning("ablation row %s skipped: %s", name, exc)
            bar.update(seeds, row=name)
            continue
        runs[name] = []
        for seed in range(seeds):
            cfg = RankerConfig.from_dict({**base_cfg.to_dict(), "features": name, "seed": base_cfg.seed + seed})
            t0 = time.perf_counter()
            result = fit(data, items, cfg, progress=progress, return_test_scores=True, score_examples=score_examples)
            result["seconds"] = time.perf_counter() - t0
            log.info("ablation %s%-16s seed %d: test auc %s gauc %s (%d epochs, %.0fs)", tag, name, cfg.seed,
                     format_metric(result["test"]["auc"]), format_metric(result["test"]["gauc"]),
                     len(result["history"]), result["seconds"])
            runs[name].append(result)
            bar.update(1, row=name)
    bar.close()
    return runs, skipped
