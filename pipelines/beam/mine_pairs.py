"""Beam PTransforms for pair mining; same definitions and kernels as `pipelines.mining.pairs` (see its docstring).

Input: a PCollection of interaction dicts {user_id, item_id, ts, label}. Nothing is a side input of the whole
catalog or log; every grouping has a bound:

- the held-out cutoff is an exact quantile from per-day then per-second counts (`ExactQuantile`);
- Swing is keyed by item: each user's capped history (``swing_max_history`` most recent positives) fans out to
  its items, and a per-item Top combine keeps the ``swing_max_users`` users with the smallest seeded hash before
  anything is grouped, so one `swing_row` call holds at most swing_max_users histories however hot the item;
- the trigger search joins each positive event with its item's similarity features (Swing neighbours, or the
  collaborative model's vector, plus the pre-trained encoder's vector for the fallback) by item, then groups by
  user: a worker holds one user's positives with their features.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.mining import pairs as P
from pipelines.beam.common import stage_timer
from pipelines.beam.quantiles import ExactQuantile

_NS = "qarm.pairs"


def _cap_history(user_rows, max_history: int):
    user, rows = user_rows
    rows = sorted(rows)[-max_history:]  # (ts, item): the most recent positives
    return user, np.sort(np.asarray([i for _, i in rows], dtype=np.int64))


def _fan_out_history(user_hist, seed: int):
    user, hist = user_hist
    for item in hist:
        yield int(item), (P.user_sample_key(seed, int(item), user), user, hist)


def _swing_neighbours(item_users, cfg: P.PairConfig):
    item, sampled = item_users
    with stage_timer("mine_pairs", "swing"):
        nb = P.swing_row(item, [(u, h) for _, u, h in sampled], cfg)
    if len(nb.partners):
        yield item, nb


def _top_swing(item_nb, last_ts, cfg: P.PairConfig):
    item, nb = item_nb
    for i, j, score, support in P.top_partners(item, nb, cfg.swing_top_n):
        yield i, j, score, support, max(last_ts[i], last_ts[j])


class _UserTriggers(beam.DoFn):
    """One user's positives with their items' features -> trigger rows (trigger, target, sim, ts, user, source)."""

    def __init__(self, cfg: P.PairConfig):
        self.cfg = cfg
        self.counters = {s: Metrics.counter(_NS, f"trigger_{s}") for s in P.TRIGGER_SOURCES}

    def process(self, user_rows):
        user, rows = user_rows
        rows = sorted(rows, key=lambda r: (r[0], r[1]))  # (ts, item, nb, collab vec, encoder vec)
        items = np.asarray([r[1] for r in rows], dtype=np.int64)
        ts = np.asarray([r[0] for r in rows], dtype=np.int64)
        nbs = {r[1]: r[2] for r in rows if r[2] is not None}
        collab = {r[1]: r[3] for r in rows if r[3] is not None}
        enc = {r[1]: r[4] for r in rows if r[4] is not None}
        with stage_timer("mine_pairs", "u2i"):
            out, counts = P.pick_triggers(user, items, ts, self.cfg, neighbours=nbs, collab=collab, encoder=enc)
        for source, n in counts.items():
            if n:
                self.counters[source].inc(n)
        yield from out


def _with_features(keyed):
    """(item, {ev: [(user, ts)], nb: [Neighbours], cv: [vec], enc: [vec]}) -> (user, (ts, item, nb, cv, enc))."""
    item, g = keyed
    feats = [next(iter(g[k]), None) for k in ("nb", "cv", "enc")]
    for user, ts in g["ev"]:
        yield user, (ts, item, *feats)


class _Prepared:
    """PCollections every pair transform starts from."""

    def __init__(self, interactions, cfg: P.PairConfig):
        self.positives = (
            interactions
            | "FilterPositives" >> beam.Filter(lambda r, lab: float(r["label"]) >= lab, cfg.positive_label)
            | "KeyUserItem" >> beam.Map(lambda r: ((int(r["user_id"]), int(r["item_id"])), int(r["ts"])))
            | "FirstTsPerUserItem" >> beam.CombinePerKey(min)
            | "ToUserItemTs" >> beam.Map(lambda kv: (kv[0][0], kv[0][1], kv[1])))
        self.cutoff = (self.positives | "PositiveTs" >> beam.Map(lambda r: r[2])
                       | "TimeCutoff" >> ExactQuantile(lambda n, f=cfg.heldout_frac: P.quantile_index(
                           n, 1.0 - f) if f > 0 else None))
        cutoff = beam.pvalue.AsSingleton(self.cutoff)
        self.train_positives = self.positives | "BeforeCutoff" >> beam.Filter(
            lambda r, c: c is None or r[2] < c, cutoff)
        self.neighbours = (
            self.train_positives
            | "KeyByUser" >> beam.Map(lambda r: (r[0], (r[2], r[1])))
            # a Top combine, not a GroupByKey: no worker holds more than swing_max_history of one user
            | "RecentPerUser" >> beam.combiners.Top.PerKey(cfg.swing_max_history)
            | "CapHistories" >> beam.Map(_cap_history, cfg.swing_max_history)
            | "FanOutByItem" >> beam.FlatMap(_fan_out_history, cfg.seed)
            | "SampleUsersPerItem" >> beam.combiners.Top.PerKey(cfg.swing_max_users, key=lambda v: (-v[0], -v[1]))
            | "SwingRows" >> beam.FlatMap(_swing_neighbours, cfg))
        self.last_ts = (self.train_positives | "KeyItemTs" >> beam.Map(lambda r: (r[1], r[2]))
                        | "LastTsPerItem" >> beam.CombinePerKey(max))


def _swing(prep: _Prepared, cfg: P.PairConfig):
    keyed = prep.neighbours | "KeyPairsByItem" >> beam.FlatMap(
        lambda kv, n: [(i, (j, s, c)) for i, j, s, c in P.top_partners(kv[0], kv[1], n)], cfg.swing_top_n)
    by_partner = ({"pair": keyed, "ts": prep.last_ts} | "JoinItemTs" >> beam.CoGroupByKey()
                  | "ToPartner" >> beam.FlatMap(_attach_ts, 0))
    return ({"pair": by_partner, "ts": prep.last_ts} | "JoinPartnerTs" >> beam.CoGroupByKey()
            | "SwingRowsWithTs" >> beam.FlatMap(_attach_ts, 1))


def _attach_ts(keyed, step: int):
    """Two joins give each directed Swing pair max(last ts of item, last ts of partner) without a dict side input."""
    key, g = keyed
    last = next(iter(g["ts"]), None)
    for rec in g["pair"]:
        if step == 0:  # key = item; rec = (partner, score, support)
            j, s, c = rec
            yield j, (key, s, c, last)
        else:  # key = partner; rec = (item, score, support, item's last ts)
            i, s, c, t = rec
            yield i, key, s, c, max(t, last)


def _u2i(prep: _Prepared, cfg: P.PairConfig, collab=None, encoder=None):
    """Trigger rows (trigger, target, sim, target_ts, user, source); collab / encoder: (item, unit vector)."""
    events = prep.positives | "EventsByItem" >> beam.Map(lambda r: (r[1], (r[0], r[2])))
    feats = {"ev": events}
    if cfg.trigger_similarity == "swing":
        feats["nb"] = prep.neighbours
    elif collab is not None:
        feats["cv"] = collab
    if cfg.trigger_fallback == "encoder" and encoder is not None:
        feats["enc"] = encoder
    for name in ("nb", "cv", "enc"):
        feats.setdefault(name, events.pipeline | f"No_{name}" >> beam.Create([]))
    return (feats | "JoinItemFeatures" >> beam.CoGroupByKey()
            | "EventsWithFeatures" >> beam.FlatMap(_with_features)
            | "GroupUserSequences" >> beam.GroupByKey()
            | "PickTriggers" >> beam.ParDo(_UserTriggers(cfg)))


def _collab(prep: _Prepared, cfg: P.PairConfig):
    from pipelines.beam.collab_vectors import CollabItemVectors

    if cfg.trigger_similarity != "collab":
        return None
    return (prep.train_positives | "TrainUserItems" >> beam.Map(lambda r: (r[0], r[1]))
            | "CollabModel" >> CollabItemVectors(cfg.collab))


class SwingPairs(beam.PTransform):
    """interactions -> directed Swing pairs (item, partner, score, support, ts); = `pipelines.mining.pairs.swing_pairs`."""

    def __init__(self, cfg: P.PairConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, interactions):
        return _swing(_Prepared(interactions, self.cfg), self.cfg)


class TriggerTargetPairs(beam.PTransform):
    """interactions -> (trigger, target, score, target_ts, user_id); = `pipelines.mining.pairs.trigger_target_pairs`.

    Args:
        encoder: optional PCollection of (item_id, unit vector) of the pre-trained encoder (the fallback).
    """

    def __init__(self, cfg: P.PairConfig, encoder=None, label: str | None = None):
        super().__init__(label)
        self.cfg, self.encoder = cfg, encoder

    def expand(self, interactions):
        prep = _Prepared(interactions, self.cfg)
        return _u2i(prep, self.cfg, _collab(prep, self.cfg), self.encoder) | "DropSource" >> beam.Map(lambda r: r[:5])


def _dedup(keyed_rows):
    _, rows = keyed_rows
    return min(rows, key=P.dedup_rank)


def _canonical_row(row):
    left, right = P.canonical(row[0], row[1])
    return (left, right), (left, right, row[2], row[3], row[4])


class MinePairs(beam.PTransform):
    """interactions -> {"train": pairs, "heldout": pairs, "cutoff": singleton}; pairs are (left, right, source,
    ts, weight) tuples, the rows of `pipelines.mining.pairs.mine_pairs(...).train / .heldout`.

    Args:
        cfg: PairConfig.
        encoder: optional PCollection of (item_id, unit vector) from the pre-trained (behaviour-free) encoder: the
            trigger fallback. Trigger sources are counted in ``qarm.pairs/trigger_<source>``.
    """

    def __init__(self, cfg: P.PairConfig, encoder=None, label: str | None = None):
        super().__init__(label)
        self.cfg, self.encoder = cfg, encoder

    def expand(self, interactions):
        cfg = self.cfg
        prep = _Prepared(interactions, cfg)
        cutoff = beam.pvalue.AsSingleton(prep.cutoff)
        swing = _swing(prep, cfg) | "SwingRows5" >> beam.Map(lambda r: (r[0], r[1], "swing", r[4], r[2]))
        u2i = (_u2i(prep, cfg, _collab(prep, cfg), self.encoder)
               | "U2iRows5" >> beam.Map(lambda r: (r[0], r[1], "u2i", r[3], r[2])))
        u2i_train = u2i | "U2iBeforeCutoff" >> beam.Filter(lambda r, c: c is None or r[3] < c, cutoff)
        u2i_held = u2i | "U2iAfterCutoff" >> beam.Filter(lambda r, c: c is not None and r[3] >= c, cutoff)
        train = ((swing, u2i_train) | "MergeTrainRows" >> beam.Flatten()
                 | "CanonicalTrain" >> beam.Map(_canonical_row)
                 | "GroupTrainDuplicates" >> beam.GroupByKey()
                 | "DedupTrain" >> beam.Map(_dedup))
        held = (u2i_held | "CanonicalHeldout" >> beam.Map(_canonical_row)
                | "GroupHeldoutDuplicates" >> beam.GroupByKey()
                | "DedupHeldout" >> beam.Map(_dedup))
        if cfg.heldout_drop_seen:
            train_keys = train | "TrainKeys" >> beam.Map(lambda r: ((r[0], r[1]), True))
            held_keyed = held | "KeyHeldout" >> beam.Map(lambda r: ((r[0], r[1]), r))
            held = ({"held": held_keyed, "train": train_keys} | "JoinHeldoutWithTrain" >> beam.CoGroupByKey()
                    | "DropSeenInTrain" >> beam.FlatMap(
                        lambda kv: kv[1]["held"] if not kv[1]["train"] else []))
        return {"train": train, "heldout": held, "cutoff": prep.cutoff}
