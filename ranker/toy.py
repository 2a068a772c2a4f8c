"""A tiny generated world where item codes carry the signal (tests, benchmarks, smoke runs).

Items belong to latent clusters; the RQ code's level 0 is the cluster, level 1 a random sub-code; the VQ
code lists items of the same cluster. Each user likes a few clusters; a click is likely iff the item's
cluster is liked. With many items and few events per item, item ids alone generalise poorly, while the
codes (shared across a cluster) let the ranker learn the preference from few events.

Example:
    >>> world = toy_world(n_items=300, n_users=100, n_events=6000, seed=0)
    >>> world.interactions.columns.tolist()
    ['user_id', 'item_id', 'ts', 'label']
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ranker.features import ItemFeatures


@dataclass
class ToyWorld:
    interactions: pd.DataFrame
    item_ids: np.ndarray
    rq: np.ndarray  # (N, 2)
    vq: np.ndarray  # (N, Kv) neighbour item ids
    embeddings: np.ndarray  # (N, d): noisy cluster centroid
    codebooks: list
    cluster: np.ndarray

    def item_features(self, frozen: bool = False, coded_fraction: float = 1.0, seed: int = 0) -> ItemFeatures:
        """ItemFeatures over the catalog; `coded_fraction` < 1 leaves the rest without codes."""
        n = len(self.item_ids)
        keep = np.random.default_rng(seed).permutation(n)[: int(round(coded_fraction * n))]
        keep.sort()
        kwargs = dict(code_item_ids=self.item_ids[keep], rq=self.rq[keep], vq=self.vq[keep],
                      rq_sizes=[len(b) for b in self.codebooks], codebooks=self.codebooks)
        if frozen:
            kwargs.update(frozen_item_ids=self.item_ids, frozen=self.embeddings)
        return ItemFeatures.build(self.item_ids, **kwargs)


def toy_world(n_items: int = 400, n_users: int = 120, n_events: int = 8000, n_clusters: int = 8,
              sub_codes: int = 4, vq_k: int = 5, dim: int = 8, liked_per_user: int = 2,
              implicit: bool = False, seed: int = 0) -> ToyWorld:
    """Generate the world (deterministic in `seed`). Item ids are 1000 + index, user ids 50 + index."""
    rng = np.random.default_rng(seed)
    item_ids = np.arange(n_items, dtype=np.int64) + 1000
    cluster = rng.integers(0, n_clusters, n_items)
    sub = rng.integers(0, sub_codes, n_items)
    centroids = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    sub_centroids = 0.3 * rng.standard_normal((sub_codes, dim)).astype(np.float32)
    embeddings = (centroids[cluster] + sub_centroids[sub] + 0.1 * rng.standard_normal((n_items, dim))).astype(np.float32)
    vq = np.zeros((n_items, vq_k), np.int64)
    for i in range(n_items):
        same = np.flatnonzero(cluster == cluster[i])
        same = same[same != i] if len(same) > 1 else same
        vq[i] = item_ids[rng.choice(same, vq_k, replace=len(same) < vq_k)]
    liked = np.stack([rng.choice(n_clusters, liked_per_user, replace=False) for _ in range(n_users)])
    users = rng.integers(0, n_users, n_events)
    ts = np.sort(rng.integers(1_600_000_000, 1_600_000_000 + 10_000_000, n_events))
    if implicit:
        # clicks only: users pick items of liked clusters (90%) or anything
        pick_liked = rng.random(n_events) < 0.9
        items = rng.integers(0, n_items, n_events)
        for e in np.flatnonzero(pick_liked):
            cands = np.flatnonzero(np.isin(cluster, liked[users[e]]))
            items[e] = rng.choice(cands)
        labels = np.ones(n_events, np.float32)
    else:
        items = rng.integers(0, n_items, n_events)
        like = (cluster[items][:, None] == liked[users]).any(1)
        labels = (rng.random(n_events) < np.where(like, 0.85, 0.1)).astype(np.float32)
    df = pd.DataFrame({"user_id": users.astype(np.int64) + 50, "item_id": item_ids[items], "ts": ts.astype(np.int64),
                       "label": labels})
    codebooks = [centroids, sub_centroids]
    return ToyWorld(df, item_ids, np.stack([cluster, sub], 1).astype(np.int64), vq, embeddings, codebooks, cluster)


def write_toy_files(world: ToyWorld, folder) -> tuple:
    """items.csv + interactions.csv in the generic-source contract (for CLI tests). Returns their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = pd.DataFrame({"item_id": world.item_ids, "title": [f"item {i}" for i in world.item_ids]})
    items.to_csv(folder / "items.csv", index=False)
    world.interactions.to_csv(folder / "interactions.csv", index=False)
    return folder / "items.csv", folder / "interactions.csv"


def publish_toy_version(world: ToyWorld, store_root, seed: int = 0) -> str:
    """Publish a feature-store version for the toy world: aligned codes = the true clusters; unaligned
    codes = a random relabelling that ignores the clusters (so alignment visibly matters). Returns its id."""
    from feature_store import FeatureStore
    from feature_store.tables import write_codebooks, write_codes, write_embeddings

    rng = np.random.default_rng(seed)
    store = FeatureStore(store_root)
    n = len(world.item_ids)
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", world.item_ids, world.embeddings)
        write_codes(st.path / "item_codes.parquet", world.item_ids, world.rq.astype(np.int32), world.vq)
        write_codebooks(st.path / "codebooks.safetensors",
                        {f"rq.level{l}": c for l, c in enumerate(world.codebooks)})
        shuffled_rq = np.stack([rng.integers(0, len(c), n) for c in world.codebooks], 1).astype(np.int32)
        shuffled_vq = world.item_ids[rng.integers(0, n, world.vq.shape)]
        write_codes(st.path / "item_codes_unaligned.parquet", world.item_ids, shuffled_rq, shuffled_vq)
        version = st.publish(config={"toy": True, "seed": seed})
    return version.id
