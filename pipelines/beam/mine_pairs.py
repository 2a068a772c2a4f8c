"""Beam PTransforms for pair mining; same definitions and kernels as `pipelines.mining.pairs` (see its docstring).

Input: a PCollection of interaction dicts {user_id, item_id, ts, label}. The mining runs on sharded tables
(`pipelines.beam.shards`): users and items are spread over ``ceil(interactions / events_per_shard)``
shards by a fixed hash, every step's element is one shard's table (or a piece of it on its way to another
shard), and the per-key logic runs on the workers over numpy slices, calling the pandas path's kernels
(`swing_row`, `cap_users`, `top_partners`, `pick_triggers`, `dedup_pairs`, the collaborative model's solves). So
the runner holds O(shards²) elements per step, never one per event, and a worker holds one shard at a time.
Nothing is a side input of the whole catalog or log. The steps:

1. user shards: each positive goes to its user's shard (a lifted `Gather`: a worker packs what a bundle sends to a
   shard into arrays first); a shard keeps one row per (user, item) with its first ts, sorted by (user, ts, item).
2. the held-out cutoff: an exact quantile over the shards' ts arrays (`ExactQuantile`: two count-table combines).
3. item shards: each training positive goes to its item's shard, with a flag for being in the user's capped
   history (its ``swing_max_history`` most recent training positives); each user's capped history goes once to
   every item shard that holds one of its items. An item shard then has each item's training users, last ts and
   Swing row: the ``swing_max_users`` users with the smallest seeded hash (`cap_users`) and their histories, so one
   `swing_row` holds at most swing_max_users histories however hot the item.
4. Swing pairs: each item's best partners go to the partner's shard, which adds the partner's last ts.
5. the collaborative model (`pipelines.beam.collab_vectors`) on the item shards' training users.
6. trigger search: each positive goes to its item's shard with its ``history`` trigger candidates (only for the
   Swing similarity, which needs them); the item shard adds the candidates' Swing similarities to the item and the
   item's collaborative and encoder vectors, and sends that back to the user's shard, which picks every target's
   trigger (`pick_triggers`).
7. dedup: every pair row goes to the shard of its smaller id, which keeps one row per unordered pair.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.mining import pairs as P
from pipelines.beam.collab_vectors import collab_blocks
from pipelines.beam.common import stage_timer
from pipelines.beam.quantiles import ExactQuantile
from pipelines.beam.shards import (Gather, ragged, ragged_rows, segments, shard_count, shard_of, shard_of_id,
                                         split, take)

_NS = "qarm.pairs"
EVENTS_PER_SHARD = 100_000  # interactions per shard: a shard's tables stay at a few MB
_EVENT = (("user", "i8", False), ("item", "i8", False), ("ts", "i8", False))
_TABLES = ()  # Gather of whole tables only
_TRIGGER_COLUMNS = ("trigger", "target", "sim", "ts", "user")


def _first(values):
    return next(iter(values), None)


# ------------------------------------------------------------------------------------------------ 1. users


def _positive_to_shard(r: dict, label: float, n_shards: int):
    if float(r["label"]) >= label:
        user = int(r["user_id"])
        yield shard_of_id(user, n_shards), (user, int(r["item_id"]), int(r["ts"]))


def _user_log(keyed):
    """(shard, {user, item, ts} positives) -> (shard, one row per (user, item) with its first ts, by (user, ts,
    item)): the rows of `pipelines.mining.pairs.positives` for the shard's users."""
    shard, t = keyed
    order = np.lexsort((t["ts"], t["item"], t["user"]))
    user, item, ts = t["user"][order], t["item"][order], t["ts"][order]
    first = np.r_[True, (user[1:] != user[:-1]) | (item[1:] != item[:-1])] if len(user) else user > 0
    user, item, ts = user[first], item[first], ts[first]
    order = np.lexsort((item, ts, user))
    return shard, {"user": user[order], "item": item[order], "ts": ts[order]}


def _before_cutoff(keyed, cutoff):
    shard, t = keyed
    return keyed if cutoff is None else (shard, take(t, t["ts"] < cutoff))


def _user_positions(t: dict) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by user: each row's user segment start and end."""
    _, bounds = segments(t["user"])
    sizes = np.diff(bounds)
    return np.repeat(bounds[:-1], sizes), np.repeat(bounds[1:], sizes)


# ------------------------------------------------------------------------------------------------ 3. items


