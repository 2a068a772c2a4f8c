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
from pathlib import Path

import numpy as np
import torch

from ranker.batch import build_batch
from ranker.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, load_sparse_optimizer_state, read_checkpoint,
                               save_checkpoint, sparse_optimizer_state)
from ranker.config import RankerConfig
from ranker.data import PreparedData
from ranker.distributed import (DistContext, all_gather_rows, full_state_dict, load_full_state, local_snapshot,
                                restore_snapshot, setup_distributed, shard_model)
from ranker.examples import Examples
from ranker.features import FeatureSchema, ItemFeatures, build_schema
from ranker.loop import (Evaluation, LoopConfig, LoopRun, LoopState, Selection, Updates, fit_loop, rng_state,
                         set_rng_state)
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

    The epochs run in ranker.loop.fit_loop (:class:`_RankerTask` is the model's part, :class:`_RankerCheckpoints`
    writes ranker.pt every epoch).

    Args:
        data: examples from `ranker.data.prepare_examples` (history_len must match cfg.history_len).
        items: ItemFeatures of the feature set's code table / frozen embeddings (same catalog as data).
        cfg: the run's config.
        out_dir: where ranker.pt and result.json go (rank 0); None keeps everything in memory.
        resume: continue from out_dir/ranker.pt.
        ctx: distributed context (default: from the environment).
        progress: a progress bar on rank 0 (on a terminal).
        return_test_scores: add "test_scores", the (N_test,) logits of the restored best model (for paired
            bootstrap intervals; not written to result.json).
        score_examples: also score these (e.g. retrieved candidates to re-rank): "extra_scores" (M,) logits.
    Returns:
        dict with config, schema tables, per-epoch validation metrics, best_epoch, valid / test metrics,
        unknown-item counts, throughput, checkpoint path.
    """
    ctx = ctx or setup_distributed()
    torch.set_num_threads(cfg.num_threads)
    _check_examples(data, items, cfg)
    schema = build_schema(cfg, data.users.n_rows, items)
    train_model = build_train_model(cfg, schema, items)
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir else None
    if out_dir is not None and ctx.is_main and not resume:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint_to_resume(ckpt_path, cfg, ctx) if resume else None
    if ckpt is not None:
        train_model.load_state_dict(ckpt["last"])  # the latest epoch's weights ("model" holds the best one)
    module, dense_opt = attach_optimizers(train_model, cfg, ctx)
    state, selection, best_full = _starting_point(module, dense_opt, ckpt, cfg, ctx, ckpt_path is not None)
    task = _RankerTask(module, data, schema, items, cfg, ctx)
    writer = _RankerCheckpoints(ckpt_path, module, dense_opt, cfg, schema, ctx, best_full) if ckpt_path else None
    steps = _steps_per_epoch(len(data.train), cfg.batch_size, ctx.world_size)
    loop = LoopConfig(epochs=cfg.epochs, max_steps=cfg.max_steps, desc=f"ranker[{cfg.features}]",
                      total_steps=min(cfg.epochs * steps, cfg.max_steps or cfg.epochs * steps),
                      progress=progress, is_main=ctx.is_main)
    module.train()
    run = fit_loop(task, loop, Updates([dense_opt]), selection, writer, state)
    # the checkpoint's "model" already holds the best epoch's weights, so loading it reproduces `test`
    result = _fit_result(task, run, cfg, ckpt_path, train_model.content_init)
    if out_dir is not None and ctx.is_main:
        from feature_store.io import atomic_write_json

        atomic_write_json(Path(out_dir) / "result.json", result)
    if return_test_scores:
        result["test_scores"] = score(module, data.test, schema, items, cfg.eval_batch_size, ctx)
    if score_examples is not None:
        result["extra_scores"] = score(module, score_examples, schema, items, cfg.eval_batch_size, ctx)
    return result


def _check_examples(data: PreparedData, items: ItemFeatures, cfg: RankerConfig) -> None:
    if data.train.hist.shape[1] != cfg.history_len:
        raise ValueError(f"examples were built with history_len {data.train.hist.shape[1]}, config says {cfg.history_len}")
    if not np.array_equal(items.item_ids, data.catalog_ids):
        raise ValueError("ItemFeatures and examples use different item catalogs")


def _checkpoint_to_resume(ckpt_path: Path | None, cfg: RankerConfig, ctx: DistContext) -> dict:
    """The checkpoint a resumed run continues from, after checking it was trained with the same config (training
    length aside)."""
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
    return ckpt


def _starting_point(module, dense_opt, ckpt: dict | None, cfg: RankerConfig, ctx: DistContext,
                    writes_checkpoints: bool) -> tuple[LoopState, Selection, dict | None]:
    """(loop state, selection, full best weights on rank 0) of a fresh run, or of the checkpoint's run: its
    optimizers, RNG and best epoch loaded into the sharded module. Before any epoch beats it the best is the
    initial model, at a score of -1 (below any selection_score of a judged epoch)."""
    if ckpt is None:  # the best until an epoch improves on it
        best_full = full_state_dict(module, ctx) if writes_checkpoints else None
        return LoopState(), Selection(cfg.patience, -1.0, -1, local_snapshot(module)), best_full
    if ckpt["dense_optimizer"]:
        dense_opt.load_state_dict(ckpt["dense_optimizer"])
    load_sparse_optimizer_state(module, ckpt["sparse_optimizer"])
    set_rng_state(ckpt["rng"], ctx)
    load_full_state(module, ckpt["model"])   # the best epoch so far, as this rank's snapshot ...
    best_snapshot = local_snapshot(module)
    load_full_state(module, ckpt["last"])    # ... then back to where training stopped
    meta = ckpt["meta"]
    best = meta["best"]
    selection = Selection(cfg.patience, best["auc"], best["epoch"], best_snapshot,
                          since_best=meta["epoch"] - best["epoch"])
    state = LoopState(epoch=meta["epoch"] + 1, step=int(meta.get("steps_total", 0)), history=meta["history"])
    return state, selection, ckpt["model"] if ctx.is_main else None


class _RankerTask:
    """The ranker's part of the training loop: seeded batches of example rows, the model's loss, validation AUC
    (selection_score) after every epoch, local snapshots of the (possibly sharded) weights."""

    def __init__(self, module, data: PreparedData, schema: FeatureSchema, items: ItemFeatures, cfg: RankerConfig,
                 ctx: DistContext):
        self.module, self.data, self.schema, self.items, self.cfg, self.ctx = module, data, schema, items, cfg, ctx
        self.samples = 0  # training examples over every rank

    def batches(self, epoch: int) -> list:
        """This rank's example rows of each global batch; the order is a function of (seed, epoch)."""
        cfg = self.cfg
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.data.train))
        steps = _steps_per_epoch(len(self.data.train), cfg.batch_size, self.ctx.world_size)
        return [_local_part(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], self.ctx) for s in range(steps)]

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        batch = build_batch(self.data.train.take(idx), self.schema, self.items).to(self.ctx.device)
        self.samples += len(idx) * self.ctx.world_size
        return self.module(batch)[0]

    def evaluate(self, epoch: int, state: LoopState, complete: bool) -> Evaluation:
        valid = evaluate(self.module, self.data.valid, self.schema, self.items, self.cfg.eval_batch_size, self.ctx)
        losses = state.epoch_losses
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               **{f"valid_{k}": v for k, v in valid.items() if k in ("auc", "gauc", "logloss")}}
        if self.ctx.is_main:
            log.info("%s epoch %d: loss %.4f valid auc %s gauc %s", self.cfg.features, epoch, row["train_loss"],
                     format_metric(valid["auc"]), format_metric(valid["gauc"]))
        return Evaluation(selection_score(valid), row)

    def snapshot(self) -> dict:
        return local_snapshot(self.module)

    def restore(self, snapshot: dict) -> None:
        restore_snapshot(self.module, snapshot)


