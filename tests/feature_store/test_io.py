import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_parquet, sha256_file


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    # sha256("abc") from FIPS 180-2
    atomic_write_bytes(path, b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_failed_write_leaves_target_and_no_temp(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"a": 2')  # half written, then the writer fails
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(RuntimeError, match="produced no file"):
        with atomic_path(path):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "f", b"")


def test_atomic_parquet_and_json_numpy(tmp_path):
    import numpy as np

    atomic_write_parquet(tmp_path / "t.parquet", pa.table({"x": [1, 2]}), compression="zstd")
    assert pq.read_table(tmp_path / "t.parquet").column("x").to_pylist() == [1, 2]
    atomic_write_json(tmp_path / "m.json", {"n": np.int64(3), "v": np.arange(2)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"n": 3, "v": [0, 1]}
