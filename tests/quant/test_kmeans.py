"""GEMM nearest-centroid fast path vs the slow float64 reference; balanced assignment; Lloyd fixed point."""
import numpy as np
import pytest

from quant import kmeans


def points_centroids_and_clear_rows(n: int, k: int, d: int, *, seed: int):
    """Random (n, d) points, (k, d) centroids, and the rows whose nearest centroid is not a near-tie."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    c = rng.normal(size=(k, d)).astype(np.float32)
    _, _, margin = kmeans.nearest_centroids_reference(x, c)
    return x, c, margin > 1e-3


def test_nearest_matches_reference_away_from_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    c = rng.normal(size=(300, 24)).astype(np.float32)
    idx, dist = kmeans.nearest_centroids(x, c, chunk_rows=257, return_distances=True)
    ref_idx, ref_dist, margin = kmeans.nearest_centroids_reference(x, c)
    clear = margin > 1e-3
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(idx[clear], ref_idx[clear])
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)


def test_excluded_centroids_are_never_chosen():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    c = rng.normal(size=(10, 8)).astype(np.float32)
    excluded = np.zeros(10, dtype=bool)
    excluded[[0, 3, 7]] = True
    idx = kmeans.nearest_centroids(x, c, excluded=excluded)
    assert not np.isin(idx, [0, 3, 7]).any()
    ref, _, _ = kmeans.nearest_centroids_reference(x, c[~excluded])
    np.testing.assert_array_equal(idx, np.flatnonzero(~excluded)[ref])


def test_balanced_assign_respects_capacity():
    rng = np.random.default_rng(2)
    # skewed data: most points near centroid 0
    x = np.concatenate([rng.normal(size=(900, 4)) * 0.1, rng.normal(size=(100, 4)) + 5]).astype(np.float32)
    c = rng.normal(size=(10, 4)).astype(np.float32)
    c[0] = 0
    a = kmeans.balanced_assign(x, c, capacity=100)
    np.testing.assert_array_equal(np.bincount(a, minlength=10), np.full(10, 100))
    with pytest.raises(ValueError, match="impossible"):
        kmeans.balanced_assign(x, c, capacity=99)


def test_balanced_assign_equals_nearest_when_capacity_is_loose():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    c = rng.normal(size=(8, 6)).astype(np.float32)
    np.testing.assert_array_equal(kmeans.balanced_assign(x, c, capacity=400), kmeans.nearest_centroids(x, c))


def test_group_rank():
    np.testing.assert_array_equal(kmeans.group_rank(np.array([1, 1, 2, 5, 5, 5])), [0, 1, 0, 0, 1, 2])
    assert kmeans.group_rank(np.array([], dtype=int)).size == 0


def test_lloyd_converged_centroids_are_a_fixed_point():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    c0 = x[:32].copy()
    c1, st1 = kmeans.lloyd_refine(x, c0, max_iter=200)
    assert st1["converged"]
    c2, _ = kmeans.lloyd_refine(x, c1, max_iter=200)
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU: GPU GEMM path not testable")
def test_gpu_nearest_matches_cpu():
    x, c, clear = points_centroids_and_clear_rows(2000, 64, 16, seed=5)
    np.testing.assert_array_equal(kmeans.nearest_centroids(x, c, device="cuda")[clear],
                                  kmeans.nearest_centroids(x, c)[clear])


def test_explicit_cuda_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        kmeans.resolve_device("cuda")


def test_faiss_gpu_request_without_gpu_is_a_clear_error():
    if kmeans.faiss_has_gpu():
        pytest.skip("faiss sees a GPU")
    from quant import RQKMeans, VQNeighbors

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="faiss_gpu=True but this faiss build sees no GPU"):
        RQKMeans(levels=1, codebook_size=4, faiss_gpu=True).fit(x)
    with pytest.raises(ValueError, match="sees no GPU"):
        VQNeighbors(k=2, faiss_gpu=True).fit(x).encode(x)
    assert kmeans.resolve_faiss_gpu("auto") is False


@pytest.mark.gpu
@pytest.mark.skipif(not kmeans.faiss_has_gpu(), reason="faiss has no GPU here: GPU k-means / search not testable")
def test_faiss_gpu_paths_match_cpu():
    from quant import RQKMeans, VQNeighbors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    gpu = RQKMeans(levels=2, codebook_size=16, faiss_gpu=True).fit(x)
    assert gpu.fit_stats["faiss_gpu"]
    np.testing.assert_array_equal(VQNeighbors(k=5, faiss_gpu=True).fit(x).encode(x),
                                  VQNeighbors(k=5, faiss_gpu=False).fit(x).encode(x))


def test_importing_quant_loads_no_heavy_modules():
    import subprocess
    import sys

    code = "import quant, sys; print(sorted(m for m in ('torch', 'faiss', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("max_iter", [1, 3, 200])
def test_lloyd_returns_the_assignment_of_its_centroids(max_iter):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1500, 6)).astype(np.float32)
    c, stats, a = kmeans.lloyd_refine(x, x[:20].copy(), max_iter=max_iter, tol=0.0, return_assignment=True)
    np.testing.assert_array_equal(a, kmeans.nearest_centroids(x, c))
    assert stats["converged"] == (max_iter == 200)


def test_row_argmax_takes_the_first_maximum_like_a_plain_loop():
    import torch

    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, size=(300, 37)).astype(np.float32)  # many ties on purpose
    scores[5] = -np.inf
    scores[5, 30] = 0.0
    idx, best = kmeans.row_argmax(torch.from_numpy(scores))
    plain = [row.tolist().index(max(row.tolist())) for row in scores]
    np.testing.assert_array_equal(idx, plain)
    np.testing.assert_array_equal(best, scores[np.arange(300), plain])
    idx_only, none = kmeans.row_argmax(torch.from_numpy(scores), with_values=False)
    assert none is None
    np.testing.assert_array_equal(idx_only, plain)


def test_nearest_centroids_does_not_depend_on_the_block_size():
    x, c, clear = points_centroids_and_clear_rows(1000, 50, 12, seed=8)
    base = kmeans.nearest_centroids(x, c)
    for rows in (1, 7, 333, 5000):
        np.testing.assert_array_equal(kmeans.nearest_centroids(x, c, chunk_rows=rows)[clear], base[clear])


def test_centroid_means_match_a_plain_float64_mean_and_keep_empty_centroids():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    assign = rng.integers(0, 9, size=500)
    assign[assign == 4] = 5  # centroid 4 gets no rows
    previous = rng.normal(size=(10, 6)).astype(np.float32)  # centroid 9 gets none either
    means = kmeans.centroid_means(x, assign, previous)
    for j in range(10):
        rows = x[assign == j].astype(np.float64)
        expected = rows.mean(axis=0) if len(rows) else previous[j]
        np.testing.assert_allclose(means[j], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(means[[4, 9]], previous[[4, 9]])


def test_centroid_means_are_the_same_whatever_the_thread_count():
    import torch

    rng = np.random.default_rng(10)
    x = rng.normal(size=(20000, 16)).astype(np.float32)
    assign = rng.integers(0, 64, size=20000)
    previous = np.zeros((64, 16), np.float32)
    one = kmeans.centroid_means(x, assign, previous)
    torch.set_num_threads(2)  # the module fixture restores the count afterwards
    np.testing.assert_array_equal(kmeans.centroid_means(x, assign, previous), one)


def test_kmeans_fit_subsamples_lloyd_but_assigns_every_row():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    c, stats, assign = kmeans.kmeans_fit(x, 20, niter=5, seed=0, max_points_per_centroid=10)
    assert c.shape == (20, 8) and assign.shape == (3000,)
    np.testing.assert_array_equal(assign, kmeans.nearest_centroids(x, c))
    full, _, _ = kmeans.kmeans_fit(x, 20, niter=5, seed=0)  # no subsample: other centroids
    assert not np.array_equal(c, full)


def test_kmeans_fit_restarts_keep_the_lowest_inertia():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    one_c, one, _ = kmeans.kmeans_fit(x, 30, niter=3, seed=0, init="random")
    best_c, best, _ = kmeans.kmeans_fit(x, 30, niter=3, seed=0, init="random", nredo=4)
    assert best["inertia"] <= one["inertia"]
    assert best["inertia"] == min(kmeans.kmeans_fit(x, 30, niter=3, seed=7919 * r, init="random")[1]["inertia"]
                                  for r in range(4))


def test_random_seeds_are_distinct_rows():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    seeds = kmeans.seed_centroids(x, 10, seed=3, init="random")
    assert len({tuple(r) for r in seeds.tolist()}) == 10
    assert all((x == r).all(axis=1).any() for r in seeds)
    with pytest.raises(ValueError, match="init must be"):
        kmeans.seed_centroids(x, 10, seed=3, init="greedy")
