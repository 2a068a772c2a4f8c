"""The unaligned embedding's base map: the frozen MLLM's pooled state (width H) -> the item embedding (width D).

Every aligned encoder starts here (issue 18): its output is ``normalize(base(pooled) + residual)`` with a
residual whose output layer starts at zero, so before any training the aligned embedding *is* the unaligned one,
and the alignment gate can always fall back to it.

Two kinds (``BASE_MAP_KINDS``):

* ``gaussian``: ``normalize(normalize(x) @ G)`` with a fixed seeded Gaussian ``G`` (H, D) / sqrt(D)
  (Johnson-Lindenstrauss: cosine geometry approximately kept). Nothing is fitted; the map is a random draw, so
  retrieval quality moves with the seed.
* ``pca``: ``normalize((normalize(x) - mean) @ V)`` with ``V`` the top-D principal directions of the normalised
  states of the protocol's *train-portion* items (never the valid / test items), ``mean`` their mean.
  Deterministic given those items; stored with every checkpoint (the map is a buffer of the model) and, in the
  job, as ``base_map.safetensors`` in the version, so embeddings are reproducible.

The fit streams: ``GramStats`` accumulates (count, sum, Gram matrix) shard by shard (or worker by worker in the
Beam job, then merged), and ``BaseMap.from_stats`` solves the (H, H) eigenproblem once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BASE_MAP_KINDS = ("gaussian", "pca")
BASE_MAP_FILE = "base_map.safetensors"


class BaseMap(nn.Module):
    """``normalize((normalize(x) - mean) @ projection)``; nothing trains (both are buffers, saved with the model).

    Args:
        in_width: H, the pooled state's width.
        embed_dim: D.
    forward(x (B, H)) -> (B, D) unit L2 norm (a zero row stays zero).
    """

    def __init__(self, in_width: int, embed_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_width))
        self.register_buffer("projection", torch.zeros(in_width, embed_dim))

    @classmethod
    def gaussian(cls, in_width: int, embed_dim: int, seed: int) -> "BaseMap":
        """The fixed seeded Gaussian map (mean zero): the pre-issue-18 unaligned baseline, bit for bit."""
        out = cls(in_width, embed_dim)
        gen = torch.Generator().manual_seed(int(seed))
        out.projection.copy_(torch.randn(in_width, embed_dim, generator=gen) / embed_dim ** 0.5)
        return out

    @classmethod
    def from_stats(cls, stats: "GramStats", embed_dim: int) -> "BaseMap":
        """PCA of the accumulated normalised states: the top ``embed_dim`` directions (signs fixed so the largest
        entry of each is positive: the same items give the same map on any machine). A state narrower than
        ``embed_dim`` (H < D) keeps all H directions and leaves the other D - H coordinates at zero (the residual
        may use them)."""
        if stats.n < 2:
            raise ValueError(f"BaseMap.from_stats: a PCA base map needs at least 2 items, got {stats.n}")
        width = stats.sum.shape[0]
        mean = stats.sum / stats.n
        cov = stats.gram / stats.n - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2)
        top = eigvec[:, ::-1][:, :embed_dim]  # (H, min(H, D))
        signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])])
        out = cls(width, embed_dim)
        out.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        out.projection[:, :top.shape[1]] = torch.from_numpy((top * np.where(signs == 0, 1.0, signs)).astype(np.float32))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((F.normalize(x, dim=-1) - self.mean) @ self.projection, dim=-1)


@dataclass
class GramStats:
    """Streaming sufficient statistics of the L2-normalised states: count, (H,) sum and (H, H) Gram matrix, in
    float64 (merging partial sums from many shards / workers must not lose precision)."""

    n: int
    sum: np.ndarray
    gram: np.ndarray

    @classmethod
    def empty(cls, width: int) -> "GramStats":
        return cls(0, np.zeros(width), np.zeros((width, width)))

    @classmethod
    def of(cls, states: torch.Tensor | np.ndarray) -> "GramStats":
        """Statistics of (n, H) raw pooled states (normalised here, as ``BaseMap`` normalises its input)."""
        x = F.normalize(torch.as_tensor(states).double(), dim=-1).numpy()
        return cls(int(len(x)), x.sum(axis=0), x.T @ x)

    def merge(self, other: "GramStats") -> "GramStats":
        return GramStats(self.n + other.n, self.sum + other.sum, self.gram + other.gram)


def pooled_top(states: dict) -> torch.Tensor:
    """The frozen MLLM's pooled output (top LM layer) from cached states: what the base map reads. (B, H),
    contiguous: the same values in the same memory layout as the encoder's own pooled output, so the base map
    gives bit-identical results on either path."""
    return states["lm.pool"][:, -1].contiguous()


def fit_base_map(kind: str, width: int, embed_dim: int, seed: int = 0, stats: Optional[GramStats] = None
                 ) -> BaseMap:
    """``gaussian``: seeded draw (``stats`` unused); ``pca``: from ``stats`` of the train-portion items."""
    if kind == "gaussian":
        return BaseMap.gaussian(width, embed_dim, seed)
    if kind == "pca":
        if stats is None:
            raise ValueError("fit_base_map: kind pca needs the statistics of the train-portion items")
        return BaseMap.from_stats(stats, embed_dim)
    raise ValueError(f"base map kind must be one of {BASE_MAP_KINDS}, got {kind!r}")


def save_base_map(path: Path, base: BaseMap, info: dict) -> Path:
    """Write ``base`` as safetensors (atomic), ``info`` (kind, items it was fitted on, ...) in its metadata."""
    from safetensors.torch import save as save_bytes

    from feature_store.io import atomic_write_bytes

    tensors = {"mean": base.mean.detach().cpu().contiguous(), "projection": base.projection.detach().cpu().contiguous()}
    atomic_write_bytes(Path(path), save_bytes(tensors, metadata={"info": json.dumps(info, sort_keys=True)}))
    return Path(path)


def load_base_map(path: Path) -> tuple[BaseMap, dict]:
    """(BaseMap, info) from ``save_base_map``'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base map {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
        mean, projection = f.get_tensor("mean"), f.get_tensor("projection")
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0]:
        raise ValueError(f"base map {path}: mean {tuple(mean.shape)} and projection {tuple(projection.shape)} "
                         "do not fit together")
    base = BaseMap(int(projection.shape[0]), int(projection.shape[1]))
    base.mean.copy_(mean)
    base.projection.copy_(projection)
    return base, info


def base_map_from_checkpoint(checkpoint: Path) -> BaseMap:
    """The base map an encoder checkpoint carries (``head.base.*`` of side modes, ``base.*`` of full / adapters):
    what a warm start or a reused encoder keeps as its unaligned embedding's map."""
    from safetensors import safe_open

    from pipelines.encoder.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(Path(checkpoint))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        prefix = next((p for p in ("head.base.", "base.") if f"{p}projection" in keys), None)
        if prefix is None:
            raise ValueError(f"checkpoint {folder}: no base map (head.base.* / base.*): it predates the residual "
                             "alignment over the unaligned embedding (issue 18); retrain it")
        mean, projection = f.get_tensor(f"{prefix}mean"), f.get_tensor(f"{prefix}projection")
    base = BaseMap(int(projection.shape[0]), int(projection.shape[1]))
    base.mean.copy_(mean)
    base.projection.copy_(projection)
    return base
