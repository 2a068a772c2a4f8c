"""Tiny clustered catalog for mllm tests: behaviour pairs stay inside clusters, and each item's title carries its
cluster word among random noise words (so an aligned encoder can learn what matters; the unaligned one cannot
know which word matters)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image

CLUSTER_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
NOISE = [f"w{i}" for i in range(60)]


@dataclass
class TinyDataset:
    items: pd.DataFrame
    interactions: pd.DataFrame
    image_root: Optional[Path]


def make_dataset(root: Path, n_clusters: int = 4, per_cluster: int = 16, seed: int = 0,
                 images: bool = True, image_cluster_signal: bool = False) -> TinyDataset:
    rng = np.random.default_rng(seed)
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n_clusters):
        cluster_color = rng.integers(0, 256, size=3)
        for k in range(per_cluster):
            color = cluster_color if image_cluster_signal else rng.integers(0, 256, size=3)
            item_id = 100 + c * per_cluster + k
            title = " ".join([CLUSTER_WORDS[c]] + list(rng.choice(NOISE, size=4)))
            uri = None
            if images:
                pix = np.clip(color + rng.normal(0, 40, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                uri = f"{item_id}.png"
                Image.fromarray(pix).save(root / uri)
            rows.append({"item_id": item_id, "title": title, "text": None, "image_uri": uri, "cluster": c})
    items = pd.DataFrame(rows)
    inter = pd.DataFrame({"user_id": np.zeros(0, np.int64), "item_id": np.zeros(0, np.int64),
                          "ts": np.zeros(0, np.int64), "label": np.zeros(0, np.float32)})
    return TinyDataset(items, inter, root if images else None)


def make_pairs(ds: TinyDataset, n_train: int = 200, n_heldout: int = 60, seed: int = 0):
    """Disjoint train / held-out within-cluster pairs (left < right)."""
    rng = np.random.default_rng(seed)
    by_cluster = ds.items.groupby("cluster")["item_id"].apply(list).to_dict()
    possible = sum(len(v) * (len(v) - 1) // 2 for v in by_cluster.values())
    if n_train + n_heldout > possible:
        raise ValueError(f"asked for {n_train + n_heldout} pairs, only {possible} within-cluster pairs exist")
    seen, out = set(), []
    while len(out) < n_train + n_heldout:
        c = int(rng.integers(len(by_cluster)))
        a, b = rng.choice(by_cluster[c], size=2, replace=False)
        key = (int(min(a, b)), int(max(a, b)))
        if key not in seen:
            seen.add(key)
            out.append(key)
    frame = pd.DataFrame(out, columns=["left", "right"])
    frame["source"] = np.where(np.arange(len(frame)) % 2 == 0, "swing", "u2i")
    frame["ts"] = np.arange(len(frame), dtype=np.int64)
    frame["weight"] = 1.0
    return frame.iloc[:n_train].reset_index(drop=True), frame.iloc[n_train:].reset_index(drop=True)
