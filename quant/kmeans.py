"""k-means building blocks: GEMM nearest-centroid search, balanced assignment, seeding, Lloyd, one level's fit.

The nearest centroid of x among C minimises ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, i.e. maximises
x.c - ||c||^2 / 2: one GEMM per chunk of rows with the bias folded in (``torch.addmm``), then a row max.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

# Rows per GEMM chunk are chosen so a (rows, K) score block stays near this many floats (2 MiB: about the L2 of
# one or two cores, so the argmax reads what the GEMM just wrote from cache; measured against 1 MiB and 4 MiB
# blocks at K = 256 / 1024 / 4096, d = 64, it is the one within ~10% of a large plain GEMM at every K).
_SCORE_BLOCK_FLOATS = 1 << 19
# On a GPU a block is one kernel launch and one device-to-host copy of its argmax: blocks of up to 256 MiB of
# scores (about a million rows at K = 64) keep the launches and copies a small share of the work.
_GPU_SCORE_BLOCK_FLOATS = 1 << 26


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'. Explicit 'cuda' without a GPU is an error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but torch sees no CUDA GPU")
    return device


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_faiss_gpu(setting) -> bool:
    """'auto' -> whether faiss has a GPU; True without one is a clear error rather than a faiss crash."""
    if setting == "auto":
        return faiss_has_gpu()
    if setting and not faiss_has_gpu():
        raise ValueError("faiss_gpu=True but this faiss build sees no GPU (faiss-cpu is installed, or no CUDA "
                         "device); use faiss_gpu='auto' or install the [gpu] extra")
    return bool(setting)


def as_tensor(a: np.ndarray):
    """float32 numpy -> CPU torch tensor sharing memory when possible (read-only arrays are copied, because
    torch cannot wrap them safely)."""
    import torch

    a = np.ascontiguousarray(a, dtype=np.float32)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def chunk_rows_for(k: int, chunk_rows: int | None = None, device: str = "cpu") -> int:
    """Rows per GEMM block against k centroids on ``device`` (explicit chunk_rows wins)."""
    if chunk_rows:
        return int(chunk_rows)
    if str(device).startswith("cuda"):
        return int(min(1 << 20, max(128, _GPU_SCORE_BLOCK_FLOATS // max(k, 1))))
    return int(min(65536, max(128, _SCORE_BLOCK_FLOATS // max(k, 1))))


def row_argmax(scores, *, with_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Index (first maximum on ties) and value of each row's maximum in a (rows, K) float32 score block.

    On CPU numpy's SIMD argmax: torch's ``max(dim=1)`` with indices costs about as much as the GEMM that produced
    the block (measured: ~1.6-2.5 ns per score against ~0.15-0.3 ns for numpy), which is what kept the search
    at 2-3x the GEMM bound. On a GPU, torch's own reduction.

    Returns:
        (rows,) int64 indices and (rows,) float32 maxima (None unless ``with_values``), as numpy arrays.
    """
    if scores.device.type == "cpu":
        s = scores.numpy()
        idx = np.argmax(s, axis=1)
        return idx, (np.take_along_axis(s, idx[:, None], axis=1)[:, 0] if with_values else None)
    best, idx = scores.max(dim=1)
    return idx.cpu().numpy(), (best.cpu().numpy() if with_values else None)


