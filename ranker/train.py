"""Train the ranker: single process, or `torchrun --nproc_per_node=N -m ranker.train ...` with
DistributedModelParallel (gloo + table_wise on CPU, nccl on GPU).

Embedding tables are updated by Adagrad applied in backward (TorchRec's fused optimizer once sharded);
dense parameters by Adam. Early stopping on validation AUC restores the best epoch before the test split
is scored. Checkpoints (ranker.pt) load with `torch.load(..., weights_only=True)`; `resume=True`
continues from the last one: it holds the best epoch's and the latest epoch's weights, both optimizers'
state (the embedding Adagrad too) and the RNG state, and the data order is a function of (seed, epoch), so
resuming after epoch k reproduces the uninterrupted run.

Example:
    >>> result = fit(data, items, RankerConfig(features="vq+rq", epochs=3), out_dir=Path("runs/r1"))
    >>> result["test"]["auc"], result["best_epoch"]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ranker.batch import build_batch
from ranker.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, load_sparse_optimizer_state, read_checkpoint,
                               save_checkpoint, sparse_optimizer_state)
from ranker.config import RankerConfig
from ranker.data import PreparedData
from ranker.distributed import (DistContext, all_gather_rows, full_state_dict, load_full_state, local_snapshot,
                                restore_snapshot, setup_distributed, shard_model)
from ranker.examples import Examples
from ranker.features import FeatureSchema, ItemFeatures, build_schema
from ranker.metrics import format_metric, ranking_metrics
from ranker.content_init import init_from_content
from ranker.model import RankerModel, RankerTrain, embedding_tables

log = logging.getLogger(__name__)
# training-length settings may change on resume (e.g. train 2 more epochs); everything else must match
_RESUMABLE_KEYS = {"epochs", "max_steps", "patience", "num_threads", "eval_batch_size"}


def build_train_model(cfg: RankerConfig, schema: FeatureSchema, items: ItemFeatures) -> RankerTrain:
    """Unsharded RankerTrain with deterministic init; code tables start from content unless code_init="random"
    (`.content_init` records which tables did: ranker.content_init.init_from_content)."""
    torch.manual_seed(cfg.seed)
    model = RankerModel(schema, cfg)
    report = init_from_content(model, items, std=cfg.content_std, seed=cfg.seed) if cfg.code_init == "content" else None
    train_model = RankerTrain(model)
    train_model.content_init = report
    return train_model


def attach_optimizers(train_model: torch.nn.Module, cfg: RankerConfig, ctx: DistContext):
    """Adagrad in backward on the tables; shard under torchrun; Adam on the rest.

    Returns (module to call, dense optimizer)."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    tables = list(embedding_tables(train_model).values())
    apply_optimizer_in_backward(torch.optim.Adagrad, tables, {"lr": cfg.lr_sparse})
    module = train_model
    if ctx.distributed:
        full = train_model.state_dict()
        module = shard_model(train_model, cfg.sharding, ctx)
        load_full_state(module, full)  # same init on every rank, whatever the planner placed where
    dense = [p for _, p in in_backward_optimizer_filter(module.named_parameters())]
    return module, torch.optim.Adam(dense, lr=cfg.lr_dense, weight_decay=cfg.weight_decay)


def _local_part(idx: np.ndarray, ctx: DistContext) -> np.ndarray:
    return np.array_split(idx, ctx.world_size)[ctx.rank]


@torch.no_grad()
def score(module: torch.nn.Module, examples: Examples, schema: FeatureSchema, items: ItemFeatures,
          batch_size: int, ctx: DistContext = DistContext()) -> np.ndarray:
    """Logits (n,) for every example, in order. Under torchrun every rank scores a slice of each chunk."""
    module.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        idx = np.arange(start, min(start + batch_size, len(examples)))
        local = _local_part(idx, ctx)
        batch = build_batch(examples.take(local), schema, items).to(ctx.device)
        _, (_, logits, _) = module(batch)
        sizes = [len(p) for p in np.array_split(idx, ctx.world_size)]
        out.append(all_gather_rows(logits.float().cpu(), sizes, ctx))
    module.train()
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def evaluate(module: torch.nn.Module, examples: Examples, schema: FeatureSchema, items: ItemFeatures,
             batch_size: int = 4096, ctx: DistContext = DistContext()) -> dict:
    """AUC / GAUC / logloss on `examples` (callable on a loaded checkpoint, e.g. by the retraining job).

    `module` is a RankerTrain (or a RankerModel, which is wrapped)."""
    if isinstance(module, RankerModel):
        module = RankerTrain(module)
    logits = score(module, examples, schema, items, batch_size, ctx)
    return ranking_metrics(examples.user_id, examples.label, logits)


