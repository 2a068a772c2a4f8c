"""`qarm retrieve`: train the retrieval model on a version (train window, epochs chosen on valid) and write the
top-K candidates of every user of a window, atomically, as Parquet (user_id, item_id, rank, score).

    qarm retrieve --store DIR --dataset movielens --data ../shared/data/movielens --require-image \
        --k 100 --window test --kd all --out runs/retrieve/test_top100.parquet --json

The default model is the student distilled with every KD part (--kd all); --kd none gives the plain student,
--model teacher the multimodal teacher. A JSON sidecar (FILE.json) records the config, version and the window's
Recall@K / NDCG@K; --save-model DIR also writes the student's tables (safetensors + config JSON), which is the
collaborative item similarity (ranker.retrieval.fit.student_item_vectors) for trigger pairs.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


from pipelines.config.retrieval import RetrieveConfig as CONFIG_TREE  # noqa: E402,F401 (the dispatcher's flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Besides the config tree's flags (data, split, source, retrieval, distill, candidates): the outputs."""
    parser.add_argument("--out", type=Path, required=True, help="candidates Parquet file")
    parser.add_argument("--save-model", type=Path, default=None, help="folder for the student's tables")


def run(args: argparse.Namespace) -> dict:
    import json

    import numpy as np
    import pyarrow as pa

    from feature_store.io import atomic_write_json, atomic_write_parquet
    from pipelines.jobs.distill import load_inputs
    from ranker.retrieval.args import config_from_args, distill_from_args
    from ranker.retrieval.cascade import relevant_from_data, rerank_candidates, retrieve_candidates
    from ranker.retrieval.fit import evaluate, fit_student, fit_teacher

    if args.k <= 0:
        raise ValueError(f"--k must be > 0, got {args.k}")
    data, feats, name = load_inputs(args)
    cfg = config_from_args(args)
    distill = distill_from_args(args, args.kd if args.model == "student" else "none")
    teacher = fit_teacher(data, feats, cfg) if (args.model == "teacher" or distill.any) else None
    res = teacher if args.model == "teacher" else fit_student(data, cfg, distill, teacher=teacher, feats=feats)
    cands = retrieve_candidates(res.model, data, args.window, args.k)
    metrics = {}
    if args.window != "train":
        ev = evaluate(res.model, data, args.window, min(20, args.k))
        metrics = {m: ev[m] for m in ev if "@" in m}
        metrics["users_scored"] = ev["n_users"]
        metrics[f"candidate_recall@{args.k}"] = rerank_candidates(
            cands, lambda u, i: np.zeros(len(u)), relevant_from_data(data, args.window), k=min(20, args.k)
        )["candidate_recall"] if len(cands) else None
    table = pa.Table.from_pandas(cands, preserve_index=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(out, table)
    meta = {"store": str(args.store), "store_version": feats.version_id, "dataset": name, "window": args.window,
            "k": args.k, "model": args.model, "config": res.config, "split": data.info["split"],
            "users": int(cands["user_id"].nunique()) if len(cands) else 0, "rows": int(len(cands)),
            "valid": res.valid, "best_epoch": res.best_epoch, "metrics": metrics}
    atomic_write_json(out.with_suffix(out.suffix + ".json"), meta)
    if args.save_model is not None and args.model == "student":
        save_student(res, data, args.save_model)
        meta["model_dir"] = str(args.save_model)
    log.info("wrote %d candidates for %d users to %s", len(cands), meta["users"], out)
    return {**{k: meta[k] for k in ("store_version", "dataset", "window", "k", "model", "users", "rows", "metrics",
                                    "best_epoch")}, "out": str(out), "config": json.loads(json.dumps(res.config))}


def save_student(res, data, out_dir: Path) -> None:
    """The student's tables (safetensors: user, item (N, d), user_ids, item_ids) + config.json, atomically."""
    from safetensors.torch import save

    from feature_store.io import atomic_write_bytes, atomic_write_json
    import torch

    sd = {k: v.detach().contiguous() for k, v in res.model.state_dict().items()}
    sd["user_ids"] = torch.as_tensor(data.user_ids)
    sd["item_ids"] = torch.as_tensor(data.item_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "student.safetensors", save(sd))
    atomic_write_json(out_dir / "config.json", {"config": res.config, "valid": res.valid, "best_epoch": res.best_epoch})
