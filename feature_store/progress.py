"""Progress of long stages, readable by a person and by a scheduler: a tqdm bar on a terminal, otherwise an INFO
line at least every ``every_s`` seconds (stage, items done / total, rate, ETA) and one closing line.

    from feature_store.progress import Progress
    with Progress("side cache", total=len(ids), unit="item", logger=log) as p:
        for batch in batches:
            ...
            p.update(len(batch), loss=0.31)       # postfix values show on the bar and in the lines

Why here: every layer reports progress (pipelines' encoder and Beam workers, the ranker's epochs and ablation rows),
and the dependency rule (feature_store <- quant <- ranker <- pipelines, tests/test_layering.py) lets each of them
import feature_store; the top level is fixed, so no new package. ``quant`` stays free of it (DESIGN: quant imports
at most feature_store.io) and reports through a plain callback its callers connect to :meth:`Progress.set`.

Lines are time-driven, not count-driven: a stage with slow items still reports every ``every_s`` seconds as long as
items finish; a line is written by ``update`` / ``set`` when the interval has passed (no thread). The clock is
injectable so tests drive it without waiting.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

EVERY_S = 30.0  # a scheduler's log reader sees a line at least this often while items finish


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where bars and logs go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 2h04m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts the work of one stage and reports it (see the module docstring).

    Args:
        stage: names the stage in every line ("side cache", "ranker rq epochs").
        total: items the stage will do (None: unknown; no percentage or ETA).
        unit: what an item is ("item", "step", "run").
        enabled: False reports nothing at all (non-main ranks, nested helpers).
        bar: a tqdm bar instead of lines; None: when stderr is a terminal. A stage that asks for no bar
            (``bar=False``) still writes its lines.
        every_s: seconds between lines when there is no bar (default: ``EVERY_S``, 30).
        logger: where the lines go (default: this module's logger); callers pass their own, so a line names
            the code that runs the stage.
        initial: items already done (a resumed run); the rate counts only this run's items.
        clock: monotonic seconds (tests pass a fake one).
        final_line: also write one closing INFO line (done, seconds, rate, ``extra``) when the stage ends, bar or
            not.
    """

    def __init__(self, stage: str, total: Optional[int] = None, unit: str = "item", *, enabled: bool = True,
                 bar: Optional[bool] = None, every_s: Optional[float] = None, logger: Optional[logging.Logger] = None,
                 initial: int = 0, clock: Callable[[], float] = time.monotonic, final_line: bool = True):
        every_s = EVERY_S if every_s is None else every_s  # read now: a test may shorten the module's interval
        if every_s <= 0:
            raise ValueError(f"Progress: every_s must be > 0, got {every_s}")
        self.stage, self.total, self.unit = stage, total, unit
        self.enabled, self.every_s, self.final_line = enabled, float(every_s), final_line
        self.log = logger or log
        self.clock = clock
        self.done = self.initial = int(initial)
        self.start = self.last_line = clock()
        self.postfix: dict = {}
        self.extra: dict = {}  # shown on the closing line only (sizes, file names)
        self.closed = False
        show_bar = enabled and (on_terminal() if bar is None else bar) and on_terminal()
        self.bar = None
        if show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, leave=False, mininterval=1.0)

    # ------------------------------------------------------------------ counting
    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more items done; ``postfix`` values (loss, epoch) show on the bar and the next line."""
        self.set(self.done + n, **postfix)

    def set(self, done: int, total: Optional[int] = None, **postfix) -> None:
        """``done`` items so far (absolute; ``total`` may change, e.g. a callback that knows it)."""
        if total is not None:
            self.total = int(total)
            if self.bar is not None:
                self.bar.total = self.total
        step = int(done) - self.done
        self.done = int(done)
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step)
            if postfix:
                self.bar.set_postfix({k: _short(v) for k, v in self.postfix.items()}, refresh=False)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self.log.info("%s", self.line(now))

    def callback(self) -> Callable[[int, int], None]:
        """``fn(done, total)`` for libraries that report through a plain callback (quant)."""
        return lambda done, total: self.set(done, total)

    # ------------------------------------------------------------------ reporting
    @property
    def seconds(self) -> float:
        return self.clock() - self.start

    def rate(self, now: Optional[float] = None) -> Optional[float]:
        """This run's items per second (None before any time passed)."""
        elapsed = (self.clock() if now is None else now) - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else None

    def line(self, now: Optional[float] = None) -> str:
        """``<stage>: <done>/<total> <unit>s (<pct>%), <rate> <unit>/s, <elapsed> elapsed, ETA <t>[, k=v ...]``."""
        now = self.clock() if now is None else now
        rate = self.rate(now)
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.stage}: {count} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.0f}%)"
        parts.append(f"{_rate(rate)} {self.unit}/s" if rate is not None else f"- {self.unit}/s")
        parts.append(f"{format_seconds(now - self.start)} elapsed")
        if self.total is not None and rate:
            parts.append(f"ETA {format_seconds(max(0, self.total - self.done) / rate)}")
        parts += [f"{k}={_short(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        """End the stage: close the bar, write the closing line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.enabled and self.final_line:
            secs = self.seconds
            extra = " ".join(f"{k}={v}" for k, v in {**self.postfix, **self.extra}.items())
            self.log.info("%s: %d %ss in %.1fs (%s/s)%s", self.stage, self.done, self.unit, secs,
                          _rate((self.done - self.initial) / max(secs, 1e-9)), f" {extra}" if extra else "")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rate(rate: float) -> str:
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
