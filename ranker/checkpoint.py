"""Ranker checkpoints: one `ranker.pt` of plain tensors + JSON strings, loadable with
`torch.load(path, weights_only=True)`, written atomically (write aside, fsync, rename).

Contents:
    "model": {name: tensor} (unsharded, RankerTrain keys): the weights of the best validation epoch so far
        (what `load_checkpoint` serves and the test split is scored with);
    "last": {name: tensor}: the weights after the latest finished epoch (what a resumed run continues from);
    "dense_optimizer": Adam state_dict; "sparse_optimizer": the embedding tables' Adagrad state (see
        `sparse_optimizer_state`); "rng": {"torch": (world, S) uint8 per-rank CPU RNG states, "cuda": same or
        absent}: together, what makes resuming after epoch k reproduce the uninterrupted run;
    "meta": JSON string (config, schema, epoch, best validation AUC, history, steps).

Example:
    >>> model, cfg, meta = load_checkpoint(out_dir / "ranker.pt", items=items, n_users=users.n_rows)
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from feature_store.io import atomic_write_bytes
from feature_store.weights import load_torch_weights
from ranker.config import RankerConfig

CHECKPOINT_NAME = "ranker.pt"
CHECKPOINT_FORMAT = 2  # 2: "last", "sparse_optimizer" and "rng" saved (resumable); 1: best weights only


def save_checkpoint(path: Path, model_state: dict, dense_optimizer_state: dict | None, meta: dict, *,
                    last_state: dict | None = None, sparse_optimizer_state: dict | None = None,
                    rng_state: dict | None = None) -> Path:
    """Write a checkpoint atomically.

    Args:
        model_state: the best epoch's full (unsharded) weights.
        last_state: the latest epoch's weights (None: the same as model_state).
        sparse_optimizer_state: from `sparse_optimizer_state`; rng_state: {"torch": uint8 tensor, ...}.
    """
    buffer = io.BytesIO()
    torch.save({"model": model_state, "last": last_state if last_state is not None else model_state,
                "dense_optimizer": dense_optimizer_state or {}, "sparse_optimizer": sparse_optimizer_state or {},
                "rng": rng_state or {}, "meta": json.dumps(meta, default=str)}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _in_backward_optimizers(module) -> dict:
    """{parameter name: the torch optimizer applied in backward to it} of an unsharded model."""
    return {name: p._in_backward_optimizers[0] for name, p in module.named_parameters()
            if getattr(p, "_in_backward_optimizers", None)}


def sparse_optimizer_state(module, ctx) -> dict | None:
    """The embedding optimizer's state, unsharded, on rank 0 (None elsewhere; every rank must call it).

    Unsharded model: {"kind": "in_backward", "params": {parameter name: torch Adagrad state_dict}}.
    Under DistributedModelParallel: {"kind": "fused", "state": {key: {name: full tensor}}} from the TorchRec
    fused optimizer (KeyedOptimizer) `state_dict`, sharded tensors gathered onto rank 0.
    """
    from ranker.distributed import _is_sharded

    fused = getattr(module, "fused_optimizer", None)
    if fused is None:
        if not ctx.is_main:
            return None
        return {"kind": "in_backward",
                "params": {name: _clone(opt.state_dict()) for name, opt in _in_backward_optimizers(module).items()}}
    # Each rank's state dict holds only the tables (shards) it owns, so ranks cannot gather tensor by tensor in
    # lockstep: every rank sends its local pieces (offsets, sizes, values) and rank 0 assembles full tensors.
    pieces = {}
    for key, states in fused.state_dict()["state"].items():
        for name, tensor in states.items():
            if _is_sharded(tensor):
                pieces[(str(key), str(name))] = (tuple(tensor.size()), [
                    (tuple(sh.metadata.shard_offsets), tuple(sh.metadata.shard_sizes), sh.tensor.detach().cpu())
                    for sh in tensor.local_shards()])
            elif torch.is_tensor(tensor):
                pieces[(str(key), str(name))] = (tuple(tensor.shape), [((0,) * tensor.dim(), tuple(tensor.shape),
                                                                        tensor.detach().cpu())])
    gathered = [pieces]
    if ctx.distributed:
        import torch.distributed as dist

        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, pieces)
    if not ctx.is_main:
        return None
    out: dict = {}
    for rank_pieces in gathered:
        for (key, name), (size, parts) in rank_pieces.items():
            for offsets, sizes, values in parts:
                full = out.setdefault(key, {}).get(name)
                if full is None:
                    full = out[key][name] = torch.zeros(size, dtype=values.dtype)
                full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = values
    return {"kind": "fused", "state": out}


def load_sparse_optimizer_state(module, state: dict) -> None:
    """Inverse of `sparse_optimizer_state`: every rank copies its own part into the live optimizer state."""
    from ranker.distributed import _is_sharded

    if not state:
        return
    fused = getattr(module, "fused_optimizer", None)
    kind = "in_backward" if fused is None else "fused"
    if state.get("kind") != kind:
        raise ValueError(f"checkpoint holds {state.get('kind')!r} embedding optimizer state, this run needs "
                         f"{kind!r} (resume with the same world size as the interrupted run)")
    if fused is None:
        own = _in_backward_optimizers(module)
        if set(own) != set(state["params"]):
            raise ValueError(f"checkpoint embedding optimizer covers {sorted(state['params'])}, the model has "
                             f"{sorted(own)}")
        for name, opt in own.items():
            opt.load_state_dict(state["params"][name])
        return
    live = fused.state_dict()["state"]
    with torch.no_grad():
        for key, states in live.items():
            for name, target in states.items():
                source = state["state"][str(key)][str(name)]
                if _is_sharded(target):
                    for shard in target.local_shards():
                        index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets,
                                                                       shard.metadata.shard_sizes))
                        shard.tensor.copy_(source[index].to(shard.tensor.device))
                elif torch.is_tensor(target):
                    target.copy_(source.to(target.device))


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def read_checkpoint(path: Path) -> dict:
    """{"model", "last", "dense_optimizer", "sparse_optimizer", "rng", "meta" (dict)}; never unpickles arbitrary
    objects. Checkpoints written before "last" existed read with "last" = "model"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ranker checkpoint {path} does not exist")
    raw = load_torch_weights(path, "ranker")  # never unpickles; a wrong file is a WeightsFileError
    if not isinstance(raw, dict) or "model" not in raw or "meta" not in raw:
        raise ValueError(f"{path}: not a ranker checkpoint (keys {list(raw) if isinstance(raw, dict) else type(raw)})")
    raw["meta"] = json.loads(raw["meta"])
    raw.setdefault("last", raw["model"])
    raw.setdefault("sparse_optimizer", {})
    raw.setdefault("rng", {})
    return raw


