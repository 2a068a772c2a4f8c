"""quant reports progress through plain callbacks (it imports no progress utility): RQ-Kmeans once per level,
VQ once per search batch, with absolute counts a caller's feature_store.progress.Progress.set takes as they are."""
import numpy as np

from quant import RQKMeans, VQNeighbors


def _points(n=600, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_rq_kmeans_reports_each_level():
    calls = []
    RQKMeans(levels=3, codebook_size=8, seed=0).fit(_points(), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_vq_reports_each_search_batch_and_codes_do_not_change():
    x = _points(250)
    calls = []
    vq = VQNeighbors(k=5, batch_rows=100).fit(x)
    codes = vq.encode(progress=lambda done, total: calls.append((done, total)))
    assert calls == [(100, 250), (200, 250), (250, 250)]
    np.testing.assert_array_equal(codes, vq.encode())
