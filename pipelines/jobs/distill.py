"""`qarm distill`: PromptMM-style retrieval distillation study on a feature-store version.

    qarm distill --store DIR --dataset movielens --data ../shared/data/movielens --require-image --seeds 3 \
        --out runs/distill --json

Rows student | student+codes | student+listwise | student+modality | student+prompt | student+all | teacher,
Recall@20 / NDCG@20 on the test window under full ranking, mean ± std over seeds (--seed, --seed+1, ...),
paired bootstrap 95% intervals vs `student`, params and top-20 serving time per 1,000 users. Writes
distill.json, distill.md and distill.png into --out (atomically). The version must have been built under the
requested split (its manifest `protocol`), unless --allow-protocol-mismatch.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


from pipelines.config.retrieval import DistillStudyConfig as CONFIG_TREE  # noqa: E402,F401 (the dispatcher's flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Besides the config tree's flags (data, split, source, retrieval, distill, study): where the report goes."""
    parser.add_argument("--out", type=Path, default=Path("runs/distill"), help="report folder")


def load_inputs(args):
    """(RetrievalData, ItemFeatures, dataset name) from the data flags, the split flags and --store."""
    import torch

    from feature_store import FeatureStore
    from pipelines.data import load_dataset
    from pipelines.beam.data_flags import data_spec_from_args
    from feature_store.split import split_from_args
    from feature_store.split import check_protocol
    from ranker.retrieval.data import load_item_features, prepare_retrieval_data

    torch.set_num_threads(max(1, args.torch_threads))
    for noisy in ("faiss", "matplotlib"):                  # third-party log noise below WARNING
        logging.getLogger(noisy).setLevel(logging.WARNING)
    split = split_from_args(args)
    from ranker.args import require_store

    version = FeatureStore(require_store(args)).read(args.version)
    ds = load_dataset(data_spec_from_args(args))
    # refuse a version built under another protocol (or trained past this split's train cut)
    check_protocol(version.manifest.get("protocol"), ds.interactions, split, version.id, args.allow_protocol_mismatch)
    data = prepare_retrieval_data(ds.interactions, ds.items["item_id"].to_numpy(), split)
    feats = load_item_features(version, data.item_ids)
    log.info("retrieval data: %s; modalities %s", data.info, {m: x.shape for m, x in feats.modalities.items()})
    return data, feats, ds.name


def run(args: argparse.Namespace) -> dict:
    from ranker.retrieval.args import config_from_args, distill_from_args
    from ranker.retrieval.report import run_distill

    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    data, feats, name = load_inputs(args)
    title = (f"PromptMM-style distillation — {name}, store version {feats.version_id}, {args.seeds} seed(s), "
             f"test window ({args.split}), full ranking")
    report = run_distill(data, feats, args.seeds, args.out, rows=rows, cfg=config_from_args(args),
                         distill=distill_from_args(args, "none"), k=args.k, title=title, n_boot=args.bootstrap,
                         extra={"dataset": name, "store": str(args.store)})
    print(report["table"])
    return {k: report[k] for k in ("store_version", "dataset", "seeds", "k", "rows", "skipped", "data",
                                   "modalities", "files")}
