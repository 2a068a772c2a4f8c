"""`qarm train-ranker`: train one ranker on a feature-store version.

    qarm train-ranker --store DIR --dataset movielens --data ../shared/data/movielens --require-image \
        --features vq+rq --out runs/ranker --json
    torchrun --nproc_per_node=2 -m ranker.train --store DIR --dataset ... --features vq+rq --out runs/ranker
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ranker.config import FEATURE_SETS, NegativeConfig, RankerConfig
from ranker.data import SplitConfig

log = logging.getLogger(__name__)
_DEFAULT = RankerConfig()


def add_ranker_arguments(parser: argparse.ArgumentParser, with_features: bool = True) -> None:
    """Model / training / split / negatives flags shared by train-ranker and eval."""
    g = parser.add_argument_group("ranker")
    if with_features:
        g.add_argument("--features", choices=sorted(FEATURE_SETS), default="vq+rq",
                       help="feature set: ids plus frozen embedding / VQ / RQ / both codes (aligned or unaligned)")
    g.add_argument("--history-len", type=int, default=_DEFAULT.history_len, help="last N positives before the event")
    g.add_argument("--embedding-dim", type=int, default=_DEFAULT.embedding_dim)
    g.add_argument("--over-arch", default=",".join(map(str, _DEFAULT.over_arch)), help="MLP widths, e.g. 128,64")
    g.add_argument("--epochs", type=int, default=_DEFAULT.epochs)
    g.add_argument("--max-steps", type=int, default=None, help="cap on training steps (smoke runs)")
    g.add_argument("--batch-size", type=int, default=_DEFAULT.batch_size, help="global batch size")
    g.add_argument("--lr-dense", type=float, default=_DEFAULT.lr_dense)
    g.add_argument("--lr-sparse", type=float, default=_DEFAULT.lr_sparse)
    g.add_argument("--weight-decay", type=float, default=_DEFAULT.weight_decay)
    g.add_argument("--dropout", type=float, default=_DEFAULT.dropout)
    g.add_argument("--patience", type=int, default=_DEFAULT.patience, help="early stopping (0 = off)")
    g.add_argument("--code-init", choices=("random", "codebook"), default=_DEFAULT.code_init)
    g.add_argument("--no-attention", action="store_true", help="mean-pool the history instead of target attention")
    g.add_argument("--no-cross", action="store_true", help="drop the RQ-prefix cross feature")
    g.add_argument("--no-user-id", action="store_true", help="drop the user-id table")
    g.add_argument("--sharding", choices=("table_wise", "column_wise", "data_parallel"), default=_DEFAULT.sharding)
    g.add_argument("--threads", type=int, default=_DEFAULT.num_threads, help="torch threads per process")
    s = parser.add_argument_group("split and negatives")
    s.add_argument("--split", choices=("global", "user_last_frac", "user_last_n"), default="global",
                   help="time split: global timestamp cuts, or each user's last fraction / last n events")
    s.add_argument("--n-valid", type=int, default=1, help="user_last_n: valid events per user")
    s.add_argument("--n-test", type=int, default=1, help="user_last_n: test events per user")
    s.add_argument("--valid-frac", type=float, default=0.1)
    s.add_argument("--test-frac", type=float, default=0.1)
    s.add_argument("--negatives", type=int, default=NegativeConfig.per_positive,
                   help="sampled negatives per positive (implicit-feedback data only)")
    s.add_argument("--neg-sampler", choices=("uniform", "popularity"), default=NegativeConfig.sampler)
    s.add_argument("--neg-seed", type=int, default=0)
    st = parser.add_argument_group("store")
    st.add_argument("--store", type=Path, required=True, help="feature-store root")
    st.add_argument("--version", default=None, help="version id (default: CURRENT)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.data import add_data_arguments

    add_data_arguments(parser)
    add_ranker_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="folder for ranker.pt and result.json")
    parser.add_argument("--resume", action="store_true", help="continue from --out/ranker.pt")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def config_from_args(args: argparse.Namespace, features: str | None = None, seed: int | None = None) -> RankerConfig:
    try:
        over_arch = tuple(int(x) for x in str(args.over_arch).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--over-arch: expected comma-separated ints, got {args.over_arch!r}") from None
    return RankerConfig(
        features=features or args.features, embedding_dim=args.embedding_dim, history_len=args.history_len,
        attention=not args.no_attention, cross_feature=not args.no_cross, code_init=args.code_init,
        use_user_id=not args.no_user_id, over_arch=over_arch, batch_size=args.batch_size, epochs=args.epochs,
        max_steps=args.max_steps, lr_dense=args.lr_dense, lr_sparse=args.lr_sparse, weight_decay=args.weight_decay,
        dropout=args.dropout, patience=args.patience, seed=args.seed if seed is None else seed,
        negatives=NegativeConfig(per_positive=args.negatives, sampler=args.neg_sampler, seed=args.neg_seed),
        sharding=args.sharding, num_threads=args.threads)


def split_from_args(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(method=args.split, valid_frac=args.valid_frac, test_frac=args.test_frac,
                       n_valid=args.n_valid, n_test=args.n_test)


def load_inputs(args: argparse.Namespace, history_len: int, negatives: NegativeConfig):
    """(PreparedData, {table: ItemFeatures}, version id, dataset stats) from the data flags and --store."""
    from pipelines.data import data_spec_from_args, load_dataset
    from ranker.data import load_store_items, prepare_examples

    dataset = load_dataset(data_spec_from_args(args))
    catalog = dataset.items["item_id"].to_numpy()
    data = prepare_examples(dataset.interactions, catalog, history_len, split_from_args(args), negatives)
    items, version_id = load_store_items(args.store, args.version, catalog)
    return data, items, version_id, {"dataset": dataset.name, "items": int(len(catalog)),
                                     "interactions": int(len(dataset.interactions))}


def run(args: argparse.Namespace, ctx=None) -> dict:
    from ranker.data import items_for
    from ranker.train import fit

    cfg = config_from_args(args)
    data, items, version_id, stats = load_inputs(args, cfg.history_len, cfg.negatives)
    result = fit(data, items_for(items, cfg.features), cfg, out_dir=args.out, resume=args.resume, ctx=ctx)
    return {"store_version": version_id, "data": {**stats, **data.info}, **result}
