"""An exact order statistic of a PCollection of integer timestamps without gathering them on one worker.

Two counting passes: events per coarse bucket (``ts // bucket``; a log spanning Y years has at most 365·Y
buckets at the default one-day width), which locates the bucket holding the wanted rank, then events per distinct
timestamp inside that bucket only (at most ``bucket`` distinct seconds). Both are global combines of count tables
(lifted: each worker sends one table per bundle); the only lists one worker holds are those two tables. The result
is identical to sorting everything and indexing.

An element is one timestamp or a 1-D integer array of them (a batch, e.g. one user's event times: pair mining
passes one array per user, so the runner moves one element per user instead of one per event).
"""
from __future__ import annotations

from typing import Callable, Optional

import apache_beam as beam
import numpy as np

DAY = 86_400


def _locate(coarse: dict, index_fn) -> Optional[tuple]:
    """(bucket, rank inside it) of the wanted index, ("past_end", max bucket) when index == n, None when none."""
    n = int(sum(coarse.values()))
    if n == 0:
        return None
    idx = index_fn(n)
    if idx is None:
        return None
    if idx >= n:
        return ("past_end", max(coarse))
    seen = 0
    for bucket in sorted(coarse):
        if idx < seen + coarse[bucket]:
            return (bucket, idx - seen)
        seen += coarse[bucket]
    raise AssertionError("index inside the counted total")


def _pick(counts: dict, where) -> Optional[int]:
    if where is None:
        return None
    if where[0] == "past_end":
        return int(max(counts)) + 1
    rank = where[1]
    seen = 0
    for ts in sorted(counts):
        if rank < seen + counts[ts]:
            return int(ts)
        seen += counts[ts]
    raise AssertionError("rank inside the bucket's count")


class _CountTable(beam.CombineFn):
    """value // width -> count over scalars and 1-D integer arrays (width 1: per distinct value)."""

    def __init__(self, width: int):
        self.width = int(width)

    def create_accumulator(self):
        return {}

    def add_input(self, acc, values):
        if isinstance(values, (int, np.integer)):
            key = int(values) // self.width
            acc[key] = acc.get(key, 0) + 1
            return acc
        keys, counts = np.unique(np.asarray(values, np.int64) // self.width, return_counts=True)
        for key, c in zip(keys.tolist(), counts.tolist()):
            acc[key] = acc.get(key, 0) + c
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            for key, c in acc.items():
                out[key] = out.get(key, 0) + c
        return out

    def extract_output(self, acc):
        return acc


def _in_bucket(values, where, width: int):
    """The part of `values` (a scalar or an array) inside the located bucket: yields nothing when none is."""
    if where is None:
        return
    bucket = where[1] if where[0] == "past_end" else where[0]
    if isinstance(values, (int, np.integer)):
        if int(values) // width == bucket:
            yield int(values)
        return
    arr = np.asarray(values, np.int64)
    arr = arr[arr // width == bucket]
    if len(arr):
        yield arr


class ExactQuantile(beam.PTransform):
    """PCollection[int | 1-D int array] -> singleton: the value at ``index_fn(n)`` of all values sorted.

    Args:
        index_fn: n -> index in [0, n] (n means "past the last value": max + 1), or None (the output is None).
        bucket: coarse bucket width (default one day of seconds).
    """

    def __init__(self, index_fn: Callable[[int], Optional[int]], bucket: int = DAY, label: str | None = None):
        super().__init__(label)
        self.index_fn, self.bucket = index_fn, int(bucket)

    def expand(self, values):
        coarse = values | "CountPerBucket" >> beam.CombineGlobally(_CountTable(self.bucket))
        where = coarse | "Locate" >> beam.Map(_locate, self.index_fn)
        side = beam.pvalue.AsSingleton(where)
        fine = (values | "InBucket" >> beam.FlatMap(_in_bucket, side, self.bucket)
                | "CountPerValue" >> beam.CombineGlobally(_CountTable(1)))
        return fine | "Pick" >> beam.Map(_pick, side)
