"""Source tables read on the workers number every record exactly as the loader's read_table does."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipelines.data.io import DataError, read_table
from pipelines.beam import sources
from pipelines.beam.sources import ReadTableParts


def _norm(v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return str(v)


def test_part_files_are_numbered_like_the_loader(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_ROWS", 7)  # several chunks per file
    folder = tmp_path / "events"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, n in enumerate((23, 5, 31)):
        frame = pd.DataFrame({"uid": rng.integers(0, 9, n), "sku": rng.integers(0, 50, n),
                              "ts": rng.integers(0, 10_000, n), "label": rng.random(n).round(3)})
        if k == 1:
            frame.loc[2, "sku"] = None
            frame.to_csv(folder / f"part-{k}.csv", index=False)
        else:
            frame.to_parquet(folder / f"part-{k}.parquet")
    ref = read_table(folder, columns=["uid", "sku", "ts", "label"])
    expected = {i: {c: _norm(ref.iloc[i][c]) for c in ("uid", "sku", "ts", "label")} for i in range(len(ref))}

    def check(records):
        got = {r["_row"]: {"uid": _norm(r["user_id"]), "sku": _norm(r["item_id"]), "ts": _norm(r["ts"]),
                           "label": _norm(r["label"])} for r in records}
        assert sorted(got) == list(range(59))
        for i in got:  # numbers print alike whatever the part's format (ints as ints, CSV text as read)
            for c in ("uid", "sku", "ts"):
                a, b = got[i][c], expected[i][c]
                assert (a is None and b is None) or float(a) == float(b), (i, c, a, b)
        csv_rows = [r for r in records if r["_source"] == "part-1.csv"]
        assert sorted(r["_file_row"] for r in csv_rows) == list(range(5))
        assert min(r["_row"] for r in csv_rows) == 23

    with TestPipeline() as p:
        out = p | ReadTableParts(folder, columns=["uid", "sku", "ts", "label"],
                                 rename={"uid": "user_id", "sku": "item_id"})
        assert_that(out, check)


def test_missing_column_is_named_in_the_driver(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="missing column"):
        ReadTableParts(tmp_path / "x.parquet", columns=["a", "b"])


TINY = ["--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
        "--encoder", "tiny", "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
        "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0", "--skip-unaligned"]


def _parts_source(base, bad_ts_rows=()):
    """The tiny synthetic dataset as a generic source: string ids, the log split over three part files (two CSV
    with ISO timestamps, one Parquet with unix seconds), one repeated event, one event on an unknown item."""
    import shutil

    from pipelines.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(n_items=48, n_users=40, n_events=1600, n_clusters=4, image_size=16,
                               data=base / "img"))
    folder = base / "src"
    shutil.copytree(ds.image_root, folder)
    items = ds.items[["item_id", "title", "text", "image_uri"]].assign(item_id=lambda f: "sku-" + f.item_id.astype(str))
    items.to_csv(folder / "items.csv", index=False)
    inter = ds.interactions[["user_id", "item_id", "ts", "label"]].assign(
        user_id=lambda f: "u" + f.user_id.astype(str), item_id=lambda f: "sku-" + f.item_id.astype(str))
    inter = pd.concat([inter, inter.iloc[[7]], pd.DataFrame({"user_id": ["u1"], "item_id": ["sku-nope"],
                                                            "ts": [int(inter.ts.max())], "label": [1.0]})])
    inter = inter.sample(frac=1.0, random_state=3).reset_index(drop=True)  # the loader sorts; order must not matter
    (folder / "log").mkdir()
    a, b = len(inter) // 3, 2 * len(inter) // 3
    iso = inter.assign(ts=pd.to_datetime(inter.ts, unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    iso = iso.astype({"ts": object})
    for r in bad_ts_rows:
        iso.loc[r, "ts"] = "notadate"
    iso.iloc[:a].to_csv(folder / "log" / "part-0.csv", index=False)
    inter.iloc[a:b].to_parquet(folder / "log" / "part-1.parquet")
    iso.iloc[b:].to_csv(folder / "log" / "part-2.csv", index=False)
    return folder


@pytest.mark.slow
def test_worker_path_publishes_what_the_snapshot_path_publishes(tmp_path):
    """The same generic source read on the workers (default) and loaded in the driver (--read-sources driver):
    identical codes, embeddings, protocol record, config hash and dead-letter counts; a bad value in a CSV part
    is a reject naming file, row, column and value."""
    from feature_store import FeatureStore
    from pipelines.jobs.cascade import run

    folder = _parts_source(tmp_path, bad_ts_rows=(5,))
    args = TINY + ["--dataset", "generic", "--items", str(folder / "items.csv"), "--interactions",
                   str(folder / "log" / "part-*"), "--map", "ids=string", "--max-bad-fraction", "0.01"]
    out = {}
    for mode in ("workers", "driver"):
        out[mode] = run(args + ["--read-sources", mode, "--store", str(tmp_path / mode)], save_main_session=False)
    w, d = (FeatureStore(tmp_path / m).read() for m in ("workers", "driver"))
    assert w.manifest["protocol"] == d.manifest["protocol"] and w.manifest["protocol"]["events"] > 1000
    assert w.manifest["config_sha256"] == d.manifest["config_sha256"]
    assert w.manifest["extra"]["watermark"] == d.manifest["extra"]["watermark"]
    assert w.manifest["extra"]["dataset"] == d.manifest["extra"]["dataset"]
    cw, cd = w.codes(), d.codes()
    assert cw.item_ids.tolist() == cd.item_ids.tolist() and len(cw.item_ids) == 48
    assert np.array_equal(cw.rq, cd.rq) and np.array_equal(cw.vq, cd.vq)
    assert np.array_equal(w.embeddings()[1], d.embeddings()[1])
    for key in ("next_item_valid_aligned", "next_item_test_aligned", "coconsumption_test_aligned"):
        assert w.manifest["metrics"][key] == d.manifest["metrics"][key]
    assert out["workers"]["dead_letter"] == out["driver"]["dead_letter"] == {
        "bad_timestamp": 1, "duplicate_interaction": 1, "unknown_item": 1}
    dead = pd.read_parquet(w.path / "dead_letter.parquet")
    bad = dead[dead.reason == "bad_timestamp"].iloc[0]
    assert bad.source == "part-0.csv" and bad.row == 5 and "'ts'" in bad.detail and "notadate" in bad.detail
    assert out["workers"]["stages"]["read_sources"]["rejected"] == 2  # parse: the bad ts and the unknown sku


@pytest.mark.slow
def test_past_max_bad_fraction_the_worker_job_fails_and_current_stays(tmp_path):
    from feature_store import FeatureStore
    from pipelines.jobs.cascade import run

    folder = _parts_source(tmp_path, bad_ts_rows=range(0, 40))
    args = TINY + ["--dataset", "generic", "--items", str(folder / "items.csv"), "--interactions",
                   str(folder / "log"), "--store", str(tmp_path / "store")]
    first = run(args + ["--max-bad-fraction", "0.05"], save_main_session=False)
    store = FeatureStore(tmp_path / "store")
    assert store.current_id() == first["version"] and first["dead_letter"]["bad_timestamp"] == 40
    with pytest.raises(Exception, match="max-bad-fraction"):
        run(args + ["--max-bad-fraction", "0.01"], save_main_session=False)
    assert store.current_id() == first["version"] and [v.id for v in store.list()] == [first["version"]]
