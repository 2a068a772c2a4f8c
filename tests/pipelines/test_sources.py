"""Source tables read on the workers number every record exactly as the loader's read_table does."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipelines.data.io import DataError, read_table
from pipelines.transforms import sources
from pipelines.transforms.sources import ReadTableParts


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
