"""Ranker flags shared by `qarm train-ranker`, `qarm eval` and the torchrun entry (`python -m ranker.train`), and
the configs they make. Pure argparse: the data-source flags belong to the `qarm` commands (pipelines), the
torchrun entry reads contract tables instead.
"""
from __future__ import annotations

import argparse
import logging

from ranker.config import CODE_INITS, FEATURE_SETS, NEGATIVE_SAMPLERS, SHARDING_TYPES, NegativeConfig, RankerConfig
from feature_store.split import add_split_arguments, split_from_args  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
_DEFAULT = RankerConfig()


def add_ranker_arguments(parser: argparse.ArgumentParser, with_features: bool = True, with_store: bool = True,
                         with_split: bool = True, with_threads: bool = True) -> None:
    """Model / training / split / negatives / store flags shared by train-ranker, eval and the torchrun entry
    (a command that already has the split, store or --torch-threads flags, e.g. from the cascade's config tree,
    leaves them out)."""
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
    g.add_argument("--code-init", choices=CODE_INITS + ("codebook",), default=_DEFAULT.code_init,
                   help="content: code tables start from the content they encode (RQ rows from their centroids, VQ "
                        "rows from the items' vectors, one fixed map); random: TorchRec's uniform init; codebook: "
                        "former name of content")
    g.add_argument("--content-std", type=float, default=_DEFAULT.content_std,
                   help="per-coordinate std of content-initialised code rows")
    g.add_argument("--interaction", action=argparse.BooleanOptionalAction, default=_DEFAULT.interaction,
                   help="DLRM-style pairwise dot products among the target's and the attended history's part "
                        "vectors, the user vector and the VQ bag, fed to the over-arch")
    g.add_argument("--no-attention", action="store_true", help="mean-pool the history instead of target attention")
    g.add_argument("--no-user-id", action="store_true", help="drop the user-id table")
    g.add_argument("--sharding", choices=SHARDING_TYPES, default=_DEFAULT.sharding)
    if with_threads:
        g.add_argument("--torch-threads", type=int, default=_DEFAULT.num_threads, help="torch threads per process")
    if with_split:
        add_split_arguments(parser)
    s = parser.add_argument_group("negatives (implicit logs)")
    s.add_argument("--negatives", type=int, default=NegativeConfig.per_positive,
                   help="sampled negatives per positive (implicit-feedback data only)")
    s.add_argument("--neg-sampler", choices=NEGATIVE_SAMPLERS, default=NegativeConfig.sampler,
                   help="implicit data: negatives drawn from each window's own positives (window, default), "
                        "uniformly over the window's live items (live), by training popularity (popularity) or "
                        "uniformly over the catalog (uniform)")
    s.add_argument("--neg-seed", type=int, default=0)
    st = parser.add_argument_group("store")
    if with_store:
        st.add_argument("--store", required=True, help="feature-store root: a folder, file://, s3:// or gs:// URL")
    st.add_argument("--version", default=None, help="version id (default: CURRENT)")
    st.add_argument("--allow-protocol-mismatch", action="store_true",
                    help="use a version built under another split protocol anyway (the result says so)")


def config_from_args(args: argparse.Namespace, features: str | None = None, seed: int | None = None) -> RankerConfig:
    try:
        over_arch = tuple(int(x) for x in str(args.over_arch).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--over-arch: expected comma-separated ints, got {args.over_arch!r}") from None
    return RankerConfig(
        features=features or args.features, embedding_dim=args.embedding_dim, history_len=args.history_len,
        attention=not args.no_attention, code_init=args.code_init, content_std=args.content_std,
        interaction=args.interaction,
        use_user_id=not args.no_user_id, over_arch=over_arch, batch_size=args.batch_size, epochs=args.epochs,
        max_steps=args.max_steps, lr_dense=args.lr_dense, lr_sparse=args.lr_sparse, weight_decay=args.weight_decay,
        dropout=args.dropout, patience=args.patience, seed=args.seed if seed is None else seed,
        negatives=NegativeConfig(per_positive=args.negatives, sampler=args.neg_sampler, seed=args.neg_seed),
        sharding=args.sharding, num_threads=args.torch_threads)
