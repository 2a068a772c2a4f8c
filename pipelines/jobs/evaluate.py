"""`qarm eval`: QARM Table-1-style ablation (see pipelines/jobs/ablation.py).

    qarm eval --store DIR --dataset movielens --data ../shared/data/movielens --require-image --seeds 3 --json
    qarm eval --cascade-seeds 3 --seeds 3 --dataset movielens --data ../shared/data/movielens --require-image \
        --out runs/ablation --json                        # cascade flags (--encoder, --align-epochs, ...) apply

Beam options pass through to the cascade runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.jobs.ablation import EvalPlan, ablation_text, run_cascades, run_eval
from ranker.args import add_ranker_arguments, config_from_args
from ranker.config import ABLATION_ROWS
from ranker.stats import BootstrapConfig

ACCEPTS_EXTRA_ARGS = True  # Beam flags of the cascade runs
# data, split and cascade flags (--store: the version to evaluate), --config, --print-config
from pipelines.config.cascade import CascadeConfig as CONFIG_TREE  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ranker_arguments(parser, with_features=False, with_store=False, with_split=False, with_threads=False)
    g = parser.add_argument_group("ablation")
    g.add_argument("--seeds", type=int, default=3, help="model seeds per row and cascade")
    g.add_argument("--cascade-seeds", type=int, default=0,
                   help="re-run pair mining, alignment and quantization with seeds 0..N-1 into private stores "
                        "under --out (0: evaluate --store's version)")
    g.add_argument("--rows", default=",".join(ABLATION_ROWS), help="comma-separated subset of rows")
    g.add_argument("--bootstrap", type=int, default=BootstrapConfig.replicates, help="bootstrap replicates")
    g.add_argument("--rerank-candidates", type=Path, default=None,
                   help="a `qarm retrieve` Parquet of the test window: report the cascade (retrieval + each row "
                        "re-ranking) next to retrieval alone")
    g.add_argument("--rerank-k", type=int, default=20, help="length of the re-ranked list (Recall@K / NDCG@K)")
    g.add_argument("--out", type=Path, default=Path("runs/ablation"), help="report folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


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
        versions = run_cascades(args.config_tree, plan.cascade_seeds, Path(args.out),
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
