"""Issue 19 case 2 (the clock bounds the data) and case 7 (empty inputs), in the loader and on the workers.

One rule (`feature_store.clock.EventClock`) rejects events later than the job's clock plus --max-future as
bad_timestamp "in the future", counted against --max-bad-fraction, in the driver's loader and in the workers'
parse step alike. Every clock here is fixed (--now), so nothing depends on when the suite runs.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from feature_store.clock import EventClock, parse_duration, parse_time
from pipelines.data import DataError, DataSpec, load_dataset

NOW = 1_717_200_000  # 2024-06-01T00:00:00Z
YEAR_3000 = 32_503_680_000


def _log(folder, rows: list[tuple], name="events.csv"):
    """items.csv (3 items) + an events file of (user, item, ts, label) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}).to_csv(folder / "items.csv", index=False)
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"]).to_csv(folder / name, index=False)
    return folder / "items.csv", folder / name


def _spec(items, events, **kw):
    return DataSpec(dataset="generic", items=items, interactions=events, **{"now": NOW, **kw})


def _rows(n, start=NOW - 10 * 86_400):
    return [(u % 7, 1 + u % 3, start + 60 * u, 1.0) for u in range(n)]


def test_an_event_from_the_future_is_a_counted_reject(tmp_path):
    """The issue's case: one interaction stamped in year 3000 was accepted silently."""
    items, events = _log(tmp_path, _rows(2000) + [(1, 2, YEAR_3000, 1.0)])
    ds = load_dataset(_spec(items, events))
    assert ds.interactions["ts"].max() <= NOW and len(ds.interactions) == 2000
    bad = ds.rejects[ds.rejects["reason"] == "bad_timestamp"]
    assert bad["row"].tolist() == [2000] and bad["source"].tolist() == ["events.csv"]
    assert "value '32503680000' is in the future: later than the job's clock 1717200000" in bad["detail"].iloc[0]


def test_the_tolerance_and_the_clock_are_options(tmp_path):
    skewed = NOW + 3600  # an hour ahead: clock skew of the logging machine, inside the default day
    items, events = _log(tmp_path, _rows(1000) + [(1, 2, skewed, 1.0)])
    assert load_dataset(_spec(items, events)).interactions["ts"].max() == skewed
    ds = load_dataset(_spec(items, events, max_future=parse_duration("30m")))
    assert ds.reject_counts == {"bad_timestamp": 1}
    # ISO clocks parse as UTC; a later clock accepts the event
    assert parse_time("2024-06-01T00:00:00Z") == parse_time("2024-06-01T00:00:00") == NOW
    assert load_dataset(_spec(items, events, now=skewed, max_future=0)).reject_counts == {}


def test_more_future_events_than_the_share_allows_is_an_error_naming_the_file(tmp_path):
    items, events = _log(tmp_path, _rows(100) + [(1, 2, NOW + 5 * 86_400, 1.0)] * 3)
    with pytest.raises(DataError, match=r"events.csv \(interactions\): 3 of 103 rows .* later than the clock"):
        load_dataset(_spec(items, events))
    assert load_dataset(_spec(items, events, max_bad_fraction=0.05)).reject_counts == {"bad_timestamp": 3}


def test_presets_are_checked_against_the_clock_too():
    """Synthetic / MovieLens timestamps are historical: a fixed clock after them rejects nothing, one before
    them refuses the load (a wrong --now), deterministically."""
    tiny = dict(n_items=30, n_users=10, n_events=300, n_clusters=3, image_size=8)
    ds = load_dataset(DataSpec(now=NOW, **tiny))
    assert ds.reject_counts == {} and len(ds.interactions) == 300
    with pytest.raises(DataError, match=r"synthetic: 300 of 300 interactions .* in the future.*check --now"):
        load_dataset(DataSpec(now=parse_time("2019-01-01"), **tiny))


