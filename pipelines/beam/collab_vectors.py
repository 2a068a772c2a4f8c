"""The collaborative model of the trigger similarity as Beam PTransforms (`pipelines.mining.collab` has the definition).

The model lives in sharded blocks (`pipelines.beam.shards`): one element per shard of items, holding each
item's id, its users (sorted) and its vector, and the same for users. A half-sweep sends every key's fixed-point
vector to its neighbours' shards as one table per (source shard, destination shard); the destination sums what
each key received (exact integer sums of outer products and vectors, whatever the order they arrive in), solves
every key at once against the other side's Gram matrix (a global combine of the same sums, a (d, d) singleton side
input) and keeps the senders as the key's neighbours for the next half-sweep, so no join is needed. The output
equals `pipelines.mining.collab.fit_item_vectors` bit for bit on any runner and any number of shards or workers.

Memory: a destination shard holds its keys' incoming messages ((d,) int32 each) and (d, d) sums for up to
``SOLVE_CHUNK`` keys at a time; nothing holds the catalog or the log.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.mining import collab as C
from pipelines.beam.common import stage_timer
from pipelines.beam.shards import Gather, segments, shard_count, shard_of, shard_of_id, split

SOLVE_CHUNK = 2048  # keys whose (d, d) systems are built and solved together
_MESSAGES = (("dst", "i8", False), ("src", "i8", False), ("q", "i4", False))
EDGES = (("item", "i8", False), ("user", "i8", False))


class _GramSum(beam.CombineFn):
    """Blocks -> the exact fixed-point Gram accumulator (`C.zero_acc` layout) of all their vectors."""

    def __init__(self, dim: int):
        self.dim = dim

    def create_accumulator(self):
        return C.zero_acc(self.dim)

    def add_input(self, acc, block):
        return C.add_block(acc, C.to_fixed(block["vec"]))

    def merge_accumulators(self, accs):
        return C.merge_accs(accs, self.dim)

    def extract_output(self, acc):
        return acc


def _block(ids, indptr, nbrs, vec) -> dict:
    """One shard of one side: ids (k,), indptr (k + 1,), nbrs (indptr[-1],) sorted per key, vec (k, d) float32."""
    return {"ids": ids, "indptr": indptr, "nbrs": nbrs, "vec": vec}


def _item_block(keyed, cfg: C.CollabConfig):
    """(shard, {item, user} training edges of its items) -> (shard, item block) of the items kept (min_count)."""
    shard, edges = keyed
    order = np.lexsort((edges["user"], edges["item"]))
    items, users = edges["item"][order], edges["user"][order]
    distinct = np.r_[True, (items[1:] != items[:-1]) | (users[1:] != users[:-1])] if len(items) else items[:0] > 0
    items, users = items[distinct], users[distinct]
    ids, bounds = segments(items)
    counts = np.diff(bounds)
    kept = counts >= cfg.min_count
    vec = np.stack([C.init_vector(i, cfg) for i in ids[kept].tolist()]) if kept.any() else \
        np.empty((0, cfg.dim), np.float32)
    return shard, _block(ids[kept], np.r_[0, np.cumsum(counts[kept])].astype(np.int64),
                         users[np.repeat(kept, counts)], vec)


def _send(keyed, n_shards: int):
    """A block -> (destination shard, {dst, src, q}) messages: each key's int32 fixed vector to its neighbours."""
    _, b = keyed
    if not len(b["ids"]):
        return
    q = C.to_fixed(b["vec"]).astype(np.int32)  # |values| <= CLIP * 2**FIXED_BITS = 2**20: exact in int32
    rows = np.repeat(np.arange(len(b["ids"])), np.diff(b["indptr"]))
    yield from split({"dst": b["nbrs"], "src": b["ids"][rows], "q": q[rows]}, shard_of(b["nbrs"], n_shards))


def _solve(keyed, gram, cfg: C.CollabConfig):
    """(shard, messages it received) -> (shard, block of the receiving keys with their new vectors)."""
    shard, m = keyed
    order = np.lexsort((m["src"], m["dst"]))
    dst, src, q = m["dst"][order], m["src"][order], m["q"][order].astype(np.int64)
    ids, bounds = segments(dst)
    vec = np.empty((len(ids), cfg.dim), np.float32)
    with stage_timer("mine_pairs", "collab"):
        for lo in range(0, len(ids), SOLVE_CHUNK):
            hi = min(len(ids), lo + SOLVE_CHUNK)
            outer = np.empty((hi - lo, cfg.dim, cfg.dim), np.int64)
            sums = np.empty((hi - lo, cfg.dim), np.int64)
            for k in range(lo, hi):
                block = q[bounds[k]: bounds[k + 1]]
                outer[k - lo] = block.T @ block
                sums[k - lo] = block.sum(axis=0)
            vec[lo:hi] = C.solve_batch(outer, sums, gram, cfg)
    return shard, _block(ids, bounds, src, vec)


def _half_sweep(name: str, blocks, n_shards, cfg: C.CollabConfig):
    gram = blocks | f"{name}Gram" >> beam.Map(lambda kv: kv[1]) | f"{name}GramSum" >> beam.CombineGlobally(
        _GramSum(cfg.dim))
    return (blocks | f"{name}Send" >> beam.FlatMap(_send, beam.pvalue.AsSingleton(n_shards))
            | f"{name}Gather" >> beam.CombinePerKey(Gather(_MESSAGES))
            | f"{name}Solve" >> beam.Map(_solve, beam.pvalue.AsSingleton(gram), cfg))


def _normalised(keyed):
    shard, b = keyed
    vec = np.stack([C.normalise(v) for v in b["vec"]]) if len(b["ids"]) else b["vec"]
    return shard, {"item": b["ids"], "vec": vec}


def collab_blocks(item_edges, n_shards, cfg: C.CollabConfig):
    """(item shard, {item, user} training edges) + the shard count singleton -> (item shard, {item, vec (k, d)})
    with the unit vectors of the items kept (the building block of `CollabItemVectors` and pair mining)."""
    items = item_edges | "ItemBlocks" >> beam.Map(_item_block, cfg)
    for it in range(cfg.iterations):
        users = _half_sweep(f"Iter{it}Users", items, n_shards, cfg)
        items = _half_sweep(f"Iter{it}Items", users, n_shards, cfg)
    return items | "Normalise" >> beam.Map(_normalised)


def _per_item(keyed):
    _, t = keyed
    return zip(t["item"].tolist(), list(t["vec"]))


class CollabItemVectors(beam.PTransform):
    """(user_id, item_id) training positives -> (item_id, (d,) float32 unit vector).

    Items with fewer than ``cfg.min_count`` distinct users get no vector (and do not take part in the fit), as in
    `pipelines.mining.collab.fit_item_vectors`.

    Args:
        rows_per_shard: input rows per shard (the shard count is ceil(rows / rows_per_shard)).
    """

    def __init__(self, cfg: C.CollabConfig, rows_per_shard: int = 200_000, label: str | None = None):
        super().__init__(label)
        self.cfg, self.rows_per_shard = cfg, int(rows_per_shard)

    def expand(self, user_item):
        n_shards = shard_count(user_item, self.rows_per_shard, "Collab")
        edges = (user_item | "ToItemShard" >> beam.Map(
            lambda ui, n: (shard_of_id(ui[1], n), (int(ui[1]), int(ui[0]))), beam.pvalue.AsSingleton(n_shards))
                 | "GatherEdges" >> beam.CombinePerKey(Gather(EDGES)))
        return collab_blocks(edges, n_shards, self.cfg) | "PerItem" >> beam.FlatMap(_per_item)
