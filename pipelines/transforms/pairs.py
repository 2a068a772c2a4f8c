"""Beam PTransforms for pair mining; same definitions and kernels as `pipelines.pairs` (see its docstring).

Input: a PCollection of interaction dicts {user_id, item_id, ts, label}. The Swing work is keyed by item (one
`swing_row` call per item over the histories of its users), the trigger search by user, so both parallelise on a
real runner. The time cutoff is a global combine used as a side input; the Swing neighbour lists of all items are
a dict side input of the trigger step (about `u2i_neighbours` floats per item).
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines import pairs as P
from pipelines.transforms.common import stage_timer

_NS = "qarm.pairs"


class _CutoffFn(beam.CombineFn):
    """Exact held-out cutoff over all positive ts (lists of ints; fine for catalog-scale jobs)."""

    def __init__(self, heldout_frac: float):
        self.heldout_frac = heldout_frac

    def create_accumulator(self):
        return []

    def add_input(self, acc, ts):
        acc.append(int(ts))
        return acc

    def merge_accumulators(self, accs):
        return [t for acc in accs for t in acc]

    def extract_output(self, acc):
        return P.time_cutoff(np.asarray(acc, dtype=np.int64), self.heldout_frac)


def _cap_history(user_rows, max_history: int):
    user, rows = user_rows
    rows = sorted(rows)[-max_history:]  # (ts, item): the most recent positives
    return user, np.sort(np.asarray([i for _, i in rows], dtype=np.int64))


def _fan_out_history(user_hist):
    user, hist = user_hist
    for item in hist:
        yield int(item), (user, hist)


def _swing_neighbours(item_users, cfg: P.PairConfig):
    item, users = item_users
    with stage_timer("mine_pairs", "swing"):
        nb = P.swing_row(item, users, cfg)
    if len(nb.partners):
        yield item, nb


def _top_swing(item_nb, last_ts, cfg: P.PairConfig):
    item, nb = item_nb
    for i, j, score, support in P.top_partners(item, nb, cfg.swing_top_n):
        yield i, j, score, support, max(last_ts[i], last_ts[j])


class _UserTriggers(beam.DoFn):
    def __init__(self, cfg: P.PairConfig):
        self.cfg = cfg
        self.skipped = Metrics.counter(_NS, "u2i_targets_without_trigger")

    def process(self, user_rows, neighbours):
        user, rows = user_rows
        rows = sorted(rows)
        items = np.asarray([i for _, i in rows], dtype=np.int64)
        ts = np.asarray([t for t, _ in rows], dtype=np.int64)
        with stage_timer("mine_pairs", "u2i"):
            out, skipped = P.user_trigger_pairs(user, items, ts, neighbours, self.cfg)
        self.skipped.inc(skipped)
        yield from out


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
                       | "TimeCutoff" >> beam.CombineGlobally(_CutoffFn(cfg.heldout_frac)))
        cutoff = beam.pvalue.AsSingleton(self.cutoff)
        self.train_positives = self.positives | "BeforeCutoff" >> beam.Filter(
            lambda r, c: c is None or r[2] < c, cutoff)
        self.neighbours = (
            self.train_positives
            | "KeyByUser" >> beam.Map(lambda r: (r[0], (r[2], r[1])))
            | "GroupTrainHistories" >> beam.GroupByKey()
            | "CapHistories" >> beam.Map(_cap_history, cfg.swing_max_history)
            | "FanOutByItem" >> beam.FlatMap(_fan_out_history)
            | "GroupUsersByItem" >> beam.GroupByKey()
            | "SwingRows" >> beam.FlatMap(_swing_neighbours, cfg))
        self.last_ts = (self.train_positives | "KeyItemTs" >> beam.Map(lambda r: (r[1], r[2]))
                        | "LastTsPerItem" >> beam.CombinePerKey(max))


def _swing(prep: _Prepared, cfg: P.PairConfig):
    return prep.neighbours | "TopSwingPartners" >> beam.FlatMap(
        _top_swing, beam.pvalue.AsDict(prep.last_ts), cfg)


def _u2i(prep: _Prepared, cfg: P.PairConfig):
    return (prep.positives
            | "KeyUserSequence" >> beam.Map(lambda r: (r[0], (r[2], r[1])))
            | "GroupUserSequences" >> beam.GroupByKey()
            | "PickTriggers" >> beam.ParDo(_UserTriggers(cfg), beam.pvalue.AsDict(prep.neighbours)))


class SwingPairs(beam.PTransform):
    """interactions -> directed Swing pairs (item, partner, score, support, ts); = `pipelines.pairs.swing_pairs`."""

    def __init__(self, cfg: P.PairConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, interactions):
        return _swing(_Prepared(interactions, self.cfg), self.cfg)


class TriggerTargetPairs(beam.PTransform):
    """interactions -> (trigger, target, score, target_ts, user_id); = `pipelines.pairs.trigger_target_pairs`."""

    def __init__(self, cfg: P.PairConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, interactions):
        return _u2i(_Prepared(interactions, self.cfg), self.cfg)


def _dedup(keyed_rows):
    _, rows = keyed_rows
    return min(rows, key=P.dedup_rank)


def _canonical_row(row):
    left, right = P.canonical(row[0], row[1])
    return (left, right), (left, right, row[2], row[3], row[4])


class MinePairs(beam.PTransform):
    """interactions -> {"train": pairs, "heldout": pairs, "cutoff": singleton}; pairs are (left, right, source,
    ts, weight) tuples, the rows of `pipelines.pairs.mine_pairs(...).train / .heldout`."""

    def __init__(self, cfg: P.PairConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, interactions):
        cfg = self.cfg
        prep = _Prepared(interactions, cfg)
        cutoff = beam.pvalue.AsSingleton(prep.cutoff)
        swing = _swing(prep, cfg) | "SwingRows5" >> beam.Map(lambda r: (r[0], r[1], "swing", r[4], r[2]))
        u2i = _u2i(prep, cfg) | "U2iRows5" >> beam.Map(lambda r: (r[0], r[1], "u2i", r[3], r[2]))
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
