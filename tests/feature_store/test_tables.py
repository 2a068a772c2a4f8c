import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store import TableError, read_codebooks, read_codes, read_embeddings, write_codebooks, write_codes, \
    write_embeddings
from feature_store.tables import codebook_levels, embeddings_schema, rq_codebook_names


def test_embeddings_round_trip_sorted_by_item_id(tmp_path):
    path = tmp_path / "item_embeddings.parquet"
    ids = np.array([30, 10, 20], np.int64)
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_embeddings(path, ids, emb)
    assert pq.read_schema(path).equals(embeddings_schema(2))
    got_ids, got = read_embeddings(path)
    assert got_ids.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(got, emb[[1, 2, 0]])
    assert got.dtype == np.float32


def test_codes_round_trip_and_lookup(tmp_path):
    path = tmp_path / "item_codes.parquet"
    ids = np.array([5, 3, 9])
    rq = np.array([[1, 2], [3, 4], [0, 0]])
    vq = np.array([[3, 9], [5, 9], [3, 5]])
    write_codes(path, ids, rq, vq)
    table = read_codes(path)
    assert table.item_ids.tolist() == [3, 5, 9]
    assert table.rq.dtype == np.int32 and table.vq.dtype == np.int64
    assert table.rq.tolist() == [[3, 4], [1, 2], [0, 0]]
    assert table.vq.tolist() == [[5, 9], [3, 9], [3, 5]]
    assert table.rows_of(np.array([9, 4, 3])).tolist() == [2, -1, 0]


def test_codes_without_vq(tmp_path):
    path = tmp_path / "item_codes.parquet"
    write_codes(path, [1, 2], [[0, 1], [1, 0]])
    table = read_codes(path)
    assert table.vq.shape == (2, 0)


def test_reader_accepts_beam_style_file_any_order_plain_lists_and_row_groups(tmp_path):
    # What beam.io.parquetio may produce: plain list<float32>, several row groups, shuffled rows.
    path = tmp_path / "item_embeddings.parquet"
    schema = pa.schema([("item_id", pa.int64()), ("embedding", pa.list_(pa.float32()))])
    rows = {"item_id": [7, 1, 4, 2], "embedding": [[7.0, 7.5], [1.0, 1.5], [4.0, 4.5], [2.0, 2.5]]}
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), path, row_group_size=1)
    ids, emb = read_embeddings(path)
    assert ids.tolist() == [1, 2, 4, 7]
    np.testing.assert_array_equal(emb[:, 0], [1.0, 2.0, 4.0, 7.0])


def _write_raw(path, item_ids, embeddings, value_type=pa.float32()):
    schema = pa.schema([("item_id", pa.int64()), ("embedding", pa.list_(value_type))])
    pq.write_table(pa.Table.from_pydict({"item_id": item_ids, "embedding": embeddings}, schema=schema), path)


@pytest.mark.parametrize("item_ids, embeddings, needle", [
    ([1, 2, 2], [[0.0], [1.0], [2.0]], "rows 1 and 2: duplicate item_id 2"),
    ([1, 2, 3], [[0.0, 1.0], [1.0, 2.0], [2.0]], "column 'embedding' row 2 (item_id 3): length 1"),
    ([1, 2, 3], [[0.0], [float("nan")], [2.0]], "column 'embedding' row 1 (item_id 2): NaN or inf"),
    ([1, None, 3], [[0.0], [1.0], [2.0]], "column 'item_id' row 1: null item_id"),
    ([1, 2, 3], [[0.0], None, [2.0]], "column 'embedding' row 1 (item_id 2): null value"),
    ([1, 2, 3], [[0.0], [None], [2.0]], "column 'embedding' row 1 (item_id 2): null element"),
])
def test_embedding_errors_name_file_column_row(tmp_path, item_ids, embeddings, needle):
    path = tmp_path / "bad.parquet"
    _write_raw(path, item_ids, embeddings)
    with pytest.raises(TableError) as err:
        read_embeddings(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_schema_errors(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"item_id": [1], "vector": [[1.0]]}), path)
    with pytest.raises(TableError, match=r"missing column\(s\) \['embedding'\]"):
        read_embeddings(path)
    pq.write_table(pa.table({"item_id": [1], "embedding": [[1]]}), path)  # int list
    with pytest.raises(TableError, match="'embedding' must hold float values"):
        read_embeddings(path)
    pq.write_table(pa.table({"item_id": ["a"], "embedding": [[1.0]]}), path)
    with pytest.raises(TableError, match="'item_id' must be int64"):
        read_embeddings(path)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(TableError, match="not a readable Parquet file"):
        read_embeddings(path)
    with pytest.raises(FileNotFoundError):
        read_embeddings(tmp_path / "missing.parquet")