def neg_half_sq_norms(centroids, excluded: np.ndarray | None = None):
    """(K,) bias -||c||^2 / 2 of a (K, d) centroid tensor, -inf where ``excluded``: the score x.c + bias is the
    nearest-centroid criterion."""
    import torch

    bias = -0.5 * (centroids * centroids).sum(dim=1)
    if excluded is not None:
        if excluded.all():
            raise ValueError("every centroid is excluded; nothing to assign to")
        bias[torch.from_numpy(np.asarray(excluded, dtype=bool)).to(bias.device)] = -math.inf
    return bias


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, *, excluded: np.ndarray | None = None,
                      chunk_rows: int | None = None, device: str = "cpu",
                      return_distances: bool = False, x_sq_norms: np.ndarray | None = None):
    """Index of the nearest centroid (squared L2) for every row: blocked GEMM, then a row argmax per block.

    The centroid norms are computed once; each block of rows is one ``addmm`` (scores x.c - ||c||^2 / 2, written
    into a reused buffer that stays in cache) and one row argmax (:func:`row_argmax`). No copy of x is made.

    Args:
        x: (N, d) float32.
        centroids: (K, d) float32.
        excluded: optional (K,) bool; True centroids are never chosen (balanced assignment masks full ones).
        chunk_rows: rows per GEMM block (default: about 512k scores, 2 MiB, per block on CPU; see chunk_rows_for).
        device: torch device for the GEMM ('cpu' or 'cuda').
        return_distances: also return the (N,) squared distances.
        x_sq_norms: optional precomputed (N,) squared norms of x (for the distances; Lloyd reuses them).

    Returns:
        (N,) int64 indices, and (N,) float32 squared distances when asked.
    """
    import torch

    n, k = x.shape[0], centroids.shape[0]
    c = as_tensor(centroids).to(device)
    bias = neg_half_sq_norms(c, excluded)  # (K,)
    ct = c.t().contiguous()  # (d, K)
    xt = as_tensor(x)
    step = chunk_rows_for(k, chunk_rows, device)
    idx_out = np.empty(n, dtype=np.int64)
    best_out = np.empty(n if return_distances else 0, dtype=np.float32)

    def search(lo: int, hi: int) -> None:  # rows [lo, hi), block by block, with its own score buffer
        buf = torch.empty((min(step, hi - lo), k), dtype=torch.float32, device=device)
        with torch.no_grad():
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                xb = xt[start:stop].to(device, non_blocking=True)
                scores = torch.addmm(bias, xb, ct, out=buf[: stop - start])  # (rows, K) = x.c - |c|^2/2
                idx, best = row_argmax(scores, with_values=return_distances)
                idx_out[start:stop] = idx
                if return_distances:
                    best_out[start:stop] = best

    for_row_ranges(n, step, device, search)
    if not return_distances:
        return idx_out
    sq = row_sq_norms(x) if x_sq_norms is None else x_sq_norms
    dist = np.maximum(sq - 2.0 * best_out, 0.0)
    return idx_out, dist


