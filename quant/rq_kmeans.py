"""RQ-Kmeans (QARM): residual k-means, L levels x K centroids, trained level by level on residuals."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from quant import kmeans
from quant.base import Quantizer, check_codes, check_embeddings, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RQKMeansConfig:
    """Settings of an RQ-Kmeans quantizer.

    Args:
        levels: number of residual levels L.
        codebook_size: centroids per level K (one int for every level, or a tuple of L ints).
        seed: seeds the training sample and faiss k-means (level l uses seed + l).
        balanced: size-constrained assignment (OneRec style): each centroid takes at most
            ceil(N / K * (1 + balance_slack)) items, in training and (by default) in ``encode``.
        balance_slack: extra capacity share for balanced assignment.
        sample: train on this many rows drawn without replacement (None: all rows).
        init: cold-start seeding of faiss k-means: 'k-means++' (greedy on a subsample; see kmeans.faiss_kmeans)
            or 'random'.
        niter: faiss k-means iterations for a cold start.
        nredo: faiss k-means restarts (the best is kept).
        refine_iter: most Lloyd iterations after the faiss start (or from warm-start codebooks).
        tol: Lloyd stops when a step lowers the inertia by less than this share; converged codebooks are a fixed
            point of the refinement, which is what makes warm-started refits on unchanged data churn-free.
        max_points_per_centroid: faiss subsamples to this many rows per centroid for its k-means.
        device: torch device for encode GEMMs: 'auto' (GPU when present), 'cpu', 'cuda'.
        faiss_gpu: 'auto' (faiss GPU when present), True, or False.
    """

    levels: int = 3
    codebook_size: int | tuple[int, ...] = 256
    seed: int = 0
    balanced: bool = False
    balance_slack: float = 0.0
    sample: int | None = None
    init: str = "k-means++"
    niter: int = 10
    nredo: int = 1
    refine_iter: int = 25
    tol: float = 1e-3
    max_points_per_centroid: int = 256
    device: str = "auto"
    faiss_gpu: bool | str = "auto"

    def __post_init__(self):
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels must be a positive int, got {self.levels!r}")
        sizes = self.codebook_sizes
        if len(sizes) != self.levels:
            raise ValueError(f"codebook_size has {len(sizes)} entries for {self.levels} levels")
        if any((not isinstance(k, (int, np.integer))) or k < 2 for k in sizes):
            raise ValueError(f"codebook_size entries must be ints >= 2, got {self.codebook_size!r}")
        if self.balance_slack < 0:
            raise ValueError(f"balance_slack must be >= 0, got {self.balance_slack}")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample must be None or >= 1, got {self.sample}")
        if self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")
        if self.init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++' or 'random', got {self.init!r}")
        if self.nredo < 1:
            raise ValueError(f"nredo must be >= 1, got {self.nredo}")
        if not 0 <= self.tol < 1:
            raise ValueError(f"tol must be in [0, 1), got {self.tol}")
        if self.refine_iter < 0:
            raise ValueError(f"refine_iter must be >= 0, got {self.refine_iter}")
        if self.max_points_per_centroid < 1:
            raise ValueError(f"max_points_per_centroid must be >= 1, got {self.max_points_per_centroid}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.faiss_gpu not in ("auto", True, False):
            raise ValueError(f"faiss_gpu must be 'auto', True or False, got {self.faiss_gpu!r}")

    @property
    def codebook_sizes(self) -> list[int]:
        if isinstance(self.codebook_size, (tuple, list)):
            return [int(k) for k in self.codebook_size]
        return [int(self.codebook_size)] * self.levels


def residual_encode(x: np.ndarray, codebooks: list[np.ndarray], *, device: str = "cpu",
                    chunk_rows: int | None = None) -> np.ndarray:
    """Greedy residual encoding, fast path: per chunk of rows, every level's GEMM nearest-centroid search.

    Args:
        x: (N, d) float32.
        codebooks: L arrays of shape (K_l, d).
    Returns:
        (N, L) int32 codes.
    """
    import torch

    n = x.shape[0]
    kmax = max(c.shape[0] for c in codebooks)
    step = chunk_rows or kmeans.chunk_rows_for(kmax)
    cbs = [kmeans.as_tensor(c).to(device) for c in codebooks]
    cts = [c.t().contiguous() for c in cbs]  # (d, K)
    biases = [-0.5 * (c * c).sum(dim=1) for c in cbs]  # (K,)
    xt = kmeans.as_tensor(x)
    out = torch.empty((n, len(codebooks)), dtype=torch.int32)
    buf = torch.empty((min(step, n), kmax), dtype=torch.float32, device=device)
    # progress for long encodes (about 10 log lines), silent for small ones
    report_every = max(1, (n // step) // 10) if n * kmax * len(codebooks) >= 2 ** 31 else 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk, start in enumerate(range(0, n, step)):
            if report_every and chunk and chunk % report_every == 0:
                log.info("rq encode: %d/%d rows (%.0f%%), %.1fs", start, n, 100.0 * start / n,
                         time.perf_counter() - t0)
            stop = min(start + step, n)
            rows = stop - start
            residual = xt[start:stop].to(device, copy=True)  # (rows, d)
            for level, (c, ct, bias) in enumerate(zip(cbs, cts, biases)):
                scores = torch.addmm(bias, residual, ct, out=buf[:rows, : c.shape[0]])  # (rows, K)
                idx = scores.argmax(dim=1)  # (rows,)
                residual -= c.index_select(0, idx)
                out[start:stop, level] = idx.to(torch.int32).cpu()
    return out.numpy()


def residual_encode_reference(x: np.ndarray, codebooks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Slow plain reference of ``residual_encode``: float64 full distance matrices.

    Returns (codes (N, L) int64, margins (N, L): gap to the second-best centroid at each level).
    """
    residual = x.astype(np.float64)
    codes, margins = [], []
    for c in codebooks:
        idx, _, margin = kmeans.nearest_centroids_reference(residual, c)
        residual = residual - c.astype(np.float64)[idx]
        codes.append(idx)
        margins.append(margin)
    return np.stack(codes, axis=1), np.stack(margins, axis=1)


