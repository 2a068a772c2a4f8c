"""The clock bounds the data: events later than the job's clock plus a tolerance are rejects, and a watermark
never passes the clock (DESIGN.md, "The clock bounds the data").

One rule (:class:`EventClock`) for every place that sees event times: the loader (`pipelines.data`), the parse
step on the Beam workers (`pipelines.beam.read_source`), the job's re-validation
(`pipelines.beam.validate_records`), the published watermark (`cap`) and `qarm store verify`. A job resolves its
clock once in the driver (``--now``, default this machine's clock at start) and hands the same value to every
worker, so a run is deterministic however long it takes; tests pass a fixed ``--now``.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

DAY_S = 86_400
DEFAULT_MAX_FUTURE_S = DAY_S  # clock skew between the machines that log events and the one that runs the job
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY_S, "w": 7 * DAY_S}


def describe_ts(ts) -> str:
    """ISO-8601 UTC text of a unix time, or a note when it is out of datetime's range."""
    try:
        return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "out of range"


def parse_time(value) -> int:
    """Unix seconds from an int, numeric text or ISO-8601 text (naive = UTC). ValueError naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"--now {value!r}: not a time")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    try:
        return int(float(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--now {value!r}: expected unix seconds or an ISO-8601 time (e.g. 2024-05-01T00:00:00Z)"
                         ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def resolve_now(value=None) -> int:
    """The clock: ``value`` (see :func:`parse_time`) when given, else this machine's clock (unix seconds)."""
    return int(time.time()) if value is None else parse_time(value)


def parse_duration(value) -> int:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"6h"``, ``"1d"`` or ``"1w"``. ValueError naming the value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"--max-future {value!r}: expected a duration such as 3600, 90s, 30m, 6h, 1d")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"--max-future {value!r}: must be >= 0")
    return int(seconds)


@dataclass(frozen=True)
class EventClock:
    """The job's clock and the tolerance for events stamped after it.

    Args:
        now: unix seconds the job treats as the present.
        max_future: seconds an event may lie after ``now`` (clock skew of the logging machines) before it is a
            ``bad_timestamp`` reject.
    """

    now: int
    max_future: int = DEFAULT_MAX_FUTURE_S

    def __post_init__(self):
        for name in ("now", "max_future"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"EventClock.{name} must be a number of seconds, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.max_future < 0:
            raise ValueError(f"EventClock.max_future must be >= 0, got {self.max_future}")

    @property
    def cutoff(self) -> int:
        """The latest accepted event time."""
        return self.now + self.max_future

    def in_future(self, ts):
        """True where ``ts`` (a number or an array of unix seconds) is later than the cutoff."""
        import numpy as np

        return np.asarray(ts) > self.cutoff

    def what(self) -> str:
        """Why a future event is rejected (the reject detail's tail)."""
        return (f"is in the future: later than the job's clock {self.now} ({describe_ts(self.now)}) plus "
                f"--max-future {self.max_future}s")

    def detail(self, ts) -> str:
        """The reject detail of one future event."""
        return f"timestamp {int(ts)} ({describe_ts(ts)}) {self.what()}"

    def cap(self, watermark: Optional[int]) -> Optional[int]:
        """A watermark never passes the clock (events inside the tolerance are taken again by the next run)."""
        return None if watermark is None else min(int(watermark), self.now)

    def to_dict(self) -> dict:
        return {"now": self.now, "now_utc": describe_ts(self.now), "max_future": self.max_future}
