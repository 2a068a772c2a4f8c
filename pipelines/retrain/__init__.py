"""`qarm retrain`: the scheduled retraining job (see pipelines/retrain/job.py).

Exit codes a scheduler can act on: 0 published (or nothing new: ``"status": "up-to-date"``), 1 error,
3 the validation gate refused the candidate (CURRENT unchanged, reasons in the JSON), 4 another run holds the
store lock.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ACCEPTS_EXTRA_ARGS = True  # unknown flags go to the candidate's `qarm pipeline` run unchanged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.data import add_data_arguments

    add_data_arguments(parser)
    g = parser.add_argument_group("retraining")
    g.add_argument("--store", type=Path, required=True, help="feature store whose CURRENT version is the parent")
    g.add_argument("--since", type=int, default=None, help="take interactions after this unix ts (default: the "
                                                          "parent's watermark)")
    g.add_argument("--until", type=int, default=None, help="... up to this unix ts (default: the newest)")
    g.add_argument("--window-days", type=float, default=365.0, help="pair-mining window before --until")
    g.add_argument("--cold", action="store_true", help="no warm start: fresh encoder fine-tune and codebooks")
    g.add_argument("--align-epochs", type=int, default=1, help="alignment fine-tuning epochs")
    g.add_argument("--skip-unaligned", action="store_true", help="skip the unaligned encoder's tables")
    g.add_argument("--continuity", action="store_true",
                   help="train a reference ranker on the parent and report AUC right after the switch to the new "
                        "codes, remapped vs fresh code rows")
    g.add_argument("--work-dir", type=Path, default=None, help="stage checkpoints (default: <store>/.retrain)")
    g.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for the store lock")
    gate = parser.add_argument_group("validation gate")
    gate.add_argument("--max-collision-rate", type=float, default=0.5)
    gate.add_argument("--min-utilization", type=float, default=0.05)
    gate.add_argument("--max-recall-drop", type=float, default=0.05,
                      help="allowed absolute drop of held-out pair recall@10 against the parent")
    gate.add_argument("--max-churn", type=float, default=None, help="highest allowed RQ code churn (share)")


def run(args: argparse.Namespace) -> dict:
    from feature_store import StoreLockedError
    from pipelines.cli import EXIT_LOCKED, EXIT_REJECTED, CommandExit
    from pipelines.data import data_spec_from_args, load_dataset
    from pipelines.retrain.gate import GateConfig
    from pipelines.retrain.job import NothingToDo, RetrainConfig, retrain

    gate = GateConfig(max_collision_rate=args.max_collision_rate, min_utilization=args.min_utilization,
                      max_recall_drop=args.max_recall_drop, max_churn=args.max_churn)
    cfg = RetrainConfig(since=args.since, until=args.until, window_days=args.window_days, warm_start=not args.cold,
                        align_epochs=args.align_epochs, skip_unaligned=args.skip_unaligned, gate=gate,
                        seed=args.seed, extra_flags=tuple(getattr(args, "extra_args", None) or ()))
    dataset = load_dataset(data_spec_from_args(args))
    try:
        outcome = retrain(args.store, dataset, cfg, work_root=args.work_dir,
                          continuity=args.continuity, lock_timeout=args.lock_timeout)
    except NothingToDo as exc:
        return {"status": "up-to-date", "published": False, "reason": str(exc)}
    except StoreLockedError as exc:
        raise CommandExit(EXIT_LOCKED, f"another run holds the store lock: {exc}", {"status": "locked"}) from exc
    if not outcome.published:
        raise CommandExit(EXIT_REJECTED, "validation gate refused the candidate: " + "; ".join(outcome.reasons),
                          {"status": "rejected", "published": False, **outcome.summary})
    return {"status": "published", "published": True, **outcome.summary}
