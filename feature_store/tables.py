"""The feature-store table contract (DESIGN.md) as pyarrow schemas, with validating writers and readers.

Tables:
    item_embeddings.parquet   item_id int64, embedding fixed_size_list<float32>[d]
    item_codes.parquet        item_id int64, rq list<int32>[L], vq list<int64>[K]
    codebooks.safetensors     tensors named ``rq.level0``, ``rq.level1``, ... (other quantizers add their own)

Readers accept any row order (Beam writes shards in no particular order) and any equivalent Arrow layout
(list, large_list or fixed_size_list); they return arrays sorted by ``item_id`` so results never depend on how
the file was produced. Every validation error names the file, the column and, where it applies, the row (the
0-based row in the file) and its item_id.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.io import atomic_path, atomic_write_parquet

EMBEDDINGS_NAME = "item_embeddings"
CODES_NAME = "item_codes"
CODEBOOKS_NAME = "codebooks"
PARQUET_SUFFIX = ".parquet"
CODEBOOKS_SUFFIX = ".safetensors"


class TableError(ValueError):
    """A feature-store table does not follow the contract. The message names file, column and row."""


@dataclass(frozen=True)
class CodeTable:
    """Semantic-ID codes of a catalog, sorted by item_id.

    Attributes:
        item_ids: (N,) int64, unique, ascending.
        rq: (N, L) int32 residual-quantization code, one centroid index per level.
        vq: (N, K) int64 VQ code (neighbour ids); K may be 0 when no VQ code was computed.
    """

    item_ids: np.ndarray
    rq: np.ndarray
    vq: np.ndarray

    def __post_init__(self):
        n = len(self.item_ids)
        if self.rq.ndim != 2 or self.rq.shape[0] != n:
            raise ValueError(f"CodeTable.rq: expected shape ({n}, L), got {self.rq.shape}")
        if self.vq.ndim != 2 or self.vq.shape[0] != n:
            raise ValueError(f"CodeTable.vq: expected shape ({n}, K), got {self.vq.shape}")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def levels(self) -> int:
        return self.rq.shape[1]

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Row index of each item id; -1 where the item is not in the table.

        Args:
            item_ids: (M,) int64.
        Returns:
            (M,) int64 row indices into ``rq`` / ``vq``.
        """
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.item_ids) == 0:
            return np.full(len(item_ids), -1, np.int64)
        pos = np.clip(np.searchsorted(self.item_ids, item_ids), 0, len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == item_ids, pos, -1).astype(np.int64)


# ----------------------------------------------------------------------------------------------- schemas


def embeddings_schema(dim: int, id_column: str = "item_id") -> pa.Schema:
    """Arrow schema of item_embeddings.parquet for embedding width ``dim`` (user_embeddings.parquet: id_column
    "user_id")."""
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    return pa.schema([
        pa.field(id_column, pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim), nullable=False),
    ])


def codes_schema(large: bool = False) -> pa.Schema:
    """Arrow schema of item_codes.parquet (lengths L and K are checked per row, not in the type).

    Args:
        large: use large_list (64-bit offsets), needed once a column holds more than 2**31 - 1 values
            (e.g. 100M items x K = 25); readers accept both.
    """
    list_type = pa.large_list if large else pa.list_
    return pa.schema([
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("rq", list_type(pa.field("item", pa.int32(), nullable=False)), nullable=False),
        pa.field("vq", list_type(pa.field("item", pa.int64(), nullable=False)), nullable=False),
    ])


# ----------------------------------------------------------------------------------------------- writers


