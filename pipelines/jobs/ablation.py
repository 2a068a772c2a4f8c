"""The QARM ablation job (`qarm eval`): every row of ranker.config.FEATURE_SETS under one protocol, with the
variance of every seeded stage and paired intervals.

    qarm eval --store DIR --dataset movielens --data ../shared/data/movielens --require-image --seeds 3
    qarm eval --cascade-seeds 3 --seeds 3 --dataset movielens ... --out runs/ablation   # re-runs the cascade

With ``--cascade-seeds N`` the batch job (pair mining, alignment, quantization) runs N times, seeds 0..N-1, each into
a private store under OUT/cascades/ (CURRENT of any user store is never touched; the data stays fixed), and every
cascade's version is crossed with the model seeds of ``--seeds``. Without it, the version of ``--store`` is the only
cascade. Rows that read no store (ids) train once per model seed and pair with every cascade's run of that seed.

Writes OUT/ablation.json, ablation.md and ablation.png atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from feature_store.split import SplitConfig, check_protocol
from ranker.ablation import check_rows, run_rows
from ranker.config import ABLATION_ROWS, FEATURE_SETS, RankerConfig
from ranker.metrics import format_metric
from ranker.stats import BootstrapConfig, PairedEvaluation, summarize_runs

log = logging.getLogger(__name__)

STORE_FREE_ROWS = tuple(r for r, (parts, table) in FEATURE_SETS.items() if not parts and table is None)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What one `qarm eval` run does.

    Args:
        rows: ablation rows.
        seeds: model seeds per row and cascade.
        cascade_seeds: 0 = evaluate the given store version; N = re-run the cascade N times.
        split: the protocol's split.
        bootstrap: resampling of test users for the intervals.
        allow_protocol_mismatch: evaluate versions built under another protocol (the title says so).
        rerank_candidates: a `qarm retrieve` Parquet of the test window: every ranker run also re-ranks these
            candidates, and the report gives the cascade's Recall@K / NDCG@K next to retrieval alone.
        rerank_k: K of the re-ranked list.
    """

    rows: tuple = ABLATION_ROWS
    seeds: int = 3
    cascade_seeds: int = 0
    split: SplitConfig = SplitConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    allow_protocol_mismatch: bool = False
    rerank_candidates: Optional[str] = None
    rerank_k: int = 20

    def __post_init__(self):
        check_rows(self.rows)
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.cascade_seeds < 0:
            raise ValueError(f"--cascade-seeds must be >= 0, got {self.cascade_seeds}")
        if self.rerank_k < 1:
            raise ValueError(f"--rerank-k must be >= 1, got {self.rerank_k}")


def run_cascades(config, n: int, out_dir: Path, beam_args=()) -> list[tuple[int, Path, str]]:
    """Run the batch job (`config`: its CascadeConfig) for cascade seeds 0..n-1 into private stores.
    Returns [(seed, store, version)]."""
    from pipelines.beam.options import options_for
    from feature_store.config_tree import with_values
    from pipelines.jobs.cascade import run_job

    done = []
    # the frozen MLLM's cache does not depend on the seed: one backbone pass serves every cascade
    cache_dir = config.align.side_cache_dir or str(out_dir / "cascades" / "side_cache")
    for seed in range(n):
        store = out_dir / "cascades" / f"seed-{seed}" / "store"
        seeded = with_values(config, {"store": str(store), "cascade_seed": seed, "side_cache_dir": cache_dir})
        log.info("ablation: cascade seed %d of %d into %s", seed + 1, n, store)
        summary = run_job(options_for(seeded, beam_args), save_main_session=False)
        done.append((seed, store, summary["version"]))
    return done


