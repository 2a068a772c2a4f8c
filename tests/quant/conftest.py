"""Tiny generated data for quantizer tests (no network, no files)."""
from __future__ import annotations

import numpy as np
import pytest


def planted_clusters(n: int, d: int, n_clusters: int, *, spread: float = 6.0, noise: float = 0.3,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) float32 points around ``n_clusters`` well separated centres, and their (N,) labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)) * spread
    labels = np.repeat(np.arange(n_clusters), int(np.ceil(n / n_clusters)))[:n]
    rng.shuffle(labels)
    x = centres[labels] + rng.normal(size=(n, d)) * noise
    return x.astype(np.float32), labels


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One BLAS/OpenMP thread for these tiny problems: on a shared 2-core box, spinning thread pools make small
    torch steps ~30x slower. Module scope, so it is in place before module-scoped fixtures train anything;
    restored after each module."""
    import faiss
    import torch

    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(old_torch)
    faiss.omp_set_num_threads(old_faiss)


@pytest.fixture(scope="module")
def clustered():
    return planted_clusters(2000, 16, 16, seed=1)