@register
class RQKMeans(Quantizer):
    """Residual k-means quantizer (faiss-style ``fit`` / ``encode`` / ``decode``).

    Example:
        >>> q = RQKMeans(levels=3, codebook_size=256, seed=0).fit(x)     # x: (N, d) float32
        >>> codes = q.encode(x)                                          # (N, 3) int32
        >>> x_hat = q.decode(codes)                                      # (N, d) float32

    Args:
        levels, codebook_size, seed, balanced, sample, ...: see :class:`RQKMeansConfig`.
        init_codebooks: warm start: previous codebooks (L arrays (K_l, d)); the refit skips faiss and runs Lloyd
            from them, so unchanged data gives unchanged codes.
        config: a ready :class:`RQKMeansConfig` instead of keyword settings.
    """

    method = "rq-kmeans"

    def __init__(self, levels: int = 3, codebook_size: int | tuple[int, ...] = 256, seed: int = 0,
                 balanced: bool = False, sample: int | None = None, init_codebooks=None, *,
                 config: RQKMeansConfig | None = None, **settings):
        if config is None:
            config = RQKMeansConfig(levels=levels, codebook_size=codebook_size, seed=seed, balanced=balanced,
                                    sample=sample, **settings)
        super().__init__(config)
        self.codebooks: list[np.ndarray] | None = None
        self._init = None
        if init_codebooks is not None:
            self._init = self._check_init(init_codebooks)

    @classmethod
    def config_class(cls):
        return RQKMeansConfig

    @property
    def is_fitted(self) -> bool:
        return self.codebooks is not None

    @property
    def dim(self) -> int:
        self._require_fitted()
        return self.codebooks[0].shape[1]

    def _check_init(self, init) -> list[np.ndarray]:
        init = [np.ascontiguousarray(c, dtype=np.float32) for c in init]
        sizes = self.config.codebook_sizes
        if len(init) != len(sizes):
            raise ValueError(f"init_codebooks has {len(init)} levels, config has {len(sizes)}")
        for level, (c, k) in enumerate(zip(init, sizes)):
            if c.ndim != 2 or c.shape[0] != k:
                raise ValueError(f"init_codebooks level {level}: shape {c.shape}, expected ({k}, d)")
            if c.shape[1] != init[0].shape[1]:
                raise ValueError(f"init_codebooks level {level}: dimension {c.shape[1]} != {init[0].shape[1]}")
            if not np.isfinite(c).all():
                raise ValueError(f"init_codebooks level {level}: non-finite values")
        return init

    def _capacity(self, n: int, k: int) -> int:
        return int(math.ceil(n / k * (1.0 + self.config.balance_slack)))

    def fit(self, x, progress: Callable[[int, int], None] | None = None) -> "RQKMeans":
        """Train the L codebooks level by level on residuals. x: (N, d). Returns self.

        ``progress(done, total)`` is called after each level (the caller's progress reporter, e.g.
        ``feature_store.progress.Progress.callback()``); the library itself only logs one line per level.
        """
        cfg = self.config
        kmax = max(cfg.codebook_sizes)
        x = check_embeddings(x, min_rows=kmax, min_rows_reason=f" (one per centroid: codebook_size {kmax})")
        if self._init is not None and self._init[0].shape[1] != x.shape[1]:
            raise ValueError(f"init_codebooks have dimension {self._init[0].shape[1]}, data has {x.shape[1]}")
        device = kmeans.resolve_device(cfg.device)
        use_gpu = kmeans.resolve_faiss_gpu(cfg.faiss_gpu)
        rows = None
        if cfg.sample is not None and cfg.sample < x.shape[0]:
            if cfg.sample < kmax:
                raise ValueError(f"sample={cfg.sample} is smaller than codebook_size {kmax}")
            rng = np.random.default_rng(cfg.seed)
            rows = np.sort(rng.choice(x.shape[0], size=cfg.sample, replace=False))
        train = x[rows] if rows is not None else x.copy()  # (S, d), becomes the residual in place
        if train.shape[0] < 39 * kmax:  # faiss's own threshold for a trustworthy k-means
            log.warning("rq-kmeans trains on %d rows for codebook_size %d (%.1f per centroid, < 39): deeper "
                        "levels fit the training residuals too closely, so codes of unseen rows degrade and "
                        "collide; use a larger sample or smaller codebooks", train.shape[0], kmax,
                        train.shape[0] / kmax)
        total_var = float(((train - train.mean(axis=0)) ** 2).sum()) or 1.0
        t0 = time.perf_counter()
        codebooks, level_stats = [], []
        for level, k in enumerate(cfg.codebook_sizes):
            t_level = time.perf_counter()
            if self._init is not None:
                start = self._init[level]
            else:
                start = kmeans.faiss_kmeans(train, k, niter=cfg.niter, seed=cfg.seed + level, use_gpu=use_gpu,
                                            nredo=cfg.nredo, init=cfg.init,
                                            max_points_per_centroid=cfg.max_points_per_centroid)
            capacity = self._capacity(train.shape[0], k) if cfg.balanced else None
            if cfg.refine_iter > 0:
                c, stats, assign = kmeans.lloyd_refine(train, start, max_iter=cfg.refine_iter, tol=cfg.tol,
                                                       balanced=cfg.balanced, capacity=capacity, device=device,
                                                       return_assignment=True)
            else:
                c, stats = start, {"iterations": 0, "converged": False, "inertia": None}
                if cfg.balanced:
                    assign = kmeans.balanced_assign(train, c, capacity, device=device)
                else:
                    assign = kmeans.nearest_centroids(train, c, device=device)
            train -= c[assign]
            rel = float((train * train).sum()) / total_var
            stats.update(level=level, seconds=round(time.perf_counter() - t_level, 4), rel_mse=rel,
                         used=int(np.unique(assign).size), codebook_size=k)
            level_stats.append(stats)
            codebooks.append(c)
            log.info("rq-kmeans level %d/%d: K=%d, %d Lloyd iters (converged=%s), used %d, rel_mse %.4f, %.2fs",
                     level + 1, cfg.levels, k, stats["iterations"], stats["converged"], stats["used"], rel,
                     stats["seconds"])
            if progress is not None:
                progress(level + 1, cfg.levels)
        self.codebooks = codebooks
        self.fit_stats = {"train_rows": int(train.shape[0]), "n_rows": int(x.shape[0]),
                          "warm_start": self._init is not None, "faiss_gpu": use_gpu, "device": device,
                          "seconds": round(time.perf_counter() - t0, 4), "levels": level_stats}
        return self

    def encode(self, x, *, balanced: bool | None = None, chunk_rows: int | None = None) -> np.ndarray:
        """Codes of x: (N, d) -> (N, L) int32.

        Args:
            x: (N, d) embeddings.
            balanced: use size-constrained assignment over this batch (default: the config's ``balanced``).
                Balanced codes depend on the whole batch: encode the full catalog at once; encode new items
                with ``balanced=False``.
            chunk_rows: rows per GEMM block (default: automatic).
        """
        self._require_fitted()
        x = check_embeddings(x, dim=self.dim)
        use_balanced = self.config.balanced if balanced is None else balanced
        device = kmeans.resolve_device(self.config.device)
        if not use_balanced:
            return residual_encode(x, self.codebooks, device=device, chunk_rows=chunk_rows)
        residual = x.copy()
        codes = np.empty((x.shape[0], len(self.codebooks)), dtype=np.int32)
        for level, c in enumerate(self.codebooks):
            a = kmeans.balanced_assign(residual, c, self._capacity(x.shape[0], c.shape[0]), device=device)
            residual -= c[a]
            codes[:, level] = a
        return codes

    def decode(self, codes) -> np.ndarray:
        """Reconstruction: sum of each level's centroid. codes (N, L) -> (N, d) float32."""
        self._require_fitted()
        codes = check_codes(codes, levels=len(self.codebooks), codebook_sizes=self.config.codebook_sizes)
        out = np.zeros((codes.shape[0], self.dim), dtype=np.float32)
        for level, c in enumerate(self.codebooks):
            out += c[codes[:, level]]
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f"codebook_{level}": c for level, c in enumerate(self.codebooks)}

    def _restore(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        self.codebooks = [np.ascontiguousarray(arrays[f"codebook_{level}"], dtype=np.float32)
                          for level in range(self.config.levels)]
        self._init = None

    def warm_start(self, **overrides) -> "RQKMeans":
        """A new unfitted quantizer with this one's config (optionally changed) and codebooks as init."""
        self._require_fitted()
        return RQKMeans(config=dataclasses.replace(self.config, **overrides), init_codebooks=self.codebooks)
