"""VQNeighbors: exact neighbours vs brute force, self exclusion with duplicates, new items, IVF, save/load."""
import numpy as np
import pytest

from quant import VQNeighbors, load_quantizer
from quant.vq import drop_self


def _brute_force(x, q, k, exclude):
    scores = q @ x.T
    if exclude is not None:
        scores[np.arange(len(q)), exclude] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_matches_brute_force_and_excludes_self(base):
    vq = VQNeighbors(k=5).fit(base)
    codes = vq.encode(base)
    assert codes.shape == (400, 5) and codes.dtype == np.int64
    assert not (codes == np.arange(400)[:, None]).any()
    np.testing.assert_array_equal(codes, _brute_force(base, base, 5, np.arange(400)))


def test_duplicate_vectors_never_list_the_item_itself():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    x[10:20] = x[10]  # ten identical items: ties everywhere
    codes = VQNeighbors(k=4).fit(x).encode(x)
    assert not (codes == np.arange(30)[:, None]).any()
    for i in range(10, 20):  # each duplicate's neighbours are other duplicates
        assert set(codes[i]) <= set(range(10, 20)) - {i}


def test_drop_self_keeps_order():
    nbrs = np.array([[3, 0, 5], [1, 2, 4]])
    np.testing.assert_array_equal(drop_self(nbrs, np.array([0, 9]), 2), [[3, 5], [1, 2]])


def test_new_items_against_fitted_base(base):
    vq = VQNeighbors(k=3).fit(base)
    rng = np.random.default_rng(2)
    new = rng.normal(size=(7, 16)).astype(np.float32)
    codes = vq.encode(new, exclude_rows=None)
    np.testing.assert_array_equal(codes, _brute_force(base, new, 3, None))
    # a new item identical to a base item finds that item first when nothing is excluded
    assert vq.encode(base[[42]], exclude_rows=None)[0, 0] == 42
    assert 42 not in vq.encode(base[[42]], exclude_rows=np.array([42]))[0]
    with pytest.raises(ValueError, match="exclude_rows='self' needs the base itself"):
        vq.encode(new)


def test_ivf_recall_is_high(base):
    exact = VQNeighbors(k=5).fit(base).encode(base)
    ivf = VQNeighbors(k=5, index="ivf", nlist=8, nprobe=8).fit(base).encode(base)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, ivf)])
    assert recall == 1.0  # nprobe == nlist visits every cell: exact
    low = VQNeighbors(k=5, index="ivf", nlist=8, nprobe=2).fit(base).encode(base)
    assert not (low == np.arange(400)[:, None]).any()


def test_decode_is_mean_of_neighbours(base):
    vq = VQNeighbors(k=2).fit(base)
    np.testing.assert_allclose(vq.decode(np.array([[0, 1]])), (base[[0]] + base[[1]]) / 2, rtol=1e-6)


def test_save_load_round_trip(tmp_path, base):
    for index in ("flat", "ivf"):
        vq = VQNeighbors(k=4, index=index, nlist=10, nprobe=3).fit(base)
        vq.save(tmp_path / index)
        loaded = load_quantizer(tmp_path / index)
        assert isinstance(loaded, VQNeighbors) and loaded.config.index == index
        np.testing.assert_array_equal(loaded.encode(base), vq.encode(base))


def test_bad_input(base):
    with pytest.raises(ValueError, match="need at least 26"):
        VQNeighbors(k=25).fit(base[:25])
    bad = base.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        VQNeighbors(k=3).fit(bad)
    with pytest.raises(ValueError, match="empty"):
        VQNeighbors(k=3).fit(np.zeros((0, 16), dtype=np.float32))
    vq = VQNeighbors(k=3).fit(base)
    with pytest.raises(ValueError, match="dimension 8"):
        vq.encode(np.zeros((2, 8), dtype=np.float32), exclude_rows=None)
    with pytest.raises(ValueError, match="index must be"):
        VQNeighbors(k=3, index="hnsw")