def run_eval(dataset, plan: EvalPlan, base_cfg: RankerConfig, out_dir: Path,
             versions: list[tuple[int | None, Path, str | None]]) -> dict:
    """Train every row on every (cascade version, model seed); summarise with paired intervals; write the report.

    Args:
        dataset: a loaded pipelines.data.Dataset.
        plan: EvalPlan.
        base_cfg: shared ranker settings (features / seed set per run).
        out_dir: report folder.
        versions: [(cascade seed or None, store root, version id or None for CURRENT)].
    """
    from ranker.data import prepare_examples

    t0 = time.perf_counter()
    interactions = dataset.interactions
    catalog = dataset.items["item_id"].to_numpy()
    data = prepare_examples(interactions, catalog, base_cfg.history_len, plan.split, base_cfg.negatives)
    rerank = Rerank(plan, data, interactions, base_cfg.history_len) if plan.rerank_candidates else None
    cascades, checked = _checked_versions(versions, interactions, plan)  # refuse another protocol before training
    runs, pairs, skipped = _train_rows(data, catalog, checked, plan, base_cfg,
                                       rerank.examples if rerank else None)
    evaluation = PairedEvaluation(data.test.user_id, data.test.label, plan.bootstrap)
    summary = summarize_runs(runs, baseline="id", evaluation=evaluation, pairs=pairs)
    summary = {r: summary[r] for r in plan.rows if r in summary}
    _add_off_on(summary, runs, evaluation)
    name = getattr(dataset, "name", "") or "dataset"
    mismatch = any(c["protocol_problems"] for c in cascades)
    out_dir = Path(out_dir)
    report = {
        "dataset": name, "seeds": plan.seeds, "cascade_seeds": plan.cascade_seeds, "cascades": cascades,
        "protocol_mismatch": mismatch, "rows": summary, "cascade": rerank.report(runs) if rerank else None,
        "skipped": skipped, "data": data.info, "config": base_cfg.to_dict(), "plan": dataclasses.asdict(plan),
        "seconds": time.perf_counter() - t0,
        "runs": {row: [{k: r.get(k) for k in ("test", "valid", "test_by_popularity", "best_epoch", "history",
                                               "seconds", "coverage", "prompt_vectors")} for r in results]
                 for row, results in runs.items()},
        "files": {k: str(out_dir / f"ablation.{k}") for k in ("json", "md", "png")},
    }
    title = (("PROTOCOL MISMATCH (--allow-protocol-mismatch) — " if mismatch else "")
             + f"QARM ablation — {name}, {len(versions)} cascade(s) × {plan.seeds} model seed(s), "
               f"test window ({plan.split.method})")
    report["table"] = _write_report(report, title, _report_notes(plan, base_cfg, data, evaluation), out_dir)
    return report


def _checked_versions(versions, interactions, plan: EvalPlan):
    """Each cascade version, read and checked against the eval's protocol. Returns (the report's "cascades"
    records, [(cascade seed, StoreVersion)])."""
    from feature_store import FeatureStore
    from ranker.data import prompt_vectors_source

    cascades, checked = [], []
    for cascade_seed, root, version_id in versions:
        version = FeatureStore(root).read(version_id)
        problems = check_protocol(version.manifest.get("protocol"), interactions, plan.split, version.id,
                                  plan.allow_protocol_mismatch)
        cascades.append({"cascade_seed": cascade_seed, "store": str(root), "version": version.id,
                         "protocol": version.manifest.get("protocol"), "protocol_problems": problems,
                         "prompt_vectors": prompt_vectors_source(version)})
        checked.append((cascade_seed, version))
    return cascades, checked


