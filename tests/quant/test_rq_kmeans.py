"""RQ-Kmeans: cluster recovery, error falling with levels, warm-start churn 0, save/load, bad input."""
import json

import numpy as np
import pytest

from quant import RQKMeans, RQKMeansConfig, load_quantizer, metrics as M
from quant.base import NotFittedError
from quant.rq_kmeans import joint_min_gain, refit_codebooks, residual_encode, residual_encode_reference

from .conftest import planted_clusters


@pytest.fixture(scope="module")
def fitted(clustered):
    x, _ = clustered
    return RQKMeans(levels=3, codebook_size=16, seed=0).fit(x)


def test_level1_codes_recover_planted_clusters(clustered, fitted):
    x, labels = clustered
    codes = fitted.encode(x)
    assert codes.shape == (2000, 3) and codes.dtype == np.int32
    assert M.nmi(codes[:, 0], labels) >= 0.9


def test_error_falls_as_levels_are_added(clustered):
    x, _ = clustered
    errors = []
    for levels in (1, 2, 3, 4):
        q = RQKMeans(levels=levels, codebook_size=16, seed=0).fit(x)
        errors.append(M.rel_mse(x, q.decode(q.encode(x))))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # a quantizer's own per-level training errors fall too
    per_level = [s["rel_mse"] for s in q.fit_stats["levels"]]
    assert per_level == sorted(per_level, reverse=True)


def test_fast_encode_matches_reference(clustered, fitted):
    x, _ = clustered
    fast = residual_encode(x, fitted.codebooks, chunk_rows=333)
    ref, margins = residual_encode_reference(x, fitted.codebooks)
    # rows whose greedy path never passes a near-tie must agree exactly
    clear = (margins > 1e-3).all(axis=1)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(fast[clear], ref[clear])


def plain_residual(x, codebooks, codes):
    """x minus each level's centroid, level by level in float32 (the order training and encode use)."""
    residual = x.copy()
    for level, c in enumerate(codebooks):
        residual -= c[codes[:, level]]
    return residual


def test_encode_residual_out_is_the_plain_residual_bit_for_bit(clustered, fitted):
    x, _ = clustered
    residual = np.full_like(x, np.nan)
    codes = residual_encode(x, fitted.codebooks, chunk_rows=333, residual_out=residual)
    np.testing.assert_array_equal(codes, residual_encode(x, fitted.codebooks))
    np.testing.assert_array_equal(residual, plain_residual(x, fitted.codebooks, codes))


def test_encode_with_mixed_codebook_sizes_matches_reference(clustered):
    x, _ = clustered
    q = RQKMeans(levels=3, codebook_size=(16, 5, 40), seed=0).fit(x)
    ref, margins = residual_encode_reference(x, q.codebooks)
    clear = (margins > 1e-3).all(axis=1)
    np.testing.assert_array_equal(residual_encode(x, q.codebooks, chunk_rows=97)[clear], ref[clear])


