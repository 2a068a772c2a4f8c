"""Replay a log as consecutive "days" and retrain after each: the scheduled job, end to end, on real data.

    python -m pipelines.retrain.replay --dataset movielens --data ../shared/data/movielens --require-image \
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

log = logging.getLogger("pipelines.retrain.replay")


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
    from pipelines import cascade
    from pipelines.data.loader import export_dataset

    early = dataset.interactions[dataset.interactions["ts"] <= until].reset_index(drop=True)
    export_dataset(dataclasses.replace(dataset, interactions=early), work / "bootstrap")
    return cascade.run(["--dataset", "generic", "--mapping", str(work / "bootstrap" / "mapping.json"),
                        "--store", str(store), "--runner", "DirectRunner", *flags], save_main_session=False)


def replay(dataset, store: Path, days: int, tail: float, flags: list[str], cfg_kwargs: dict,
           continuity: bool = False) -> dict:
    """Bootstrap, then retrain once per replay day. Returns per-day churn (warm vs cold) and continuity.

    Args:
        continuity: also report ranker AUC right after each switch, remapped vs fresh code rows.
    """
    from pipelines.retrain.job import RetrainConfig, retrain

    bounds = day_boundaries(dataset.interactions["ts"].to_numpy(), days, tail)
    with tempfile.TemporaryDirectory(prefix="qarm-replay-") as tmp:
        first = bootstrap(dataset, store, bounds[0], Path(tmp), flags)
    report = {"bootstrap": {"version": first["version"], "until": bounds[0]}, "days": []}
    for day, (since, until) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        cfg = RetrainConfig(since=since, until=until, extra_flags=tuple(flags), **cfg_kwargs)
        outcome = retrain(store, dataset, cfg, continuity=continuity)
        s = outcome.summary
        row = {"day": day, "since": since, "until": until, "published": outcome.published,
               "version": outcome.version, "parent": outcome.parent, "reasons": outcome.reasons,
               "new_interactions": s["new_interactions"], "new_items": s["new_items"],
               "churn_warm": s["churn_warm"].get("rq_code_churn"), "churn_cold": s["churn_cold"].get("rq_code_churn"),
               "level_churn_warm": s["churn_warm"].get("rq_level_churn"),
               "level_churn_cold": s["churn_cold"].get("rq_level_churn"),
               "continuity": s.get("continuity"), "seconds": s.get("seconds")}
        log.info("day %d: %s", day, json.dumps(row, default=str))
        report["days"].append(row)
    warm = [d["churn_warm"] for d in report["days"] if d["churn_warm"] is not None]
    cold = [d["churn_cold"] for d in report["days"] if d["churn_cold"] is not None]
    report["mean_churn_warm"] = float(np.mean(warm)) if warm else None
    report["mean_churn_cold"] = float(np.mean(cold)) if cold else None
    return report


def main(argv=None) -> int:
    from pipelines.data import add_data_arguments, data_spec_from_args, load_dataset

    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--tail", type=float, default=0.1, help="share of the log replayed day by day")
    parser.add_argument("--align-epochs", type=int, default=1)
    parser.add_argument("--continuity", action="store_true", help="ranker AUC after each switch, mapped vs fresh")
    parser.add_argument("--json", action="store_true")
    args, flags = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset = load_dataset(data_spec_from_args(args))
    report = replay(dataset, args.store, args.days, args.tail, flags + ["--seed", str(args.seed)],
                    {"align_epochs": args.align_epochs, "seed": args.seed}, continuity=args.continuity)
    print(json.dumps(report, default=str) if args.json else json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