def selection_score(valid: dict) -> float:
    """What early stopping maximises: validation AUC in [0, 1]; where the validation window cannot define an AUC (one
    class, the same for every epoch, so epochs stay comparable) 1 / (1 + logloss) - 1, a monotone map of the logloss
    into (-1, 0] (above the initial best of -1, below any AUC)."""
    if valid.get("auc") is not None:
        return float(valid["auc"])
    return 1.0 / (1.0 + float(valid["logloss"])) - 1.0 if valid.get("logloss") is not None else -1.0


def _steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    steps = math.ceil(n / batch_size)
    if steps and n - (steps - 1) * batch_size < world:  # a last batch too small to give every rank a sample
        steps -= 1
    return steps


def fit(data: PreparedData, items: ItemFeatures, cfg: RankerConfig, out_dir: Path | None = None,
        resume: bool = False, ctx: DistContext | None = None, progress: bool = True,
        return_test_scores: bool = False, score_examples: Examples | None = None) -> dict:
    """Train one ranker, early-stop on validation AUC, score the test split.

    Args:
        data: examples from `ranker.data.prepare_examples` (history_len must match cfg.history_len).
        items: ItemFeatures of the feature set's code table / frozen embeddings (same catalog as data).
        cfg: the run's config.
        out_dir: where ranker.pt and result.json go (rank 0); None keeps everything in memory.
        resume: continue from out_dir/ranker.pt.
        ctx: distributed context (default: from the environment).
        progress: tqdm bars on rank 0.
        return_test_scores: add "test_scores", the (N_test,) logits of the restored best model (for paired
            bootstrap intervals; not written to result.json).
        score_examples: also score these (e.g. retrieved candidates to re-rank): "extra_scores" (M,) logits.
    Returns:
        dict with config, schema tables, per-epoch validation metrics, best_epoch, valid / test metrics,
        unknown-item counts, throughput, checkpoint path.
    """
    ctx = ctx or setup_distributed()
    torch.set_num_threads(cfg.num_threads)
    if data.train.hist.shape[1] != cfg.history_len:
        raise ValueError(f"examples were built with history_len {data.train.hist.shape[1]}, config says {cfg.history_len}")
    if not np.array_equal(items.item_ids, data.catalog_ids):
        raise ValueError("ItemFeatures and examples use different item catalogs")
    schema = build_schema(cfg, data.users.n_rows, items)
    train_model = build_train_model(cfg, schema, items)
    start_epoch, history, best = 0, [], {"auc": -1.0, "epoch": -1}
    steps_before = 0  # optimizer steps of the epochs a resumed run already has (max_steps counts them)
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir else None
    if out_dir is not None and ctx.is_main and not resume:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    ckpt = None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        # through the config class, so keys added since (at their defaults) and former names compare as equal
        saved = json.loads(json.dumps(RankerConfig.from_dict(ckpt["meta"]["config"]).to_dict()))
        wanted = json.loads(json.dumps(cfg.to_dict()))
        differ = sorted(k for k in set(saved) | set(wanted)
                        if k not in _RESUMABLE_KEYS and saved.get(k) != wanted.get(k))
        if differ:
            raise ValueError(f"--resume: {ckpt_path} was trained with a different config ({', '.join(differ)})")
        if ckpt["meta"].get("checkpoint_format", 1) < CHECKPOINT_FORMAT and ctx.is_main:
            log.warning("--resume: %s predates resumable checkpoints (no latest weights, embedding optimizer or "
                        "RNG state): training continues, but will not match an uninterrupted run", ckpt_path)
        train_model.load_state_dict(ckpt["last"])  # the latest epoch's weights ("model" holds the best one)
        start_epoch = ckpt["meta"]["epoch"] + 1
        history, best = ckpt["meta"]["history"], ckpt["meta"]["best"]
        steps_before = int(ckpt["meta"].get("steps_total", 0))
    module, dense_opt = attach_optimizers(train_model, cfg, ctx)
    best_full = None  # rank 0: full weights of the best epoch, written as the checkpoint's "model"
    if ckpt is not None:
        if ckpt["dense_optimizer"]:
            dense_opt.load_state_dict(ckpt["dense_optimizer"])
        load_sparse_optimizer_state(module, ckpt["sparse_optimizer"])
        _set_rng_state(ckpt["rng"], ctx)
        load_full_state(module, ckpt["model"])   # the best epoch so far, as this rank's snapshot ...
        best_snapshot = local_snapshot(module)
        load_full_state(module, ckpt["last"])    # ... then back to where training stopped
        best_full = ckpt["model"] if ctx.is_main else None
    else:
        best_snapshot = local_snapshot(module)
        if ckpt_path is not None:  # the best until an epoch improves on it (as best_snapshot)
            best_full = full_state_dict(module, ctx)
    steps = _steps_per_epoch(len(data.train), cfg.batch_size, ctx.world_size)
    total_steps, samples, train_seconds = 0, 0, 0.0
    stopped_early = False
    module.train()
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps and steps_before + total_steps >= cfg.max_steps:
            break
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data.train))
        bar = tqdm(range(steps), desc=f"{cfg.features} epoch {epoch}", disable=not (progress and ctx.is_main),
                   leave=False, mininterval=2.0)
        losses, t0 = [], time.perf_counter()
        for step in bar:
            idx = _local_part(order[step * cfg.batch_size:(step + 1) * cfg.batch_size], ctx)
            batch = build_batch(data.train.take(idx), schema, items).to(ctx.device)
            loss, _ = module(batch)
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            losses.append(loss.item())
            total_steps += 1
            samples += len(idx) * ctx.world_size
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if cfg.max_steps and steps_before + total_steps >= cfg.max_steps:
                break
        train_seconds += time.perf_counter() - t0
        valid = evaluate(module, data.valid, schema, items, cfg.eval_batch_size, ctx)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  **{f"valid_{k}": v for k, v in valid.items() if k in ("auc", "gauc", "logloss")}}
        history.append(record)
        if ctx.is_main:
            log.info("%s epoch %d: loss %.4f valid auc %s gauc %s", cfg.features, epoch, record["train_loss"],
                     format_metric(valid["auc"]), format_metric(valid["gauc"]))
        improved = selection_score(valid) > best["auc"]
        if improved:
            best = {"auc": selection_score(valid), "epoch": epoch}
            best_snapshot = local_snapshot(module)
        if ckpt_path is not None:
            # every rank joins the gathers; rank 0 writes: best weights, latest weights, both optimizers, RNG
            state = full_state_dict(module, ctx)
            sparse = sparse_optimizer_state(module, ctx)
            rng = _rng_state(ctx)
            if ctx.is_main:
                if improved:
                    best_full = state
                meta = {"config": cfg.to_dict(), "epoch": epoch, "history": history, "best": best,
                        "tables": _table_summary(schema), "restored_best": True,
                        "steps_total": steps_before + total_steps, "checkpoint_format": CHECKPOINT_FORMAT}
                save_checkpoint(ckpt_path, best_full, dense_opt.state_dict(), meta, last_state=state,
                                sparse_optimizer_state=sparse, rng_state=rng)
        if cfg.max_steps and steps_before + total_steps >= cfg.max_steps:
            break
        if cfg.patience and epoch - best["epoch"] >= cfg.patience:
            stopped_early = True
            break
    # the checkpoint's "model" already holds the best epoch's weights, so loading it reproduces `test`
    restore_snapshot(module, best_snapshot)
    valid = evaluate(module, data.valid, schema, items, cfg.eval_batch_size, ctx)
    test = evaluate(module, data.test, schema, items, cfg.eval_batch_size, ctx)
    result = {
        "features": cfg.features,
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "tables": _table_summary(schema),
        "content_init": train_model.content_init,
        "history": history,
        "best_epoch": best["epoch"],
        "stopped_early": stopped_early,
        "steps": total_steps,
        "train_samples_per_s": samples / train_seconds if train_seconds > 0 else None,
        "valid": valid,
        "test": test,
        "test_by_popularity": metrics_by_popularity(module, data, schema, items, cfg.eval_batch_size, ctx),
        "coverage": coverage_report(data, items),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
    }
    if out_dir is not None and ctx.is_main:
        from feature_store.io import atomic_write_json

        atomic_write_json(Path(out_dir) / "result.json", result)
    if return_test_scores:
        result["test_scores"] = score(module, data.test, schema, items, cfg.eval_batch_size, ctx)
    if score_examples is not None:
        result["extra_scores"] = score(module, score_examples, schema, items, cfg.eval_batch_size, ctx)
    return result


