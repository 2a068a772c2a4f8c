"""`qarm align`: mine behaviour pairs, align the item encoder, evaluate it against the unaligned one.

    qarm align --dataset movielens --data ../shared/data/movielens --require-image --align-mode side --out runs/a --json

One protocol, as the cascade job: the time split (--split, --valid-frac, --test-frac, ...) is applied first; pairs
are mined on its train portion only (the miner's later train-portion pairs are the validation pairs); next-item
retrieval on the *validation window* judges every epoch against step 0 (the unaligned embedding the residual
starts from) and the weights that ship are step 0's when no epoch beats it (the never-worse gate,
``align_result.json`` "alignment"); the *test window*'s next-item figures of both embeddings are reported.

Writes into --out: checkpoints/ (the aligned encoder, `load_encoder(out)`), side_cache/ (side modes),
item_embeddings.parquet and item_embeddings_unaligned.parquet (feature-store table format; side mode also
item_embeddings_text.parquet / item_embeddings_image.parquet, all from the one backbone pass), pairs_train.parquet,
pairs_valid.parquet, valid_queries.parquet and align_result.json (everything printed, plus the configs).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.config.align_study import EPOCHS_BY_MODE as DEFAULT_EPOCHS
from pipelines.config.align_study import AlignStudyConfig as CONFIG_TREE  # noqa: F401 (the dispatcher's flags)
from pipelines.encoder.alignment import gate_line
from pipelines.encoder.config import EncoderConfig, catalog_has_images

log = logging.getLogger(__name__)




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Besides the config tree's flags: where the run goes."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, embeddings, result)")


def encoder_config_from_args(args) -> EncoderConfig:
    overrides = {"embed_dim": args.embed_dim, "seed": args.seed}
    for flag, field in (("text_model", "text"), ("vision_model", "vision"), ("vision_weights", "vision_weights"),
                        ("encoder_image_size", "image_size"), ("image_grid", "image_grid"),
                        ("max_text_tokens", "max_text_tokens")):
        value = getattr(args, flag)
        if value is not None:
            overrides[field] = value
    if args.vision_model is not None and args.vision_weights is None:
        overrides["vision_weights"] = None  # the named config's weights belong to its own vision model
    return EncoderConfig.named(args.encoder, **overrides)


def cap_items(dataset, max_items: int):
    """The ``max_items`` items with most positive interactions, and only the interactions on them."""
    inter = dataset.interactions
    pos = inter[inter["label"] > 0.5]
    counts = pos["item_id"].value_counts()
    keep = set(counts.index[:max_items].tolist())
    items = dataset.items[dataset.items["item_id"].isin(keep)].reset_index(drop=True)
    return SimpleNamespace(items=items, interactions=inter[inter["item_id"].isin(keep)].reset_index(drop=True),
                           image_root=dataset.image_root)


def _write_embeddings(path: Path, item_ids: np.ndarray, emb: np.ndarray) -> None:
    from feature_store.tables import write_embeddings
    write_embeddings(path, item_ids, emb)


def _write_pairs(path: Path, pairs: pd.DataFrame) -> None:
    from feature_store.io import atomic_write_parquet
    atomic_write_parquet(path, pa.Table.from_pandas(pairs, preserve_index=False))


def _protocol(dataset, args):
    """(train-portion interactions, validation-window queries, test-window queries, SplitConfig)."""
    from feature_store.split import split_from_args, split_labels
    from pipelines.encoder.retrieval_eval import next_item_queries

    split = split_from_args(args)
    inter = dataset.interactions
    part = split_labels(inter, split)
    positive = (inter["label"] >= 0.5).to_numpy()
    queries = {w: next_item_queries(inter[positive], (part == code)[positive]) for w, code in (("valid", 1),
                                                                                             ("test", 2))}
    return inter[part == 0].reset_index(drop=True), queries["valid"], queries["test"], split


def _embed_both(args, result, dataset, enc_cfg, catalog, align_cfg):
    """(aligned (ids, emb), unaligned (ids, emb), text / image tables, modality stats): the unaligned embedding
    is the frozen MLLM through the trained model's own base map (step 0 of the residual)."""
    from pipelines.encoder.alignment import embed_with_cache
    from pipelines.encoder.embed_catalog import embed_catalog
    from pipelines.encoder.model_io import base_map_of, build_for_mode
    from pipelines.encoder.onepass import embed_from_cache

    if args.align_mode == "side":  # every embedding from the one backbone pass (the cache)
        tables = embed_from_cache(result.encoder, result.cache, unaligned_seed=args.unaligned_seed,
                                  progress=align_cfg.progress)
        return tables["aligned"], tables["unaligned"], {k: v for k, v in tables.items() if k in ("text", "image")}, \
            result.cache.stats
    unaligned = build_for_mode("unaligned", enc_cfg, base=base_map_of(result.encoder)).to(args.device)
    ids_u, emb_u, _ = embed_catalog(unaligned, dataset, args.eval_batch_size, catalog=catalog)
    if result.cache is not None:  # side-towers: aligned from the cache, unaligned needs the MLLM pass
        return embed_with_cache(result.encoder, result.cache), (ids_u, emb_u), {}, result.cache.stats
    ids, emb, modality = embed_catalog(result.encoder, dataset, args.eval_batch_size, catalog=catalog)
    return (ids, emb), (ids_u, emb_u), {}, modality