def for_row_ranges(n: int, step: int, device: str, body) -> None:
    """Run ``body(lo, hi)`` over rows [0, n): on CPU in one contiguous range of whole ``step``-row blocks per torch
    thread, each on its own Python thread with torch single-threaded inside; otherwise in one call.

    Why: a (step, d) x (d, K) block GEMM is too small to split across threads well, and on a busy machine the
    per-call fork/join of a multi-threaded GEMM costs more than it saves (measured: 2 threads ran the blocked search
    ~4x *slower* than 1 on a loaded 2-core box). One range per thread has a single join. The GEMM and numpy's
    argmax release the GIL. Ranges start on block boundaries, so every block, and so every result, is bit for bit
    the one a single thread computes.
    """
    import torch

    blocks = -(-n // step)
    workers = min(torch.get_num_threads(), blocks) if str(device).startswith("cpu") else 1
    if workers <= 1:
        body(0, n)
        return
    from concurrent.futures import ThreadPoolExecutor

    per = -(-blocks // workers) * step
    ranges = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
    with ThreadPoolExecutor(len(ranges), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for future in [pool.submit(body, lo, hi) for lo, hi in ranges]:
            future.result()  # re-raises a worker's error


@contextlib.contextmanager
def one_torch_thread():
    """Torch ops of the calling thread run single-threaded inside (its thread count is restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def row_sq_norms(x: np.ndarray) -> np.ndarray:
    """(N,) float32 squared L2 norms of the rows of an (N, d) array."""
    return np.einsum("nd,nd->n", x, x, dtype=np.float32)


def nearest_centroids_reference(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slow plain reference: full (N, K) squared-distance matrix in float64. Returns (idx, dist, margin).

    ``margin`` is the gap between the best and second-best distance, so tests can ignore near-ties.
    """
    diff = x.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None, :, :]  # (N, K, d)
    dist = (diff * diff).sum(axis=2)  # (N, K)
    order = np.argsort(dist, axis=1, kind="stable")
    best = dist[np.arange(len(x)), order[:, 0]]
    second = dist[np.arange(len(x)), order[:, 1]] if dist.shape[1] > 1 else np.full(len(x), np.inf)
    return order[:, 0], best, second - best


def balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: int, *, device: str = "cpu",
                    chunk_rows: int | None = None) -> np.ndarray:
    """Size-constrained assignment: every centroid takes at most ``capacity`` rows.

    Rounds of proposals: each unassigned row proposes to its nearest non-full centroid; each centroid keeps its
    closest proposals up to its remaining capacity; the rest try again with the newly full centroids masked.
    Every round fills at least one centroid or assigns every proposer, so it terminates; all steps are
    vectorised and deterministic (ties broken by row order).

    Args:
        x: (N, d) float32.
        centroids: (K, d) float32.
        capacity: most rows per centroid; ``capacity * K`` must be at least N.

    Returns:
        (N,) int64 centroid index per row.
    """
    n, k = x.shape[0], centroids.shape[0]
    if capacity * k < n:
        raise ValueError(f"balanced assignment impossible: capacity {capacity} x {k} centroids < {n} rows")
    assign = np.full(n, -1, dtype=np.int64)
    remaining = np.full(k, capacity, dtype=np.int64)
    todo = np.arange(n)
    rounds = 0
    while todo.size:
        rounds += 1
        idx, dist = nearest_centroids(x[todo], centroids, excluded=remaining <= 0, device=device,
                                      chunk_rows=chunk_rows, return_distances=True)
        order = np.lexsort((np.arange(todo.size), dist, idx))  # by centroid, then distance, then row
        idx_sorted = idx[order]
        rank = group_rank(idx_sorted)
        accept = rank < remaining[idx_sorted]
        assign[todo[order[accept]]] = idx_sorted[accept]
        remaining -= np.bincount(idx_sorted[accept], minlength=k)
        todo = np.sort(todo[order[~accept]])
    log.debug("balanced assignment of %d rows to %d centroids took %d rounds", n, k, rounds)
    return assign


def group_rank(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values in an already sorted (N,) array."""
    n = sorted_keys.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    run_lengths = np.diff(np.append(starts, n))
    return np.arange(n, dtype=np.int64) - np.repeat(starts, run_lengths)


def centroid_means(x: np.ndarray, assign: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of the rows assigned to each centroid; an empty centroid keeps its previous value.

    ``index_add_`` on CPU: float32 sums accumulated serially in row order (deterministic, whatever the thread
    count), O(N d), without building a sparse indicator.
    """
    import torch

    k = previous.shape[0]
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float32)
    with one_torch_thread():  # a serial loop over rows: measured 3-4x slower when torch may use 2 threads
        sums.index_add_(0, torch.from_numpy(np.asarray(assign, dtype=np.int64)), as_tensor(x))
    sums = sums.numpy()  # (K, d)
    counts = np.bincount(assign, minlength=k)
    out = previous.copy()
    used = counts > 0
    out[used] = sums[used] / counts[used, None].astype(np.float32)
    return out


def _assign_with_inertia(x, c, *, balanced, capacity, device, x_sq_norms) -> tuple[np.ndarray, float]:
    if balanced:
        a = balanced_assign(x, c, capacity, device=device)
        diff = x - c[a]
        return a, float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
    a, dist = nearest_centroids(x, c, device=device, return_distances=True, x_sq_norms=x_sq_norms)
    return a, float(dist.sum(dtype=np.float64))


def lloyd_refine(x: np.ndarray, centroids: np.ndarray, *, max_iter: int, tol: float = 1e-3,
                 balanced: bool = False, capacity: int | None = None, device: str = "cpu",
                 return_assignment: bool = False):
    """Lloyd iterations from ``centroids`` until converged: the assignment is stable, or one more step would lower
    the inertia (sum of squared distances) by less than ``tol`` of it; at most ``max_iter`` steps.

    The stopping rule is a pure function of (x, current centroids), and on a sub-``tol`` step the current
    centroids are kept, not the update. So refining converged centroids again on the same rows returns them bit
    for bit: that is what makes a warm-started refit on unchanged data produce zero churn.

    Args:
        x: (N, d) float32 training rows.
        centroids: (K, d) starting centroids.
        max_iter: most update steps.
        tol: relative inertia decrease below which a step counts as converged.
        balanced / capacity: size-constrained assignment with at most ``capacity`` rows per centroid.

    Returns:
        (centroids (K, d) float32, stats {iterations, converged, inertia}), plus the rows' (N,) assignment to
        the returned centroids when ``return_assignment``.
    """
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    assign = functools.partial(_assign_with_inertia, x, balanced=balanced, capacity=capacity, device=device,
                               x_sq_norms=None if balanced else row_sq_norms(x))
    a, inertia = assign(c)
    stats = {"iterations": max_iter, "converged": False, "inertia": inertia}
    for it in range(1, max_iter + 1):
        c_new = centroid_means(x, a, c)
        a_new, inertia_new = assign(c_new)
        if np.array_equal(a_new, a):  # c_new is the mean of its own assignment: a fixed point
            c, stats = c_new, {"iterations": it, "converged": True, "inertia": inertia_new}
            break
        if inertia - inertia_new <= tol * inertia:
            stats = {"iterations": it, "converged": True, "inertia": inertia}
            break
        c, a, inertia = c_new, a_new, inertia_new
        stats["inertia"] = inertia
    return (c, stats, a) if return_assignment else (c, stats)


def kmeans_plus_plus(x: np.ndarray, k: int, *, seed: int, max_rows: int | None = None,
                     n_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (D^2 sampling, best of ``n_trials`` candidates per step, as scikit-learn does).

    Args:
        x: (N, d) float32.
        k: number of centroids.
        seed: random seed.
        max_rows: seed from a random subset of this many rows (k-means++ costs O(k N d n_trials)).
        n_trials: candidates per step (default 2 + ln k).
    Returns:
        (K, d) float32 initial centroids.
    """
    import torch

    rng = np.random.default_rng(seed)
    if max_rows is not None and x.shape[0] > max_rows:
        x = x[np.sort(rng.choice(x.shape[0], size=max_rows, replace=False))]
    # torch for the per-step GEMMs: its thread pool is the one callers size (numpy's BLAS pool is not)
    xt = as_tensor(x)  # (N, d)
    n = xt.shape[0]
    n_trials = n_trials or 2 + int(math.log(k))
    sq_norms = (xt * xt).sum(dim=1)  # (N,)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    closest = (sq_norms - 2.0 * (xt @ xt[chosen[0]]) + sq_norms[chosen[0]]).clamp_min_(0.0)  # (N,)
    with torch.no_grad(), one_torch_thread():  # K steps of tiny ops: a thread fork/join each would dominate
        for i in range(1, k):
            cumulative = torch.cumsum(closest.double(), dim=0)
            total = float(cumulative[-1])
            if total <= 0:  # fewer distinct points than centroids: repeat some
                chosen[i:] = rng.integers(n, size=k - i)
                break
            draws = torch.from_numpy(rng.random(n_trials) * total)
            cand = torch.searchsorted(cumulative, draws, right=True).clamp_(max=n - 1)  # (T,)
            dist = torch.addmm(sq_norms[cand][:, None] + sq_norms[None, :], xt[cand], xt.t(), alpha=-2.0)  # (T, N)
            torch.minimum(dist, closest[None, :], out=dist).clamp_(min=0.0)
            best = int(dist.sum(dim=1).argmin())
            closest = dist[best].clone()
            chosen[i] = int(cand[best])
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)[chosen])


def seed_centroids(x: np.ndarray, k: int, *, seed: int, init: str = "k-means++") -> np.ndarray:
    """Starting centroids for k-means: 'k-means++' or 'random' (k distinct rows, faiss's own seeding).

    k-means++ reads every candidate row once per centroid, so it runs on a subsample of 2 rows per centroid (at
    least 1024): measured at K = 256 / 1024 (d = 64, 3 levels, then this module's Lloyd and RQ-Kmeans' joint
    refinement) it matches 4 rows per centroid in final error at about half the cost, and beats random rows.
    Greedy (best of 2 + ln K candidates per step, as scikit-learn does) up to K = 1024, which keeps well
    separated clusters apart; one candidate beyond, where the trials would cost more than the Lloyd steps.

    Returns:
        (K, d) float32.
    """
    if init == "k-means++":
        return kmeans_plus_plus(x, k, seed=seed, max_rows=max(2 * k, 1024), n_trials=None if k <= 1024 else 1)
    if init == "random":
        rows = np.random.default_rng(seed).choice(x.shape[0], size=k, replace=False)
        return np.ascontiguousarray(x[np.sort(rows)], dtype=np.float32)
    raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")


def balanced_capacity(n: int, k: int, slack: float) -> int:
    """Most rows per centroid under balanced assignment of n rows to k centroids with ``slack`` extra share."""
    return int(math.ceil(n / k * (1.0 + slack)))


def kmeans_fit(x: np.ndarray, k: int, *, niter: int, seed: int, init: str = "k-means++", nredo: int = 1,
               tol: float = 1e-3, max_points_per_centroid: int | None = None, balance_slack: float | None = None,
               device: str = "cpu", use_faiss_gpu: bool = False) -> tuple[np.ndarray, dict, np.ndarray]:
    """Cold-start k-means of one level: seeding, then at most ``niter`` Lloyd steps (blocked-GEMM search).

    Lloyd runs on at most ``k * max_points_per_centroid`` rows (faiss's subsampling rule), keeping the best of
    ``nredo`` seeds by inertia; the returned assignment covers every row of x. With ``use_faiss_gpu`` faiss's GPU
    k-means does the iterations instead.

    Args:
        x: (N, d) float32 training rows.
        k: centroids.
        niter: most Lloyd steps (fewer once converged, see :func:`lloyd_refine`).
        seed: seeds subsampling and seeding (restart r uses seed + 7919 r).
        init: 'k-means++' or 'random' (see :func:`seed_centroids`).
        nredo: restarts; the lowest inertia wins.
        tol: Lloyd's convergence rule.
        max_points_per_centroid: subsample Lloyd's rows to k times this (None: all rows).
        balance_slack: None for plain assignment, else balanced assignment with this capacity slack.

    Returns:
        ((K, d) float32 centroids, stats {iterations, converged, inertia}, (N,) int64 assignment of x).
    """
    n = x.shape[0]
    balanced = balance_slack is not None
    if use_faiss_gpu and niter > 0:
        c = faiss_kmeans(x, k, niter=niter, seed=seed, use_gpu=True, nredo=nredo, init=init,
                         max_points_per_centroid=max_points_per_centroid or n)
        stats = {"iterations": niter, "converged": False, "inertia": None}
        return c, stats, _assign(x, c, balance_slack=balance_slack, device=device)
    sub = x
    if max_points_per_centroid and n > k * max_points_per_centroid:
        rows = np.random.default_rng(seed).choice(n, size=k * max_points_per_centroid, replace=False)
        sub = x[np.sort(rows)]
    capacity = balanced_capacity(sub.shape[0], k, balance_slack) if balanced else None
    best = None
    for redo in range(nredo):
        start = seed_centroids(sub, k, seed=seed + 7919 * redo, init=init)
        c, stats, a = lloyd_refine(sub, start, max_iter=niter, tol=tol, balanced=balanced, capacity=capacity,
                                   device=device, return_assignment=True)
        if best is None or stats["inertia"] < best[1]["inertia"]:
            best = (c, stats, a)
    c, stats, a = best
    if sub is not x:
        a = _assign(x, c, balance_slack=balance_slack, device=device)
    return c, stats, a


def _assign(x, c, *, balance_slack, device) -> np.ndarray:
    if balance_slack is None:
        return nearest_centroids(x, c, device=device)
    return balanced_assign(x, c, balanced_capacity(x.shape[0], c.shape[0], balance_slack), device=device)


def faiss_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, use_gpu: bool, nredo: int = 1,
                 max_points_per_centroid: int = 256, init: str = "k-means++") -> np.ndarray:
    """Cold-start centroids from faiss.Kmeans (GPU when asked and present), seeded by k-means++ or at random.

    Args:
        x: (N, d) float32 training rows.
        k: centroids.
        niter: faiss Lloyd iterations.
        seed: seeds sampling and seeding.
        use_gpu: run faiss k-means on the GPU.
        nredo: faiss restarts (keeps the best).
        max_points_per_centroid: faiss subsamples to k times this many rows.
        init: 'k-means++' or 'random' (faiss's own: distinct random rows).

    Returns:
        (K, d) float32 centroids.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(use_gpu), verbose=False, nredo=nredo,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    if init == "k-means++":
        km.train(x, init_centroids=seed_centroids(x, k, seed=seed, init=init))
    elif init == "random":
        km.train(x)
    else:
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    return np.ascontiguousarray(km.centroids, dtype=np.float32)