def test_codes_errors(tmp_path):
    path = tmp_path / "c.parquet"
    with pytest.raises(TableError, match=r"row 1 \(item_id 8\): negative code"):
        write_codes(path, [7, 8], [[0, 1], [-1, 2]])
    assert not path.exists()
    schema = pa.schema([("item_id", pa.int64()), ("rq", pa.list_(pa.int32())), ("vq", pa.list_(pa.int64()))])
    pq.write_table(pa.Table.from_pydict({"item_id": [1, 2], "rq": [[1, 2], [3]], "vq": [[], []]}, schema=schema),
                   path)
    with pytest.raises(TableError, match=r"column 'rq' row 1 \(item_id 2\): length 1 differs"):
        read_codes(path)


def test_writers_validate_before_touching_the_file(tmp_path):
    path = tmp_path / "item_embeddings.parquet"
    write_embeddings(path, [1, 2], np.ones((2, 3)))
    before = path.read_bytes()
    with pytest.raises(TableError, match="duplicate item_id 1"):
        write_embeddings(path, [1, 1], np.ones((2, 3)))
    with pytest.raises(TableError, match="NaN"):
        write_embeddings(path, [1, 2], np.array([[1, 2, 3], [np.inf, 0, 0]], np.float32))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item_embeddings.parquet"]  # no temp left behind


def test_codebooks_round_trip_and_levels(tmp_path):
    path = tmp_path / "codebooks.safetensors"
    books = {name: np.full((4, 2), i, np.float32) for i, name in enumerate(rq_codebook_names(3))}
    write_codebooks(path, books, metadata={"method": "rq-kmeans"})
    got = read_codebooks(path, as_numpy=True)
    assert isinstance(got["rq.level0"], np.ndarray)
    levels = codebook_levels(got)
    assert [float(level[0, 0]) for level in levels] == [0.0, 1.0, 2.0]
    with pytest.raises(KeyError, match="not contiguous"):
        codebook_levels({"rq.level0": 1, "rq.level2": 2})
    with pytest.raises(ValueError, match="must be 2-D"):
        write_codebooks(path, {"rq.level0": np.zeros(3)})
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(TableError, match="not a readable safetensors"):
        read_codebooks(path)


def test_large_list_layout_is_read_too(tmp_path):
    from feature_store.tables import _fixed_rows_to_list, codes_schema

    rq = np.array([[1, 2], [3, 4]], np.int32)
    vq = np.array([[9], [8]], np.int64)
    table = pa.Table.from_arrays([pa.array([2, 1], pa.int64()), _fixed_rows_to_list(rq, pa.int32(), large=True),
                                  _fixed_rows_to_list(vq, pa.int64(), large=True)], schema=codes_schema(large=True))
    pq.write_table(table, tmp_path / "item_codes.parquet")
    codes = read_codes(tmp_path / "item_codes.parquet")
    assert codes.item_ids.tolist() == [1, 2] and codes.rq.tolist() == [[3, 4], [1, 2]] and codes.vq.tolist() == [[8], [9]]


def test_asof_user_embeddings_round_trip_sorted_and_refuse_a_repeated_cut(tmp_path):
    from feature_store.tables import read_asof_embeddings, write_asof_embeddings
    path = tmp_path / "user_embeddings_asof.parquet"
    emb = np.arange(8, dtype=np.float32).reshape(4, 2)
    write_asof_embeddings(path, [9, 7, 7, 9], [5, 20, 10, 3], emb)   # written sorted by (user_id, cut_ts)
    users, cuts, got = read_asof_embeddings(path)
    assert users.tolist() == [7, 7, 9, 9] and cuts.tolist() == [10, 20, 3, 5]
    np.testing.assert_array_equal(got, emb[[2, 1, 3, 0]])
    assert pq.read_schema(path).names == ["user_id", "cut_ts", "embedding"]
    with pytest.raises(TableError, match="appears twice"):
        write_asof_embeddings(path, [7, 7], [10, 10], emb[:2])
    with pytest.raises(TableError, match="non-finite|finite|nan|NaN"):
        write_asof_embeddings(path, [7], [10], np.array([[np.nan, 0.0]], np.float32))
