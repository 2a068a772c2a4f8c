"""The data flags every `qarm` command shares, and the DataSpec they make."""
from __future__ import annotations

import argparse
from pathlib import Path

from feature_store.clock import DEFAULT_MAX_FUTURE_S, parse_duration, parse_time
from pipelines.data.schema import DATASETS, IMAGE_CHECKS, PRESET_SIZES, PRESETS, DataSpec


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --dataset --data --items --interactions --mapping --map --id-maps --require-image --validate-images
    --max-bad-fraction --now --max-future --n-items --n-users --n-events --n-clusters --lookalike-share --image-size --seed."""
    g = parser.add_argument_group("data source")
    g.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="synthetic (embedded, default), movielens (ml-latest-small + posters) or generic")
    g.add_argument("--data", type=Path, default=None,
                   help="movielens: folder with ml-latest-small/ and posters/; synthetic: where images are "
                        "generated (default: $QARM_CACHE/synthetic or ~/.cache/qarm/synthetic, one folder per "
                        "config); generic: base folder for relative --items / --interactions")
    g.add_argument("--items", type=Path, default=None, help="generic: item catalog (Parquet or CSV)")
    g.add_argument("--interactions", type=Path, default=None, help="generic: interaction log (Parquet or CSV)")
    g.add_argument("--mapping", type=Path, default=None,
                   help="generic: JSON/YAML file mapping your columns onto the contract "
                        "(format: pipelines/data/generic.py)")
    g.add_argument("--map", dest="column_map", action="append", default=[], metavar="TABLE.FIELD=COLUMN",
                   help="generic: map one column, e.g. items.item_id=sku or interactions.ts=event_time "
                        "(repeatable; overrides the mapping file)")
    g.add_argument("--id-maps", dest="id_map_dir", type=Path, default=None,
                   help="generic: folder of saved string->int id maps to reuse and extend (stable ids across runs)")
    g.add_argument("--require-image", action="store_true",
                   help="keep only items with a valid image and the interactions on them")
    g.add_argument("--validate-images", choices=IMAGE_CHECKS, default=DataSpec.validate_images,
                   help="image check per item: exists, header (a truncated JPEG passes it), draft (default: header "
                        "+ a reduced-size decode; catches truncated files) or decode (full size)")
    g.add_argument("--max-bad-fraction", type=float, default=DataSpec.max_bad_fraction,
                   help="largest share of a table's rows whose id, timestamp or label does not parse: below it "
                        "they are rejected (bad_id / bad_timestamp / bad_label), above it the load fails "
                        f"(default {DataSpec.max_bad_fraction:g})")
    g.add_argument("--now", default=None,
                   help="the job's clock, unix seconds or ISO-8601 (default: this machine's clock at start); events "
                        "later than it plus --max-future are rejected as bad_timestamp and the published watermark "
                        "never passes it")
    g.add_argument("--max-future", default="1d",
                   help="how far after --now an event may be stamped (clock skew of the logging machines) before it "
                        "is rejected: seconds or 90s / 30m / 6h / 1d (default 1d)")
    g.add_argument("--preset", choices=PRESETS, default="default",
                   help="synthetic: default (impression log, 0/1 labels) or sparse (a purchase-like implicit log: "
                        "~4 events per user, a long tail of items bought once or twice, repeats, new items "
                        "dominating later windows)")
    g.add_argument("--n-items", type=int, default=None,
                   help="synthetic: number of items (default: the preset's, 2000 / sparse 4000)")
    g.add_argument("--n-users", type=int, default=None,
                   help="synthetic: number of users (default: the preset's, 600 / sparse 1000)")
    g.add_argument("--n-events", type=int, default=None,
                   help="synthetic: logged events (default: the preset's, 60000 impressions / sparse 4500 "
                        "purchases)")
    g.add_argument("--n-clusters", type=int, default=DataSpec.n_clusters, help="synthetic: latent clusters")
    g.add_argument("--lookalike-share", type=float, default=DataSpec.lookalike_share,
                   help="synthetic: share of clusters in look-alike pairs (content alike, liked independently)")
    g.add_argument("--image-size", type=int, default=DataSpec.image_size, help="synthetic: image side (px)")
    g.add_argument("--seed", type=int, default=0, help="random seed (synthetic data and everything downstream)")


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    """DataSpec from the flags added by `add_data_arguments` (raises ValueError naming a bad flag value).

    Args:
        args: an argparse Namespace, or anything with the same attributes, e.g. a Beam
            `options.view_as(DataOptions)`: build specs through here so a new data flag is never dropped.
    """
    preset = getattr(args, "preset", None) or "default"
    sizes = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else PRESET_SIZES[preset][k])
             for k in ("n_items", "n_users", "n_events")}
    return DataSpec(dataset=args.dataset, data=args.data, items=args.items, interactions=args.interactions,
                    mapping=args.mapping, column_map=tuple(args.column_map or ()), id_map_dir=args.id_map_dir,
                    require_image=bool(args.require_image), validate_images=args.validate_images,
                    n_items=sizes["n_items"], n_users=sizes["n_users"], n_events=sizes["n_events"],
                    n_clusters=args.n_clusters, preset=preset,
                    lookalike_share=args.lookalike_share, image_size=args.image_size, seed=args.seed,
                    max_bad_fraction=args.max_bad_fraction,
                    now=None if getattr(args, "now", None) is None else parse_time(args.now),
                    max_future=parse_duration(DEFAULT_MAX_FUTURE_S if getattr(args, "max_future", None) is None
                                              else args.max_future))
