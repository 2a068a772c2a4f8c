"""RQ-Kmeans: cluster recovery, error falling with levels, warm-start churn 0, save/load, bad input."""
import json

import numpy as np
import pytest

from quant import RQKMeans, RQKMeansConfig, load_quantizer, metrics as M
from quant.base import NotFittedError
from quant.rq_kmeans import residual_encode, residual_encode_reference

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