def _train_to_items(keyed, n_shards: int, cfg: P.PairConfig):
    """A user shard's training positives -> (item shard, {"edges": its items' positives, "hists": the capped
    histories of the users with a history item there})."""
    _, t = keyed
    if not len(t["user"]):
        return
    _, end = _user_positions(t)
    in_hist = (end - 1 - np.arange(len(t["user"]))) < cfg.swing_max_history  # the most recent, in (ts, item) order
    edges = {"item": t["item"], "user": t["user"], "ts": t["ts"], "in_hist": in_hist.astype(np.int8)}
    h_order = np.flatnonzero(in_hist)
    h_order = h_order[np.lexsort((t["item"][h_order], t["user"][h_order]))]  # histories as sorted item ids
    h_users, h_bounds = segments(t["user"][h_order])
    hists = {"user": h_users, "hist": (t["item"][h_order], np.diff(h_bounds))}
    h_row = np.repeat(np.arange(len(h_users)), np.diff(h_bounds))  # history row of each history entry
    item_shard = shard_of(t["item"], n_shards)
    wanted = np.unique(np.stack([item_shard[h_order], h_row]), axis=1)  # (shard, history row), distinct
    for shard, part in split(edges, item_shard):
        rows = wanted[1][wanted[0] == shard]
        yield shard, {"edges": part, "hists": take(hists, rows)}


def _item_shard(keyed, cfg: P.PairConfig):
    """(item shard, training positives + histories) -> (shard, {item, last_ts, edges: {item, user} sorted, nb:
    item -> Neighbours of the items with Swing partners})."""
    shard, m = keyed
    e = m["edges"]
    order = np.lexsort((e["user"], e["item"]))
    item, user, ts, in_hist = e["item"][order], e["user"][order], e["ts"][order], e["in_hist"][order]
    items, bounds = segments(item)
    last_ts = np.maximum.reduceat(ts, bounds[:-1]) if len(items) else ts[:0]
    hists = dict(zip(m["hists"]["user"].tolist(), ragged_rows(m["hists"]["hist"])))
    neighbours = {}
    with stage_timer("mine_pairs", "swing"):
        for k, it in enumerate(items.tolist()):
            lo, hi = bounds[k], bounds[k + 1]
            swing_users = user[lo:hi][in_hist[lo:hi] == 1].tolist()
            if len(swing_users) < 2:  # one user makes no Swing pair
                continue
            nb = P.swing_row(it, P.cap_users(it, [(u, hists[u]) for u in swing_users], cfg), cfg)
            if len(nb.partners):
                neighbours[it] = nb
    return shard, {"item": items, "last_ts": last_ts, "edges": {"item": item, "user": user}, "nb": neighbours}


# ------------------------------------------------------------------------------------------------ 4. Swing pairs


def _swing_requests(keyed, n_shards: int, cfg: P.PairConfig):
    """An item shard's best partners -> (partner's shard, {partner, item, score, support, item_ts})."""
    _, s = keyed
    rows = []
    for it, nb in s["nb"].items():
        item_ts = int(s["last_ts"][np.searchsorted(s["item"], it)])
        rows.extend((j, i, score, support, item_ts) for i, j, score, support in P.top_partners(it, nb, cfg.swing_top_n))
    if not rows:
        return
    cols = list(zip(*rows))
    table = {"partner": np.asarray(cols[0], np.int64), "item": np.asarray(cols[1], np.int64),
             "score": np.asarray(cols[2], np.float64), "support": np.asarray(cols[3], np.int64),
             "item_ts": np.asarray(cols[4], np.int64)}
    yield from split(table, shard_of(table["partner"], n_shards))


def _swing_rows(keyed):
    """(partner shard, {req: [requests], items: [item shard]}) -> (shard, directed Swing rows {item, partner,
    score, support, ts}); ts = max(last ts of the item, last ts of the partner)."""
    shard, g = keyed
    req, items = _first(g["req"]), _first(g["items"])
    if req is None:
        return
    partner_ts = items["last_ts"][np.searchsorted(items["item"], req["partner"])]
    yield shard, {"item": req["item"], "partner": req["partner"], "score": req["score"], "support": req["support"],
                  "ts": np.maximum(req["item_ts"], partner_ts)}


def _swing_tuples(keyed):
    _, t = keyed
    return zip(t["item"].tolist(), t["partner"].tolist(), t["score"].tolist(), t["support"].tolist(),
               t["ts"].tolist())


# ------------------------------------------------------------------------------------------------ 6. triggers


