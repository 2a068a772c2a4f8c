"""`qarm eval`: QARM Table-1-style ablation (see pipelines/jobs/ablation.py).

    qarm eval --store DIR --dataset movielens --data ../shared/data/movielens --require-image --seeds 3 --json
    qarm eval --cascade-seeds 3 --seeds 3 --dataset movielens --data ../shared/data/movielens --require-image \
        --out runs/ablation --json                        # cascade flags (--encoder, --align-epochs, ...) apply

Beam options pass through to the cascade runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.config.ranker import EvalConfig as CONFIG_TREE  # noqa: F401 (the dispatcher's flags)
from pipelines.jobs.ablation import EvalPlan, ablation_text, run_cascades, run_eval
from ranker.args import config_from_args
from ranker.stats import BootstrapConfig

ACCEPTS_EXTRA_ARGS = True  # Beam flags of the cascade runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Besides the config tree's flags (the cascade's sections, source, ranker, negatives, ablation): where the
    report goes."""
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="report folder")


def run(args: argparse.Namespace) -> dict:
    from feature_store.split import split_from_args
    from pipelines.data import load_dataset
    from pipelines.beam.data_flags import data_spec_from_args

    plan = EvalPlan(rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()), seeds=args.seeds,
                    cascade_seeds=args.cascade_seeds, split=split_from_args(args),
                    bootstrap=BootstrapConfig(replicates=args.bootstrap, seed=args.seed),
                    allow_protocol_mismatch=args.allow_protocol_mismatch,
                    rerank_candidates=str(args.rerank_candidates) if args.rerank_candidates else None,
                    rerank_k=args.rerank_k)
    if plan.cascade_seeds:
        versions = run_cascades(args.config_tree.cascade(), plan.cascade_seeds, Path(args.out),
                                getattr(args, "extra_args", None) or ())
    elif args.store:
        versions = [(None, args.store, args.version)]
    else:
        raise ValueError("qarm eval needs --store DIR (a published version) or --cascade-seeds N")
    dataset = load_dataset(data_spec_from_args(args))
    report = run_eval(dataset, plan, config_from_args(args, features="id"), Path(args.out), versions)
    return {k: report[k] for k in ("dataset", "seeds", "cascade_seeds", "cascades", "protocol_mismatch", "rows",
                                   "cascade", "skipped", "files")}


def human_summary(result: dict) -> str:
    """What the terminal shows at the end without --json: the ablation table as text and where the report is."""
    return ablation_text(result)
