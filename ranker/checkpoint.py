"""Ranker checkpoints: one `ranker.pt` of plain tensors + JSON strings, loadable with
`torch.load(path, weights_only=True)`, written atomically (write aside, fsync, rename).

Contents: {"model": {name: tensor} (unsharded, RankerTrain keys), "dense_optimizer": Adam state_dict,
"meta": JSON string (config, schema, epoch, best validation AUC, history)}.

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
from ranker.config import RankerConfig

CHECKPOINT_NAME = "ranker.pt"


def save_checkpoint(path: Path, model_state: dict, dense_optimizer_state: dict | None, meta: dict) -> Path:
    buffer = io.BytesIO()
    torch.save({"model": model_state, "dense_optimizer": dense_optimizer_state or {},
                "meta": json.dumps(meta, default=str)}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: Path) -> dict:
    """{"model", "dense_optimizer", "meta" (dict)}; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ranker checkpoint {path} does not exist")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or "model" not in raw or "meta" not in raw:
        raise ValueError(f"{path}: not a ranker checkpoint (keys {list(raw) if isinstance(raw, dict) else type(raw)})")
    raw["meta"] = json.loads(raw["meta"])
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