def embeddings_table(item_ids, emb, id_column: str = "item_id") -> pa.Table:
    """Build (and validate) the Arrow table for item embeddings.

    Args:
        item_ids: (N,) integer ids, unique.
        emb: (N, d) float array or tensor, finite.
    """
    item_ids = _as_ids(item_ids, "<memory>")
    emb = _to_numpy(emb).astype(np.float32, copy=False)
    if emb.ndim != 2 or emb.shape[0] != len(item_ids):
        raise TableError(f"embeddings: expected shape ({len(item_ids)}, d), got {emb.shape}")
    _check_unique(item_ids, "<memory>")
    _check_finite(emb, item_ids, "<memory>", "embedding")
    dim = emb.shape[1]
    values = pa.array(np.ascontiguousarray(emb).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.Table.from_arrays([pa.array(item_ids, pa.int64()), column], schema=embeddings_schema(dim, id_column))


def write_embeddings(path: str | os.PathLike, item_ids, emb, id_column: str = "item_id") -> Path:
    """Atomically write item_embeddings.parquet (or user_embeddings.parquet with id_column="user_id"). See
    :func:`embeddings_table` for the arguments."""
    return atomic_write_parquet(path, embeddings_table(item_ids, emb, id_column))


def asof_embeddings_table(user_ids, cut_ts, emb) -> pa.Table:
    """Arrow table of user_embeddings_asof.parquet: (user_id int64, cut_ts int64, embedding list<float32>[d]),
    one row per (user, cut), the vector of a prompt that read only events with ts < cut_ts. Rows are written
    sorted by (user_id, cut_ts); a (user_id, cut_ts) pair appears once."""
    user_ids = _as_ids(user_ids, "<memory>")
    cut_ts = _as_ids(cut_ts, "<memory>")
    emb = _to_numpy(emb).astype(np.float32, copy=False)
    if emb.ndim != 2 or emb.shape[0] != len(user_ids) or len(cut_ts) != len(user_ids):
        raise TableError(f"as-of embeddings: {len(user_ids)} user ids, {len(cut_ts)} cuts, embeddings {emb.shape}")
    if emb.shape[1] <= 0:
        raise TableError("as-of embeddings: dimension 0")
    order = np.lexsort((cut_ts, user_ids))
    user_ids, cut_ts, emb = user_ids[order], cut_ts[order], emb[order]
    same = (user_ids[1:] == user_ids[:-1]) & (cut_ts[1:] == cut_ts[:-1])
    if same.any():
        r = int(np.flatnonzero(same)[0])
        raise TableError(f"as-of embeddings: (user_id {user_ids[r]}, cut_ts {cut_ts[r]}) appears twice")
    _check_finite(emb, user_ids, "<memory>", "embedding")
    dim = emb.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(emb).reshape(-1), type=pa.float32()),
                                               dim)
    schema = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                        pa.field("cut_ts", pa.int64(), nullable=False),
                        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim),
                                 nullable=False)])
    return pa.Table.from_arrays([pa.array(user_ids, pa.int64()), pa.array(cut_ts, pa.int64()), column],
                                schema=schema)


def write_asof_embeddings(path: str | os.PathLike, user_ids, cut_ts, emb) -> Path:
    """Atomically write user_embeddings_asof.parquet (see :func:`asof_embeddings_table`)."""
    return atomic_write_parquet(path, asof_embeddings_table(user_ids, cut_ts, emb))


