"""The protocol's part of every event (0 train, 1 valid, 2 test), computed on the workers.

Same definitions as `feature_store.split.split_labels` (identical labels; the tests compare them):

- global: the two cut timestamps are order statistics of all timestamps (index n - round(frac * n) of the sorted
  ts, past the last event when that rounds to n), found by `ExactQuantile` (two counting passes, no worker holds
  the log), and applied to every event with the cuts as a side input;
- user_last_n / user_last_frac: a GroupByKey per user; inside one user, events are ordered by (ts, row) (ties in
  ts keep input order, as in split_labels) and the last n_test / n_valid (or rounded shares) are test / valid.

Input: typed interaction rows (dicts with int ``user_id``, ``ts`` and ``_row``: the loader's snapshot, or the
validated records of the worker path). Output: the same dicts with ``_part`` set. Inside a user, ties in ts are broken
by the ``order`` fields (default ``_row``; rows read from the source on the workers pass ``("item_id", "_row")``:
the loader's table is sorted by ts, user, item, source row, which is the order split_labels sees).

`ProtocolRecord` turns the parted rows into the version's protocol record as one combine of
`feature_store.split.protocol_aggregates` over blocks (the same function `protocol_record` applies to a whole
table), plus the log's last ts (the watermark). It is computed once, here, on either read path: the driver
publishes it as it comes.
"""
from __future__ import annotations

import apache_beam as beam

from feature_store.split import SplitConfig
from pipelines.beam.quantiles import ExactQuantile


def _cut_index(frac: float):
    return lambda n: n - int(round(frac * n))


def _global_part(r: dict, valid_cut, test_cut) -> dict:
    ts = int(r["ts"])
    return {**r, "_part": 2 if ts >= test_cut else 1 if ts >= valid_cut else 0}


def _user_parts(keyed, cfg: SplitConfig, order: tuple = ("_row",)):
    import numpy as np

    from feature_store.split import user_parts

    _, rows = keyed
    rows = sorted(rows, key=lambda r: (int(r["ts"]), *(int(r[k]) for k in order)))
    n = len(rows)
    parts = user_parts(np.full(n, n), np.arange(n - 1, -1, -1), cfg)
    for r, part in zip(rows, parts.tolist()):
        yield {**r, "_part": part}


class ProtocolParts(beam.PTransform):
    """Source interaction rows -> the same rows with ``_part`` (0 train / 1 valid / 2 test) of `cfg`'s split."""

    def __init__(self, cfg: SplitConfig, order: tuple = ("_row",), label: str | None = None):
        super().__init__(label)
        self.cfg, self.order = cfg, tuple(order)

    def expand(self, rows):
        cfg = self.cfg
        if cfg.method == "global":
            ts = rows | "Timestamps" >> beam.Map(lambda r: int(r["ts"]))
            valid_cut = ts | "ValidCut" >> ExactQuantile(_cut_index(cfg.valid_frac + cfg.test_frac))
            test_cut = ts | "TestCut" >> ExactQuantile(_cut_index(cfg.test_frac))
            return rows | "ApplyCuts" >> beam.Map(_global_part, beam.pvalue.AsSingleton(valid_cut),
                                                  beam.pvalue.AsSingleton(test_cut))
        return (rows | "KeyByUser" >> beam.Map(lambda r: (r["user_id"], r))
                | "GroupUserEvents" >> beam.GroupByKey()
                | "UserParts" >> beam.FlatMap(_user_parts, cfg, self.order))


FLUSH_ROWS = 8192


class _RecordFn(beam.CombineFn):
    """Parted rows -> merged `feature_store.split.protocol_aggregates`. Accumulator: [aggregates so far, buffered
    (user, item, ts, label, part) rows]; the buffer is aggregated in blocks of FLUSH_ROWS."""

    def create_accumulator(self):
        return [None, []]

    @staticmethod
    def _flush(acc):
        import pandas as pd

        from feature_store.split import merge_protocol_aggregates, protocol_aggregates

        if acc[1] or acc[0] is None:
            frame = pd.DataFrame(acc[1], columns=["user_id", "item_id", "ts", "label", "_part"])
            block = protocol_aggregates(frame, frame["_part"].to_numpy())
            acc = [block if acc[0] is None else merge_protocol_aggregates([acc[0], block]), []]
        return acc

    def add_input(self, acc, r):
        acc[1].append((int(r["user_id"]), int(r["item_id"]), int(r["ts"]), float(r["label"]), int(r["_part"])))
        return self._flush(acc) if len(acc[1]) >= FLUSH_ROWS else acc

    def merge_accumulators(self, accs):
        from feature_store.split import merge_protocol_aggregates

        return [merge_protocol_aggregates([self._flush(a)[0] for a in accs]), []]

    def extract_output(self, acc):
        return self._flush(acc)[0]


