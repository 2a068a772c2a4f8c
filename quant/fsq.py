"""Res-KmeansFSQ (QARM V2 style): residual k-means levels, then a finite-scalar-quantization last level.

The FSQ level projects the last residual onto its top principal directions and quantizes each coordinate on a
fixed per-dimension grid; its code is the mixed-radix number of the per-dimension bins. Every combination of
bins is a valid code, so the last level spreads items evenly (high utilization, fewer collisions) without a
learned codebook to collapse.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from quant.base import Quantizer, check_codes, check_embeddings, register
from quant.rq_kmeans import RQKMeans, RQKMeansConfig

log = logging.getLogger(__name__)


def default_fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """Four grid dimensions whose bin counts multiply to ``codebook_size`` (a power of two, >= 16)."""
    bits = int(round(math.log2(codebook_size)))
    if 2 ** bits != codebook_size or bits < 4:
        raise ValueError(f"no default fsq_levels for codebook_size {codebook_size}: give fsq_levels explicitly "
                         "(bins per dimension, their product is the last level's code space)")
    per_dim = [bits // 4 + (1 if i < bits % 4 else 0) for i in range(4)]
    return tuple(2 ** b for b in per_dim)


class ScalarGrid:
    """FSQ on (N, d) residuals: PCA to m = len(bins) dims, per-dimension bins, mixed-radix code.

    Args:
        bins: bins per projected dimension (L_1, ..., L_m); the code space is their product.
        grid: 'quantile' (equal-mass bins: every bin used about equally) or 'uniform' (evenly spaced over
            +-2 standard deviations, FSQ's fixed grid).
    """

    def __init__(self, bins: tuple[int, ...], grid: str = "quantile"):
        self.bins = tuple(int(b) for b in bins)
        self.grid = grid
        self.mean: np.ndarray | None = None  # (d,)
        self.projection: np.ndarray | None = None  # (d, m)
        self.edges: list[np.ndarray] = []  # m arrays of (L_j - 1,)
        self.values: list[np.ndarray] = []  # m arrays of (L_j,) reconstruction value per bin
        self.radix = np.cumprod((1,) + self.bins[:-1]).astype(np.int64)  # (m,)

    @property
    def size(self) -> int:
        return int(np.prod(self.bins))

    def fit(self, r: np.ndarray) -> "ScalarGrid":
        m = len(self.bins)
        if m > r.shape[1]:
            raise ValueError(f"fsq_levels has {m} dimensions but the embeddings have only {r.shape[1]}")
        self.mean = r.mean(axis=0).astype(np.float32)
        centred = (r - self.mean).astype(np.float64)
        cov = centred.T @ centred / max(1, r.shape[0] - 1)  # (d, d)
        eigval, eigvec = np.linalg.eigh(cov)
        top = eigvec[:, np.argsort(eigval)[::-1][:m]]
        top *= np.where(top[np.abs(top).argmax(axis=0), np.arange(m)] < 0, -1.0, 1.0)  # deterministic signs
        self.projection = top.astype(np.float32)
        z = centred @ top  # (N, m)
        self.edges, self.values = [], []
        for j, n_bins in enumerate(self.bins):
            col = z[:, j]
            if self.grid == "quantile":
                edges = np.quantile(col, np.arange(1, n_bins) / n_bins)
            else:
                s = col.std() or 1.0
                edges = np.linspace(-2 * s, 2 * s, n_bins + 1)[1:-1]
            digit = np.searchsorted(edges, col, side="right")
            sums = np.bincount(digit, weights=col, minlength=n_bins)
            counts = np.bincount(digit, minlength=n_bins)
            mids = np.concatenate([[edges[0] if len(edges) else 0.0],
                                   (edges[1:] + edges[:-1]) / 2, [edges[-1] if len(edges) else 0.0]])
            values = np.where(counts > 0, sums / np.maximum(counts, 1), mids[:n_bins])
            self.edges.append(edges.astype(np.float32))
            self.values.append(values.astype(np.float32))
        return self

    def digits(self, r: np.ndarray) -> np.ndarray:
        z = (r - self.mean) @ self.projection  # (N, m)
        return np.stack([np.searchsorted(e, z[:, j], side="right") for j, e in enumerate(self.edges)], axis=1)

    def encode(self, r: np.ndarray) -> np.ndarray:
        """(N, d) residuals -> (N,) int64 codes in [0, size)."""
        return self.digits(r) @ self.radix

    def decode(self, code: np.ndarray) -> np.ndarray:
        """(N,) codes -> (N, d) float32 residual reconstructions."""
        digits = (code[:, None] // self.radix[None, :]) % np.asarray(self.bins)[None, :]  # (N, m)
        z = np.stack([self.values[j][digits[:, j]] for j in range(len(self.bins))], axis=1)  # (N, m)
        return (self.mean + z @ self.projection.T).astype(np.float32)


@dataclass(frozen=True)
class ResKMeansFSQConfig:
    """Settings of Res-KmeansFSQ.

    Args:
        levels: total levels L: L - 1 residual k-means levels, then the FSQ level.
        codebook_size: centroids per k-means level.
        fsq_levels: bins per FSQ grid dimension (their product is the last level's code space); None picks four
            dimensions multiplying to codebook_size.
        fsq_grid: 'quantile' or 'uniform' bins (see :class:`ScalarGrid`).
        seed, balanced, sample, niter, refine_iter, tol, device: as in RQKMeansConfig.
    """

    levels: int = 3
    codebook_size: int = 256
    fsq_levels: tuple[int, ...] | None = None
    fsq_grid: str = "quantile"
    seed: int = 0
    balanced: bool = False
    sample: int | None = None
    niter: int = RQKMeansConfig.niter  # the k-means levels' defaults are RQKMeansConfig's
    refine_iter: int = RQKMeansConfig.refine_iter
    tol: float = RQKMeansConfig.tol
    device: str = "auto"

    def __post_init__(self):
        if not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels must be an int >= 2 (k-means levels + the FSQ level), got {self.levels!r}")
        if self.fsq_levels is not None:
            if len(self.fsq_levels) < 1 or any(int(b) < 2 for b in self.fsq_levels):
                raise ValueError(f"fsq_levels must be bins >= 2 per dimension, got {self.fsq_levels!r}")
            if math.prod(int(b) for b in self.fsq_levels) > 2 ** 31 - 1:
                raise ValueError(f"fsq_levels {self.fsq_levels} give a code space beyond int32")
        else:
            default_fsq_levels(self.codebook_size)  # raises with advice when there is no default
        if self.fsq_grid not in ("quantile", "uniform"):
            raise ValueError(f"fsq_grid must be 'quantile' or 'uniform', got {self.fsq_grid!r}")
        self.rq_config()  # validates the k-means settings

    @property
    def bins(self) -> tuple[int, ...]:
        return tuple(int(b) for b in (self.fsq_levels or default_fsq_levels(self.codebook_size)))

    def rq_config(self) -> RQKMeansConfig:
        return RQKMeansConfig(levels=self.levels - 1, codebook_size=self.codebook_size, seed=self.seed,
                              balanced=self.balanced, sample=self.sample, niter=self.niter,
                              refine_iter=self.refine_iter, tol=self.tol, device=self.device)


@register
class ResKMeansFSQ(Quantizer):
    """Residual k-means levels followed by an FSQ level: codes (N, L), level L-1 in [0, prod(fsq_levels))."""

    method = "res-kmeans-fsq"

    def __init__(self, levels: int = 3, codebook_size: int = 256, fsq_levels=None, seed: int = 0, *,
                 init_codebooks=None, config: ResKMeansFSQConfig | None = None, **settings):
        if config is None:
            config = ResKMeansFSQConfig(levels=levels, codebook_size=codebook_size,
                                        fsq_levels=tuple(fsq_levels) if fsq_levels else None, seed=seed, **settings)
        super().__init__(config)
        self.rq = RQKMeans(config=config.rq_config(), init_codebooks=init_codebooks)
        self.fsq: ScalarGrid | None = None

    @classmethod
    def config_class(cls):
        return ResKMeansFSQConfig

    @property
    def is_fitted(self) -> bool:
        return self.fsq is not None

    @property
    def codebook_sizes(self) -> list[int]:
        return self.config.rq_config().codebook_sizes + [int(np.prod(self.config.bins))]

    @property
    def codebooks(self) -> list[np.ndarray]:
        """k-means codebooks plus the FSQ level's materialised (prod(fsq_levels), d) table."""
        self._require_fitted()
        table = self.fsq.decode(np.arange(self.fsq.size, dtype=np.int64))
        return list(self.rq.codebooks) + [table]

    def fit(self, x) -> "ResKMeansFSQ":
        x = check_embeddings(x, min_rows=self.config.codebook_size,
                             min_rows_reason=f" (one per centroid: codebook_size {self.config.codebook_size})")
        t0 = time.perf_counter()
        self.rq.fit(x)
        residual = x - self.rq.decode(self.rq.encode(x))  # (N, d)
        self.fsq = ScalarGrid(self.config.bins, self.config.fsq_grid).fit(residual)
        self.fit_stats = {**self.rq.fit_stats, "seconds": round(time.perf_counter() - t0, 4),
                          "fsq_bins": list(self.config.bins)}
        log.info("res-kmeans-fsq: FSQ level %s (%d codes) fitted on %d residuals", self.config.bins,
                 self.fsq.size, residual.shape[0])
        return self

    def encode(self, x, *, balanced: bool | None = None) -> np.ndarray:
        """(N, d) -> (N, L) int32 codes."""
        self._require_fitted()
        x = check_embeddings(x, dim=self.rq.dim)
        head = self.rq.encode(x, balanced=balanced)  # (N, L-1)
        last = self.fsq.encode(x - self.rq.decode(head))  # (N,)
        return np.concatenate([head, last[:, None].astype(np.int32)], axis=1)

    def decode(self, codes) -> np.ndarray:
        """(N, L) -> (N, d) float32."""
        self._require_fitted()
        codes = check_codes(codes, levels=self.config.levels, codebook_sizes=self.codebook_sizes)
        return self.rq.decode(codes[:, :-1]) + self.fsq.decode(codes[:, -1])

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"codebook_{level}": c for level, c in enumerate(self.rq.codebooks)}
        arrays["fsq_mean"] = self.fsq.mean
        arrays["fsq_projection"] = self.fsq.projection
        for j, (e, v) in enumerate(zip(self.fsq.edges, self.fsq.values)):
            arrays[f"fsq_edges_{j}"] = e
            arrays[f"fsq_values_{j}"] = v
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        self.rq = RQKMeans(config=self.config.rq_config())
        self.rq._restore(arrays, extra)
        grid = ScalarGrid(self.config.bins, self.config.fsq_grid)
        grid.mean = arrays["fsq_mean"]
        grid.projection = arrays["fsq_projection"]
        grid.edges = [arrays[f"fsq_edges_{j}"] for j in range(len(grid.bins))]
        grid.values = [arrays[f"fsq_values_{j}"] for j in range(len(grid.bins))]
        self.fsq = grid
