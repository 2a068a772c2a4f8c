"""The collaborative model of the trigger similarity as Beam PTransforms (`pipelines.mining.collab` has the definition).

Input: distinct (user_id, item_id) training positives. Each ALS half-sweep is a join by key (the other side's
vectors travel to the events), an exact fixed-point sum per key (a CombineFn: one (d, d) + (d,) accumulator per
user or item, whatever its popularity), and a solve against the other side's Gram matrix (a global combine of
the same kind, a (d, d) singleton side input). No step holds more than one key's accumulator or one key's event
list; the output equals `pipelines.mining.collab.fit_item_vectors` bit for bit on any runner.
"""
from __future__ import annotations

import apache_beam as beam

from pipelines.mining import collab as C
from pipelines.beam.common import stage_timer


class _SumTerms(beam.CombineFn):
    """Exact fixed-point sums of outer products and vectors (order independent); inputs are `to_fixed` vectors."""

    def __init__(self, dim: int):
        self.dim = dim

    def create_accumulator(self):
        return C.zero_acc(self.dim)

    def add_input(self, acc, fixed):
        return C.add_fixed(acc, fixed)

    def merge_accumulators(self, accs):
        return C.merge_accs(accs, self.dim)

    def extract_output(self, acc):
        return acc


def _fan_out(keyed, side: str):
    """CoGroupByKey result -> (other key, vector) for every event of this key that has a vector."""
    _, grouped = keyed
    vecs = list(grouped["vec"])
    if not vecs:
        return
    fixed = C.to_fixed(vecs[0])  # once per key, not per event
    for other in grouped["ev"]:
        yield other, fixed


def _solve(kv, gram, cfg: C.CollabConfig):
    key, acc = kv
    with stage_timer("mine_pairs", "collab"):
        return key, C.solve(acc, gram, cfg)


def _half_sweep(name: str, events_by_src, vectors, cfg: C.CollabConfig):
    """Solve every key of the other side given `vectors` (keyed by this side). events_by_src: (src, dst)."""
    gram = (vectors | f"{name}Gram" >> beam.Map(lambda kv: C.to_fixed(kv[1]))
            | f"{name}GramSum" >> beam.CombineGlobally(_SumTerms(cfg.dim)))
    return ({"ev": events_by_src, "vec": vectors} | f"{name}Join" >> beam.CoGroupByKey()
            | f"{name}FanOut" >> beam.FlatMap(_fan_out, "ev")
            | f"{name}Sums" >> beam.CombinePerKey(_SumTerms(cfg.dim))
            | f"{name}Solve" >> beam.Map(_solve, beam.pvalue.AsSingleton(gram), cfg))


class CollabItemVectors(beam.PTransform):
    """(user_id, item_id) distinct training positives -> (item_id, (d,) float32 unit vector).

    Items with fewer than ``cfg.min_count`` positives get no vector (and do not take part in the fit), as in
    `pipelines.mining.collab.fit_item_vectors`.
    """

    def __init__(self, cfg: C.CollabConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, user_item):
        cfg = self.cfg
        counts = (user_item | "ItemOf" >> beam.Map(lambda ui: (int(ui[1]), 1))
                  | "CountPerItem" >> beam.CombinePerKey(sum))
        kept = counts | "KeepFrequent" >> beam.Filter(lambda kv, m: kv[1] >= m, cfg.min_count)
        by_item = user_item | "EventsByItem" >> beam.Map(lambda ui: (int(ui[1]), int(ui[0])))
        by_user = ({"ev": by_item, "kept": kept} | "JoinKept" >> beam.CoGroupByKey()
                   | "KeptEvents" >> beam.FlatMap(lambda kv: [(u, kv[0]) for u in kv[1]["ev"]] if kv[1]["kept"]
                                                  else []))
        by_item_kept = by_user | "KeptByItem" >> beam.Map(lambda ui: (ui[1], ui[0]))
        y = kept | "InitVectors" >> beam.Map(lambda kv, c: (kv[0], C.init_vector(kv[0], c)), cfg)
        for it in range(cfg.iterations):
            x = _half_sweep(f"Iter{it}Users", by_item_kept, y, cfg)
            y = _half_sweep(f"Iter{it}Items", by_user, x, cfg)
        return y | "Normalise" >> beam.Map(lambda kv: (kv[0], C.normalise(kv[1])))
