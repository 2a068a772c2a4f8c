"""Replay a log as consecutive "days" and retrain after each: the scheduled job, end to end, on real data.

    python -m pipelines.jobs.retrain.replay --dataset movielens --data ../shared/data/movielens --require-image \
        --store /tmp/replay --days 3 --json

The first version is built by the cascade on everything before the replay starts; then each day's interactions
arrive and `qarm retrain` runs with ``--until`` = the day's end, exactly as a daily cron entry would. MovieLens
spans 22 years with few ratings a day, so a replay "day" is an equal share of the last ``--tail`` of the log
(by count), not a calendar day. After every day it reports code churn against the parent with and without warm
start, and, with ``--ranker``, validation AUC right after the switch for remapped vs fresh code tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("pipelines.jobs.retrain.replay")


def day_boundaries(ts: np.ndarray, days: int, tail: float) -> list[int]:
    """Timestamps that end the bootstrap period and each replay day (len days + 1), by interaction count.

    Args:
        ts: (N,) interaction timestamps.
        days: number of replay days.
        tail: share of the log (by count) replayed; the rest builds the first version.
    """
    if days < 1 or not 0 < tail < 1:
        raise ValueError(f"replay needs days >= 1 and 0 < tail < 1, got days={days}, tail={tail}")
    qs = np.linspace(1.0 - tail, 1.0, days + 1)
    bounds = [int(np.quantile(ts, q, method="lower")) for q in qs]
    bounds[-1] = int(ts.max())
    if len(set(bounds)) != len(bounds):
        raise ValueError("replay days collapse onto the same timestamp; use fewer days or a longer tail")
    return bounds


def bootstrap(dataset, store: Path, until: int, work: Path, flags: list[str]) -> dict:
    """Publish the first version from the interactions up to ``until`` with the cascade job."""
    from pipelines.jobs import cascade
    from pipelines.data.loader import export_dataset

    early = dataset.interactions[dataset.interactions["ts"] <= until].reset_index(drop=True)
    export_dataset(dataclasses.replace(dataset, interactions=early), work / "bootstrap")
    return cascade.run(["--dataset", "generic", "--mapping", str(work / "bootstrap" / "mapping.json"),
                        "--store", str(store), "--runner", "DirectRunner", *flags], save_main_session=False)


def top_items(dataset, n: int):
    """The dataset restricted to its ``n`` most-interacted items and their events."""
    keep = dataset.interactions["item_id"].value_counts().index[:n]
    return dataclasses.replace(
        dataset, items=dataset.items[dataset.items["item_id"].isin(keep)].reset_index(drop=True),
        interactions=dataset.interactions[dataset.interactions["item_id"].isin(keep)].reset_index(drop=True))


def catalog_until(dataset, until: int):
    """The dataset as it stood at ``until``: events up to then, and only the items interacted with by then (a
    replayed catalog grows, so later days bring new items the way a live catalog does)."""
    inter = dataset.interactions[dataset.interactions["ts"] <= until]
    seen = np.unique(inter["item_id"].to_numpy(np.int64))
    return dataclasses.replace(dataset, items=dataset.items[dataset.items["item_id"].isin(seen)].reset_index(drop=True),
                               interactions=inter.reset_index(drop=True))


def day_row(day: int, since: int, until: int, outcome) -> dict:
    """One replay day's JSON record (the fields README's table and the PNG read)."""
    s = outcome.summary
    groups = s.get("churn_groups") or {}
    cont = s.get("continuity") or {}
    auc = {f"auc_{v}": (cont.get(v) or {}).get("auc") for v in ("before", "remapped", "stale", "fresh", "scratch")}
    gauc = {f"gauc_{v}": (cont.get(v) or {}).get("gauc") for v in ("before", "remapped", "stale", "fresh", "scratch")}
    return {"day": day, "since": s.get("since", since), "until": until, "published": outcome.published,
            "version": outcome.version, "parent": outcome.parent,
            "gate": "published" if outcome.published else "refused", "reasons": outcome.reasons,
            "new_interactions": s["new_interactions"], "new_items": s["new_items"],
            "tail_interactions": s.get("tail_interactions"), "encoder_refreshed": s.get("encoder_refreshed"),
            "refresh_refused": (s.get("refused_refresh") or {}).get("reasons"),
            "codes_refit": (s.get("codes") or {}).get("refit"), "drift": (s.get("codes") or {}).get("drift"),
            "moved_share": (s.get("codes") or {}).get("moved_share"),
            "churn_unchanged": (groups.get("unchanged") or {}).get("code_churn"),
            "churn_touched": (groups.get("touched") or {}).get("code_churn"),
            "churn_new": (groups.get("new") or {}).get("items"),
            "items_unchanged": (groups.get("unchanged") or {}).get("items"),
            "items_touched": (groups.get("touched") or {}).get("items"),
            "churn_unchanged_warm_refit": ((s.get("churn_groups_warm_refit") or {}).get("unchanged") or {}).get(
                "code_churn"),
            **auc, **gauc,
            **{f"auc_remapped_vs_{o}_ci": (((cont.get("remapped") or {}).get(f"vs_{o}") or {}).get("auc") or {}).get(
                "ci95") for o in ("before", "fresh", "scratch")},
            "recall10_parent": ((s.get("tail_recall") or {}).get("parent") or {}).get("recall@10"),
            "recall10_candidate": ((s.get("tail_recall") or {}).get("candidate") or {}).get("recall@10"),
            "churn_warm": s["churn_warm"].get("rq_code_churn"), "churn_cold": s["churn_cold"].get("rq_code_churn"),
            "level_churn_warm": s["churn_warm"].get("rq_level_churn"),
            "level_churn_cold": s["churn_cold"].get("rq_level_churn"), "seconds": s.get("seconds")}


def replay(dataset, store: Path, days: int, tail: float, flags: list[str], cfg_kwargs: dict,
           continuity: bool | None = None, bootstrap_flags: list[str] = (), grow_catalog: bool = True) -> dict:
    """Bootstrap, then retrain once per replay day (``since`` = the CURRENT version's watermark, so a refused
    day's events are retried with the next day's).

    Args:
        cfg_kwargs: RetrainConfig fields (``since`` / ``until`` are set per day).
        continuity: override RetrainConfig.ranker_gate.
        bootstrap_flags: further cascade flags of the first version only (e.g. --skip-unaligned).
        grow_catalog: each version sees only the items interacted with up to its day's end
            (:func:`catalog_until`), so items first rated later arrive as new items; False: the whole catalog
            from the start.
    Returns:
        {"bootstrap", "days": [day_row ...], "mean_churn_warm", "mean_churn_cold", "refused_days"}.
    """
    from pipelines.jobs.retrain.job import RetrainConfig, retrain

    bounds = day_boundaries(dataset.interactions["ts"].to_numpy(), days, tail)
    with tempfile.TemporaryDirectory(prefix="qarm-replay-") as tmp:
        first = bootstrap(catalog_until(dataset, bounds[0]) if grow_catalog else dataset, store, bounds[0], Path(tmp),
                          [*flags, *bootstrap_flags])
    report = {"bootstrap": {"version": first["version"], "until": bounds[0]}, "days": []}
    for day, (since, until) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        cfg = RetrainConfig(**{**cfg_kwargs, "since": None, "until": until, "extra_flags": tuple(flags)})
        outcome = retrain(store, catalog_until(dataset, until) if grow_catalog else dataset, cfg,
                          continuity=continuity)
        row = day_row(day, since, until, outcome)
        log.info("day %d: %s", day, json.dumps(row, default=str))
        report["days"].append(row)
    warm = [d["churn_warm"] for d in report["days"] if d["churn_warm"] is not None]
    cold = [d["churn_cold"] for d in report["days"] if d["churn_cold"] is not None]
    report["mean_churn_warm"] = float(np.mean(warm)) if warm else None
    report["mean_churn_cold"] = float(np.mean(cold)) if cold else None
    report["refused_days"] = [d["day"] for d in report["days"] if not d["published"]]
    return report


COLUMNS = (("day", "day"), ("gate", "gate"), ("enc", "encoder_refreshed"), ("refit", "codes_refit"),
           ("churn unch.", "churn_unchanged"), ("churn touched", "churn_touched"), ("new items", "churn_new"),
           ("AUC before", "auc_before"), ("remapped", "auc_remapped"), ("stale", "auc_stale"),
           ("fresh", "auc_fresh"), ("scratch", "auc_scratch"), ("R@10 parent", "recall10_parent"),
           ("R@10 cand.", "recall10_candidate"))


SEED_FIELDS = ("churn_unchanged", "churn_touched", "churn_new", "auc_before", "auc_remapped", "auc_stale", "auc_fresh",
               "auc_scratch", "gauc_before", "gauc_remapped", "recall10_parent", "recall10_candidate")


def combine_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """One report from replays that differ only by seed: per day, each field's mean over seeds, plus its std
    and a 95% t-interval of the mean (``<field>_std``, ``<field>_ci95``); ``gate`` is "published" when every seed
    published that day, else "refused k/n"; ``runs`` keeps every seed's own report."""
    from scipy import stats

    days = []
    for rows in zip(*[r["days"] for r in runs]):
        day = {"day": rows[0]["day"], "seeds": list(seeds), "published": all(r["published"] for r in rows),
               "reasons": [r["reasons"] for r in rows],
               "encoder_refreshed": [r.get("encoder_refreshed") for r in rows],
               "codes_refit": [r.get("codes_refit") for r in rows]}
        refused = sum(not r["published"] for r in rows)
        day["gate"] = "published" if not refused else f"refused {refused}/{len(rows)}"
        for key in SEED_FIELDS:
            vals = np.array([r.get(key) for r in rows if r.get(key) is not None], np.float64)
            mean = float(vals.mean()) if len(vals) else None
            std = float(vals.std(ddof=1)) if len(vals) > 1 else None
            half = float(stats.t.ppf(0.975, len(vals) - 1) * std / np.sqrt(len(vals))) if std is not None else None
            day[key], day[f"{key}_std"] = mean, std
            day[f"{key}_ci95"] = [mean - half, mean + half] if half is not None else None
        days.append(day)
    return {"seeds": list(seeds), "days": days, "refused_days": [d["day"] for d in days if not d["published"]],
            "runs": runs}


