"""`qarm retrain`: the scheduled retraining job (see pipelines/jobs/retrain/job.py).

Exit codes a scheduler can act on: 0 published (or nothing new: ``"status": "up-to-date"``), 1 error,
3 the validation gate refused the candidate (CURRENT unchanged, reasons in the JSON), 4 another run holds the
store lock.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ACCEPTS_EXTRA_ARGS = True  # unknown flags go to the candidate's `qarm pipeline` run unchanged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from feature_store.remap import METHODS as REMAP_METHODS
    from pipelines.beam.data_flags import add_data_arguments
    from pipelines.jobs.retrain.gate import GateConfig
    from pipelines.jobs.retrain.job import RetrainConfig
    from pipelines.jobs.retrain.stability import StabilityConfig
    # the extra flags go to the candidate's cascade run: register its PipelineOptions so the dispatcher's
    # unknown-flag check (pipelines.beam.flags.check_beam_flags) knows them in a fresh process too
    from pipelines.beam import options as _cascade_options  # noqa: F401

    add_data_arguments(parser)
    g = parser.add_argument_group("retraining")
    g.add_argument("--store", required=True, help="feature store whose CURRENT version is the parent (a directory, "
                                               "file:///path, s3://bucket/prefix or gs://bucket/prefix)")
    g.add_argument("--since", type=int, default=None, help="take interactions after this unix ts (default: the "
                                                          "parent's watermark)")
    g.add_argument("--until", type=int, default=None, help="... up to this unix ts (default: the newest)")
    g.add_argument("--window-days", type=float, default=365.0,
                   help="pair-mining window (days) before the held-out tail")
    g.add_argument("--tail-frac", type=float, default=RetrainConfig.tail_frac,
                   help="last share of the new events kept out of alignment and fitting: the held-out tail the "
                        "gate compares candidate and parent on")
    g.add_argument("--cold", action="store_true", help="no warm start: fresh encoder fine-tune and codebooks")
    g.add_argument("--refresh-encoder-every", type=int, default=RetrainConfig.refresh_encoder_every,
                   help="fine-tune the encoder on every N-th version (counted in the store's history; 1: every "
                        "run, 0: never); other runs reuse the parent's encoder frozen")
    g.add_argument("--align-epochs", type=int, default=1, help="alignment fine-tuning epochs")
    g.add_argument("--align-lr", type=float, default=None, help="fine-tuning learning rate (default: the mode's)")
    g.add_argument("--skip-unaligned", action="store_true", help="skip the unaligned encoder's tables")
    c = parser.add_argument_group("code stability and ranker carry-over")
    c.add_argument("--move-threshold", type=float, default=StabilityConfig.move_threshold,
                   help="relative L2 embedding move below which an item keeps its parent code")
    c.add_argument("--refit-drift", type=float, default=StabilityConfig.refit_drift,
                   help="relative quantization-error increase above which the refit codebooks are published "
                        "(negative: never refit)")
    c.add_argument("--remap-method", choices=REMAP_METHODS, default=RetrainConfig.remap_method,
                   help="how the reference ranker's learned code rows move onto the new codes")
    c.add_argument("--no-ranker-gate", action="store_true",
                   help="skip the reference rankers (no tail AUC check; faster)")
    c.add_argument("--continuity", action="store_true", help=argparse.SUPPRESS)  # the default now; kept as alias
    g.add_argument("--work-dir", type=Path, default=None, help="stage checkpoints (default: <store>/.retrain)")
    g.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for the store lock")
    gate = parser.add_argument_group("validation gate")
    gate.add_argument("--max-collision-rate", type=float, default=0.5)
    gate.add_argument("--min-utilization", type=float, default=0.05)
    gate.add_argument("--max-recall-drop", type=float, default=0.05,
                      help="allowed absolute drop of next-item recall@10 on the held-out tail, the parent's and "
                           "the candidate's encoder scored on the same queries")
    gate.add_argument("--max-churn", type=float, default=None,
                      help="highest allowed full-code churn of the parent's items (share)")
    gate.add_argument("--max-auc-drop", type=float, default=GateConfig.max_auc_drop,
                      help="allowed AUC drop of the remapped ranker vs the parent's on the held-out tail")
    gate.add_argument("--max-gauc-drop", type=float, default=GateConfig.max_gauc_drop,
                      help="allowed GAUC drop of the remapped ranker vs the parent's on the held-out tail")
    gate.add_argument("--ranking-rule", choices=("point", "ci"), default=GateConfig.ranking_rule,
                      help="point: refuse an observed drop beyond the tolerance; ci: only when the paired 95%% "
                           "interval of the difference lies wholly below it")


def run(args: argparse.Namespace) -> dict:
    from feature_store import StoreLockedError
    from pipelines.jobs.outcome import EXIT_LOCKED, EXIT_REJECTED, CommandExit
    from pipelines.data import load_dataset
    from pipelines.beam.data_flags import data_spec_from_args
    from pipelines.jobs.retrain.gate import GateConfig
    from pipelines.jobs.retrain.job import NothingToDo, RetrainConfig, retrain

    cfg = config_from_args(args, extra_flags=tuple(getattr(args, "extra_args", None) or ()))
    spec = data_spec_from_args(args).at_clock()  # one clock for the load, the window and the candidate job
    dataset = load_dataset(spec)
    try:
        outcome = retrain(args.store, dataset, cfg, work_root=args.work_dir, lock_timeout=args.lock_timeout,
                          clock=spec.clock())
    except NothingToDo as exc:
        return {"status": "up-to-date", "published": False, "reason": str(exc)}
    except StoreLockedError as exc:
        raise CommandExit(EXIT_LOCKED, f"another run holds the store lock: {exc}", {"status": "locked"}) from exc
    if not outcome.published:
        raise CommandExit(EXIT_REJECTED, "validation gate refused the candidate: " + "; ".join(outcome.reasons),
                          {"status": "rejected", "published": False, **outcome.summary})
    return {"status": "published", "published": True, **outcome.summary}


def config_from_args(args: argparse.Namespace, **overrides):
    """RetrainConfig from the flags of :func:`add_arguments` (the replay shares them)."""
    from pipelines.jobs.retrain.gate import GateConfig
    from pipelines.jobs.retrain.job import RetrainConfig
    from pipelines.jobs.retrain.stability import StabilityConfig

    gate = GateConfig(max_collision_rate=args.max_collision_rate, min_utilization=args.min_utilization,
                      max_recall_drop=args.max_recall_drop, max_churn=args.max_churn,
                      max_auc_drop=args.max_auc_drop, max_gauc_drop=args.max_gauc_drop,
                      ranking_rule=args.ranking_rule)
    refit = None if args.refit_drift is not None and args.refit_drift < 0 else args.refit_drift
    kwargs = dict(since=args.since, until=args.until, window_days=args.window_days, tail_frac=args.tail_frac,
                  warm_start=not args.cold, refresh_encoder_every=args.refresh_encoder_every,
                  align_epochs=args.align_epochs, align_lr=args.align_lr,
                  stability=StabilityConfig(move_threshold=args.move_threshold, refit_drift=refit),
                  remap_method=args.remap_method, ranker_gate=not args.no_ranker_gate,
                  skip_unaligned=args.skip_unaligned, gate=gate, seed=args.seed)
    kwargs.update(overrides)
    return RetrainConfig(**kwargs)
