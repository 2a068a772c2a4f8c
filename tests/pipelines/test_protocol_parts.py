"""The protocol's parts and record computed on the workers equal feature_store.split's, and the driver refuses to
publish when the workers' record disagrees with its own."""
from __future__ import annotations

import json

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


def test_driver_refuses_a_record_that_differs_from_its_own():
    from feature_store.split import SplitConfig, protocol_record
    from pipelines.jobs.cascade.driver import check_protocol_record

    log = pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "item_id": [1, 2, 3, 4, 5], "ts": [1, 2, 3, 4, 5],
                        "label": np.ones(5, np.float32)})
    cfg = SplitConfig("global", 0.2, 0.2)
    rec = protocol_record(log, cfg)
    check_protocol_record(log, cfg, dict(rec))
    with pytest.raises(RuntimeError, match="nothing published"):
        check_protocol_record(log, cfg, {**rec, "train_events": rec["train_events"] + 1})
    with pytest.raises(RuntimeError, match="train_sha256"):
        check_protocol_record(log, cfg, {**rec, "train_sha256": "0" * 64})
