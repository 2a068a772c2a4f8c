"""`qarm data stats`: load a source, validate it, print its figures and reject counts.

    qarm data stats --dataset movielens --data ../shared/data/movielens --json
    qarm data stats --dataset generic --items items.csv --interactions events.csv --mapping map.yaml \
        --rejects rejects.parquet --save-id-maps ids/
    qarm data export --dataset movielens --data ../shared/data/movielens --out ml-contract/
"""
from __future__ import annotations

import argparse
import logging

from pipelines.beam.data_flags import add_data_arguments, data_spec_from_args
from pipelines.data.loader import export_dataset, load_dataset, rejects_format, save_id_maps, write_rejects
from feature_store.split import METHODS, SplitConfig, split_labels

log = logging.getLogger(__name__)
ACTIONS = ("stats", "export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS,
                        help="stats: load, validate and summarise a data source; export: also write it in contract "
                             "form to --out (reload with --dataset generic --mapping OUT/mapping.json)")
    parser.add_argument("--out", type=str, default=None, help="export: output folder")
    add_data_arguments(parser)
    parser.add_argument("--rejects", type=str, default=None,
                        help="write the rejected records to this file, in the format its extension names (.csv, "
                             ".parquet or .jsonl), with the reason counts in <name>.summary.json beside it")
    parser.add_argument("--save-id-maps", type=str, default=None,
                        help="write the string->int id maps (generic sources with string ids) to this folder")
    parser.add_argument("--split", choices=METHODS, default=None,
                        help="also report the sizes of a time split (global / user_last_n / user_last_frac)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def run(args: argparse.Namespace) -> dict:
    if args.action == "export" and not args.out:
        raise ValueError("qarm data export needs --out DIR")
    if args.rejects:
        rejects_format(args.rejects)  # refuse a bad extension before the load, not after it
    spec = data_spec_from_args(args)
    ds = load_dataset(spec)
    result = ds.stats()
    result["fingerprint"] = ds.fingerprint()
    if args.split:
        parts = split_labels(ds.interactions, SplitConfig(method=args.split))
        inter = ds.interactions
        result["split"] = {"method": args.split}
        seen_items = set(inter.loc[parts == 0, "item_id"])
        for p, name in enumerate(("train", "valid", "test")):
            rows = inter.loc[parts == p]
            result["split"][name] = {
                "interactions": int(len(rows)), "users": int(rows["user_id"].nunique()),
                "positive_rate": round(float(rows["label"].mean()), 4) if len(rows) else 0.0,
                "items_unseen_in_train": int((~rows["item_id"].isin(seen_items)).sum()) if p else 0,
            }
    if args.rejects:
        result["rejects_file"] = str(write_rejects(ds, args.rejects))
    if args.action == "export":
        result["export"] = export_dataset(ds, args.out)
    if args.save_id_maps:
        result["id_map_files"] = [str(p) for p in save_id_maps(ds, args.save_id_maps)]
    return result