def run(args: argparse.Namespace) -> dict:
    import torch

    from feature_store.io import atomic_write_json
    from pipelines.data import load_dataset
    from pipelines.beam.data_flags import data_spec_from_args
    from pipelines.encoder.adapters import AdapterConfig
    from pipelines.encoder.alignment import AlignConfig, train_alignment
    from pipelines.encoder.retrieval_eval import next_item_recall, pair_retrieval
    from pipelines.encoder.items import ItemCatalog
    from pipelines.encoder.onepass import write_embedding_tables
    from pipelines.encoder.side import SideConfig
    from pipelines.mining.pairs import PairConfig, mine_pairs

    if args.target == "user-prompts" or args.user_prompts:
        from pipelines.jobs.align_users import run as run_user_prompts
        return run_user_prompts(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t_start = time.perf_counter()
    dataset = load_dataset(data_spec_from_args(args))
    if args.max_items:
        dataset = cap_items(dataset, args.max_items)
    enc_cfg = encoder_config_from_args(args).for_catalog(catalog_has_images(dataset.items))  # else no vision
    train_part, valid_queries, test_queries, split = _protocol(dataset, args)
    pair_cfg = PairConfig(swing_top_n=args.swing_top_n, min_support=args.min_support,
                          heldout_frac=args.heldout_frac, seed=args.seed,
                          heldout_drop_seen=not args.keep_seen_heldout)
    pairs = mine_pairs(train_part, pair_cfg)
    align_cfg = AlignConfig(
        mode=args.align_mode, epochs=args.align_epochs or DEFAULT_EPOCHS[args.align_mode],
        batch_size=args.align_batch_size, lr=args.align_lr,
        backbone_lr_scale=args.backbone_lr_scale,
        temperature=args.align_temperature, learn_temperature=args.learn_temperature, mask=args.mask,
        patience=args.patience, seed=args.seed, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
        sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()), save_every=args.save_every,
        resume=not args.no_resume, adapter=AdapterConfig(reduction=args.adapter_reduction),
        side=SideConfig(width=args.side_width, layer_stride=args.side_layer_stride, token_states=args.token_states),
        num_threads=args.torch_threads, device=args.device, cache_batch_size=args.eval_batch_size,
        base_map=args.unaligned_map, unaligned_seed=args.unaligned_seed, gate_z=args.align_gate_z)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Side modes read each image once (the cache build); the other modes re-read them every epoch.
    catalog = ItemCatalog.from_dataset(dataset, enc_cfg, cache_images=args.align_mode not in ("side", "side-towers"))
    result = train_alignment(enc_cfg, dataset, pairs.train, align_cfg, out, init_checkpoint=args.init_encoder,
                             catalog=catalog, valid_pairs=pairs.heldout, valid_queries=valid_queries)

    t0 = time.perf_counter()
    (ids, emb), (ids_u, emb_u), extra_tables, modality = _embed_both(args, result, dataset, enc_cfg, catalog,
                                                                     align_cfg)
    evals = {}
    for name, (i, e) in (("aligned", (ids, emb)), ("unaligned", (ids_u, emb_u))):
        evals[name] = {"valid_pairs": pair_retrieval(i, e, pairs.heldout) if len(pairs.heldout) else None,
                       "next_item_valid": next_item_recall(i, e, valid_queries, k=(10, 50)),
                       "next_item_test": next_item_recall(i, e, test_queries, k=(10, 50))}
    eval_seconds = time.perf_counter() - t0
    _write_embeddings(out / "item_embeddings.parquet", ids, emb)
    _write_embeddings(out / "item_embeddings_unaligned.parquet", ids_u, emb_u)
    write_embedding_tables(extra_tables, out)
    _write_pairs(out / "pairs_train.parquet", pairs.train)
    _write_pairs(out / "pairs_valid.parquet", pairs.heldout)
    _write_pairs(out / "valid_queries.parquet", valid_queries)
    report = _report(args, dataset, result, pairs, evals, modality, eval_seconds, t_start, out)
    atomic_write_json(out / "align_result.json", {**report, "config": {
        "encoder": enc_cfg.to_dict(), "align": align_cfg.to_dict(), "pairs": pair_cfg.to_dict(),
        "split": dataclasses.asdict(split), "unaligned_seed": args.unaligned_seed, "max_items": args.max_items}})
    return report