def _train_rows(data, catalog, checked, plan: EvalPlan, base_cfg: RankerConfig, extra):
    """Rows that need no store once; every store row on every cascade version, each crossed with the model seeds.
    Returns (runs {row: [fit results]}, pairs {row: [model seed of each run]}, skipped {row: why})."""
    from ranker.data import store_items

    runs, pairs, skipped = {}, {}, {}
    free_rows = tuple(r for r in plan.rows if r in STORE_FREE_ROWS)
    if free_rows:
        from ranker.features import ItemFeatures

        free, _ = run_rows(data, {"ids": ItemFeatures.build(catalog)}, base_cfg, plan.seeds, free_rows,
                           progress=False, tag="(no store) ", score_examples=extra)
        runs.update(free)
    store_rows = tuple(r for r in plan.rows if r not in STORE_FREE_ROWS)
    for cascade_seed, version in checked:
        items = store_items(version, catalog, random_seed=cascade_seed or 0)
        tag = f"cascade {cascade_seed} " if cascade_seed is not None else ""
        got, missing = run_rows(data, items, base_cfg, plan.seeds, store_rows, progress=False, tag=tag,
                                score_examples=extra)
        for row, results in got.items():
            runs.setdefault(row, []).extend(results)
            pairs.setdefault(row, []).extend(range(plan.seeds))  # paired with the ids run of the same model seed
        skipped.update(missing)
    return runs, pairs, skipped


def _report_notes(plan: EvalPlan, base_cfg: RankerConfig, data, evaluation) -> tuple[str, ...]:
    neg = base_cfg.negatives
    negatives = (f"sampled, {neg.per_positive} per positive, sampler {neg.sampler}" if data.info["implicit"]
                 else "explicit labels (no sampling)")
    return (f"Split: {plan.split.method} {dataclasses.asdict(plan.split)}; every version's pairs, alignment and "
            f"codebooks saw only its train portion (checked against manifest['protocol']).",
            f"Negatives: {negatives}.",
            ranker_note(base_cfg),
            f"Intervals: paired bootstrap over {len(evaluation.unique_users)} test users × "
            f"{plan.bootstrap.replicates} replicates, paired by model seed; AUC units.")


def _write_report(report: dict, title: str, notes, out_dir: Path) -> str:
    """ablation.md, ablation.png and ablation.json under ``out_dir`` (atomic); returns the Markdown."""
    from feature_store.io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from ranker.report import bar_chart_png, cascade_table, markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(report["rows"], title, notes)
    if report["cascade"]:
        md += "\n" + cascade_table(report["cascade"])
    if report["skipped"]:
        md += "\nSkipped rows: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()) + "\n"
    atomic_write_text(out_dir / "ablation.md", md)
    atomic_write_bytes(out_dir / "ablation.png", bar_chart_png(report["rows"], title))
    atomic_write_json(out_dir / "ablation.json", report)
    return md


def ablation_text(result: dict) -> str:
    """The ablation for the terminal: a heading, the table as text (ranker.report.text_table), skipped rows and where
    the report is. ``result``: the ``qarm eval`` result (rows, skipped, files, dataset, seeds, cascade_seeds)."""
    from ranker.report import text_table

    cascades = max(1, int(result.get("cascade_seeds") or 0))
    lines = [f"QARM ablation — {result.get('dataset', 'dataset')}, {cascades} cascade(s) × {result.get('seeds')} "
             "model seed(s), test window"]
    if result.get("protocol_mismatch"):
        lines.append("PROTOCOL MISMATCH: a version was built under another protocol (--allow-protocol-mismatch)")
    lines += ["", text_table(result["rows"]).rstrip()] if result.get("rows") else ["(no row could be trained)"]
    lines += [f"skipped {row}: {why}" for row, why in (result.get("skipped") or {}).items()]
    cascade = result.get("cascade")
    if cascade and cascade.get("rows"):
        k = cascade["k"]
        lines.append(f"re-ranked retrieval, recall@{k}: " + ", ".join(
            f"{row} {format_metric(r.get(f'recall@{k}_mean'))}" for row, r in cascade["rows"].items()))
    files = result.get("files") or {}
    if files:
        lines += ["", f"ablation report: {files.get('md')} (JSON {files.get('json')})",
                  f"ablation plot:   {files.get('png')}"]
    return "\n".join(lines)


