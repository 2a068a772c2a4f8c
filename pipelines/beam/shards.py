"""Sharded tables: how pair mining moves data through a Beam runner with one element per shard, not per event.

A *table* is a dict of numpy columns of equal length (a column may be 2-D: one row per table row) or *ragged*
columns, ``(flat values, lengths)`` with length -1 for a missing value (None). Keys (users, items, pairs) are
spread over ``n_shards`` shards by a fixed hash of the id (`shard_of`, the same on every runner and worker); every
PCollection of the mining is keyed by shard, and each element is one shard's table (or a piece of it on its way).

Why: a runner moves and (the FnApiRunner) holds every element as its own object, and its per-element cost is tens
of microseconds; pair mining has ~20 steps over every event, user or item. With one element per shard the runner
does O(shards²) work per step and the events stay in numpy arrays (a few bytes each); the per-key logic runs on
the workers in loops over numpy slices, calling the same kernels as the pandas reference.

`Gather` collects rows or tables sent to a shard; it is a CombineFn, so with combiner lifting a worker
concatenates what one bundle sends to a shard before anything is shuffled.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive ids evenly
PACK_ROWS = 65_536  # rows a Gather accumulator keeps as Python tuples before packing them into arrays


def shard_of_id(key: int, n_shards: int) -> int:
    """Shard of one id (= `shard_of` on an array)."""
    return (((int(key) * _GOLDEN) & _MASK) >> 33) % n_shards


def shard_of(keys, n_shards: int) -> np.ndarray:
    """Shard of every id: int64 array -> int64 array in [0, n_shards)."""
    h = np.asarray(keys, np.int64).view(np.uint64) * np.uint64(_GOLDEN)  # wraps modulo 2**64
    return ((h >> np.uint64(33)) % np.uint64(n_shards)).astype(np.int64)


def shards_for(n_rows: int, rows_per_shard: int) -> int:
    return max(1, math.ceil(int(n_rows) / int(rows_per_shard)))


# ------------------------------------------------------------------------------------------------ tables


def ragged(parts: Iterable, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A ragged column from a sequence of 1-D arrays / None."""
    parts = list(parts)
    lengths = np.fromiter((-1 if p is None else len(p) for p in parts), np.int64, len(parts))
    kept = [np.asarray(p, dtype) for p in parts if p is not None]
    return (np.concatenate(kept) if kept else np.empty(0, dtype)), lengths


def ragged_rows(col: tuple) -> list:
    """A ragged column -> list of 1-D arrays (views) / None."""
    flat, lengths = col
    sizes = np.maximum(lengths, 0)
    ends = np.cumsum(sizes)
    return [None if n < 0 else flat[e - n: e] for e, n in zip(ends.tolist(), lengths.tolist())]


def _ragged_take(col: tuple, rows: np.ndarray) -> tuple:
    flat, lengths = col
    sizes = np.maximum(lengths, 0)
    starts = np.cumsum(sizes) - sizes
    sel = sizes[rows]
    out_starts = np.cumsum(sel) - sel
    idx = np.arange(int(sel.sum()), dtype=np.int64) + np.repeat(starts[rows] - out_starts, sel)
    return flat[idx], lengths[rows]


def nrows(table: dict) -> int:
    col = next(iter(table.values()))
    return len(col[1]) if isinstance(col, tuple) else len(col)


def take(table: dict, rows) -> dict:
    """The table's rows `rows` (an index array or a boolean mask), in that order."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    return {k: _ragged_take(v, rows) if isinstance(v, tuple) else v[rows] for k, v in table.items()}


def concat(tables: list) -> dict:
    """Rows of all `tables` (same columns), in order; a column that is itself a dict of tables is concatenated
    recursively (a message carrying several tables of different lengths)."""
    tables = [t for t in tables if t]
    if len(tables) == 1:
        return tables[0]
    out = {}
    for k, v in tables[0].items():
        if isinstance(v, dict):  # a message of several tables
            out[k] = concat([t[k] for t in tables])
        elif isinstance(v, tuple):
            out[k] = (np.concatenate([t[k][0] for t in tables]), np.concatenate([t[k][1] for t in tables]))
        else:
            out[k] = np.concatenate([t[k] for t in tables])
    return out


def split(table: dict, shard: np.ndarray) -> Iterator[tuple[int, dict]]:
    """(shard, the table's rows of that shard) for every shard that has rows."""
    order = np.argsort(shard, kind="stable")
    s = shard[order]
    bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        yield int(s[a]), take(table, order[a:b])


def segments(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal values in sorted `keys`: (the distinct keys, start offsets with the end appended)."""
    if len(keys) == 0:
        return keys[:0], np.zeros(1, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.r_[starts, len(keys)].astype(np.int64)


# ------------------------------------------------------------------------------------------------ Beam


class Gather(beam.CombineFn):
    """Rows (tuples in `schema` order) or whole tables sent to a key -> one table of all of them.

    Args:
        schema: ((column, dtype, is_ragged), ...) of the rows; a ragged field of a row is a 1-D array or None.
            Empty when only tables are sent.
    """

    def __init__(self, schema: tuple):
        self.schema = tuple(schema)

    def create_accumulator(self):
        return [[], []]  # [tables, pending row tuples]

    def _pack(self, rows: list) -> dict:
        out = {}
        for f, (name, dtype, is_ragged) in enumerate(self.schema):
            col = [r[f] for r in rows]
            out[name] = ragged(col, dtype) if is_ragged else np.asarray(col, dtype)
        return out

    def add_input(self, acc, value):
        if isinstance(value, dict):
            acc[0].append(value)
        else:
            acc[1].append(value)
            if len(acc[1]) >= PACK_ROWS:
                acc[0].append(self._pack(acc[1]))
                acc[1] = []
        return acc

    def merge_accumulators(self, accs):
        out = [[], []]
        for tables, pending in accs:
            out[0].extend(tables)
            out[1].extend(pending)
        return out

    def compact(self, acc):
        tables = acc[0] + ([self._pack(acc[1])] if acc[1] else [])
        return [[concat(tables)] if tables else [], []]

    def extract_output(self, acc):
        tables = self.compact(acc)[0]
        return tables[0] if tables else self._pack([])


def shard_count(pcoll, rows_per_shard: int, label: str):
    """Singleton: the number of shards for a PCollection of rows (ceil(rows / rows_per_shard), at least 1)."""
    return (pcoll | f"{label}Count" >> beam.combiners.Count.Globally()
            | f"{label}Shards" >> beam.Map(shards_for, rows_per_shard))
