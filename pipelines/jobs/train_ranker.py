"""`qarm train-ranker`: train one ranker on a feature-store version.

    qarm train-ranker --store DIR --dataset movielens --data ../shared/data/movielens --require-image \
        --features vq+rq --out runs/ranker --json

The same model on several processes: export the data once, then torchrun the library entry, which reads the
contract tables rather than the source loaders:

    qarm data export --dataset movielens --data ../shared/data/movielens --require-image --out runs/data
    torchrun --nproc_per_node=2 -m ranker.train --items runs/data/items.parquet \
        --interactions runs/data/interactions.parquet --store DIR --features vq+rq --out runs/ranker
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.config.ranker import TrainRankerConfig as CONFIG_TREE  # noqa: F401 (the dispatcher's flags)
from pipelines.data import load_dataset
from pipelines.beam.data_flags import data_spec_from_args
from ranker.args import config_from_args, require_store, split_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Besides the config tree's flags (data, split, run, ranker, negatives, source): where the run goes."""
    parser.add_argument("--out", type=Path, default=None, help="folder for ranker.pt and result.json")
    parser.add_argument("--resume", action="store_true", help="continue from --out/ranker.pt")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def run(args: argparse.Namespace) -> dict:
    from ranker.train import train_on_tables

    store = require_store(args)
    dataset = load_dataset(data_spec_from_args(args))
    result = train_on_tables(dataset.interactions, dataset.items["item_id"].to_numpy(), store, args.version,
                             config_from_args(args), split_from_args(args), out_dir=args.out, resume=args.resume,
                             allow_protocol_mismatch=args.allow_protocol_mismatch)
    result["data"] = {"dataset": dataset.name, **result["data"]}
    return result