def markdown_table(days: list[dict]) -> str:
    """The per-day table (churn by group, AUC right after the switch, gate) as Markdown."""
    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(d.get(k)) for _, k in COLUMNS) + " |" for d in days]
    return "\n".join(lines)


def plot(days: list[dict], path: Path) -> Path:
    """PNG: churn by group (left) and AUC right after the switch (right) over the replay days."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [d["day"] for d in days]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("churn_unchanged", "unchanged"), ("churn_touched", "touched"),
                       ("churn_unchanged_warm_refit", "unchanged, had the cascade's warm refit been published")):
        a.plot(x, [np.nan if d.get(key) is None else d[key] for d in days], marker="o", label=label)
    a.axhline(0.1, color="grey", ls=":", lw=1, label="10% target (unchanged)")
    a.set(xlabel="replay day", ylabel="full-code churn vs parent", title="code churn by item group", ylim=(-0.02, 1.02))
    a.legend(fontsize=8)
    for v in ("before", "remapped", "stale", "fresh", "scratch"):
        b.plot(x, [np.nan if d.get(f"auc_{v}") is None else d[f"auc_{v}"] for d in days], marker="o", label=v)
    for d in days:
        if not d["published"]:
            b.axvline(d["day"], color="red", alpha=0.2, lw=8)
    b.set(xlabel="replay day (red: refused)", ylabel="AUC on the held-out tail", title="ranker right after the switch")
    for axis in (a, b):
        axis.set_xticks(x)
    b.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from feature_store.io import dumps_strict
    from pipelines.data import load_dataset
    from pipelines.beam.data_flags import data_spec_from_args
    from feature_store.config_tree import add_tree_arguments
    from pipelines.jobs.retrain import config_from_args
    from pipelines.jobs.retrain.retrain_tree import RetrainTree

    parser = argparse.ArgumentParser(prog="python -m pipelines.jobs.retrain.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tree_arguments(parser, RetrainTree)  # the retraining job's knobs, with their defaults
    r = parser.add_argument_group("replay")
    r.add_argument("--days", type=int, default=5)
    r.add_argument("--tail", type=float, default=0.1, help="share of the log replayed day by day")
    r.add_argument("--out", type=Path, default=None,
                   help="where replay.json / replay.md / replay.png go (default: <store>/replay)")
    r.add_argument("--top-items", type=int, default=0,
                   help="keep only the N most-interacted items and their events (a smaller replay; 0: all)")
    r.add_argument("--whole-catalog", action="store_true",
                   help="every version sees the whole catalog (default: only items interacted with by its day's end)")
    r.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="replay once per seed (stores <store>/seed-<s>) and report mean, std and a 95%% t-interval "
                        "per day (default: one replay with --seed)")
    r.add_argument("--json", action="store_true")
    args, flags = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("apache_beam", "faiss", "transformers", "timm", "matplotlib", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dataset = load_dataset(data_spec_from_args(args))
    if args.top_items:
        dataset = top_items(dataset, args.top_items)
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        cfg = config_from_args(args, seed=seed)
        kwargs = {k: v for k, v in cfg.__dict__.items() if k not in ("since", "until", "extra_flags")}
        boot_flags = ["--skip-unaligned"] if cfg.skip_unaligned else []
        store = Path(args.store) / f"seed-{seed}" if len(seeds) > 1 else Path(args.store)
        runs.append(replay(dataset, store, args.days, args.tail, flags + ["--seed", str(seed)], kwargs,
                           bootstrap_flags=boot_flags, grow_catalog=not args.whole_catalog))
    report = runs[0] if len(runs) == 1 else combine_seeds(runs, seeds)
    out = args.out or Path(args.store) / "replay"
    out.mkdir(parents=True, exist_ok=True)
    from feature_store.io import atomic_write_json, atomic_write_bytes

    atomic_write_json(out / "replay.json", json.loads(dumps_strict(report, default=str)))
    atomic_write_bytes(out / "replay.md", (markdown_table(report["days"]) + "\n").encode())
    plot(report["days"], out / "replay.png")
    print(markdown_table(report["days"]), file=sys.stderr)
    print(dumps_strict(report, default=str) if args.json else json.dumps(report, indent=2, default=str))
    return 3 if report["refused_days"] else 0


if __name__ == "__main__":
    sys.exit(main())
