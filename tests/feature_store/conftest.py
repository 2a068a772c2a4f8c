"""Fixtures for the feature-store tests: tiny generated tables, nothing from disk or network."""
from __future__ import annotations

import numpy as np
import pytest

from feature_store import FeatureStore, write_codebooks, write_codes, write_embeddings


def fill_version(path, seed: int = 0, n: int = 20, dim: int = 4, levels: int = 2, k: int = 8) -> dict:
    """Write the three contract files of one version under ``path``; return the arrays written."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n).astype(np.int64) + 100  # not sorted: readers must sort
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    rq = rng.integers(0, k, size=(n, levels)).astype(np.int32)
    vq = rng.integers(100, 100 + n, size=(n, 3)).astype(np.int64)
    books = {f"rq.level{i}": rng.normal(size=(k, dim)).astype(np.float32) for i in range(levels)}
    write_embeddings(path / "item_embeddings.parquet", ids, emb)
    write_codes(path / "item_codes.parquet", ids, rq, vq)
    write_codebooks(path / "codebooks.safetensors", books)
    return {"ids": ids, "emb": emb, "rq": rq, "vq": vq, "books": books}


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


@pytest.fixture
def publish(store):
    """publish(seed, **publish_kwargs) -> StoreVersion: stage the contract files and publish them."""

    def _publish(seed: int = 0, config: dict | None = None, **kwargs):
        with store.stage() as st:
            fill_version(st.path, seed=seed)
            return st.publish(config=config or {"seed": seed}, **kwargs)

    return _publish


@pytest.fixture
def fill():
    """The :func:`fill_version` helper, as a fixture (test modules cannot import conftest in importlib mode)."""
    return fill_version
