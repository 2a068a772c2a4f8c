"""feature_store.progress off a terminal: a line at least every 30 s of a fake clock (stage, done / total, rate,
ETA), none in between, one closing line; silent when disabled; a bar only on a terminal."""
import logging

import pytest

from feature_store.progress import Progress, format_seconds

LOGGER = "feature_store.progress.test"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_line_every_30_seconds_with_stage_count_rate_and_eta(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        p = Progress("side cache", total=100, unit="item", logger=logging.getLogger(LOGGER), clock=clock)
        for _ in range(10):  # 10 items at 5 s each: 50 s, so exactly one line (at 30 s)
            clock.now += 5
            p.update(1)
        assert _lines(caplog) == ["side cache: 6/100 items (6%), 0.2 item/s, 30s elapsed, ETA 7m50s"]
        clock.now += 9
        p.update(5, loss=0.25)  # 29 s after the last line (at 30 s): none yet
        assert len(_lines(caplog)) == 1
        clock.now += 1
        p.update(1)
        assert _lines(caplog)[-1] == "side cache: 16/100 items (16%), 0.267 item/s, 1m00s elapsed, ETA 5m15s, loss=0.25"
        p.close()
        p.close()  # once
    closing = _lines(caplog)[2:]
    assert closing == ["side cache: 16 items in 60.0s (0.267/s) loss=0.25"]


def test_slow_items_still_give_a_line_each_time_one_finishes_after_the_interval(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        p = Progress("ranker epochs", total=3, unit="epoch", logger=logging.getLogger(LOGGER), clock=clock,
                     final_line=False)
        for _ in range(3):
            clock.now += 95
            p.update(1)
        p.close()
    assert [m.split(",")[0] for m in _lines(caplog)] == ["ranker epochs: 1/3 epochs (33%)",
                                                         "ranker epochs: 2/3 epochs (67%)",
                                                         "ranker epochs: 3/3 epochs (100%)"]


def test_unknown_total_resume_and_absolute_set(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        p = Progress("align", unit="step", initial=40, logger=logging.getLogger(LOGGER), clock=clock)
        clock.now += 40
        p.update(20)  # 20 steps of this run in 40 s, not 60
        assert _lines(caplog) == ["align: 60 steps, 0.5 step/s, 40s elapsed"]
        cb = p.callback()
        clock.now += 30
        cb(90, 120)  # a library callback: absolute count and total
        assert _lines(caplog)[-1] == "align: 90/120 steps (75%), 0.714 step/s, 1m10s elapsed, ETA 42s"


def test_disabled_reports_nothing(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with Progress("x", total=5, enabled=False, logger=logging.getLogger(LOGGER), clock=clock) as p:
            for _ in range(5):
                clock.now += 60
                p.update()
    assert p.done == 5 and _lines(caplog) == []


def test_bar_only_on_a_terminal(monkeypatch):
    import feature_store.progress as progress

    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: False)
    assert Progress("x", total=2, bar=True).bar is None  # never a bar into a pipe or a log file
    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: True)
    p = Progress("x", total=2)
    assert p.bar is not None
    p.update(2)
    assert p.bar.n == 2
    p.close()
    assert Progress("x", total=2, bar=False).bar is None


def test_format_seconds_and_bad_interval():
    assert [format_seconds(s) for s in (0, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "1h02m"]
    with pytest.raises(ValueError, match="every_s"):
        Progress("x", every_s=0)
