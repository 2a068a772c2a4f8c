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