class _RankerCheckpoints:
    """Writes ranker.pt at every epoch end (ranker.checkpoint): the best epoch's full weights, the latest ones,
    both optimizers and every rank's RNG. Every rank joins the gathers; rank 0 writes."""

    def __init__(self, path: Path, module, dense_opt, cfg: RankerConfig, schema: FeatureSchema, ctx: DistContext,
                 best_full: dict | None):
        self.path, self.module, self.dense_opt, self.cfg, self.schema, self.ctx = path, module, dense_opt, cfg, \
            schema, ctx
        self.best_full = best_full  # rank 0: full weights of the best epoch, written as the checkpoint's "model"

    def save(self, state: LoopState, selection: Selection, event: str) -> Path | None:
        if event != "epoch":  # the best weights are in every epoch's checkpoint already
            return None
        full = full_state_dict(self.module, self.ctx)
        sparse = sparse_optimizer_state(self.module, self.ctx)
        rng = rng_state(self.ctx)
        if not self.ctx.is_main:
            return None
        if selection.improved:
            self.best_full = full
        meta = {"config": self.cfg.to_dict(), "epoch": state.epochs_run - 1, "history": state.history,
                "best": {"auc": selection.best_score, "epoch": selection.best_epoch},
                "tables": _table_summary(self.schema), "restored_best": True, "steps_total": state.step,
                "checkpoint_format": CHECKPOINT_FORMAT}
        return save_checkpoint(self.path, self.best_full, self.dense_opt.state_dict(), meta, last_state=full,
                               sparse_optimizer_state=sparse, rng_state=rng)


