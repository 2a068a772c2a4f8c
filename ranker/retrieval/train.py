"""`python -m ranker.retrieval.train`: train one retrieval model from contract tables and a store version.

Reads contract Parquet (or CSV) tables, not the source loaders, so it runs wherever the tables are:

    python -m ranker.retrieval.train --interactions data/interactions.parquet [--items data/items.parquet] \
        --store DIR --model student --kd all --seed 0 --out runs/retrieval
    torchrun --nproc_per_node=2 -m ranker.retrieval.train ...   # gloo data parallel: each rank trains on its
                                                                # slice of every batch, gradients averaged

Writes into --out (rank 0, atomically): result.json (config, split, version, valid and test Recall@K /
NDCG@K) and, for the student, student.safetensors (its tables + user_ids / item_ids). Exit 1 with a message on
bad input (file, column, row).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("ranker.retrieval.train")
CONTRACT = {"user_id": "int64", "item_id": "int64", "ts": "int64", "label": "float32"}


def read_table(path: Path, columns) -> pd.DataFrame:
    """A contract table (Parquet, a folder of Parquet parts, or CSV) with the given columns, typed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (have {list(df.columns)})")
    out = {}
    for col in columns:
        s = df[col]
        if s.isna().any():
            row = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise ValueError(f"{path}: column {col!r} row {row}: null value")
        try:
            out[col] = s.astype(CONTRACT.get(col, "int64"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: column {col!r}: cannot be read as {CONTRACT.get(col, 'int64')} ({exc})") from None
    return pd.DataFrame(out)


def build_parser() -> argparse.ArgumentParser:
    from ranker.retrieval.args import add_retrieval_arguments

    p = argparse.ArgumentParser(prog="python -m ranker.retrieval.train", description=__doc__.split("\n")[0])
    p.add_argument("--interactions", type=Path, required=True, help="contract interactions table")
    p.add_argument("--items", type=Path, default=None, help="catalog table (item_id); default: the store's items")
    add_retrieval_arguments(p)
    p.add_argument("--model", choices=("student", "teacher"), default="student")
    p.add_argument("--kd", default="all", help="student KD parts: none | listwise | modality | prompt | all")
    p.add_argument("--use-codes", action="store_true", help="student adds the item's RQ code tables")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    return p


def main(argv=None) -> int:
    import torch

    from feature_store import FeatureStore
    from feature_store.io import atomic_write_bytes, atomic_write_json
    from feature_store.split import split_from_args
    from ranker.retrieval.args import config_from_args, distill_from_args
    from feature_store.split import check_protocol
    from ranker.retrieval.data import load_item_features, prepare_retrieval_data
    from ranker.retrieval.fit import evaluate, fit_student, fit_teacher

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, args.torch_threads))
    logging.getLogger("faiss").setLevel(logging.WARNING)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    try:
        split = split_from_args(args)
        from ranker.args import require_store

        version = FeatureStore(require_store(args)).read(args.version)
        inter = read_table(args.interactions, ("user_id", "item_id", "ts", "label"))
        check_protocol(version.manifest.get("protocol"), inter, split, version.id, args.allow_protocol_mismatch)
        if args.items is not None:
            catalog = read_table(args.items, ("item_id",))["item_id"].to_numpy()
        else:
            catalog = version.embeddings("item_embeddings")[0] if version.has("item_embeddings") else \
                np.unique(inter["item_id"].to_numpy())
        data = prepare_retrieval_data(inter, catalog, split)
        feats = load_item_features(version, data.item_ids)
        cfg = config_from_args(args).replace(use_codes=bool(args.use_codes))
        distill = distill_from_args(args, args.kd if args.model == "student" else "none")
        teacher = fit_teacher(data, feats, cfg) if (args.model == "teacher" or distill.any) else None
        res = teacher if args.model == "teacher" else fit_student(data, cfg, distill, teacher=teacher, feats=feats)
        test = evaluate(res.model, data, "test", args.k)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"ranker.retrieval.train: error: {exc}", file=sys.stderr)
        return 1
    result = {"model": args.model, "store_version": version.id, "world_size": world, "config": res.config,
              "split": data.info["split"], "data": data.info, "valid": res.valid, "best_epoch": res.best_epoch,
              "test": {m: test[m] for m in test if "@" in m}, "params": res.params}
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.model == "student":
            from safetensors.torch import save

            sd = {k: v.detach().contiguous() for k, v in res.model.state_dict().items()}
            sd["user_ids"], sd["item_ids"] = torch.as_tensor(data.user_ids), torch.as_tensor(data.item_ids)
            atomic_write_bytes(out / "student.safetensors", save(sd))
        atomic_write_json(out / "result.json", result)
        print(json.dumps(result) if args.json else f"test {result['test']}  ->  {out / 'result.json'}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
