"""An exact order statistic of a PCollection of integer timestamps without gathering them on one worker.

Two counting passes: events per coarse bucket (``ts // bucket``; a log spanning Y years has at most 365·Y
buckets at the default one-day width), which locates the bucket holding the wanted rank, then events per distinct
timestamp inside that bucket only (at most ``bucket`` distinct seconds). Both are combines; the only lists one
worker holds are those two count tables. The result is identical to sorting everything and indexing.
"""
from __future__ import annotations

from typing import Callable, Optional

import apache_beam as beam

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


def _pick(fine: list, where) -> Optional[int]:
    if where is None:
        return None
    counts = dict(fine)
    if where[0] == "past_end":
        return int(max(counts)) + 1
    rank = where[1]
    seen = 0
    for ts in sorted(counts):
        if rank < seen + counts[ts]:
            return int(ts)
        seen += counts[ts]
    raise AssertionError("rank inside the bucket's count")


class ExactQuantile(beam.PTransform):
    """PCollection[int] -> singleton: the value at ``index_fn(n)`` of the sorted input.

    Args:
        index_fn: n -> index in [0, n] (n means "past the last value": max + 1), or None (the output is None).
        bucket: coarse bucket width (default one day of seconds).
    """

    def __init__(self, index_fn: Callable[[int], Optional[int]], bucket: int = DAY, label: str | None = None):
        super().__init__(label)
        self.index_fn, self.bucket = index_fn, int(bucket)

    def expand(self, values):
        b = self.bucket
        coarse = (values | "CoarseKey" >> beam.Map(lambda t: (int(t) // b, 1))
                  | "CountPerBucket" >> beam.CombinePerKey(sum)
                  | "BucketTable" >> beam.combiners.ToDict())
        where = coarse | "Locate" >> beam.Map(_locate, self.index_fn)
        side = beam.pvalue.AsSingleton(where)

        def in_bucket(t, w):
            if w is None:
                return False
            return int(t) // b == w[1] if w[0] == "past_end" else int(t) // b == w[0]

        fine = (values | "InBucket" >> beam.Filter(in_bucket, side)
                | "SecondKey" >> beam.Map(lambda t: (int(t), 1))
                | "CountPerValue" >> beam.CombinePerKey(sum)
                | "ValueTable" >> beam.combiners.ToList())
        return fine | "Pick" >> beam.Map(_pick, side)
