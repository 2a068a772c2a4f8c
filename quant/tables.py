"""Parquet I/O for the quantize command: the DESIGN.md embeddings table in, a codes table out.

Read with pyarrow directly (quant/ does not depend on feature_store). Every problem names the file, the column
and, for bad values, the row and its item_id.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from quant._io import atomic_write_parquet


def read_embeddings(path: str | os.PathLike, *, id_column: str = "item_id",
                    embedding_column: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """Read (item_id, embedding) from Parquet.

    Args:
        path: Parquet file with an integer id column and a list / fixed_size_list<float> embedding column.
    Returns:
        (item_ids (N,) int64, embeddings (N, d) float32), in file order.
    Raises:
        FileNotFoundError, or ValueError naming the file, column and first bad row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embeddings file not found")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    for column in (id_column, embedding_column):
        if column not in schema.names:
            raise ValueError(f"{path}: missing column {column!r} (columns: {schema.names}); expected the "
                             f"embeddings contract (item_id int64, embedding fixed_size_list<float32>[d])")
    id_type = schema.field(id_column).type
    if not pa.types.is_integer(id_type):
        raise ValueError(f"{path}: column {id_column!r} must be an integer type, got {id_type}")
    emb_type = schema.field(embedding_column).type
    if not (pa.types.is_fixed_size_list(emb_type) or pa.types.is_list(emb_type)
            or pa.types.is_large_list(emb_type)) or not pa.types.is_floating(emb_type.value_type):
        raise ValueError(f"{path}: column {embedding_column!r} must be a (fixed-size) list of floats, got {emb_type}")
    table = pq.read_table(path, columns=[id_column, embedding_column])
    n = table.num_rows
    if n == 0:
        raise ValueError(f"{path}: empty input (0 rows)")
    ids_col = table.column(id_column).combine_chunks()
    if ids_col.null_count:
        row = int(np.flatnonzero(ids_col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{path}: column {id_column!r} row {row} is null")
    ids = ids_col.to_numpy().astype(np.int64)
    emb_col = table.column(embedding_column).combine_chunks()
    if emb_col.null_count:
        row = int(np.flatnonzero(emb_col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{path}: column {embedding_column!r} row {row} (item_id {ids[row]}) is null")
    lengths = emb_col.value_lengths().to_numpy(zero_copy_only=False)
    dim = int(lengths[0])
    bad_len = np.flatnonzero(lengths != dim)
    if bad_len.size:
        row = int(bad_len[0])
        raise ValueError(f"{path}: column {embedding_column!r} row {row} (item_id {ids[row]}) has {lengths[row]} "
                         f"values, row 0 has {dim}")
    if dim == 0:
        raise ValueError(f"{path}: column {embedding_column!r} has dimension 0")
    values = emb_col.flatten()
    if values.null_count:
        flat = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        row = flat // dim
        raise ValueError(f"{path}: column {embedding_column!r} row {row} (item_id {ids[row]}) holds a null value")
    emb = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        row = int(bad[0])
        raise ValueError(f"{path}: column {embedding_column!r} row {row} (item_id {ids[row]}) has a non-finite "
                         f"value; {bad.size} such row(s)")
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        raise ValueError(f"{path}: column {id_column!r} has duplicate item_id {ids[a]} (rows {a} and {b})")
    return ids, np.ascontiguousarray(emb)


def write_codes(path: str | os.PathLike, item_ids: np.ndarray, codes: np.ndarray, column: str) -> None:
    """Atomically write (item_id int64, <column> list<int32|int64>) Parquet.

    Args:
        item_ids: (N,) int64.
        codes: (N, L) codes; ``column`` 'rq' is stored as int32, 'vq' (neighbour item ids) as int64.
    """
    import pyarrow as pa

    value_type = {"rq": pa.int32(), "vq": pa.int64()}[column]
    codes = np.ascontiguousarray(codes)
    n, width = codes.shape
    if column == "rq" and codes.size and codes.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: rq codes exceed int32")
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32) if n else np.zeros(1, np.int32))
    values = pa.array(codes.reshape(-1).astype(value_type.to_pandas_dtype()), type=value_type)
    list_type = pa.list_(pa.field("item", value_type, nullable=False))
    lists = pa.ListArray.from_arrays(offsets, values, type=list_type)
    schema = pa.schema([pa.field("item_id", pa.int64(), nullable=False), pa.field(column, list_type, nullable=False)])
    table = pa.Table.from_arrays([pa.array(np.asarray(item_ids, dtype=np.int64)), lists], schema=schema)
    atomic_write_parquet(path, table)
