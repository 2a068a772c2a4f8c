"""Ground-truth codes for the synthetic dataset: a feature-store version whose codes are the latent clusters.

Ranker tests and benchmarks need a world where codes carry the signal without paying for an encoder: the
synthetic dataset (pipelines.data.synthetic) already decides clicks by latent cluster, so its codes here are
RQ level 0 = the cluster, level 1 = a random sub-code, VQ = items of the same cluster, and the "frozen"
embedding a noisy cluster centroid. The unaligned control is a random relabelling that ignores the clusters.
One generative story for every test: this module only adds the oracle tables on top of it.

Example:
    >>> world = oracle_world(n_items=300, n_users=100, n_events=6000, seed=0)
    >>> world.interactions.columns.tolist()
    ['user_id', 'item_id', 'ts', 'label']
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.loader import load_dataset
from pipelines.data.schema import DataSpec


@dataclass
class OracleWorld:
    interactions: pd.DataFrame
    item_ids: np.ndarray
    rq: np.ndarray  # (N, 2)
    vq: np.ndarray  # (N, Kv) neighbour item ids
    embeddings: np.ndarray  # (N, d): noisy cluster centroid
    codebooks: list
    cluster: np.ndarray

    def item_features(self, frozen: bool = False, coded_fraction: float = 1.0, seed: int = 0):
        """ranker ItemFeatures over the catalog; `coded_fraction` < 1 leaves the rest without codes."""
        from ranker.features import ItemFeatures

        n = len(self.item_ids)
        keep = np.sort(np.random.default_rng(seed).permutation(n)[: int(round(coded_fraction * n))])
        kwargs = dict(code_item_ids=self.item_ids[keep], rq=self.rq[keep], vq=self.vq[keep],
                      rq_sizes=[len(b) for b in self.codebooks], codebooks=self.codebooks)
        if frozen:
            kwargs.update(frozen_item_ids=self.item_ids, frozen=self.embeddings)
        return ItemFeatures.build(self.item_ids, **kwargs)


def oracle_world(n_items: int = 400, n_users: int = 120, n_events: int = 8000, n_clusters: int = 8,
                 sub_codes: int = 4, vq_k: int = 5, dim: int = 8, implicit: bool = False, seed: int = 0,
                 data: Path | None = None) -> OracleWorld:
    """The synthetic dataset of `seed` with oracle codes (deterministic in `seed`).

    Args:
        implicit: keep only the clicks (label 1), as an implicit log.
        data: where the synthetic images are cached (default: the synthetic source's cache folder).
    """
    ds = load_dataset(DataSpec(dataset="synthetic", data=data, n_items=n_items, n_users=n_users, n_events=n_events,
                               n_clusters=n_clusters, seed=seed))
    rng = np.random.default_rng([seed, 7])
    items = ds.items.sort_values("item_id")
    item_ids = items["item_id"].to_numpy(np.int64)
    cluster = items["cluster"].to_numpy(np.int64)
    n = len(item_ids)
    sub = rng.integers(0, sub_codes, n)
    centroids = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    sub_centroids = 0.3 * rng.standard_normal((sub_codes, dim)).astype(np.float32)
    embeddings = (centroids[cluster] + sub_centroids[sub] + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)
    vq = np.zeros((n, vq_k), np.int64)
    for i in range(n):
        same = np.flatnonzero(cluster == cluster[i])
        same = same[same != i] if len(same) > 1 else same
        vq[i] = item_ids[rng.choice(same, vq_k, replace=len(same) < vq_k)]
    inter = ds.interactions[["user_id", "item_id", "ts", "label"]]
    if implicit:
        inter = inter[inter["label"] >= 0.5].assign(label=np.float32(1.0))
    return OracleWorld(inter.reset_index(drop=True), item_ids, np.stack([cluster, sub], 1), vq, embeddings,
                       [centroids, sub_centroids], cluster)


def write_world_files(world: OracleWorld, folder) -> tuple:
    """items.csv + interactions.csv in the generic-source contract (for CLI tests). Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": world.item_ids, "title": [f"item {i}" for i in world.item_ids]}).to_csv(
        folder / "items.csv", index=False)
    world.interactions.to_csv(folder / "interactions.csv", index=False)
    return folder / "items.csv", folder / "interactions.csv"


def publish_world_version(world: OracleWorld, store_root, seed: int = 0) -> str:
    """Publish the oracle tables as a feature-store version (aligned codes = the clusters, unaligned = a random
    relabelling). Nothing in it was learned from interactions, so it records a behaviour-free protocol."""
    from feature_store import FeatureStore
    from feature_store.split import behaviour_free_protocol
    from feature_store.tables import write_codebooks, write_codes, write_embeddings

    rng = np.random.default_rng(seed)
    n = len(world.item_ids)
    with FeatureStore(store_root).stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", world.item_ids, world.embeddings)
        write_codes(st.path / "item_codes.parquet", world.item_ids, world.rq.astype(np.int32), world.vq)
        write_codebooks(st.path / "codebooks.safetensors", {f"rq.level{l}": c for l, c in enumerate(world.codebooks)})
        shuffled_rq = np.stack([rng.integers(0, len(c), n) for c in world.codebooks], 1).astype(np.int32)
        write_codes(st.path / "item_codes_unaligned.parquet", world.item_ids, shuffled_rq,
                    world.item_ids[rng.integers(0, n, world.vq.shape)])
        version = st.publish(config={"oracle": True, "seed": seed},
                             extra={"protocol": behaviour_free_protocol("oracle codes from the synthetic clusters")})
    return version.id
