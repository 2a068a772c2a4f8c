"""Progress for long mllm stages: a tqdm bar on a terminal, otherwise one summary line per stage (logging)."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

log = logging.getLogger("pipelines.encoder")


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Stage:
    """Counts work done in a stage; ``update(n)`` advances the bar (terminal only)."""

    def __init__(self, desc: str, total: int, unit: str, bar: bool):
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if bar else None
        self.start = time.perf_counter()
        self.extra: dict = {}

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


@contextmanager
def stage(desc: str, total: int, unit: str = "item", progress: bool = True) -> Iterator[Stage]:
    """``with stage("side cache", n) as s: ... s.update(k)``: a bar when ``progress`` and stderr is a terminal;
    always one INFO line at the end: ``<desc>: <done> <unit>s in <s>s (<rate>/s) <extra>``."""
    s = Stage(desc, total, unit, bar=progress and on_terminal())
    try:
        yield s
    finally:
        if s.bar is not None:
            s.bar.close()
        secs = s.seconds
        extra = " ".join(f"{k}={v}" for k, v in s.extra.items())
        log.info("%s: %d %ss in %.1fs (%.1f/s) %s", desc, s.done, unit, secs, s.done / max(secs, 1e-9), extra)