def _fit_result(task: _RankerTask, run: LoopRun, cfg: RankerConfig, ckpt_path: Path | None,
                content_init: dict | None) -> dict:
    """fit()'s record of a finished run; the module holds the selected (best) epoch's weights."""
    module, data, schema, items, ctx = task.module, task.data, task.schema, task.items, task.ctx
    state = run.state
    train_seconds = sum(state.epoch_seconds)
    return {
        "features": cfg.features,
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "tables": _table_summary(schema),
        "content_init": content_init,
        "history": state.history,
        "best_epoch": run.selection.best_epoch,
        # patience, not max_steps, ended it
        "stopped_early": state.stopped and not state.reached(cfg.max_steps),
        "steps": state.steps_this_run,
        "train_samples_per_s": task.samples / train_seconds if train_seconds > 0 else None,
        "valid": evaluate(module, data.valid, schema, items, cfg.eval_batch_size, ctx),
        "test": evaluate(module, data.test, schema, items, cfg.eval_batch_size, ctx),
        "test_by_popularity": metrics_by_popularity(module, data, schema, items, cfg.eval_batch_size, ctx),
        "coverage": coverage_report(data, items),
        "prompt_vectors": prompt_vectors_record(data, items, cfg),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
    }


def prompt_vectors_record(data: PreparedData, items: ItemFeatures, cfg: RankerConfig) -> dict | None:
    """Which user vectors the "prompt" feature read (None for rows without it): source "asof" (the version's
    user_embeddings_asof.parquet, each example its user's latest cut <= its ts), "serving" (an older version's
    user_embeddings.parquet only: one vector per user over the whole train portion, training examples' own
    events inside it) or "given" (set by the caller); and per split the share of examples that got a vector."""
    if not cfg.uses("prompt") or items.user_vectors is None:
        return None
    share = {}
    for name in ("train", "valid", "test"):
        ex = getattr(data, name)
        got = np.abs(items.user_vectors_of(ex.user_id, ex.ts)).sum(1) > 0 if len(ex) else np.zeros(0, bool)
        share[name] = float(got.mean()) if len(got) else None
    return {"source": items.user_vectors_source or "given", "rows": int(len(items.user_ids)),
            "users": int(len(np.unique(items.user_ids))), "examples_with_vector": share}


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
    from ranker.args import add_ranker_arguments, config_from_args, require_store, split_from_args

    parser = argparse.ArgumentParser(prog="python -m ranker.train", description="train the TorchRec ranker")
    parser.add_argument("--items", type=Path, required=True, help="contract items Parquet (item_id, ...)")
    parser.add_argument("--interactions", type=Path, required=True,
                        help="contract interactions Parquet (user_id, item_id, ts, label)")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    add_ranker_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="folder for ranker.pt and result.json")
    parser.add_argument("--resume", action="store_true", help="continue from --out/ranker.pt")
    args = parser.parse_args(argv)
    try:
        require_store(args)
    except ValueError as exc:
        parser.error(str(exc))
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
