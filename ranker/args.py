"""Ranker flags shared by `qarm train-ranker`, `qarm eval` and the torchrun entry (`python -m ranker.train`), and
the configs they make. Each knob is defined once, in the sections below (frozen dataclasses with their defaults); the flags are
generated from them (`feature_store.config_tree`). The data-source flags belong to the `qarm` commands
(pipelines), the torchrun entry reads contract tables instead.
"""
from __future__ import annotations

import argparse
import logging

from dataclasses import dataclass
from typing import Optional

from feature_store.config_tree import add_section_arguments, knob
from feature_store.split import add_split_arguments, split_from_args  # noqa: F401 (re-exported)
from ranker.config import CODE_INITS, FEATURE_SETS, NEGATIVE_SAMPLERS, SHARDING_TYPES, NegativeConfig, RankerConfig

log = logging.getLogger(__name__)
_DEFAULT = RankerConfig()
_NEG = NegativeConfig()


@dataclass(frozen=True)
class RankerSection:
    """The ranker's model and training knobs (RankerConfig's defaults; the feature set and threads are the
    command's: `qarm eval` sets features per ablation row and shares the cascade's --torch-threads)."""

    history_len: int = knob(_DEFAULT.history_len, "last N positives before the event")
    embedding_dim: int = knob(_DEFAULT.embedding_dim, "width of every sparse table")
    over_arch: str = knob(",".join(map(str, _DEFAULT.over_arch)), "MLP widths, e.g. 128,64")
    epochs: int = knob(_DEFAULT.epochs, "most ranker epochs (early stopping on validation AUC)")
    max_steps: Optional[int] = knob(None, "cap on training steps (smoke runs)")
    batch_size: int = knob(_DEFAULT.batch_size, "global batch size")
    lr_dense: float = knob(_DEFAULT.lr_dense, "learning rate of the dense parts")
    lr_sparse: float = knob(_DEFAULT.lr_sparse, "learning rate of the embedding tables")
    weight_decay: float = knob(_DEFAULT.weight_decay, "L2 on dense parameters")
    dropout: float = knob(_DEFAULT.dropout, "over-arch dropout")
    patience: int = knob(_DEFAULT.patience, "epochs without validation-AUC gain before stopping (0: off)")
    code_init: str = knob(_DEFAULT.code_init, "content: code tables start from the content they encode (RQ rows "
                                              "from their centroids, VQ rows from the items' vectors); random: "
                                              "TorchRec's uniform init; codebook: former name of content",
                          choices=CODE_INITS + ("codebook",))
    content_std: float = knob(_DEFAULT.content_std, "per-coordinate std of content-initialised code rows")
    interaction: bool = knob(_DEFAULT.interaction, "DLRM-style pairwise dot products among the target's and the "
                                                   "history's part vectors, the user vector and the VQ bag")
    no_attention: bool = knob(not _DEFAULT.attention, "mean-pool the history instead of target attention")
    no_user_id: bool = knob(not _DEFAULT.use_user_id, "drop the user-id table")
    sharding: str = knob(_DEFAULT.sharding, "TorchRec sharding type under torchrun", choices=SHARDING_TYPES)


@dataclass(frozen=True)
class NegativesSection:
    """Sampled negatives of implicit logs (NegativeConfig's defaults)."""

    negatives: int = knob(_NEG.per_positive, "sampled negatives per positive (implicit-feedback data only)")
    neg_sampler: str = knob(_NEG.sampler, "implicit data: negatives from each window's own positives (window), "
                                          "uniformly over the window's live items (live), by training popularity "
                                          "(popularity) or uniformly over the catalog (uniform)",
                            choices=NEGATIVE_SAMPLERS)
    neg_seed: int = knob(_NEG.seed, "seed of the negative sampler")


@dataclass(frozen=True)
class ReadSection:
    """Which published version of the store a command reads (the store itself: VersionSection, or the cascade's
    --store in `qarm eval`)."""

    version: Optional[str] = knob(None, "version id (none: CURRENT)")
    allow_protocol_mismatch: bool = knob(False, "use a version built under another split protocol anyway (its "
                                                "upstream stages saw interactions this split holds out: leakage; "
                                                "the result says so)")


@dataclass(frozen=True)
class VersionSection(ReadSection):
    """A store and the version read from it."""

    store: Optional[str] = knob(None, "feature-store root: a folder, file://, s3:// or gs:// URL", required=True)


def require_store(args) -> str:
    """The --store a command cannot run without (a usage error naming the flag otherwise)."""
    if not getattr(args, "store", None):
        raise ValueError("--store is required (the feature store whose version is read)")
    return args.store


@dataclass(frozen=True)
class RankerRunSection:
    """`qarm train-ranker` / `python -m ranker.train`: the feature set and the threads of one ranker."""

    features: str = knob("vq+rq", "feature set: ids plus frozen embedding / VQ / RQ / both codes (aligned or "
                                  "unaligned)", choices=tuple(sorted(FEATURE_SETS)))
    torch_threads: int = knob(_DEFAULT.num_threads, "torch threads per process")


def add_ranker_arguments(parser: argparse.ArgumentParser, with_features: bool = True, with_store: bool = True,
                         with_split: bool = True) -> None:
    """The ranker's flags, generated from its sections, for commands without a config tree (`python -m
    ranker.train`): run (features, threads), ranker, split, negatives and the version read."""
    if with_features:
        add_section_arguments(parser, RankerRunSection, title="run")
    add_section_arguments(parser, RankerSection, title="ranker")
    if with_split:
        add_split_arguments(parser)
    add_section_arguments(parser, NegativesSection, title="negatives (implicit logs)")
    if with_store:
        add_section_arguments(parser, VersionSection, title="store")


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
