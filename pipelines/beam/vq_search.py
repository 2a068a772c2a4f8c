"""VQ codes (the K nearest other items by inner product) for catalogs too large to gather into one worker.

An IVF search spread over the workers:

1. coarse centroids: spherical k-means with ``nlist`` cells on the RQ fit sample (one worker, bounded by
   ``fit_sample`` items), saved to ``centroids_file`` (safetensors) when a path is given and passed on as a small
   (nlist, d) side input;
2. every item is put in its nearest cell (the base), and sent as a query to its ``nprobe`` nearest cells;
3. one group per cell: its members and the queries probing it; each query's best K+1 members (by score, ties by
   the smaller id, the query itself excluded) come out;
4. a per-item combine keeps the best K over its probed cells.

A worker holds one cell's members and queries (about N / nlist members and nprobe · N / nlist queries with
balanced cells), never the base. With ``nprobe == nlist`` the search is exhaustive and equals the exact k-NN
(ties by the smaller id; floating-point ties aside). Results do not depend on arrival order: members and
queries are sorted by id before scoring.
"""
from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
import numpy as np

from pipelines.beam.common import stage_timer

log = logging.getLogger(__name__)


def n_lists(n_items: int, nlist: int, n_sample: int) -> int:
    """Cells of the index: ``nlist`` or about 4 sqrt(N), at most the sample size."""
    want = nlist or max(1, int(4 * np.sqrt(max(n_items, 1))))
    return int(max(1, min(want, n_sample)))


def fit_centroids(sample, n_items: int, nlist: int, seed: int, stage: str, centroids_file: Optional[str] = None,
                  active: bool = True):
    """Spherical k-means cells on the sample [(item_id, emb)]: (nlist, d) float32 (None when not active)."""
    if not active or not sample:
        return None
    import faiss

    with stage_timer(stage, "vq_ivf_fit"):
        sample = sorted(sample, key=lambda kv: kv[0])
        x = np.ascontiguousarray(np.stack([np.asarray(v, np.float32) for _, v in sample]))
        k = n_lists(n_items, nlist, len(x))
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=int(seed), spherical=True, verbose=False)
        km.train(x)
        cents = np.ascontiguousarray(km.centroids, dtype=np.float32)
        if centroids_file:
            from feature_store.io import atomic_write_bytes
            from safetensors.numpy import save

            atomic_write_bytes(centroids_file, save({"centroids": cents}))
        log.info("%s: IVF with %d cells fitted on %d sampled items of %d", stage, k, len(x), n_items)
        return cents


def _probes(kv, cents, nprobe: int):
    """(item, emb) -> its own cell (as a base member) and its nprobe nearest cells (as a query)."""
    if cents is None:
        return
    item, v = kv
    v = np.asarray(v, np.float32)
    scores = cents @ v  # (nlist,)
    order = np.lexsort((np.arange(len(scores)), -scores))
    yield int(order[0]), ("base", int(item), v)
    for cell in order[: min(nprobe, len(order))]:
        yield int(cell), ("query", int(item), v)


def _search_cell(keyed, k: int, stage: str):
    """One cell: each query's best k members other than itself, as (query, [(score, member), ...])."""
    _, rows = keyed
    base = sorted((r[1], r[2]) for r in rows if r[0] == "base")
    queries = sorted((r[1], r[2]) for r in rows if r[0] == "query")
    if not base or not queries:
        return
    with stage_timer(stage, "vq"):
        ids = np.asarray([i for i, _ in base], np.int64)
        x = np.stack([v for _, v in base])  # (M, d)
        for start in range(0, len(queries), 1024):
            chunk = queries[start: start + 1024]
            qids = np.asarray([i for i, _ in chunk], np.int64)
            scores = np.stack([v for _, v in chunk]) @ x.T  # (Q, M)
            for row, qid in enumerate(qids.tolist()):
                s = scores[row]
                keep = ids != qid
                order = np.lexsort((ids[keep], -s[keep]))[:k]
                yield qid, [(float(s[keep][j]), int(ids[keep][j])) for j in order]


class _BestK(beam.CombineFn):
    """Best k (score, id) over the probed cells, ties by the smaller id."""

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return []

    def _best(self, rows):
        return sorted(set(rows), key=lambda r: (-r[0], r[1]))[: self.k]

    def add_input(self, acc, rows):
        return self._best(acc + list(rows))

    def merge_accumulators(self, accs):
        return self._best([r for a in accs for r in a])

    def extract_output(self, acc):
        return acc


def _to_code(kv, k: int, nprobe: int):
    item, best = kv
    if len(best) < k:
        raise ValueError(f"VQ: item {item} found only {len(best)} of {k} neighbours in its {nprobe} probed IVF "
                         f"cells; raise --vq-nprobe or --vq-nlist fewer cells")
    return item, np.asarray([i for _, i in best], dtype=np.int64)


class DistributedKNN(beam.PTransform):
    """(item_id, emb) -> (item_id, (k,) int64 ids of its k nearest other items) by a distributed IVF search.

    Args:
        k: neighbours per item.
        sample: PCollection with one element, the fit sample [(item_id, emb)].
        n_items: singleton PCollection, the number of items.
        nlist, nprobe, seed: IVF cells (0: about 4 sqrt(N)), cells probed per query, k-means seed.
        stage: counter prefix.
        active: singleton PCollection of bool (False: the search is skipped, nothing comes out), or None.
        centroids_file: where the cells are saved (safetensors), or None.
    """

    def __init__(self, k: int, sample, n_items, nlist: int = 0, nprobe: int = 16, seed: int = 0,
                 stage: str = "quantize", active=None, centroids_file: Optional[str] = None,
                 label: str | None = None):
        super().__init__(label)
        self.k, self.sample, self.n_items = k, sample, n_items
        self.nlist, self.nprobe, self.seed, self.stage = nlist, nprobe, seed, stage
        self.active, self.centroids_file = active, centroids_file

    def expand(self, emb):
        active = beam.pvalue.AsSingleton(self.active) if self.active is not None else True
        cents = self.sample | "FitCells" >> beam.Map(
            fit_centroids, beam.pvalue.AsSingleton(self.n_items), self.nlist, self.seed, self.stage,
            self.centroids_file, active)
        return (emb | "AssignCells" >> beam.FlatMap(_probes, beam.pvalue.AsSingleton(cents), self.nprobe)
                | "GroupCells" >> beam.GroupByKey()
                | "SearchCells" >> beam.FlatMap(_search_cell, self.k, self.stage)
                | "BestOverCells" >> beam.CombinePerKey(_BestK(self.k))
                | "ToVQCode" >> beam.Map(_to_code, self.k, self.nprobe))
