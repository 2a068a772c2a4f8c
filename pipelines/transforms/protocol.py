"""The protocol's part of every event (0 train, 1 valid, 2 test), computed on the workers.

Same definitions as `feature_store.split.split_labels` (identical labels; the tests compare them):

- global: the two cut timestamps are order statistics of all timestamps (index n - round(frac * n) of the sorted
  ts, past the last event when that rounds to n), found by `ExactQuantile` (two counting passes, no worker holds
  the log), and applied to every event with the cuts as a side input;
- user_last_n / user_last_frac: a GroupByKey per user; inside one user, events are ordered by (ts, row) (ties in
  ts keep input order, as in split_labels) and the last n_test / n_valid (or rounded shares) are test / valid.

Input: the source rows (dicts with ``user_id``, ``ts`` and ``_row``, the row of the loaded table the driver's
protocol record is computed over). Output: the same dicts with ``_part`` set.
"""
from __future__ import annotations

import apache_beam as beam

from feature_store.split import SplitConfig
from pipelines.transforms.quantiles import ExactQuantile


def _parseable(r: dict):
    from pipelines.transforms.validate import parse_int

    (user, bad_u), (ts, bad_t) = parse_int(r.get("user_id")), parse_int(r.get("ts"))
    if not (bad_u or bad_t) and user is not None and ts is not None:
        yield {**r, "user_id": user, "ts": ts}


def _cut_index(frac: float):
    return lambda n: n - int(round(frac * n))


def _global_part(r: dict, valid_cut, test_cut) -> dict:
    ts = int(r["ts"])
    return {**r, "_part": 2 if ts >= test_cut else 1 if ts >= valid_cut else 0}


def _share(count: int, frac: float) -> int:
    """= feature_store.split._share for one user: rounded to nearest (ties to even), at least 1 when frac > 0."""
    return 0 if frac <= 0 else max(1, int(round(count * frac)))


def _user_parts(keyed, cfg: SplitConfig):
    _, rows = keyed
    rows = sorted(rows, key=lambda r: (int(r["ts"]), int(r["_row"])))
    n = len(rows)
    if cfg.method == "user_last_n":
        n_test, n_valid = cfg.n_test, cfg.n_valid
    else:
        n_test, n_valid = _share(n, cfg.test_frac), _share(n, cfg.valid_frac)
    eligible = n >= cfg.min_train + n_test + n_valid
    for k, r in enumerate(rows):
        from_end = n - 1 - k
        part = 0
        if eligible and from_end < n_test + n_valid:
            part = 2 if from_end < n_test else 1
        yield {**r, "_part": part}


class ProtocolParts(beam.PTransform):
    """Source interaction rows -> the same rows with ``_part`` (0 train / 1 valid / 2 test) of `cfg`'s split."""

    def __init__(self, cfg: SplitConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, rows):
        cfg = self.cfg
        rows = rows | "Parseable" >> beam.FlatMap(_parseable)  # the loader's table never holds others
        if cfg.method == "global":
            ts = rows | "Timestamps" >> beam.Map(lambda r: int(r["ts"]))
            valid_cut = ts | "ValidCut" >> ExactQuantile(_cut_index(cfg.valid_frac + cfg.test_frac))
            test_cut = ts | "TestCut" >> ExactQuantile(_cut_index(cfg.test_frac))
            return rows | "ApplyCuts" >> beam.Map(_global_part, beam.pvalue.AsSingleton(valid_cut),
                                                  beam.pvalue.AsSingleton(test_cut))
        return (rows | "KeyByUser" >> beam.Map(lambda r: (r["user_id"], r))
                | "GroupUserEvents" >> beam.GroupByKey()
                | "UserParts" >> beam.FlatMap(_user_parts, cfg))


class ProtocolSummary(beam.PTransform):
    """Rows with ``_part`` -> one dict {events, train_events, train_max_ts}: the protocol record's counts, computed
    on the workers (the driver checks them against `feature_store.split.protocol_record`)."""

    def expand(self, parted):
        def acc(r):
            train = int(r["_part"]) == 0
            return (1, int(train), int(r["ts"]) if train else None)

        def merge(values):
            events = train = 0
            max_ts = None
            for e, t, m in values:
                events, train = events + e, train + t
                if m is not None:
                    max_ts = m if max_ts is None else max(max_ts, m)
            return (events, train, max_ts)

        return (parted | "PartOf" >> beam.Map(acc) | "SumParts" >> beam.CombineGlobally(merge)
                | "AsRecord" >> beam.Map(lambda t: {"events": t[0], "train_events": t[1], "train_max_ts": t[2]}))
