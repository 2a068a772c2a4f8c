"""The protocol's parts and record computed on the workers equal feature_store.split's: the record is built once,
from aggregates of blocks of events that merge into the whole table's record."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to


@pytest.mark.parametrize("method", ["global", "user_last_n", "user_last_frac"])
def test_protocol_parts_on_workers_equal_split_labels(method):
    from feature_store.split import SplitConfig, protocol_record, split_labels
    from pipelines.beam.protocol import ProtocolParts, ProtocolRecord

    rng = np.random.default_rng(4)
    n = 700
    log = pd.DataFrame({"user_id": rng.integers(0, 30, n), "item_id": rng.integers(0, 50, n),
                        "ts": 1_600_000_000 + rng.integers(0, 20, n) * 43_200,  # many ties, several days
                        "label": np.ones(n, np.float32)})
    cfg = {"global": SplitConfig("global", 0.15, 0.1), "user_last_n": SplitConfig("user_last_n", n_valid=2, n_test=1),
           "user_last_frac": SplitConfig("user_last_frac", 0.2, 0.25, min_train=2)}[method]
    part = split_labels(log, cfg)
    rec = protocol_record(log, cfg)
    rows = [{"user_id": int(r.user_id), "item_id": int(r.item_id), "ts": int(r.ts), "label": float(r.label),
             "_row": i} for i, r in enumerate(log.itertuples())]
    with TestPipeline() as p:
        parted = p | beam.Create(rows) | ProtocolParts(cfg)
        assert_that(parted | beam.Map(lambda r: (r["_row"], r["_part"])),
                    equal_to(list(enumerate(part.tolist()))), label="Parts")
        assert_that(parted | ProtocolRecord(cfg), equal_to([{"protocol": rec, "max_ts": int(log.ts.max())}]),
                    label="Record")
    assert len(set(part.tolist())) == 3


def test_record_of_an_empty_log_and_of_an_empty_window_equal_the_driver_s():
    from feature_store.split import SplitConfig, protocol_record
    from pipelines.beam.protocol import ProtocolParts, ProtocolRecord

    cfg = SplitConfig("global", 0.0, 0.2)  # no validation window: its cut is past the last event
    log = pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "item_id": [1, 2, 3, 4, 5], "ts": [1, 2, 3, 4, 5],
                        "label": np.ones(5, np.float32)})
    rows = [{**{k: int(v) for k, v in r._asdict().items() if k != "Index"}, "label": 1.0, "_row": i}
            for i, r in enumerate(log.itertuples())]
    with TestPipeline() as p:
        got = p | "Log" >> beam.Create(rows) | "Parts" >> ProtocolParts(cfg) | "Rec" >> ProtocolRecord(cfg)
        assert_that(got, equal_to([{"protocol": protocol_record(log, cfg), "max_ts": 5}]), label="Log")
        empty = p | "None" >> beam.Create([]) | "EmptyParts" >> ProtocolParts(cfg) | "EmptyRec" >> ProtocolRecord(cfg)
        assert_that(empty, equal_to([{"protocol": protocol_record(log.iloc[:0], cfg), "max_ts": None}]),
                    label="Empty")


@pytest.mark.parametrize("method", ["global", "user_last_frac"])
def test_aggregates_of_blocks_merge_into_the_whole_table_s_record(method):
    """Issue 20.4: one record, whatever the blocks: the workers' combine of `protocol_aggregates` over any split of
    the rows (here uneven blocks, one empty, in shuffled order) gives `protocol_record` of the whole table."""
    from feature_store.split import (SplitConfig, merge_protocol_aggregates, protocol_aggregates,
                                     protocol_from_aggregates, protocol_record, split_labels)

    rng = np.random.default_rng(7)
    n = 400
    log = pd.DataFrame({"user_id": rng.integers(0, 25, n), "item_id": rng.integers(0, 40, n),
                        "ts": 1_600_000_000 + rng.integers(0, 50, n) * 3600,
                        "label": rng.integers(0, 2, n).astype(np.float32)})
    cfg = SplitConfig(method, 0.2, 0.1)
    part = split_labels(log, cfg)
    order = rng.permutation(n)
    blocks = [order[:0], order[:13], order[13:250], order[250:]]
    aggs = [protocol_aggregates(log.iloc[b], part[b]) for b in blocks]
    whole = protocol_record(log, cfg)
    assert protocol_from_aggregates(merge_protocol_aggregates(aggs[::-1]), cfg) == whole
    assert whole["events"] == n and 0 < whole["train_events"] < n
    # a block that misses one row gives another record (the digests and counts see every event)
    assert protocol_from_aggregates(merge_protocol_aggregates(aggs[:-1] + [protocol_aggregates(
        log.iloc[order[251:]], part[order[251:]])]), cfg) != whole