class ProtocolRecord(beam.PTransform):
    """Rows with ``_part`` (and user_id, item_id, ts, label) -> one dict {"protocol": the protocol record,
    "max_ts": the log's last ts or None}: `feature_store.split.protocol_from_aggregates` of the combined
    `protocol_aggregates`, so it equals `protocol_record` over the same events by construction."""

    def __init__(self, cfg: SplitConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, parted):
        from feature_store.split import protocol_from_aggregates

        cfg = self.cfg
        return (parted | "Aggregate" >> beam.CombineGlobally(_RecordFn())
                | "AsRecord" >> beam.Map(lambda agg: {"protocol": protocol_from_aggregates(agg, cfg),
                                                      "max_ts": agg["max_ts"]}))


WINDOW_FIELDS = ("user_id", "item_id", "ts", "label", "part", "o_file", "o_row")


def _window_row(r: dict, order: tuple) -> dict:
    """A parted row as written for the driver's window metrics: the contract columns, its part, and the two
    tie-break numbers of the loader's row order (``order``'s last two fields: file row and table row)."""
    return {"user_id": int(r["user_id"]), "item_id": int(r["item_id"]), "ts": int(r["ts"]),
            "label": float(r["label"]), "part": int(r["_part"]), "o_file": int(r[order[-2]] if len(order) > 1
                                                                               else r[order[-1]]),
            "o_row": int(r[order[-1]])}


class WindowEvents(beam.PTransform):
    """Parted rows -> the rows the driver's window metrics read (`pipelines.jobs.cascade.window_metrics`): every event of the
    valid and test windows, and each user's last train positive (the query of that user's first window
    positive). Their size is the documented bound: the protocol's valid_frac + test_frac of the log plus one row
    per user; the train portion itself never reaches the driver.

    Args:
        positive_label: labels at or above it are positives.
        order: the tie-break fields inside one (user, ts) (as `ProtocolParts`); the last train positive is the
            largest (ts, item_id, *order).
    """

    def __init__(self, positive_label: float, order: tuple = ("_row",), label: str | None = None):
        super().__init__(label)
        self.positive_label, self.order = float(positive_label), tuple(order)

    def expand(self, parted):
        order, pos = self.order, self.positive_label
        windows = parted | "InWindows" >> beam.Filter(lambda r: int(r["_part"]) > 0)
        last_train = (parted | "TrainPositives" >> beam.Filter(lambda r: int(r["_part"]) == 0
                                                              and float(r["label"]) >= pos)
                      | "KeyTrainByUser" >> beam.Map(lambda r: (int(r["user_id"]), r))
                      | "LastTrainPositive" >> beam.CombinePerKey(
                          lambda rows: max((r for r in rows if r is not None), key=lambda r: (int(r["ts"]), int(r["item_id"]),
                                                                *(int(r[k]) for k in order)), default=None))
                      | "DropKey" >> beam.FlatMap(lambda kv: [kv[1]] if kv[1] is not None else []))
        return ((windows, last_train) | "Flatten" >> beam.Flatten()
                | "WindowRow" >> beam.Map(_window_row, order))


ITEM_DIGEST_COLUMNS = (("item_id", "int64"), ("title", object), ("text", object), ("image_uri", object))


class _DigestFn(beam.CombineFn):
    """Rows (dicts) -> `feature_store.split.fingerprint_partial` of ``columns``, summed (order-independent)."""

    def __init__(self, columns):
        self.columns = tuple(columns)

    def create_accumulator(self):
        return [(0, 0, 0), []]

    def _flush(self, acc):
        import pandas as pd

        from feature_store.split import fingerprint_merge, fingerprint_partial

        if acc[1]:
            frame = pd.DataFrame(acc[1], columns=[c for c, _ in self.columns])
            acc = [fingerprint_merge([acc[0], fingerprint_partial(frame, self.columns)]), []]
        return acc

    def add_input(self, acc, r):
        acc[1].append(tuple(r.get(c) for c, _ in self.columns))
        return self._flush(acc) if len(acc[1]) >= FLUSH_ROWS else acc

    def merge_accumulators(self, accs):
        from feature_store.split import fingerprint_merge

        return [fingerprint_merge([self._flush(a)[0] for a in accs]), []]

    def extract_output(self, acc):
        from feature_store.split import fingerprint_hex

        return fingerprint_hex(self._flush(acc)[0])


class ItemsDigest(beam.PTransform):
    """Validated items -> the hex digest of their (item_id, title, text, image_uri) as a multiset: with the
    protocol's data_sha256, the job config's data fingerprint, whichever path read the source."""

    def expand(self, items):
        return items | "Digest" >> beam.CombineGlobally(_DigestFn(ITEM_DIGEST_COLUMNS))
