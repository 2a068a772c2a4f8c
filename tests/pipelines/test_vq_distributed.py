"""VQ codes without gathering the base: the distributed IVF search against the exact k-NN."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipelines.beam.quantize_items import QuantConfig, QuantizeItems


def _catalog(n=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d))
    x = centres[rng.integers(0, 6, n)] + 0.4 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return np.arange(1000, 1000 + n, dtype=np.int64), x


def _exact(ids, x, k):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    out = {}
    for r, i in enumerate(ids.tolist()):
        order = np.lexsort((ids, -s[r]))[:k]
        out[i] = ids[order]
    return out


def _check(expected, k, min_recall):
    def check(got):
        got = dict(got)
        assert sorted(got) == sorted(expected)
        hits = [len(set(got[i].tolist()) & set(expected[i].tolist())) for i in expected]
        assert all(len(got[i]) == k and i not in got[i] for i in got)
        assert np.mean(hits) / k >= min_recall, np.mean(hits) / k
        if min_recall == 1.0:
            for i in expected:
                assert got[i].tolist() == expected[i].tolist(), i  # same order too (ties by smaller id)
    return check


def test_exhaustive_distributed_search_equals_exact_knn(tmp_path):
    ids, x = _catalog()
    k = 5
    exact = _exact(ids, x, k)
    cfg = QuantConfig(rq_levels=1, rq_codebook_size=8, vq_k=k, vq_gather_max=0, vq_nlist=12, vq_nprobe=12,
                      fit_sample=120)
    with TestPipeline() as p:
        out = p | beam.Create(list(zip(ids.tolist(), x))) | QuantizeItems(cfg, ivf_file=str(tmp_path / "ivf.st"))
        assert_that(out["vq"], _check(exact, k, 1.0))
    assert (tmp_path / "ivf.st").is_file()  # the cells are written for later runs / inspection


def test_probing_few_cells_keeps_most_neighbours_and_gathered_path_is_exact():
    ids, x = _catalog(seed=1)
    k = 5
    exact = _exact(ids, x, k)
    approx = QuantConfig(rq_levels=1, rq_codebook_size=8, vq_k=k, vq_gather_max=0, vq_nlist=12, vq_nprobe=3,
                         fit_sample=120)
    gathered = QuantConfig(rq_levels=1, rq_codebook_size=8, vq_k=k, fit_sample=120)
    with TestPipeline() as p:
        items = p | beam.Create(list(zip(ids.tolist(), x)))
        assert_that((items | "Approx" >> QuantizeItems(approx))["vq"], _check(exact, k, 0.9), label="Approx")
        assert_that((items | "Gathered" >> QuantizeItems(gathered))["vq"], _check(exact, k, 1.0), label="Exact")
