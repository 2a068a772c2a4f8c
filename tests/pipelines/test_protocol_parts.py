"""The protocol's parts computed on the workers equal feature_store.split's, and the driver refuses to publish
when the workers' counts disagree with the protocol record."""
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
    from pipelines.transforms.protocol import ProtocolParts, ProtocolSummary

    rng = np.random.default_rng(4)
    n = 700
    log = pd.DataFrame({"user_id": rng.integers(0, 30, n), "item_id": rng.integers(0, 50, n),
                        "ts": 1_600_000_000 + rng.integers(0, 20, n) * 43_200,  # many ties, several days
                        "label": np.ones(n, np.float32)})
    cfg = {"global": SplitConfig("global", 0.15, 0.1), "user_last_n": SplitConfig("user_last_n", n_valid=2, n_test=1),
           "user_last_frac": SplitConfig("user_last_frac", 0.2, 0.25, min_train=2)}[method]
    part = split_labels(log, cfg)
    rec = protocol_record(log, cfg)
    rows = [{"user_id": int(r.user_id), "ts": int(r.ts), "_row": i} for i, r in enumerate(log.itertuples())]
    with TestPipeline() as p:
        parted = p | beam.Create(rows) | ProtocolParts(cfg)
        assert_that(parted | beam.Map(lambda r: (r["_row"], r["_part"])),
                    equal_to(list(enumerate(part.tolist()))), label="Parts")
        assert_that(parted | ProtocolSummary(),
                    equal_to([{k: rec[k] for k in ("events", "train_events", "train_max_ts")}]), label="Record")
    assert len(set(part.tolist())) == 3


def test_driver_refuses_counts_that_differ_from_the_protocol_record(tmp_path):
    from feature_store.split import SplitConfig, protocol_record
    from pipelines.cascade.graph import PROTOCOL_COUNTS
    from pipelines.cascade.job import check_protocol_counts

    log = pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "item_id": [1, 2, 3, 4, 5], "ts": [1, 2, 3, 4, 5],
                        "label": np.ones(5, np.float32)})
    rec = protocol_record(log, SplitConfig("global", 0.2, 0.2))
    good = {k: rec[k] for k in ("events", "train_events", "train_max_ts")}
    (tmp_path / PROTOCOL_COUNTS).write_text(json.dumps(good))
    check_protocol_counts(tmp_path, rec)
    (tmp_path / PROTOCOL_COUNTS).write_text(json.dumps({**good, "train_events": good["train_events"] + 1}))
    with pytest.raises(RuntimeError, match="nothing published"):
        check_protocol_counts(tmp_path, rec)