def ranker_note(cfg: RankerConfig) -> str:
    """The report's line on the ranker settings every row shares."""
    init = f"from content (std {cfg.content_std})" if cfg.code_init == "content" else "at random"
    return (f"Ranker: code tables start {init}, dot-product interaction {'on' if cfg.interaction else 'off'}, "
            f"history {cfg.history_len}, embedding dim {cfg.embedding_dim}, up to {cfg.epochs} epochs "
            f"(early-stopped on validation AUC).")


class Rerank:
    """The cascade's evaluation: each ranker run re-ranks the retrieved candidates of the test window."""

    def __init__(self, plan: EvalPlan, data, interactions: pd.DataFrame, history_len: int):
        from feature_store.split import split_labels
        from ranker.data import candidate_examples

        cands = pd.read_parquet(plan.rerank_candidates)
        self.k = plan.rerank_k
        self.examples = candidate_examples(data, interactions, cands, history_len)
        self.candidates = cands[cands["user_id"].isin(set(data.test.user_id.tolist()))].reset_index(drop=True)
        part = split_labels(interactions, plan.split)
        pos = interactions["label"].to_numpy() >= 0.5
        seen = interactions[pos & (part == 0)].groupby("user_id")["item_id"].agg(set).to_dict()
        test = interactions[pos & (part == 2)].groupby("user_id")["item_id"].agg(set)
        # the window's targets, minus what the user already had in training (retrieval never returns those)
        self.relevant = {int(u): {int(i) for i in items - seen.get(u, set())} for u, items in test.items()}
        self.relevant = {u: t for u, t in self.relevant.items() if t}

    def report(self, runs: dict) -> dict:
        """{"k", "retrieval": {recall, ndcg}, "candidate_recall", "rows": {row: {recall_mean, recall_std, ...}}}."""
        from ranker.retrieval.cascade import rerank_candidates
        from ranker.stats import mean_std

        key = pd.MultiIndex.from_arrays([self.candidates["user_id"].to_numpy(np.int64),
                                         self.candidates["item_id"].to_numpy(np.int64)])
        out, base = {"k": self.k, "rows": {}}, None
        for row, results in runs.items():
            recalls, ndcgs = [], []
            for r in results:
                lookup = pd.Series(r["extra_scores"], index=key)
                rep = rerank_candidates(self.candidates, lambda u, i, s=lookup: s.reindex(
                    pd.MultiIndex.from_arrays([u, i])).to_numpy(), self.relevant, k=self.k)
                recalls.append(rep["cascade"][f"recall@{self.k}"])
                ndcgs.append(rep["cascade"][f"ndcg@{self.k}"])
                base = base or rep
            (rm, rs), (nm, ns) = mean_std(recalls), mean_std(ndcgs)
            out["rows"][row] = {f"recall@{self.k}_mean": rm, f"recall@{self.k}_std": rs,
                                f"ndcg@{self.k}_mean": nm, f"ndcg@{self.k}_std": ns}
        if base:
            out.update(retrieval=base["retrieval"], candidate_recall=base["candidate_recall"], users=base["users"],
                       candidates_per_user=base["candidates_per_user"])
        return out


# rows that add one feature to another row: their paired difference from that row (feature off -> on), besides the
# difference from ids every row gets
OFF_ON = {"vq+rq+prompt": "vq+rq"}


def _add_off_on(summary: dict, runs: dict, evaluation) -> None:
    """rows[on]["vs_" + off] = the paired AUC / GAUC difference and intervals of `on` minus `off` (same model
    seeds, same cascades), when both rows ran."""
    for on, off in OFF_ON.items():
        if on in summary and off in runs and len(runs[off]) == len(runs[on]):
            pair = summarize_runs({off: runs[off], on: runs[on]}, baseline=off, evaluation=evaluation)[on]
            summary[on]["vs_" + off] = {k: pair.get(k) for k in ("delta_auc_pt_mean", "delta_gauc_pt_mean",
                                                                 "auc_diff", "auc_diff_ci95", "gauc_diff",
                                                                 "gauc_diff_ci95", "undefined") if k in pair}