def test_refit_codebooks_is_the_sequential_least_squares_update():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    codebooks = [rng.normal(size=(k, 5)).astype(np.float32) for k in (7, 4, 9)]
    codes = np.stack([rng.integers(0, k, 600) for k in (7, 4, 9)], axis=1)
    codes[:, 2][codes[:, 2] == 8] = 0  # centroid 8 of the last level has no rows: it is relocated
    residual = plain_residual(x, codebooks, codes)
    before = float((residual.astype(np.float64) ** 2).sum())
    new = refit_codebooks(codebooks, codes, residual)
    # plain float64 reference: each level in turn, the mean of (x - every other level's current centroid)
    expected = [c.astype(np.float64) for c in codebooks]
    for level in range(3):
        others = sum(expected[m][codes[:, m]] for m in range(3) if m != level)
        target = x.astype(np.float64) - others
        for j in range(expected[level].shape[0]):
            rows = codes[:, level] == j
            if rows.any():
                expected[level][j] = target[rows].mean(axis=0)
    # the empty centroid moves onto the target of the worst-served row (after the update, codes unchanged)
    after = x.astype(np.float64) - sum(expected[m][codes[:, m]] for m in range(3))
    worst = int(np.argmax((after ** 2).sum(axis=1)))
    expected[2][8] = expected[2][codes[worst, 2]] + after[worst]
    for got, want in zip(new, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the consumed residual is x minus the new decode, and the error did not grow for the same codes
    np.testing.assert_allclose(residual, plain_residual(x, new, codes), atol=1e-5)
    assert float((residual.astype(np.float64) ** 2).sum()) < before


def test_joint_refinement_lowers_the_error_of_the_cold_start(clustered):
    x, _ = clustered
    cold = RQKMeans(levels=3, codebook_size=16, seed=0, refine_iter=0).fit(x)
    refined = RQKMeans(levels=3, codebook_size=16, seed=0, tol=1e-4).fit(x)
    assert refined.fit_stats["joint"]["rounds"] >= 1
    assert M.rel_mse(x, refined.decode(refined.encode(x))) < M.rel_mse(x, cold.decode(cold.encode(x)))
    assert cold.fit_stats["joint"]["rounds"] == 0 and not cold.fit_stats["joint"]["converged"]


@pytest.mark.parametrize("balanced", [False, True])
def test_converged_codebooks_are_a_fixed_point_of_a_warm_refit(balanced):
    x, _ = planted_clusters(1500, 12, 10, noise=1.0, seed=3)
    q = RQKMeans(levels=3, codebook_size=12, seed=0, balanced=balanced, tol=1e-4).fit(x)
    assert q.fit_stats["joint"]["converged"] and q.fit_stats["joint"]["rounds"] >= 1
    again = q.warm_start().fit(x)
    assert again.fit_stats["joint"]["rounds"] == 0
    for a, b in zip(q.codebooks, again.codebooks):
        np.testing.assert_array_equal(a, b)


def test_joint_min_gain_is_tol_or_half_the_fit_optimism():
    assert joint_min_gain(5e-3, [256, 256, 256], 100_000) == 5e-3
    assert joint_min_gain(5e-3, [1024, 1024, 1024], 100_000) == pytest.approx(0.5 * 3072 / 100_000)


def test_decode_is_sum_of_centroids(fitted):
    codes = np.array([[1, 2, 3], [0, 0, 0]])
    expected = fitted.codebooks[0][[1, 0]] + fitted.codebooks[1][[2, 0]] + fitted.codebooks[2][[3, 0]]
    np.testing.assert_allclose(fitted.decode(codes), expected, rtol=1e-6)


def test_fit_is_deterministic_for_a_seed(clustered, fitted):
    x, _ = clustered
    again = RQKMeans(levels=3, codebook_size=16, seed=0).fit(x)
    for a, b in zip(fitted.codebooks, again.codebooks):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("balanced", [False, True])
def test_warm_started_refit_on_unchanged_data_has_zero_churn(balanced):
    x, _ = planted_clusters(1500, 12, 10, noise=1.0, seed=3)
    q = RQKMeans(levels=3, codebook_size=12, seed=0, balanced=balanced, sample=1200).fit(x)
    codes = q.encode(x)
    refit = RQKMeans(levels=3, codebook_size=12, seed=0, balanced=balanced, sample=1200,
                     init_codebooks=q.codebooks).fit(x)
    assert refit.fit_stats["warm_start"]
    assert M.churn(codes, refit.encode(x)) == 0.0
    # and a *cold* refit with another seed does move codes: the zero above is not vacuous
    cold = RQKMeans(levels=3, codebook_size=12, seed=7, balanced=balanced, sample=1200).fit(x)
    assert M.churn(codes, cold.encode(x)) > 0.1


def test_warm_start_on_shifted_data_keeps_most_codes():
    x, _ = planted_clusters(1500, 12, 10, seed=4)
    q = RQKMeans(levels=2, codebook_size=10, seed=0).fit(x)
    rng = np.random.default_rng(0)
    x2 = x + rng.normal(size=x.shape).astype(np.float32) * 0.01
    refit = q.warm_start().fit(x2)
    assert M.churn(q.encode(x)[:, :1], refit.encode(x2)[:, :1]) < 0.01


def test_balanced_codes_fill_every_centroid_evenly():
    x, _ = planted_clusters(1200, 8, 3, seed=5)  # 3 real clusters, 12 centroids
    q = RQKMeans(levels=2, codebook_size=12, balanced=True, seed=0).fit(x)
    codes = q.encode(x)
    for level in range(2):
        np.testing.assert_array_equal(np.bincount(codes[:, level], minlength=12), np.full(12, 100))
    # unconstrained encode of the same model is allowed (new items), and differs somewhere
    assert codes.shape == q.encode(x, balanced=False).shape


def test_sample_trains_on_a_subset(clustered):
    x, labels = clustered
    q = RQKMeans(levels=2, codebook_size=16, sample=500, seed=0).fit(x)
    assert q.fit_stats["train_rows"] == 500 and q.fit_stats["n_rows"] == 2000
    assert M.nmi(q.encode(x)[:, 0], labels) >= 0.9


def test_per_level_codebook_sizes(clustered):
    x, _ = clustered
    q = RQKMeans(levels=2, codebook_size=(16, 4), seed=0).fit(x)
    assert [c.shape[0] for c in q.codebooks] == [16, 4]
    assert q.encode(x)[:, 1].max() < 4


def test_save_load_round_trip_gives_identical_codes(tmp_path, clustered, fitted):
    x, _ = clustered
    fitted.save(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quantizer.json").read_text())
    assert meta["method"] == "rq-kmeans" and meta["config"]["codebook_size"] == 16
    loaded = load_quantizer(tmp_path / "q")
    assert isinstance(loaded, RQKMeans)
    np.testing.assert_array_equal(loaded.encode(x), fitted.encode(x))
    assert loaded.fit_stats["levels"][0]["codebook_size"] == 16


def test_corrupt_save_is_detected(tmp_path, fitted):
    fitted.save(tmp_path / "q")
    blob = bytearray((tmp_path / "q" / "arrays.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "q" / "arrays.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        load_quantizer(tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="no saved quantizer"):
        load_quantizer(tmp_path / "nothing")


def test_bad_input_errors():
    x, _ = planted_clusters(100, 4, 2, seed=0)
    bad = x.copy()
    bad[37, 2] = np.nan
    with pytest.raises(ValueError, match="row 37 has a non-finite value"):
        RQKMeans(levels=1, codebook_size=4).fit(bad)
    bad[37, 2] = np.inf
    with pytest.raises(ValueError, match="row 37"):
        RQKMeans(levels=1, codebook_size=4).fit(bad)
    with pytest.raises(ValueError, match="empty input"):
        RQKMeans(levels=1, codebook_size=4).fit(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="100 rows, need at least 128"):
        RQKMeans(levels=1, codebook_size=128).fit(x)
    q = RQKMeans(levels=1, codebook_size=4).fit(x)
    with pytest.raises(ValueError, match="dimension 5 does not match the fitted dimension 4"):
        q.encode(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        q.encode(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="row 1 level 0 has code 9"):
        q.decode(np.array([[0], [9]]))
    with pytest.raises(NotFittedError):
        RQKMeans(levels=1, codebook_size=4).encode(x)
    with pytest.raises(ValueError, match="init_codebooks level 0"):
        RQKMeans(levels=1, codebook_size=4, init_codebooks=[np.zeros((3, 4))])


@pytest.mark.parametrize("kwargs, match", [
    ({"levels": 0}, "levels"), ({"codebook_size": 1}, "codebook_size"), ({"codebook_size": (4, 4)}, "2 entries"),
    ({"sample": 0}, "sample"), ({"device": "tpu"}, "device"), ({"tol": 2.0}, "tol"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RQKMeansConfig(**{"levels": 1, **kwargs})


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU: GPU encode path not testable")
def test_gpu_encode_and_residual_match_cpu(clustered, fitted):
    x, _ = clustered
    _, margins = residual_encode_reference(x, fitted.codebooks)
    clear = (margins > 1e-3).all(axis=1)
    cpu_residual, gpu_residual = np.empty_like(x), np.empty_like(x)
    cpu = residual_encode(x, fitted.codebooks, residual_out=cpu_residual)
    gpu = residual_encode(x, fitted.codebooks, device="cuda", chunk_rows=333, residual_out=gpu_residual)
    np.testing.assert_array_equal(gpu[clear], cpu[clear])
    np.testing.assert_allclose(gpu_residual[clear], cpu_residual[clear], atol=1e-5)
    on_gpu = RQKMeans(levels=3, codebook_size=16, seed=0, device="cuda", faiss_gpu=False).fit(x)
    assert on_gpu.fit_stats["device"] == "cuda" and on_gpu.fit_stats["joint"]["converged"]


def test_codes_and_residuals_are_the_same_with_two_threads(clustered, fitted):
    import torch

    x, _ = clustered
    one_residual, two_residual = np.empty_like(x), np.empty_like(x)
    one = residual_encode(x, fitted.codebooks, chunk_rows=100, residual_out=one_residual)
    torch.set_num_threads(2)  # the module fixture restores the count afterwards
    two = residual_encode(x, fitted.codebooks, chunk_rows=100, residual_out=two_residual)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(two_residual, one_residual)
    refit = RQKMeans(levels=3, codebook_size=16, seed=0).fit(x)
    for a, b in zip(refit.codebooks, fitted.codebooks):
        np.testing.assert_array_equal(a, b)


def test_worst_rows_match_a_stable_sort():
    from quant.rq_kmeans import worst_rows

    errors = np.array([3.0, 7.0, 7.0, 1.0, 9.0, 7.0, 0.0])
    for m in range(1, 8):
        np.testing.assert_array_equal(worst_rows(errors, m), np.argsort(-errors, kind="stable")[:m])