def _positives_to_items(keyed, n_shards: int, with_candidates: bool, cfg: P.PairConfig):
    """A user shard's positives -> (item shard, {item, user, ts[, cands]}): cands = `trigger_candidates`."""
    _, t = keyed
    if not len(t["user"]):
        return
    start, _ = _user_positions(t)
    msg = {"item": t["item"], "user": t["user"], "ts": t["ts"]}
    if with_candidates:
        pos = np.arange(len(t["user"]))
        lo = np.maximum(start, pos - cfg.history)  # = trigger_candidates: the `history` previous positives
        sizes = pos - lo
        offsets = np.cumsum(sizes) - sizes
        idx = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(lo - offsets, sizes)
        msg["cands"] = (t["item"][idx], sizes)
    yield from split(msg, shard_of(t["item"], n_shards))


def _vectors_of(items: np.ndarray, table) -> tuple:
    """Ragged float32 column: each item's vector from a {item (sorted), vec (k, d)} table, None without one."""
    if table is None or not len(table["item"]):
        return np.empty(0, np.float32), np.full(len(items), -1, np.int64)
    pos = np.minimum(np.searchsorted(table["item"], items), len(table["item"]) - 1)
    hit = table["item"][pos] == items
    vec = np.asarray(table["vec"], np.float32)
    return vec[pos[hit]].ravel(), np.where(hit, vec.shape[1], -1).astype(np.int64)


def _item_features(keyed, n_shards: int, cfg: P.PairConfig):
    """(item shard, {ev, items, cv, enc}) -> (user shard, {user, ts, item, sims, cv, enc}) for every positive: what
    decides the trigger of the positive as a target (its candidates' Swing similarities) and the item's vectors."""
    _, g = keyed
    ev = _first(g["ev"])
    if ev is None:
        return
    msg = {"user": ev["user"], "ts": ev["ts"], "item": ev["item"],
           "cv": _vectors_of(ev["item"], _first(g.get("cv", ()))),
           "enc": _vectors_of(ev["item"], _first(g.get("enc", ())))}
    if "cands" in ev:
        shard_items = _first(g.get("items", ()))
        nbs = shard_items["nb"] if shard_items is not None else {}
        with stage_timer("mine_pairs", "u2i"):
            msg["sims"] = ragged((P.target_swing_sims(c, nbs.get(it), cfg) if len(c) else None
                                  for it, c in zip(ev["item"].tolist(), ragged_rows(ev["cands"]))), np.float64)
    yield from split(msg, shard_of(ev["user"], n_shards))


class _UserTriggers(beam.DoFn):
    """(user shard, its positives with their features) -> (shard, trigger rows {trigger, target, sim, ts, user,
    source}); source indexes TRIGGER_SOURCES."""

    def __init__(self, cfg: P.PairConfig):
        self.cfg = cfg

    def setup(self):
        self.counters = {s: Metrics.counter(_NS, f"trigger_{s}") for s in P.TRIGGER_SOURCES}

    def process(self, keyed):
        shard, t = keyed
        t = take(t, np.lexsort((t["item"], t["ts"], t["user"])))
        users, bounds = segments(t["user"])
        sims = ragged_rows(t["sims"]) if "sims" in t else None
        cv, enc = ragged_rows(t["cv"]), ragged_rows(t["enc"])
        items, ts = t["item"], t["ts"]
        rows, counts = [], dict.fromkeys(P.TRIGGER_SOURCES, 0)
        with stage_timer("mine_pairs", "u2i"):
            for k, user in enumerate(users.tolist()):
                lo, hi = bounds[k], bounds[k + 1]
                its = items[lo:hi]
                out, c = P.pick_triggers(
                    user, its, ts[lo:hi], self.cfg, swing_sims=sims[lo:hi] if sims is not None else None,
                    collab={i: v for i, v in zip(its.tolist(), cv[lo:hi]) if v is not None},
                    encoder={i: v for i, v in zip(its.tolist(), enc[lo:hi]) if v is not None})
                rows.extend(out)
                for source, n in c.items():
                    counts[source] += n
        for source, n in counts.items():
            if n:
                self.counters[source].inc(n)
        if rows:
            cols = list(zip(*rows))
            yield shard, {"trigger": np.asarray(cols[0], np.int64), "target": np.asarray(cols[1], np.int64),
                          "sim": np.asarray(cols[2], np.float64), "ts": np.asarray(cols[3], np.int64),
                          "user": np.asarray(cols[4], np.int64),
                          "source": np.asarray([P.TRIGGER_SOURCES.index(s) for s in cols[5]], np.int8)}