def codes_table(item_ids, rq, vq=None) -> pa.Table:
    """Build (and validate) the Arrow table for item codes.

    Args:
        item_ids: (N,) integer ids, unique.
        rq: (N, L) non-negative integer centroid indices.
        vq: (N, K) integer neighbour ids, or None for K = 0.
    """
    item_ids = _as_ids(item_ids, "<memory>")
    n = len(item_ids)
    rq = _to_numpy(rq)
    vq = np.zeros((n, 0), np.int64) if vq is None else _to_numpy(vq)
    for name, arr in (("rq", rq), ("vq", vq)):
        if arr.ndim != 2 or arr.shape[0] != n:
            raise TableError(f"codes: column '{name}' expected shape ({n}, width), got {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TableError(f"codes: column '{name}' must be integer, got dtype {arr.dtype}")
    _check_unique(item_ids, "<memory>")
    if rq.size and rq.min() < 0:
        row = int(np.argwhere(rq < 0)[0, 0])
        raise TableError(f"codes: column 'rq' row {row} (item_id {item_ids[row]}): negative code {rq[row].tolist()}")
    if rq.size and rq.max() > np.iinfo(np.int32).max:
        raise TableError("codes: column 'rq' has a code above int32 range")
    large = max(rq.size, vq.size) > np.iinfo(np.int32).max
    rq_col = _fixed_rows_to_list(rq.astype(np.int32), pa.int32(), large)
    vq_col = _fixed_rows_to_list(vq.astype(np.int64), pa.int64(), large)
    return pa.Table.from_arrays([pa.array(item_ids, pa.int64()), rq_col, vq_col], schema=codes_schema(large))


def write_codes(path: str | os.PathLike, item_ids, rq, vq=None) -> Path:
    """Atomically write item_codes.parquet. See :func:`codes_table` for the arguments."""
    return atomic_write_parquet(path, codes_table(item_ids, rq, vq))


def write_codebooks(path: str | os.PathLike, codebooks: Mapping[str, object],
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write codebooks as safetensors.

    Args:
        path: destination ``.safetensors`` file.
        codebooks: name -> (K, d) array or tensor; RQ levels are named ``rq.level0``, ``rq.level1``, ...
            (see :func:`rq_codebook_names`).
        metadata: optional string -> string header metadata (e.g. the quantizer config as JSON).
    """
    from safetensors.numpy import save_file

    if not codebooks:
        raise ValueError(f"{path}: no codebooks to write")
    arrays = {}
    for name, value in codebooks.items():
        arr = np.ascontiguousarray(_to_numpy(value))
        if arr.ndim != 2:
            raise ValueError(f"{path}: codebook '{name}' must be 2-D (K, d), got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(f"{path}: codebook '{name}' contains NaN or inf")
        arrays[name] = arr
    with atomic_path(path) as tmp:
        save_file(arrays, os.fspath(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def rq_codebook_names(levels: int, prefix: str = "rq") -> list[str]:
    """Canonical tensor names of an L-level residual codebook: ``rq.level0`` .. ``rq.level{L-1}``."""
    return [f"{prefix}.level{i}" for i in range(levels)]


def codebook_levels(codebooks: Mapping[str, object], prefix: str = "rq") -> list:
    """The per-level codebooks named ``{prefix}.level{i}``, in level order.

    Raises:
        KeyError: when levels are missing or not contiguous from 0.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.level(\d+)$")
    found = {int(m.group(1)): name for name in codebooks if (m := pattern.match(name))}
    if not found:
        raise KeyError(f"no '{prefix}.levelN' codebooks among {sorted(codebooks)}")
    if sorted(found) != list(range(len(found))):
        raise KeyError(f"'{prefix}' codebook levels are not contiguous from 0: {sorted(found)}")
    return [codebooks[found[i]] for i in range(len(found))]


# ----------------------------------------------------------------------------------------------- readers


def read_embeddings(path: str | os.PathLike, *, id_column: str = "item_id",
                    embedding_column: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """Read and validate item_embeddings.parquet (or any Parquet with an id and a list<float> column).

    Args:
        path: the Parquet file.
        id_column, embedding_column: column names (the contract's by default).
    Returns:
        item_ids: (N,) int64 ascending; emb: (N, d) float32.
    Raises:
        TableError naming the file, column and row on any contract violation.
    """
    path = Path(path)
    table = _read_parquet(path, (id_column, embedding_column))
    if table.num_rows == 0:
        raise TableError(f"{path}: empty table (0 rows)")
    item_ids = _id_column(table, path, id_column)
    emb = _list_column_to_matrix(table, embedding_column, path, item_ids, kind="float")
    if emb.shape[1] == 0:
        raise TableError(f"{path}: column '{embedding_column}' has dimension 0")
    emb = emb.astype(np.float32, copy=False)
    _check_unique(item_ids, path, id_column)
    _check_finite(emb, item_ids, path, embedding_column)
    order = np.argsort(item_ids, kind="stable")
    return item_ids[order], np.ascontiguousarray(emb[order])


def read_asof_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read user_embeddings_asof.parquet: (user_ids (R,) int64, cut_ts (R,) int64, emb (R, d) float32), sorted
    by (user_id, cut_ts); TableError on a missing column, a null, a non-finite value or a repeated pair."""
    path = Path(path)
    table = _read_parquet(path, ("user_id", "cut_ts", "embedding"))
    if table.num_rows == 0:
        raise TableError(f"{path}: empty table (0 rows)")
    user_ids = _id_column(table, path, "user_id")
    cut_ts = _id_column(table, path, "cut_ts")
    emb = _list_column_to_matrix(table, "embedding", path, user_ids, kind="float").astype(np.float32, copy=False)
    if emb.shape[1] == 0:
        raise TableError(f"{path}: column 'embedding' has dimension 0")
    _check_finite(emb, user_ids, path, "embedding")
    order = np.lexsort((cut_ts, user_ids))
    user_ids, cut_ts, emb = user_ids[order], cut_ts[order], np.ascontiguousarray(emb[order])
    same = (user_ids[1:] == user_ids[:-1]) & (cut_ts[1:] == cut_ts[:-1])
    if same.any():
        r = int(np.flatnonzero(same)[0])
        raise TableError(f"{path}: (user_id {user_ids[r]}, cut_ts {cut_ts[r]}) appears twice")
    return user_ids, cut_ts, emb


def read_codes(path: str | os.PathLike) -> CodeTable:
    """Read and validate item_codes.parquet into a :class:`CodeTable` sorted by item_id."""
    path = Path(path)
    table = _read_parquet(path, ("item_id", "rq", "vq"))
    item_ids = _id_column(table, path)
    rq = _list_column_to_matrix(table, "rq", path, item_ids, kind="int")
    vq = _list_column_to_matrix(table, "vq", path, item_ids, kind="int")
    _check_unique(item_ids, path)
    if rq.size and rq.min() < 0:
        row = int(np.argwhere(rq < 0)[0, 0])
        raise TableError(f"{path}: column 'rq' row {row} (item_id {item_ids[row]}): negative code {rq[row].tolist()}")
    order = np.argsort(item_ids, kind="stable")
    return CodeTable(item_ids[order], np.ascontiguousarray(rq[order].astype(np.int32)),
                     np.ascontiguousarray(vq[order].astype(np.int64)))


def read_codebooks(path: str | os.PathLike, *, as_numpy: bool = False) -> dict:
    """Read codebooks.safetensors into ``{name: torch.Tensor}`` (or numpy arrays; no pickle involved)."""
    if as_numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"codebooks file not found: {path}")
    try:
        return load_file(os.fspath(path))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise TableError(f"{path}: not a readable safetensors file ({exc})") from exc


def table_summary(path: str | os.PathLike) -> dict:
    """Row count and column names of a Parquet file from its footer (cheap; used by the manifest)."""
    meta = pq.ParquetFile(os.fspath(path)).metadata
    return {"rows": int(meta.num_rows), "columns": list(meta.schema.to_arrow_schema().names)}


# ----------------------------------------------------------------------------------------------- helpers


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _as_ids(item_ids, path) -> np.ndarray:
    ids = _to_numpy(item_ids)
    if ids.ndim != 1:
        raise TableError(f"{path}: column 'item_id' must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TableError(f"{path}: column 'item_id' must be integer, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _fixed_rows_to_list(arr: np.ndarray, value_type: pa.DataType, large: bool = False):
    """(N, W) matrix -> list array without a Python loop (offsets 0, W, 2W, ...)."""
    n, width = arr.shape
    offsets = np.arange(n + 1, dtype=np.int64) * width
    values = pa.array(np.ascontiguousarray(arr).reshape(-1), type=value_type)
    if large:
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    try:
        schema = pq.read_schema(os.fspath(path))
    except Exception as exc:
        raise TableError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; found {schema.names}")
    try:
        return pq.read_table(os.fspath(path), columns=list(columns))
    except Exception as exc:
        raise TableError(f"{path}: cannot read columns {list(columns)} ({exc})") from exc


def _id_column(table: pa.Table, path: Path, name: str = "item_id") -> np.ndarray:
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise TableError(f"{path}: column '{name}' must be int64, got {col.type}")
    if col.null_count:
        row = _first_null_row(col)
        raise TableError(f"{path}: column '{name}' row {row}: null item_id")
    return col.to_numpy().astype(np.int64, copy=False)


def _first_null_row(col) -> int:
    mask = pc.is_null(col).to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(mask)[0])


def _list_column_to_matrix(table: pa.Table, name: str, path: Path, item_ids: np.ndarray, kind: str) -> np.ndarray:
    """Turn a list / large_list / fixed_size_list column into an (N, width) matrix, validating every row."""
    col = table.column(name)
    typ = col.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        raise TableError(f"{path}: column '{name}' must be a list type, got {typ}")
    value_type = typ.value_type
    ok = pa.types.is_floating(value_type) if kind == "float" else pa.types.is_integer(value_type)
    if not ok:
        raise TableError(f"{path}: column '{name}' must hold {kind} values, got {typ}")
    n = len(table)
    if col.null_count:
        row = _first_null_row(col)
        raise TableError(f"{path}: column '{name}' row {row} (item_id {item_ids[row]}): null value")
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if n == 0:
        return np.zeros((0, typ.list_size if pa.types.is_fixed_size_list(typ) else 0),
                        np.float32 if kind == "float" else np.int64)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    width = int(lengths[0])
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = int(bad[0])
        raise TableError(f"{path}: column '{name}' row {row} (item_id {item_ids[row]}): length {lengths[row]} "
                         f"differs from row 0 length {width}")
    values = arr.flatten()  # respects slicing offsets, unlike .values
    if values.null_count:
        flat_row = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0]) // max(width, 1)
        raise TableError(f"{path}: column '{name}' row {flat_row} (item_id {item_ids[flat_row]}): null element")
    return values.to_numpy(zero_copy_only=False).reshape(n, width)


def _check_unique(item_ids: np.ndarray, path, name: str = "item_id") -> None:
    if len(item_ids) < 2:
        return
    order = np.argsort(item_ids, kind="stable")
    dup = np.flatnonzero(item_ids[order][1:] == item_ids[order][:-1])
    if dup.size:
        rows = sorted(order[dup[0]: dup[0] + 2].tolist())
        raise TableError(f"{path}: column '{name}' rows {rows[0]} and {rows[1]}: duplicate item_id "
                         f"{item_ids[rows[0]]} ({dup.size} duplicate(s) in total)")


def _check_finite(emb: np.ndarray, item_ids: np.ndarray, path, name: str) -> None:
    finite = np.isfinite(emb).all(axis=1) if emb.size else np.ones(len(emb), bool)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise TableError(f"{path}: column '{name}' row {row} (item_id {item_ids[row]}): NaN or inf value "
                         f"({int((~finite).sum())} bad row(s) in total)")