def _report(args, dataset, result, pairs, evals, modality, eval_seconds, t_start, out) -> dict:
    summary = result.summary()
    flat = {}
    for name, ev in evals.items():
        for window in ("next_item_valid", "next_item_test"):
            flat[f"{window}_recall@10_{name}"] = ev[window]["recall@10"]
            flat[f"{window}_mrr_{name}"] = ev[window]["mrr"]
        pairs_eval = ev["valid_pairs"] or {}
        for key in ("recall@10", "recall@50", "mrr"):
            flat[f"{key}_{name}"] = pairs_eval.get(key)
    return {
        "mode": args.align_mode, "dataset": args.dataset, "n_items": int(len(dataset.items)),
        "n_pairs_train": int(summary["pairs_used"]), "n_pairs_heldout": int(len(pairs.heldout)),
        "n_valid_queries": evals["aligned"]["next_item_valid"]["n_queries"],
        "n_test_queries": evals["aligned"]["next_item_test"]["n_queries"],
        "alignment": result.alignment, "alignment_line": gate_line(result.alignment),
        "valid": summary["valid"], "best_epoch": summary["best_epoch"],
        "stopped_early": summary["stopped_early"], "temperature": summary["temperature"],
        "cache_bytes_per_item": result.cache.bytes_per_item() if result.cache is not None else None,
        **flat,
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "trainable_share": summary["trainable_params"] / max(1, summary["total_params"]),
        "seconds_per_epoch": summary["seconds_per_epoch"], "cache_seconds": summary["cache_seconds"],
        "peak_rss_mb": summary["peak_memory_mb"] if args.device == "cpu" else None,
        "peak_memory_mb": summary["peak_memory_mb"],
        "steps": summary["steps"], "epochs": summary["epochs"], "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"], "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start, "modality": modality,
        "pairs": {**pairs.stats, **{k: v for k, v in summary.items() if k.startswith("pairs_")}},
        "checkpoint": summary["checkpoint"], "out": str(out),
    }
