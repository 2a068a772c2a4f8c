"""RQ-Kmeans (QARM): residual k-means, L levels x K centroids, trained level by level on residuals, then refined
jointly (every level's codebook re-fitted to the codes of all levels)."""
from __future__ import annotations

import dataclasses
import logging
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
        seed: seeds the training sample and each level's k-means (level l uses seed + l).
        balanced: size-constrained assignment (OneRec style): each centroid takes at most
            ceil(N / K * (1 + balance_slack)) items, in training and (by default) in ``encode``.
        balance_slack: extra capacity share for balanced assignment.
        sample: train on this many rows drawn without replacement (None: all rows).
        init: seeding of each level's cold-start k-means: 'k-means++' (on a subsample; see
            kmeans.seed_centroids) or 'random' (K distinct rows, faiss's own seeding).
        niter: most Lloyd steps of each level's cold-start k-means (blocked-GEMM search; fewer once a step gains
            less than ``tol``). Most of the fit is the joint refinement that follows; 0 keeps the seeds.
        nredo: cold-start k-means restarts per level (the lowest inertia is kept).
        refine_iter: most rounds of joint refinement (all levels re-fitted to the codes, then re-encoded) after
            the cold start, or from warm-start codebooks.
        tol: least relative gain of a Lloyd step or of a joint round (a round must also gain more than half the
            optimism of fitting sum(K) centroids to the training rows, see ``joint_min_gain``). Refinement stops
            at the first round that gains less and keeps the codebooks it had, so converged codebooks are a fixed
            point: warm-started refits on unchanged data are churn-free.
        max_points_per_centroid: each level's cold-start k-means runs on at most K times this many rows (faiss's
            rule; the joint refinement uses every training row).
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
    niter: int = 1
    nredo: int = 1
    refine_iter: int = 25
    tol: float = 3e-3
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
        if self.niter < 0:
            raise ValueError(f"niter must be >= 0, got {self.niter}")
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
                    chunk_rows: int | None = None, residual_out: np.ndarray | None = None) -> np.ndarray:
    """Greedy residual encoding, fast path: per block of rows, every level's GEMM nearest-centroid search.

    Centroid norms and transposes are computed once; each block's residual lives in one reused buffer (no
    per-level copies), each level is one ``addmm`` into a reused score buffer, a row argmax
    (:func:`kmeans.row_argmax`) and an in-place subtraction of the chosen centroids.

    Args:
        x: (N, d) float32.
        codebooks: L arrays of shape (K_l, d).
        chunk_rows: rows per block (default: a score block of about 2 MiB on CPU; see kmeans.chunk_rows_for).
        residual_out: optional (N, d) float32 array that receives x minus the decoded codes, subtracted level by
            level in order (the same float32 steps as the level-by-level training residual).
    Returns:
        (N, L) int32 codes.
    """
    import torch

    n, d = x.shape
    kmax = max(c.shape[0] for c in codebooks)
    step = kmeans.chunk_rows_for(kmax, chunk_rows, device)
    cbs = [kmeans.as_tensor(c).to(device) for c in codebooks]
    cts = [c.t().contiguous() for c in cbs]  # (d, K)
    biases = [kmeans.neg_half_sq_norms(c) for c in cbs]  # (K,)
    xt = kmeans.as_tensor(x)
    out = np.empty((n, len(codebooks)), dtype=np.int32)
    # progress for long encodes (about 10 log lines from the first range), silent for small ones
    report_every = max(1, (n // step) // 10) if n * kmax * len(codebooks) >= 2 ** 31 else 0
    last = len(cbs) - 1 if residual_out is None else len(cbs)  # levels whose centroids are subtracted
    t0 = time.perf_counter()

    def encode_range(lo: int, hi: int) -> None:  # rows [lo, hi), block by block, with its own buffers
        rows_max = min(step, hi - lo)
        scores_flat = torch.empty(rows_max * kmax, dtype=torch.float32, device=device)  # (rows, K_l) views
        residual_buf = torch.empty((rows_max, d), dtype=torch.float32, device=device)
        chosen_buf = torch.empty((rows_max, d), dtype=torch.float32, device=device)
        with torch.no_grad():
            for chunk, start in enumerate(range(lo, hi, step)):
                if report_every and lo == 0 and chunk and chunk % report_every == 0:
                    log.info("rq encode: %d/%d rows of the first range, %.1fs", start, hi, time.perf_counter() - t0)
                stop = min(start + step, hi)
                rows = stop - start
                residual = residual_buf[:rows]
                residual.copy_(xt[start:stop])  # (rows, d)
                for level, (c, ct, bias) in enumerate(zip(cbs, cts, biases)):
                    scores = scores_flat[: rows * c.shape[0]].view(rows, c.shape[0])
                    torch.addmm(bias, residual, ct, out=scores)  # (rows, K) = r.c - |c|^2/2
                    idx, _ = kmeans.row_argmax(scores, with_values=False)  # (rows,)
                    out[start:stop, level] = idx
                    if level < last:
                        chosen = torch.index_select(c, 0, torch.from_numpy(idx).to(device), out=chosen_buf[:rows])
                        residual.sub_(chosen)
                if residual_out is not None:
                    residual_out[start:stop] = residual.cpu().numpy()

    kmeans.for_row_ranges(n, step, device, encode_range)
    return out


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


# A joint round must gain more than this share of the error per (sum of K) / (training rows): about half the
# optimism of fitting that many centroids to that many rows (k-means' training error is below its held-out error by
# roughly K / rows of it), so rounds stop where their gain would mostly be fitting noise.
_OPTIMISM_SHARE = 0.5


def joint_min_gain(tol: float, codebook_sizes: list[int], train_rows: int) -> float:
    """Least relative gain a joint-refinement round must bring: ``tol``, or half the optimism of the fit when that
    is larger (see ``_OPTIMISM_SHARE``)."""
    return max(tol, _OPTIMISM_SHARE * sum(codebook_sizes) / train_rows)


def _sq_sum(a: np.ndarray) -> float:
    """Sum of squares of a float32 array, accumulated in float64."""
    return float(np.einsum("nd,nd->", a, a, dtype=np.float64))


def worst_rows(errors: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest of (N,) errors, largest first, the lower index first on ties (deterministic)."""
    m = min(m, errors.shape[0])
    kth = -np.partition(-errors, m - 1)[m - 1]  # the m-th largest value: O(N), no full sort
    above = np.flatnonzero(errors > kth)
    top = np.concatenate([above, np.flatnonzero(errors == kth)[: m - above.size]])
    return top[np.lexsort((top, -errors[top]))]


def refit_codebooks(codebooks: list[np.ndarray], codes: np.ndarray, residual: np.ndarray) -> list[np.ndarray]:
    """One sweep of least-squares codebook updates with the codes fixed (block coordinate descent over levels).

    For each level in turn, its centroids become the mean of their rows' target, the row minus every *other*
    level's centroid: target = residual + own centroid, so the new centroid is the old one plus the mean residual
    of its rows, and the rows' residual drops by that shift (one pass over the residual per level instead of
    three). A centroid without rows is moved onto the target of the row worst served after the update (largest
    residual, lowest index on ties; faiss splits a large cluster instead), so the next encode can use it; the
    rows' codes, and so the residual, are not changed here.

    Args:
        codebooks: L arrays (K_l, d).
        codes: (N, L) codes.
        residual: (N, d) x minus the decoded codes; consumed (updated in place).

    Returns:
        L new arrays (K_l, d).
    """
    new = []
    for level, c in enumerate(codebooks):
        assign = codes[:, level]
        shift = kmeans.centroid_means(residual, assign, np.zeros_like(c))  # (K, d) mean residual per centroid
        residual -= shift[assign]
        c_new = c + shift
        empty = np.flatnonzero(np.bincount(assign, minlength=c.shape[0]) == 0)
        if empty.size:
            worst = worst_rows(kmeans.row_sq_norms(residual), empty.size)
            c_new[empty[: worst.size]] = c_new[assign[worst]] + residual[worst]
        new.append(c_new)
    return new


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
        return kmeans.balanced_capacity(n, k, self.config.balance_slack)

    def fit(self, x, progress: Callable[[int, int], None] | None = None) -> "RQKMeans":
        """Train the L codebooks: level by level on residuals (cold start), then joint refinement. x: (N, d).

        Cold start: each level's k-means (seeding + at most ``niter`` Lloyd steps) on the residual of the levels
        before it. Warm start: the ``init_codebooks``. Then at most ``refine_iter`` rounds of joint refinement
        (:meth:`_joint_refine`), whose stopping rule makes a warm refit on unchanged data return the codebooks
        bit for bit. Returns self.

        ``progress(done, total)`` is called after each cold-start level (the caller's progress reporter, e.g.
        ``feature_store.progress.Progress.callback()``); the library itself only logs one line per level.
        """
        cfg = self.config
        kmax = max(cfg.codebook_sizes)
        x = check_embeddings(x, min_rows=kmax, min_rows_reason=f" (one per centroid: codebook_size {kmax})")
        if self._init is not None and self._init[0].shape[1] != x.shape[1]:
            raise ValueError(f"init_codebooks have dimension {self._init[0].shape[1]}, data has {x.shape[1]}")
        device = kmeans.resolve_device(cfg.device)
        use_gpu = kmeans.resolve_faiss_gpu(cfg.faiss_gpu)
        train = x
        if cfg.sample is not None and cfg.sample < x.shape[0]:
            if cfg.sample < kmax:
                raise ValueError(f"sample={cfg.sample} is smaller than codebook_size {kmax}")
            rng = np.random.default_rng(cfg.seed)
            train = x[np.sort(rng.choice(x.shape[0], size=cfg.sample, replace=False))]  # (S, d)
        if train.shape[0] < 39 * kmax:  # faiss's own threshold for a trustworthy k-means
            log.warning("rq-kmeans trains on %d rows for codebook_size %d (%.1f per centroid, < 39): deeper "
                        "levels fit the training residuals too closely, so codes of unseen rows degrade and "
                        "collide; use a larger sample or smaller codebooks", train.shape[0], kmax,
                        train.shape[0] / kmax)
        t0 = time.perf_counter()
        if self._init is not None:
            codebooks, level_stats = list(self._init), [{} for _ in self._init]
            residual = np.empty_like(train)
            codes = self._encode_rows(train, codebooks, balanced=cfg.balanced, device=device, residual_out=residual)
        else:
            codebooks, codes, residual, level_stats = self._fit_levels(train, device, use_gpu, progress)
        t_joint = time.perf_counter()
        codebooks, codes, joint = self._joint_refine(train, codebooks, codes, residual, device)
        joint["seconds"] = round(time.perf_counter() - t_joint, 4)
        self.codebooks = codebooks
        self._record_fit_stats(train, codes, level_stats, joint, n_rows=x.shape[0], use_gpu=use_gpu,
                               device=device, seconds=time.perf_counter() - t0)
        return self

    def _fit_levels(self, train: np.ndarray, device: str, use_gpu: bool,
                    progress: Callable[[int, int], None] | None = None):
        """Cold start: one k-means per level on the residual of the levels before. train: (S, d).

        Returns (L codebooks (K_l, d), (S, L) int32 greedy codes of train, (S, d) residual, per-level stats).
        """
        cfg = self.config
        residual = train.copy()  # (S, d), updated in place level by level: the only copy of the training rows
        codes = np.empty((train.shape[0], cfg.levels), dtype=np.int32)
        codebooks, level_stats = [], []
        for level, k in enumerate(cfg.codebook_sizes):
            t_level = time.perf_counter()
            c, stats, assign = kmeans.kmeans_fit(
                residual, k, niter=cfg.niter, seed=cfg.seed + level, init=cfg.init, nredo=cfg.nredo, tol=cfg.tol,
                max_points_per_centroid=cfg.max_points_per_centroid,
                balance_slack=cfg.balance_slack if cfg.balanced else None, device=device, use_faiss_gpu=use_gpu)
            residual -= c[assign]
            codes[:, level] = assign
            stats.update(seconds=round(time.perf_counter() - t_level, 4))
            log.info("rq-kmeans level %d/%d: K=%d, %d Lloyd iters (converged=%s), %.2fs", level + 1, cfg.levels,
                     k, stats["iterations"], stats["converged"], stats["seconds"])
            level_stats.append(stats)
            codebooks.append(c)
            if progress is not None:
                progress(level + 1, cfg.levels)
        return codebooks, codes, residual, level_stats

    def _joint_refine(self, train: np.ndarray, codebooks: list[np.ndarray], codes: np.ndarray,
                      residual: np.ndarray, device: str):
        """Joint refinement: every level's codebook re-fitted to the codes of all levels, then re-encoded.

        Greedy level-by-level k-means fits the first levels as if the later ones did not exist; alternating
        between the codebooks and the codes recovers most of that loss. A round:

        1. re-fits the levels in turn by least squares with the codes fixed (each centroid becomes the mean of its
           rows' target: the row minus every other level's centroid). This costs no GEMM, and its error (new
           codebooks, current codes) is known at once. If it lowers the squared error by at most
           :func:`joint_min_gain` of it, refinement has converged: the current codebooks are returned, not the
           re-fit ones.
        2. re-encodes the rows with the re-fitted codebooks, exactly as ``encode`` does (one encode of the
           training rows: the round's only GEMM work). If the re-encoded error is not below the current one, the
           current codebooks are returned; otherwise the round is kept.

        Both decisions are pure functions of (train, current codebooks), so refining returned codebooks again on
        the same rows returns them bit for bit (zero churn on an unchanged warm refit), and the converged round
        costs no encode.

        Args:
            train: (S, d) training rows.
            codebooks: L arrays (K_l, d).
            codes: (S, L) greedy (or balanced) codes of train under ``codebooks``.
            residual: (S, d) train minus the decoded codes, subtracted level by level; consumed.

        Returns:
            (codebooks, (S, L) codes, stats {rounds kept, converged (stopped by a rule, not by refine_iter),
            sq_error, min_gain}).
        """
        cfg = self.config
        error = _sq_sum(residual)
        min_gain = joint_min_gain(cfg.tol, cfg.codebook_sizes, train.shape[0])
        stats = {"rounds": 0, "converged": False, "sq_error": error, "min_gain": min_gain}
        new_residual = np.empty_like(residual)
        for round_ in range(1, cfg.refine_iter + 1):
            candidate = refit_codebooks(codebooks, codes, residual)  # residual becomes train - (candidate, codes)
            refit_error = _sq_sum(residual)
            if error - refit_error <= min_gain * error:
                stats.update(converged=True)
                break
            new_codes = self._encode_rows(train, candidate, balanced=cfg.balanced, device=device,
                                          residual_out=new_residual)
            new_error = _sq_sum(new_residual)
            log.debug("rq-kmeans joint round %d: squared error %.6g -> re-fit %.6g -> re-encoded %.6g", round_,
                      error, refit_error, new_error)
            if new_error >= error:
                stats.update(converged=True)
                break
            codebooks, codes, error = candidate, new_codes, new_error
            residual, new_residual = new_residual, residual  # swap buffers: no allocation per round
            stats.update(rounds=round_, sq_error=error)
        log.info("rq-kmeans joint refinement: %d rounds kept (converged=%s)", stats["rounds"], stats["converged"])
        return codebooks, codes, stats

    def _record_fit_stats(self, train, codes, level_stats, joint, *, n_rows, use_gpu, device, seconds) -> None:
        """fit_stats: per level the final training rel_mse after that level and the codes used, plus the cold
        start's k-means figures (empty on a warm start); the joint refinement's rounds."""
        total_var = float(((train - train.mean(axis=0)) ** 2).sum()) or 1.0
        residual = train.copy()
        for level, c in enumerate(self.codebooks):
            residual -= c[codes[:, level]]
            rel = _sq_sum(residual) / total_var
            level_stats[level].update(level=level, codebook_size=int(c.shape[0]), rel_mse=rel,
                                      used=int(np.unique(codes[:, level]).size))
        joint["rel_mse"] = level_stats[-1]["rel_mse"]
        self.fit_stats = {"train_rows": int(train.shape[0]), "n_rows": int(n_rows),
                          "warm_start": self._init is not None, "faiss_gpu": use_gpu, "device": device,
                          "seconds": round(seconds, 4), "levels": level_stats, "joint": joint}
        log.info("rq-kmeans: training rel_mse %.4f after %d levels, %.2fs", joint["rel_mse"], len(level_stats),
                 seconds)

    def _encode_rows(self, x: np.ndarray, codebooks: list[np.ndarray], *, balanced: bool, device: str,
                     chunk_rows: int | None = None, residual_out: np.ndarray | None = None) -> np.ndarray:
        """Codes of validated rows x (N, d) under ``codebooks``: greedy fast path, or level-wise balanced.
        ``residual_out``: optional (N, d) array receiving x minus the decoded codes."""
        if not balanced:
            return residual_encode(x, codebooks, device=device, chunk_rows=chunk_rows, residual_out=residual_out)
        residual = x.copy() if residual_out is None else residual_out
        if residual_out is not None:
            residual[...] = x
        codes = np.empty((x.shape[0], len(codebooks)), dtype=np.int32)
        for level, c in enumerate(codebooks):
            a = kmeans.balanced_assign(residual, c, self._capacity(x.shape[0], c.shape[0]), device=device)
            residual -= c[a]
            codes[:, level] = a
        return codes

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
        return self._encode_rows(x, self.codebooks, balanced=use_balanced,
                                 device=kmeans.resolve_device(self.config.device), chunk_rows=chunk_rows)

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