def _rng_state(ctx: DistContext) -> dict | None:
    """Every rank's torch RNG state (dropout draws from it), stacked on rank 0: {"torch": (world, S) uint8, "cuda":
    (world, S') uint8 on GPU}. Every rank must call it."""
    local = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(ctx.device).cpu()
    gathered = [local]
    if ctx.distributed:
        import torch.distributed as dist

        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, local)
    return {k: torch.stack([g[k] for g in gathered]) for k in local} if ctx.is_main else None


def _set_rng_state(state: dict, ctx: DistContext) -> None:
    if not state:
        return
    rows = state["torch"]
    row = ctx.rank if rows.shape[0] == ctx.world_size else 0
    if rows.shape[0] != ctx.world_size and ctx.is_main:
        log.warning("--resume: checkpoint RNG state is from %d rank(s), this run has %d: dropout draws will differ "
                    "from an uninterrupted run", rows.shape[0], ctx.world_size)
    torch.set_rng_state(rows[row].clone())
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][min(row, state["cuda"].shape[0] - 1)].clone(), ctx.device)


def _table_summary(schema: FeatureSchema) -> dict:
    out = {}
    for f in schema.features:
        out.setdefault(f.table, {"rows": f.rows, "features": []})["features"].append(f.name)
    return out


POPULARITY_BUCKETS = ((0, 5, "<5"), (5, 20, "5-19"), (20, None, ">=20"))