def _trigger_tuples(keyed):
    _, t = keyed
    return zip(*(t[c].tolist() for c in _TRIGGER_COLUMNS))


# ------------------------------------------------------------------------------------------------ 7. dedup


def _pair_rows(keyed, source: str, cutoff, n_shards: int):
    """Swing rows or trigger rows -> (shard of the smaller id, {left, right, source, ts, weight, held})."""
    _, t = keyed
    a, b = (t["item"], t["partner"]) if source == "swing" else (t["trigger"], t["target"])
    weight = t["score"] if source == "swing" else t["sim"]
    held = (t["ts"] >= cutoff) if source == "u2i" and cutoff is not None else np.zeros(len(a), bool)
    left, right = np.minimum(a, b), np.maximum(a, b)
    table = {"left": left, "right": right, "source": np.full(len(a), P.SOURCES.index(source), np.int8),
             "ts": t["ts"], "weight": weight, "held": held.astype(np.int8)}
    yield from split(table, shard_of(left, n_shards))


def _dedup(keyed, drop_seen: bool):
    """(shard, pair rows) -> deduplicated train rows (main output) and held-out rows (tag "heldout"), as
    (left, right, source, ts, weight) tuples: `pipelines.mining.pairs.mine_pairs`' rules."""
    _, t = keyed
    rows = list(zip(t["left"].tolist(), t["right"].tolist(), [P.SOURCES[s] for s in t["source"].tolist()],
                    t["ts"].tolist(), t["weight"].tolist()))
    held = t["held"].astype(bool).tolist()
    train = P.dedup_pairs([r for r, h in zip(rows, held) if not h])
    train_keys = {(r[0], r[1]) for r in train}
    yield from train
    for r in P.dedup_pairs([r for r, h in zip(rows, held) if h]):
        if not (drop_seen and (r[0], r[1]) in train_keys):
            yield beam.pvalue.TaggedOutput("heldout", r)


# ------------------------------------------------------------------------------------------------ the graph


class _Mining:
    """The sharded PCollections of one pair-mining run (built lazily: each transform adds what it uses)."""

    def __init__(self, interactions, cfg: P.PairConfig, events_per_shard: int):
        self.cfg = cfg
        self.shard_count = shard_count(interactions, events_per_shard, "Pairs")
        self.n_shards = beam.pvalue.AsSingleton(self.shard_count)
        self.logs = (interactions
                     | "PositivesToUserShards" >> beam.FlatMap(_positive_to_shard, cfg.positive_label, self.n_shards)
                     | "GatherUserShards" >> beam.CombinePerKey(Gather(_EVENT))
                     | "UserLogs" >> beam.Map(_user_log))
        self.cutoff = (self.logs | "PositiveTs" >> beam.Map(lambda kv: kv[1]["ts"])
                       | "TimeCutoff" >> ExactQuantile(lambda n, f=cfg.heldout_frac: P.quantile_index(
                           n, 1.0 - f) if f > 0 else None))
        train = self.logs | "BeforeCutoff" >> beam.Map(_before_cutoff, beam.pvalue.AsSingleton(self.cutoff))
        self.items = (train | "TrainToItemShards" >> beam.FlatMap(_train_to_items, self.n_shards, cfg)
                      | "GatherItemShards" >> beam.CombinePerKey(Gather(_TABLES))
                      | "ItemShards" >> beam.Map(_item_shard, cfg))
        self._swing = self._triggers = None

    def swing(self):
        if self._swing is None:
            req = (self.items | "SwingRequests" >> beam.FlatMap(_swing_requests, self.n_shards, self.cfg)
                   | "GatherSwingRequests" >> beam.CombinePerKey(Gather(_TABLES)))
            self._swing = ({"req": req, "items": self.items} | "JoinPartnerTs" >> beam.CoGroupByKey()
                           | "SwingRowsWithTs" >> beam.FlatMap(_swing_rows))
        return self._swing

    def triggers(self, encoder=None):
        """(user shard, trigger rows); encoder: (item, float32 unit vector) of the pre-trained encoder or None."""
        if self._triggers is not None:
            return self._triggers
        cfg = self.cfg
        swing = cfg.trigger_similarity == "swing"
        feats = {"ev": (self.logs | "PositivesToItemShards" >> beam.FlatMap(_positives_to_items, self.n_shards, swing,
                                                                            cfg)
                        | "GatherTargets" >> beam.CombinePerKey(Gather(_TABLES)))}
        if swing:
            feats["items"] = self.items
        else:
            edges = self.items | "CollabEdges" >> beam.Map(lambda kv: (kv[0], kv[1]["edges"]))
            feats["cv"] = collab_blocks(edges, self.shard_count, cfg.collab)
        if cfg.trigger_fallback == "encoder" and encoder is not None:
            feats["enc"] = (encoder | "EncoderToItemShards" >> beam.Map(
                lambda kv, n: (shard_of_id(kv[0], n), (int(kv[0]), np.asarray(kv[1], np.float32))), self.n_shards)
                            | "GatherEncoder" >> beam.CombinePerKey(Gather((("item", "i8", False),
                                                                            ("vec", "f4", False))))
                            | "EncoderTables" >> beam.Map(_sorted_vectors))
        self._triggers = (feats | "JoinItemFeatures" >> beam.CoGroupByKey()
                          | "FeaturesToUserShards" >> beam.FlatMap(_item_features, self.n_shards, cfg)
                          | "GatherUserFeatures" >> beam.CombinePerKey(Gather(_TABLES))
                          | "PickTriggers" >> beam.ParDo(_UserTriggers(cfg)))
        return self._triggers


