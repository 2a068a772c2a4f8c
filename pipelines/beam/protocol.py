"""The protocol's part of every event (0 train, 1 valid, 2 test), computed on the workers.

Same definitions as `feature_store.split.split_labels` (identical labels; the tests compare them):

- global: the two cut timestamps are order statistics of all timestamps (index n - round(frac * n) of the sorted
  ts, past the last event when that rounds to n), found by `ExactQuantile` (two counting passes, no worker holds
  the log), and applied to every event with the cuts as a side input;
- user_last_n / user_last_frac: a GroupByKey per user; inside one user, events are ordered by (ts, row) (ties in
  ts keep input order, as in split_labels) and the last n_test / n_valid (or rounded shares) are test / valid.

Input: the source rows (dicts with ``user_id``, ``ts`` and ``_row``, the row of the loaded table the driver's
protocol record is computed over). Output: the same dicts with ``_part`` set. Inside a user, ties in ts are broken
by the ``order`` fields (default ``_row``; rows read from the source on the workers pass ``("item_id", "_row")``:
the loader's table is sorted by ts, user, item, source row, which is the order split_labels sees).

`ProtocolRecord` turns the parted rows into `feature_store.split.protocol_record`'s whole record as one combine
(counts, last train ts, cuts, the order-independent data / train digests), plus the log's last ts (the watermark).
"""
from __future__ import annotations

import apache_beam as beam

from feature_store.split import SplitConfig
from pipelines.beam.quantiles import ExactQuantile


def _parseable(r: dict):
    from pipelines.beam.validate_records import parse_int

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


def _user_parts(keyed, cfg: SplitConfig, order: tuple = ("_row",)):
    _, rows = keyed
    rows = sorted(rows, key=lambda r: (int(r["ts"]), *(int(r[k]) for k in order)))
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

    def __init__(self, cfg: SplitConfig, order: tuple = ("_row",), label: str | None = None):
        super().__init__(label)
        self.cfg, self.order = cfg, tuple(order)

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
                | "UserParts" >> beam.FlatMap(_user_parts, cfg, self.order))


FLUSH_ROWS = 8192


class _RecordFn(beam.CombineFn):
    """Parted rows -> the protocol record's aggregates. Accumulator: [events, train events, last train ts, last ts,
    first ts of valid+test, first ts of test, all-rows digest, train digest, buffered (user, item, ts, label,
    part) rows]; the buffer is hashed in blocks of FLUSH_ROWS (`feature_store.split.fingerprint_partial`)."""

    def create_accumulator(self):
        return [0, 0, None, None, None, None, (0, 0, 0), (0, 0, 0), []]

    @staticmethod
    def _flush(acc):
        import pandas as pd

        from feature_store.split import fingerprint_merge, fingerprint_partial

        if acc[8]:
            frame = pd.DataFrame(acc[8], columns=["user_id", "item_id", "ts", "label", "_part"])
            acc[6] = fingerprint_merge([acc[6], fingerprint_partial(frame)])
            acc[7] = fingerprint_merge([acc[7], fingerprint_partial(frame[frame["_part"] == 0])])
            acc[8] = []
        return acc

    def add_input(self, acc, r):
        ts, part = int(r["ts"]), int(r["_part"])
        acc[0] += 1
        acc[3] = ts if acc[3] is None else max(acc[3], ts)
        if part == 0:
            acc[1] += 1
            acc[2] = ts if acc[2] is None else max(acc[2], ts)
        else:
            acc[4] = ts if acc[4] is None else min(acc[4], ts)
            if part == 2:
                acc[5] = ts if acc[5] is None else min(acc[5], ts)
        acc[8].append((int(r["user_id"]), int(r["item_id"]), ts, float(r["label"]), part))
        return self._flush(acc) if len(acc[8]) >= FLUSH_ROWS else acc

    def merge_accumulators(self, accs):
        from feature_store.split import fingerprint_merge

        def pick(fn, values):
            values = [v for v in values if v is not None]
            return fn(values) if values else None

        accs = [self._flush(a) for a in accs]
        return [sum(a[0] for a in accs), sum(a[1] for a in accs), pick(max, [a[2] for a in accs]),
                pick(max, [a[3] for a in accs]), pick(min, [a[4] for a in accs]), pick(min, [a[5] for a in accs]),
                fingerprint_merge([a[6] for a in accs]), fingerprint_merge([a[7] for a in accs]), []]

    def extract_output(self, acc):
        acc = self._flush(acc)
        return {"events": acc[0], "train_events": acc[1], "train_max_ts": acc[2], "max_ts": acc[3],
                "first_valid_ts": acc[4], "first_test_ts": acc[5], "data": list(acc[6]), "train": list(acc[7])}


def record_from_aggregates(agg: dict, cfg: SplitConfig) -> dict:
    """The combine's aggregates -> exactly `feature_store.split.protocol_record` of the same events.

    Global cuts: every event at or after a cut is in the later part and none before it, so a cut is the first ts
    of its later part, or past the last event (max + 1) when that part is empty, as `global_cuts` gives."""
    from dataclasses import asdict

    from feature_store.split import PROTOCOL_VERSION, fingerprint_hex

    rec = {"version": PROTOCOL_VERSION, "split": asdict(cfg), "data_sha256": fingerprint_hex(agg["data"]),
           "events": int(agg["events"]), "train_events": int(agg["train_events"]),
           "train_max_ts": agg["train_max_ts"], "train_sha256": fingerprint_hex(agg["train"])}
    if cfg.method == "global" and agg["events"]:
        past = int(agg["max_ts"]) + 1
        rec["valid_start_ts"] = past if agg["first_valid_ts"] is None else int(agg["first_valid_ts"])
        rec["test_start_ts"] = past if agg["first_test_ts"] is None else int(agg["first_test_ts"])
    return rec


class ProtocolRecord(beam.PTransform):
    """Rows with ``_part`` (and user_id, item_id, ts, label) -> one dict {"protocol": the protocol record,
    "max_ts": the log's last ts or None}: computed on the workers as one combine, equal to
    `feature_store.split.protocol_record` over the same events (the tests compare them)."""

    def __init__(self, cfg: SplitConfig, label: str | None = None):
        super().__init__(label)
        self.cfg = cfg

    def expand(self, parted):
        cfg = self.cfg
        return (parted | "Aggregate" >> beam.CombineGlobally(_RecordFn())
                | "AsRecord" >> beam.Map(lambda agg: {"protocol": record_from_aggregates(agg, cfg),
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