def load_checkpoint(path: Path, items, n_users: int):
    """Rebuild the unsharded RankerModel of a checkpoint.

    Args:
        path: ranker.pt.
        items: ItemFeatures with the same vocabulary / code sizes as at training time.
        n_users: user rows (UserIndex.n_rows) at training time.
    Returns:
        (RankerModel, RankerConfig, meta dict)
    """
    from ranker.features import build_schema
    from ranker.model import RankerModel, RankerTrain

    ckpt = read_checkpoint(path)
    cfg = RankerConfig.from_dict(ckpt["meta"]["config"])
    schema = build_schema(cfg, n_users, items)
    train_model = RankerTrain(RankerModel(schema, cfg))
    own = train_model.state_dict()
    for name, tensor in ckpt["model"].items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the rebuilt model "
                             f"expects {tuple(own[name].shape)} (different vocabulary or code sizes)")
    train_model.load_state_dict(ckpt["model"])
    return train_model.model, cfg, ckpt["meta"]


def remap_rq_tables(model, cfg: RankerConfig, new_items, n_users: int, mappings: list):
    """Carry a trained ranker onto re-quantized codes (the retraining job's warm start).

    Builds a model for `new_items` (the new version's codes) and copies every tensor over; the RQ table of
    level l is rebuilt row by row: new code j takes the learned row `mappings[l][j]` of the old table
    (-1 = no old counterpart: the mean of the old code rows). The unknown row is carried over.

    Args:
        model: trained RankerModel (e.g. from load_checkpoint).
        cfg: its config.
        new_items: ItemFeatures of the new version (same catalog; rq_sizes may differ).
        n_users: user rows at training time.
        mappings: per level, (K_new,) int array of old code ids (feature_store.remap gives them).
    Returns:
        a new RankerModel (unsharded), ready for `ranker.train.evaluate` on the validation split.
    """
    from ranker.features import build_schema
    from ranker.model import RankerModel

    schema = build_schema(cfg, n_users, new_items)
    new_model = RankerModel(schema, cfg)
    old_state = model.state_dict()
    new_state = new_model.state_dict()
    if len(mappings) != schema.rq_levels:
        raise ValueError(f"remap_rq_tables: {len(mappings)} mappings for {schema.rq_levels} RQ levels")
    for name, tensor in new_state.items():
        level = _rq_level(name)
        if level is None:
            if name not in old_state or old_state[name].shape != tensor.shape:
                raise ValueError(f"remap_rq_tables: tensor {name} differs between old and new model")
            new_state[name] = old_state[name]
            continue
        old = old_state[name]  # (K_old + 1, D), last row = unknown
        mapping = np.asarray(mappings[level], dtype=np.int64)
        k_new = tensor.shape[0] - 1
        if mapping.shape != (k_new,):
            raise ValueError(f"remap_rq_tables: level {level} mapping has shape {mapping.shape}, expected ({k_new},)")
        if mapping.max(initial=-1) >= old.shape[0] - 1:
            raise ValueError(f"remap_rq_tables: level {level} maps to old code {mapping.max()} >= {old.shape[0] - 1}")
        rows = old[:-1].mean(0, keepdim=True).repeat(k_new + 1, 1)
        known = mapping >= 0
        rows[np.flatnonzero(known)] = old[mapping[known]]
        rows[-1] = old[-1]
        new_state[name] = rows
    new_model.load_state_dict(new_state)
    return new_model


def _rq_level(state_key: str) -> int | None:
    """Level of an RQ table weight key like 'sparse_arch.ec.embeddings.rq_l2.weight'."""
    import re

    m = re.search(r"\.rq_l(\d+)\.weight$", state_key)
    return int(m.group(1)) if m else None
