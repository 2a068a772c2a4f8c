"""One protocol from pair mining to the ranker: only the train portion reaches the behaviour-learned stages, the
version records its protocol, and consumers refuse a version built under another one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import apache_beam as beam
from feature_store import FeatureStore
from feature_store.split import (ProtocolMismatchError, SplitConfig, check_protocol, protocol_problems,
                                 protocol_record, split_labels)
from pipelines.beam.cascade_graph import TrainPortion

SPLITS = [SplitConfig("global", 0.1, 0.1), SplitConfig("user_last_n", n_valid=1, n_test=1),
          SplitConfig("user_last_frac", 0.2, 0.2)]


def _log(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": rng.integers(0, 25, n), "item_id": rng.integers(0, 60, n),
                         "ts": np.sort(rng.integers(1_600_000_000, 1_600_900_000, n)),
                         "label": (rng.random(n) < 0.6).astype(np.float32)})


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s.method)
def test_train_portion_passes_exactly_the_train_events(split):
    log = _log()
    part = split_labels(log, split)
    raw = [{"_row": i, "_part": int(p)} for i, p in enumerate(part)]
    validated = [{"user_id": int(r.user_id), "item_id": int(r.item_id), "ts": int(r.ts), "label": float(r.label),
                  "_row": i} for i, r in enumerate(log.itertuples())]
    expected = [v for v, p in zip(validated, part) if p == 0]
    assert 0 < len(expected) < len(validated)
    with TestPipeline() as p:
        out = (p | "Validated" >> beam.Create(validated)) | TrainPortion(p | "Raw" >> beam.Create(raw))
        assert_that(out, equal_to(expected))


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s.method)
def test_protocol_record_accepts_its_own_split_and_refuses_others(split):
    log = _log()
    rec = protocol_record(log, split)
    assert protocol_problems(rec, log, split) == []
    other = next(s for s in SPLITS if s.method != split.method)
    problems = protocol_problems(rec, log, other)
    assert problems and split.method in problems[0] and other.method in problems[0]
    with pytest.raises(ProtocolMismatchError, match="--allow-protocol-mismatch"):
        check_protocol(rec, log, other, "v1")
    assert check_protocol(rec, log, other, "v1", allow_mismatch=True) == problems


def test_global_version_whose_training_reaches_past_the_cut_is_refused():
    log = _log()
    split = SplitConfig("global", 0.1, 0.1)
    rec = protocol_record(log, split)
    # evaluated on a log that ends earlier: the version's train events now reach into validation
    shorter = log[log.ts < log.ts.quantile(0.8)]
    problems = protocol_problems(rec, shorter, split)
    assert any("reaches ts" in p for p in problems)
    assert protocol_problems(None, log, split)[0].startswith("the version records no protocol")


def test_per_user_split_over_other_data_cannot_be_verified():
    log = _log()
    split = SplitConfig("user_last_n")
    rec = protocol_record(log, split)
    assert any("cannot be re-derived" in p for p in protocol_problems(rec, _log(seed=1), split))


TINY = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
        "--encoder", "tiny", "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
        "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0", "--skip-unaligned"]


@pytest.mark.slow
@pytest.mark.parametrize("split_flags", [["--split", "global"], ["--split", "user_last_n"],
                                         ["--split", "user_last_frac", "--test-frac", "0.2"]],
                         ids=["global", "user_last_n", "user_last_frac"])
def test_cascade_mines_pairs_on_the_train_portion_only(tmp_path, split_flags):
    from pipelines.jobs.cascade import run
    from pipelines.data import DataSpec, load_dataset

    summary = run(TINY + split_flags + ["--data", str(tmp_path / "img"), "--store", str(tmp_path / "store")],
                  save_main_session=False)
    version = FeatureStore(tmp_path / "store").read()
    protocol = version.manifest["protocol"]
    assert protocol["split"]["method"] == split_flags[1]
    ds = load_dataset(DataSpec(n_items=48, n_users=40, n_events=1600, n_clusters=4, image_size=16,
                               data=tmp_path / "img"))
    train = split_labels(ds.interactions, SplitConfig(**protocol["split"])) == 0
    # exactly the train events entered pair mining: no validation or test event reached pairs, alignment or codes
    assert summary["stages"]["mine_pairs"]["in"] == protocol["train_events"] == int(train.sum())
    assert protocol["train_events"] < len(ds.interactions)


@pytest.mark.slow
def test_ranker_and_eval_refuse_a_version_of_another_protocol(tmp_path, capsys):
    from pipelines.jobs.cascade import run
    from pipelines.cli import main

    store, img = tmp_path / "store", tmp_path / "img"
    run(TINY + ["--data", str(img), "--store", str(store)], save_main_session=False)
    data = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
            "--data", str(img), "--seed", "0"]
    small = ["--epochs", "1", "--history-len", "4", "--batch-size", "256"]
    code = main(["train-ranker", *data, "--store", str(store), "--features", "rq", *small,
                 "--split", "user_last_frac", "--json"])
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert code == 1 and "global(" in err and "user_last_frac(" in err
    code = main(["eval", *data, "--store", str(store), "--rows", "id,rq", "--seeds", "1", *small,
                 "--split", "user_last_frac", "--out", str(tmp_path / "ev"), "--json"])
    assert code == 1 and "user_last_frac" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    code = main(["eval", *data, "--store", str(store), "--rows", "id,rq", "--seeds", "1", *small, "--bootstrap", "50",
                 "--split", "user_last_frac", "--allow-protocol-mismatch", "--out", str(tmp_path / "ev"), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["protocol_mismatch"] is True
    assert (tmp_path / "ev" / "ablation.md").read_text().startswith("### PROTOCOL MISMATCH")
    code = main(["eval", *data, "--store", str(store), "--rows", "id,rq", "--seeds", "1", *small, "--bootstrap", "50",
                 "--out", str(tmp_path / "ev2"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol_mismatch"] is False