def _sorted_vectors(keyed):
    shard, t = keyed
    order = np.argsort(t["item"], kind="stable")
    return shard, {"item": t["item"][order], "vec": t["vec"][order]}


class SwingPairs(beam.PTransform):
    """interactions -> directed Swing pairs (item, partner, score, support, ts); = `pipelines.mining.pairs.swing_pairs`."""

    def __init__(self, cfg: P.PairConfig, events_per_shard: int = EVENTS_PER_SHARD, label: str | None = None):
        super().__init__(label)
        self.cfg, self.events_per_shard = cfg, events_per_shard

    def expand(self, interactions):
        return _Mining(interactions, self.cfg, self.events_per_shard).swing() | "SwingTuples" >> beam.FlatMap(
            _swing_tuples)


class TriggerTargetPairs(beam.PTransform):
    """interactions -> (trigger, target, score, target_ts, user_id); = `pipelines.mining.pairs.trigger_target_pairs`.

    Args:
        encoder: optional PCollection of (item_id, float32 unit vector) of the pre-trained encoder (the fallback).
    """

    def __init__(self, cfg: P.PairConfig, encoder=None, events_per_shard: int = EVENTS_PER_SHARD,
                 label: str | None = None):
        super().__init__(label)
        self.cfg, self.encoder, self.events_per_shard = cfg, encoder, events_per_shard

    def expand(self, interactions):
        mining = _Mining(interactions, self.cfg, self.events_per_shard)
        return mining.triggers(self.encoder) | "TriggerTuples" >> beam.FlatMap(_trigger_tuples)


class MinePairs(beam.PTransform):
    """interactions -> {"train": pairs, "heldout": pairs, "cutoff": singleton}; pairs are (left, right, source,
    ts, weight) tuples, the rows of `pipelines.mining.pairs.mine_pairs(...).train / .heldout`.

    Args:
        cfg: PairConfig.
        encoder: optional PCollection of (item_id, float32 unit vector) from the pre-trained (behaviour-free)
            encoder: the trigger fallback. Trigger sources are counted in ``qarm.pairs/trigger_<source>``.
        events_per_shard: interactions per shard (the shard count is ceil(interactions / events_per_shard)).
    """

    def __init__(self, cfg: P.PairConfig, encoder=None, events_per_shard: int = EVENTS_PER_SHARD,
                 label: str | None = None):
        super().__init__(label)
        self.cfg, self.encoder, self.events_per_shard = cfg, encoder, events_per_shard

    def expand(self, interactions):
        cfg = self.cfg
        mining = _Mining(interactions, cfg, self.events_per_shard)
        cutoff = beam.pvalue.AsSingleton(mining.cutoff)
        swing = mining.swing() | "SwingPairRows" >> beam.FlatMap(_pair_rows, "swing", None, mining.n_shards)
        u2i = mining.triggers(self.encoder) | "U2iPairRows" >> beam.FlatMap(_pair_rows, "u2i", cutoff,
                                                                             mining.n_shards)
        out = ((swing, u2i) | "MergePairRows" >> beam.Flatten()
               | "GatherPairShards" >> beam.CombinePerKey(Gather(_TABLES))
               | "Dedup" >> beam.FlatMap(_dedup, cfg.heldout_drop_seen).with_outputs("heldout", main="train"))
        return {"train": out.train, "heldout": out.heldout, "cutoff": mining.cutoff}
