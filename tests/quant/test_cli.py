"""`qarm quantize` end to end on tiny Parquet files: outputs, JSON keys, warm start, clear errors."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from quant import load_quantizer, metrics as M

from .conftest import planted_clusters

KEYS = {"method", "n_items", "levels", "codebook_size", "collision_rate", "utilization", "entropy", "rel_mse",
        "hr@1", "hr@10", "fit_seconds", "encode_seconds"}


def _write(path, ids, x, fixed=True):
    values = pa.array(np.asarray(x, dtype=np.float32).ravel())
    emb = (pa.FixedSizeListArray.from_arrays(values, x.shape[1]) if fixed
           else pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32)), values))
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": emb}), path)
    return path


@pytest.fixture(scope="module")
def emb_file(tmp_path_factory):
    x, _ = planted_clusters(600, 8, 12, seed=9)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(600, dtype=np.int64) * 3 + 1000
    return _write(tmp_path_factory.mktemp("emb") / "emb.parquet", ids, x), ids, x


def _run(capsys, *argv):
    code = main(["quantize", *map(str, argv), "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out.strip().splitlines()[-1]), out.err


def test_rq_kmeans_with_collision_resolution(tmp_path, capsys, emb_file):
    path, ids, x = emb_file
    code, res, _ = _run(capsys, "--embeddings", path, "--method", "rq-kmeans", "--levels", 2, "--codebook-size", 4,
                        "--resolve-collisions", "--out", tmp_path / "o", "--hr-queries", 100)
    assert code == 0 and res["ok"]
    assert KEYS <= res.keys()
    assert res["collision_rate_before"] > 0 and res["collision_rate"] == 0.0
    assert len(res["utilization"]) == 2 and res["hr_queries"] == 100
    table = pq.read_table(tmp_path / "o" / "codes.parquet")
    assert table.schema.field("rq").type == pa.list_(pa.field("item", pa.int32(), nullable=False))
    np.testing.assert_array_equal(table.column("item_id").to_numpy(), ids)
    codes = np.array(table.column("rq").to_pylist())
    assert codes.shape == (600, 3) and M.collision_rate(codes) == 0.0
    # the saved quantizer reproduces the stored codes (without the suffix)
    q = load_quantizer(tmp_path / "o" / "quantizer")
    np.testing.assert_array_equal(q.encode(x), codes[:, :2])
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["config"]["codebook_size"] == 4 and saved["rel_mse"] == res["rel_mse"]


def test_warm_start_from_saved_quantizer_keeps_codes(tmp_path, capsys, emb_file):
    path, _, _ = emb_file
    args = ["--embeddings", path, "--levels", 2, "--codebook-size", 8]
    assert _run(capsys, *args, "--out", tmp_path / "a")[0] == 0
    code, res, _ = _run(capsys, *args, "--out", tmp_path / "b", "--init-from", tmp_path / "a" / "quantizer")
    assert code == 0
    a = np.array(pq.read_table(tmp_path / "a" / "codes.parquet").column("rq").to_pylist())
    b = np.array(pq.read_table(tmp_path / "b" / "codes.parquet").column("rq").to_pylist())
    assert M.churn(a, b) == 0.0


def test_vq_stores_neighbour_item_ids(tmp_path, capsys, emb_file):
    path, ids, _ = emb_file
    code, res, _ = _run(capsys, "--embeddings", path, "--method", "vq", "--vq-k", 5, "--out", tmp_path / "v")
    assert code == 0 and res["levels"] == 5 and res["codebook_size"] == 600
    table = pq.read_table(tmp_path / "v" / "codes.parquet")
    nbrs = np.array(table.column("vq").to_pylist())
    assert nbrs.shape == (600, 5) and np.isin(nbrs, ids).all()
    assert not (nbrs == ids[:, None]).any()


@pytest.mark.parametrize("method, extra", [("res-kmeans-fsq", ["--fsq-levels", "2,2"]),
                                           ("rq-vae", ["--epochs", 2, "--latent-dim", 4, "--batch-size", 128])])
def test_other_methods(tmp_path, capsys, emb_file, method, extra):
    path, _, x = emb_file
    code, res, _ = _run(capsys, "--embeddings", path, "--method", method, "--levels", 2, "--codebook-size", 4,
                        *extra, "--out", tmp_path / "m")
    assert code == 0 and res["method"] == method and KEYS <= res.keys()
    assert load_quantizer(tmp_path / "m" / "quantizer").encode(x).shape == (600, 2)


def test_bad_inputs_are_clear_errors(tmp_path, capsys, emb_file):
    _, ids, x = emb_file
    out = ["--out", tmp_path / "x", "--codebook-size", 4, "--levels", 1]
    # missing column
    pq.write_table(pa.table({"item_id": pa.array(ids), "vec": pa.array(x.tolist())}), tmp_path / "nocol.parquet")
    code, res, err = _run(capsys, "--embeddings", tmp_path / "nocol.parquet", *out)
    assert code == 1 and "nocol.parquet" in res["error"] and "missing column(s) ['embedding']" in res["error"]
    # NaN row names the row and item id
    bad = x.copy()
    bad[17, 2] = np.nan
    code, res, _ = _run(capsys, "--embeddings", _write(tmp_path / "nan.parquet", ids, bad), *out)
    assert code == 1 and "row 17 (item_id 1051)" in res["error"]
    # ragged list embeddings
    ragged = pa.table({"item_id": pa.array([1, 2]), "embedding": pa.array([[0.1, 0.2], [0.3]], pa.list_(pa.float32()))})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    code, res, _ = _run(capsys, "--embeddings", tmp_path / "ragged.parquet", *out)
    assert code == 1 and "column 'embedding' row 1 (item_id 2): length 1 differs from row 0 length 2" in res["error"]
    # duplicate ids
    dup = ids.copy()
    dup[5] = dup[2]
    code, res, _ = _run(capsys, "--embeddings", _write(tmp_path / "dup.parquet", dup, x), *out)
    assert code == 1 and "column 'item_id' rows 2 and 5: duplicate item_id 1006" in res["error"]
    # string ids
    pq.write_table(pa.table({"item_id": pa.array(["a"]), "embedding": pa.array([[0.1]])}), tmp_path / "s.parquet")
    code, res, _ = _run(capsys, "--embeddings", tmp_path / "s.parquet", *out)
    assert code == 1 and "column 'item_id' must be int64, got string" in res["error"]
    # fewer items than K, empty input, missing file
    code, res, _ = _run(capsys, "--embeddings", _write(tmp_path / "few.parquet", ids[:3], x[:3], fixed=False), *out)
    assert code == 1 and "3 rows, need at least 4" in res["error"]
    code, res, _ = _run(capsys, "--embeddings", _write(tmp_path / "empty.parquet", ids[:0], x[:0]), *out)
    assert code == 1 and "empty table (0 rows)" in res["error"]
    code, res, _ = _run(capsys, "--embeddings", tmp_path / "none.parquet", *out)
    assert code == 1 and "not found" in res["error"]
    # not parquet
    (tmp_path / "junk.parquet").write_text("hello")
    code, res, _ = _run(capsys, "--embeddings", tmp_path / "junk.parquet", *out)
    assert code == 1 and "not a readable Parquet file" in res["error"]


def test_suffix_overflow_is_reported(tmp_path, capsys, emb_file):
    path, _, _ = emb_file
    code, res, _ = _run(capsys, "--embeddings", path, "--levels", 1, "--codebook-size", 4, "--resolve-collisions",
                        "--suffix-size", 8, "--out", tmp_path / "o")
    assert code == 1 and "suffix space overflow" in res["error"]