def metrics_by_popularity(module, data: PreparedData, schema: FeatureSchema, items: ItemFeatures,
                          batch_size: int, ctx: DistContext = DistContext()) -> dict:
    """Test AUC / GAUC per bucket of the target item's training positives (where do codes help: tail items?)."""
    logits = score(module, data.test, schema, items, batch_size, ctx)
    pop = data.popularity[data.test.item]
    out = {}
    for lo, hi, name in POPULARITY_BUCKETS:
        mask = (pop >= lo) & (pop < hi if hi is not None else True)
        if mask.sum() == 0:
            continue
        m = ranking_metrics(data.test.user_id[mask], data.test.label[mask], logits[mask])
        out[name] = {"auc": m["auc"], "gauc": m["gauc"], "n": m["n"]}
    return out


def coverage_report(data: PreparedData, items: ItemFeatures) -> dict:
    """How many test targets / history items have no codes (they used the reserved unknown row)."""
    return {"test_targets": items.coverage(data.test.item), "test_history": items.coverage(data.test.hist),
            "train_targets": items.coverage(data.train.item)}


def train_on_tables(interactions, catalog_ids: np.ndarray, store_root: Path, version_id: str | None,
                    cfg: RankerConfig, split, out_dir: Path | None = None, resume: bool = False,
                    ctx: DistContext | None = None, allow_protocol_mismatch: bool = False) -> dict:
    """Examples from contract interactions + a store version's tables, then :func:`fit`.

    Args:
        interactions: DataFrame user_id, item_id, ts, label (the contract).
        catalog_ids: (N,) item vocabulary.
        store_root / version_id: the feature-store version (None: CURRENT).
        cfg: RankerConfig; split: feature_store.split.SplitConfig.
        allow_protocol_mismatch: train on a version built under another split protocol (reported).
    Returns:
        fit()'s result plus "store_version", "protocol_problems" and "data" (example counts and shares).
    Raises:
        ProtocolMismatchError naming both protocols, unless allow_protocol_mismatch.
    """
    from feature_store import FeatureStore
    from feature_store.split import check_protocol
    from ranker.data import items_for, prepare_examples, store_items

    version = FeatureStore(store_root).read(version_id)
    problems = check_protocol(version.manifest.get("protocol"), interactions, split, version.id,
                              allow_protocol_mismatch)
    data = prepare_examples(interactions, catalog_ids, cfg.history_len, split, cfg.negatives)
    items = store_items(version, catalog_ids)
    result = fit(data, items_for(items, cfg.features), cfg, out_dir=out_dir, resume=resume, ctx=ctx)
    return {"store_version": version.id, "protocol_problems": problems,
            "data": {"items": int(len(catalog_ids)), "interactions": int(len(interactions)), **data.info}, **result}


def main(argv: list | None = None) -> int:
    """torchrun entry over contract tables (as `qarm data export` writes them)::

        torchrun --nproc_per_node=2 -m ranker.train --items DIR/items.parquet --interactions DIR/interactions.parquet \
            --store STORE --features vq+rq --out runs/ranker
    """
    from feature_store.contract import read_interactions, read_item_ids
    from ranker.args import add_ranker_arguments, config_from_args, split_from_args

    parser = argparse.ArgumentParser(prog="python -m ranker.train", description="train the TorchRec ranker")
    parser.add_argument("--items", type=Path, required=True, help="contract items Parquet (item_id, ...)")
    parser.add_argument("--interactions", type=Path, required=True,
                        help="contract interactions Parquet (user_id, item_id, ts, label)")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    add_ranker_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="folder for ranker.pt and result.json")
    parser.add_argument("--resume", action="store_true", help="continue from --out/ranker.pt")
    args = parser.parse_args(argv)
    ctx = setup_distributed()
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{ctx.rank} %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = train_on_tables(read_interactions(args.interactions), read_item_ids(args.items), args.store,
                                 args.version, config_from_args(args), split_from_args(args), out_dir=args.out,
                                 resume=args.resume, ctx=ctx, allow_protocol_mismatch=args.allow_protocol_mismatch)
    finally:
        if ctx.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ctx.is_main:
        from feature_store.io import dumps_strict

        print(dumps_strict({"command": "train-ranker", "ok": True, **result}, default=str), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
