"""Small pieces every job transform uses: stage counters, stage timers, dead-letter records.

Counters live in the Beam metrics namespace ``qarm.stage`` as ``<stage>.in`` / ``<stage>.out`` /
``<stage>.rejected`` (and ``<stage>.msecs``, time spent inside the stage's DoFns, summed over workers), so the
job summary reads them back from the PipelineResult on any runner that reports committed metrics.
"""
from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager

import apache_beam as beam
from apache_beam.metrics import Metrics

STAGE_NS = "qarm.stage"
REJECT_FIELDS = ("stage", "source", "row", "item_id", "user_id", "item_dense_id", "user_dense_id", "reason", "detail",
                 "action")


def _raw_id(value):
    """An id as the source wrote it, as text (None when absent); integral floats lose their ``.0``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text.strip() else None


def _dense_id(value):
    """A dense int64 id, or None when `value` is absent or not an integer (never raises)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return None


def reject(stage: str, source: str, reason: str, *, row=None, item_id=None, user_id=None, item_dense_id=None,
           user_dense_id=None, detail: str = "", action: str = "dropped") -> dict:
    """One dead-letter record (the loader's reject columns plus the job stage that raised it).

    Args:
        item_id, user_id: the ids as the source wrote them (raw strings for string-id sources); stored as text,
            never parsed, so a reject can always be recorded whatever the id looks like.
        item_dense_id, user_dense_id: the dense int64 ids where known (None otherwise).
    """
    return {"stage": stage, "source": source, "row": _dense_id(row),
            "item_id": _raw_id(item_id), "user_id": _raw_id(user_id),
            "item_dense_id": _dense_id(item_dense_id), "user_dense_id": _dense_id(user_dense_id),
            "reason": reason, "detail": str(detail)[:500], "action": action}


def counter(stage: str, kind: str):
    return Metrics.counter(STAGE_NS, f"{stage}.{kind}")


@contextmanager
def stage_timer(stage: str, part: str | None = None, total: bool = True):
    """Adds the wall time of the block to ``<stage>.msecs`` (and ``<stage>.msecs_<part>`` for a breakdown)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        msecs = int(round((time.perf_counter() - t0) * 1000))
        if total:  # a part timed inside the stage's own timer must not count twice
            counter(stage, "msecs").inc(msecs)
        if part:
            counter(stage, f"msecs_{part}").inc(msecs)


def worker_progress(stage: str, total=None):
    """A DoFn's count of one stage's items on this worker (create it lazily in ``process``: it is not pickled with
    the DoFn): an INFO line at least every 30 s while batches finish, so a scheduler reading the job's log sees the
    stage move. Workers log off a terminal, so never a bar."""
    import logging

    from feature_store.progress import Progress

    return Progress(f"{stage} (this worker)", total, bar=False, logger=logging.getLogger("pipelines.beam"),
                    final_line=False)


class _CountFn(beam.DoFn):
    def __init__(self, stage: str, kind: str):
        self.stage, self.kind = stage, kind
        self._counter = None

    def setup(self):
        self._counter = counter(self.stage, self.kind)

    def process(self, element):
        self._counter.inc()
        yield element


def count(stage: str, kind: str) -> beam.ParDo:
    """A pass-through step counting elements into ``<stage>.<kind>``."""
    return beam.ParDo(_CountFn(stage, kind))


def read_stage_metrics(result) -> dict:
    """{stage: {in, out, rejected, seconds}} from a finished PipelineResult's committed counters."""
    from apache_beam.metrics.metric import MetricsFilter

    stages: dict[str, dict] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(STAGE_NS))
    for c in query["counters"]:
        stage, _, kind = c.key.metric.name.rpartition(".")
        value = c.committed if c.committed is not None else c.attempted
        entry = stages.setdefault(stage, {})
        entry[kind] = entry.get(kind, 0) + int(value or 0)
    out = {}
    for stage, entry in sorted(stages.items()):
        out[stage] = {"in": entry.get("in", 0), "out": entry.get("out", 0), "rejected": entry.get("rejected", 0),
                      "seconds": round(entry.get("msecs", 0) / 1000.0, 3)}
        parts = {k[len("msecs_"):]: round(v / 1000.0, 3) for k, v in entry.items() if k.startswith("msecs_")}
        if parts:
            out[stage]["seconds_by_part"] = parts
    return out


def read_counters(result, namespace: str) -> dict:
    """{counter name: committed (else attempted) value} of one Beam metrics namespace of a finished result."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out