def test_the_workers_parse_applies_the_same_rule(tmp_path):
    """The Beam worker-side parse (`--read-sources workers`) rejects what the loader rejects, with the same
    detail, marked as a parse reject so it counts against --max-bad-fraction."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines.beam.read_source import ReadSource, source_plan
    from pipelines.beam.validate_records import DEAD, UNPARSED

    items, events = _log(tmp_path, _rows(1500) + [(1, 2, YEAR_3000, 1.0), (2, 3, NOW + 2 * 86_400, 0.0)])
    spec = _spec(items, events, max_bad_fraction=0.01)
    out = tmp_path / "dead.jsonl"
    with TestPipeline() as p:
        src = p | ReadSource(source_plan(spec))
        _ = (src[DEAD] | beam.Map(lambda r: json.dumps(r, default=str)) | beam.combiners.ToList()
             | beam.Map(lambda rows, path=str(out): open(path, "w").write("\n".join(rows))))
    dead = [json.loads(line) for line in out.read_text().splitlines()]
    loader = load_dataset(spec).rejects
    assert sorted((d["row"], d["reason"]) for d in dead) == [(1500, "bad_timestamp"), (1501, "bad_timestamp")]
    assert all(d[UNPARSED] for d in dead)
    assert sorted(d["detail"] for d in dead) == sorted(loader["detail"])


def test_the_job_revalidation_applies_the_same_rule():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.beam.validate_records import DEAD, ValidateInteractions

    clock = EventClock(NOW)
    events = [{"user_id": 1, "item_id": 1, "ts": NOW - 5, "label": 1.0, "_row": 0},
              {"user_id": 1, "item_id": 1, "ts": YEAR_3000, "label": 1.0, "_row": 1}]
    with TestPipeline() as p:
        items = p | "Items" >> beam.Create([{"item_id": 1}])
        out = p | beam.Create(events) | ValidateInteractions(items, clock=clock)
        assert_that(out["interactions"] | beam.Map(lambda r: r["_row"]), equal_to([0]), label="kept")
        assert_that(out[DEAD] | beam.Map(lambda r: (r["row"], r["reason"], r["detail"])),
                    equal_to([(1, "bad_timestamp", clock.detail(YEAR_3000))]), label="dead")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "empty-csv"])
def test_an_empty_or_header_only_table_is_an_error_naming_the_file(tmp_path, fmt):
    """Case 7: a header-only interactions file ran the job for 29 s and failed inside Align."""
    from pipelines.beam.read_source import source_plan

    items, _ = _log(tmp_path, [])
    events = tmp_path / ("events.parquet" if fmt == "parquet" else "events.csv")
    if fmt == "parquet":
        pd.DataFrame({"user_id": pd.Series(dtype="int64"), "item_id": pd.Series(dtype="int64"),
                      "ts": pd.Series(dtype="int64"), "label": pd.Series(dtype="float32")}).to_parquet(events)
    elif fmt == "empty-csv":
        events.write_text("")
    else:
        events.write_text("user_id,item_id,ts,label\n")
    spec = _spec(items, events)
    with pytest.raises(DataError, match=f"{events}: no interactions .*nothing to learn from"):
        source_plan(spec)  # the worker path decides in the driver, before the job starts
    if fmt != "empty-csv":  # (an empty CSV has no columns for the loader to check first)
        with pytest.raises(DataError, match=f"{events}: no interactions"):
            load_dataset(spec)


def test_pipeline_on_a_header_only_log_stops_before_the_job(tmp_path, capsys):
    from pipelines.cli import main

    items, events = _log(tmp_path, [])
    code = main(["pipeline", "--dataset", "generic", "--items", str(items), "--interactions", str(events),
                 "--store", str(tmp_path / "store"), "--encoder", "tiny", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and result["error_type"] == "DataError"
    assert result["error"].startswith(f"{events}: no interactions")
    assert not (tmp_path / "store" / "CURRENT").exists()


def test_a_load_where_every_event_was_rejected_is_refused_before_the_job(tmp_path):
    from pipelines.jobs.cascade.driver import require_events

    items, events = _log(tmp_path, [(1, 9, NOW - 5, 1.0)] * 1)  # item 9 is not in the catalog
    ds = load_dataset(_spec(items, events))
    with pytest.raises(DataError, match="no usable interactions: every row was rejected \\(unknown_item: 1\\)"):
        require_events(ds)


def test_clock_rule_on_arrays_and_scalars():
    clock = EventClock(NOW, max_future=10)
    assert clock.cutoff == NOW + 10 and clock.cap(YEAR_3000) == NOW and clock.cap(NOW - 1) == NOW - 1
    assert clock.in_future(np.array([NOW, NOW + 10, NOW + 11])).tolist() == [False, False, True]
    assert bool(clock.in_future(NOW + 11)) and parse_duration("1d") == 86_400 and parse_duration(90) == 90
    for bad in ("soon", "-1d"):
        with pytest.raises(ValueError, match="--max-future"):
            parse_duration(bad)
