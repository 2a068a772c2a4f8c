"""Reading tables with errors that name the file, column and row; atomic writes of what others read.

Row numbers in messages and in the rejects table are 0-based data rows (the header is not a row); for CSV the
message adds the 1-based file line as well, which is what an editor shows.
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store import io as fs_io
from pipelines.data.rules import (NOT_A_NUMBER, NOT_AN_INTEGER, column_label, parse_int64, parse_numbers,
                                  parse_unix_seconds, value_detail)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input file: the message names the file, and the column and row where they are known."""


def table_format(path: Path) -> str:
    suffix = "".join(Path(path).suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        return "parquet"
    if suffix.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        return "csv"
    raise DataError(f"{path}: unsupported table format (expected .parquet or .csv/.tsv)")


def table_columns(path: Path) -> list[str]:
    """Column names of a CSV/TSV/Parquet file, read from its header / schema only."""
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        sep = "\t" if ".tsv" in Path(path).name.lower() else ","
        return list(pd.read_csv(path, sep=sep, dtype=str, nrows=0, encoding="utf-8-sig").columns)
    except (OSError, pa.ArrowException, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as exc:
        raise DataError(f"{path}: unreadable {fmt} file: {exc}") from None


def table_files(path: Path) -> list[Path]:
    """The files behind a table path: the file itself, every table file in a folder (a partitioned log,
    e.g. events/day=2024-01-01.parquet ...), or the matches of a glob pattern; sorted by name."""
    path = Path(path)
    if any(ch in str(path) for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))
                       and _is_table(p))
        if not files:
            raise DataError(f"{path}: folder holds no .parquet / .csv / .tsv files")
        return files
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return [path]


def require_rows(path: Path, table: str) -> None:
    """DataError naming ``path`` when no file of the table holds a data row (an empty or header-only file): a job
    refuses it before it starts instead of failing deep inside on empty inputs. Reads Parquet footers and the
    first data line of CSV files only."""
    files = table_files(path)
    if not any(_has_rows(f) for f in files):
        raise empty_table_error(path, table, len(files))


def empty_table_error(path: Path, table: str, n_files: int = 1) -> DataError:
    where = "the file is empty or has a header but no rows" if n_files == 1 else \
        f"its {n_files} files are empty or hold a header but no rows"
    return DataError(f"{path}: no {table} ({where}); nothing to learn from")


def _has_rows(file: Path) -> bool:
    fmt = table_format(file)
    try:
        if fmt == "parquet":
            return pq.ParquetFile(file).metadata.num_rows > 0
        sep = "\t" if ".tsv" in Path(file).name.lower() else ","
        return len(pd.read_csv(file, sep=sep, dtype=str, nrows=1, encoding="utf-8-sig")) > 0
    except pd.errors.EmptyDataError:  # not even a header
        return False
    except (OSError, pa.ArrowException, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{file}: unreadable {fmt} file: {exc}") from None


def _is_table(path: Path) -> bool:
    try:
        table_format(path)
        return True
    except DataError:
        return False


def read_table(path: Path, columns: Optional[Iterable[str]] = None,
               optional: Iterable[str] = ()) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet table: one file, a folder of part files, or a glob. CSV cells are read as strings
    so that dtype errors can name the row.

    Args:
        columns: required columns (None: read every column).
        optional: further columns read when present. With `columns` given, nothing else is read.
    Returns:
        The rows of every part in file order. `frame.attrs["parts"]` lists (file, format, first row, n rows), so
        errors and rejects can name the part file and the row inside it (see `locate`).
    Raises:
        DataError: a file is missing or unreadable, or lacks one of `columns` (named, with those present).
    """
    files = table_files(path)
    frames, parts, start = [], [], 0
    for file in files:
        frame = _read_one(file, columns, optional)
        parts.append((str(file), table_format(file), start, len(frame)))
        start += len(frame)
        frames.append(frame)
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    frame.attrs["parts"] = parts
    return frame


def _read_one(path: Path, columns: Optional[Iterable[str]], optional: Iterable[str]) -> pd.DataFrame:
    fmt = table_format(path)
    wanted = None
    if columns is not None:
        present = table_columns(path)
        columns = list(dict.fromkeys(columns))
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; columns present: {present}")
        wanted = columns + [c for c in dict.fromkeys(optional) if c in present and c not in columns]
    try:
        if fmt == "parquet":
            return pq.read_table(path, columns=wanted).to_pandas()
        sep = "\t" if ".tsv" in path.name.lower() else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], usecols=wanted,
                           encoding="utf-8-sig")  # utf-8-sig: a BOM written by spreadsheet tools is not part of a name
    except (OSError, pa.ArrowException, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as exc:
        raise DataError(f"{path}: unreadable {fmt} file: {exc}") from None


def locate(frame: pd.DataFrame, position: int) -> tuple[str, str, int]:
    """(file, format, row inside that file) of the frame's row at `position` (0-based)."""
    for file, fmt, start, n in frame.attrs.get("parts", [("<table>", "parquet", 0, len(frame))]):
        if start <= position < start + n:
            return file, fmt, position - start
    raise IndexError(position)


def row_sources(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (part file name (N,) object, row inside that file (N,) int64), for the rejects table."""
    parts = frame.attrs.get("parts", [("<table>", "parquet", 0, len(frame))])
    names = np.concatenate([np.full(n, Path(file).name, dtype=object) for file, _, _, n in parts]) \
        if parts else np.zeros(0, dtype=object)
    rows = np.concatenate([np.arange(n, dtype=np.int64) for _, _, _, n in parts]) if parts else np.zeros(0, np.int64)
    return names, rows


def _where(frame: pd.DataFrame, position: int) -> tuple[str, str]:
    file, fmt, row = locate(frame, position)
    return file, (f"row {row} (line {row + 2})" if fmt == "csv" else f"row {row}")


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class Unparsed:
    """The cells of one source column that fail a rule of `pipelines.data.rules` (do not parse, or lie past the
    clock): a per-record problem, not a file error, named by file, column, row and value. Which reason the rows
    get is the rule table's (`rules.INTERACTION_RULES` / `ITEM_ID_RULES`).

    Args:
        frame: the table read by `read_table` (its parts name the file and row of each cell).
        column: source column name; role: contract field it feeds ("ts", "label", "user_id", ...).
        mask: (N,) bool, True where the cell fails; what: why, e.g. "is not an integer".
    """

    def __init__(self, frame: pd.DataFrame, column: str, role: str, mask: np.ndarray, what: str):
        self.frame, self.column, self.role, self.what = frame, column, role, what
        self.mask = np.asarray(mask, dtype=bool)

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    @property
    def label(self) -> str:
        return column_label(self.column, self.role)

    def value(self, position: int):
        return self.frame[self.column].iloc[position]

    def detail(self, position: int) -> str:
        """The rejects table's detail for one bad row: column, value and why (`rules.value_detail`)."""
        return value_detail(self.column, self.role, self.value(position), self.what)

    def describe(self, examples: int = 5) -> str:
        """'<file>: column 'ts' (ts) row 1 (line 3): value 'x' <what>; N bad value(s) ... first: ...'."""
        positions = np.flatnonzero(self.mask)
        file, where = _where(self.frame, int(positions[0]))
        first = ", ".join(f"{Path(f).name} {w} {self.value(int(i))!r}"
                          for i in positions[:examples] for f, w in [_where(self.frame, int(i))])
        return (f"{file}: {self.label} {where}: value {self.value(int(positions[0]))!r} {self.what} "
                f"({self.count} bad value(s) in this column; first: {first})")


def int64_column(frame: pd.DataFrame, column: str, *, role: str = "", what: str = NOT_AN_INTEGER
                 ) -> tuple[pd.Series, Unparsed]:
    """Column as nullable Int64 (`rules.parse_int64`) plus its unparseable cells (<NA> in the values; missing cells
    are <NA> too, but not in `Unparsed`: they are missing values). ``what``: why a bad cell is bad, in its
    reject's detail (integer unix seconds are `rules.NOT_UNIX_SECONDS`).

    Raises:
        DataError: a boolean column (a wrong column, not a bad cell).
    """
    series = frame[column]
    if pd.api.types.is_bool_dtype(series.dtype):
        raise DataError(f"{locate(frame, 0)[0]}: {column_label(column, role)}: expected integers, got booleans")
    values, bad = parse_int64(series)
    return values, Unparsed(frame, column, role, bad, what)


def float32_column(frame: pd.DataFrame, column: str, *, role: str = "") -> tuple[pd.Series, Unparsed]:
    """Column as float32 (NaN for missing and for bad cells) plus its cells that are not numbers
    (`rules.parse_numbers`)."""
    values, bad = parse_numbers(frame[column])
    return values, Unparsed(frame, column, role, bad, NOT_A_NUMBER)


def unix_seconds_column(frame: pd.DataFrame, column: str, *, fmt: str = "auto", role: str = "ts",
                        ms: Optional[bool] = None) -> tuple[pd.Series, Unparsed]:
    """Timestamps as nullable Int64 unix seconds (empty and unparseable cells are <NA>), plus the unparseable cells
    (`rules.parse_unix_seconds`).

    Args:
        fmt: "unix", "unix_ms", "iso" or "auto" (partitions written in different formats load together).
        ms: with "auto", whether the numbers are milliseconds; None decides from this frame's median (the whole
            table for the loader; workers reading it in chunks pass the whole table's `ms_decision`).
    Raises:
        DataError: an unknown `fmt`.
    """
    if fmt not in ("auto", "unix", "unix_ms", "iso"):
        raise DataError(f"timestamp format {fmt!r} is not one of auto, unix, unix_ms, iso")
    values, bad, what, as_ms = parse_unix_seconds(frame[column], fmt, ms)
    if fmt == "auto" and as_ms:
        log.info("%s: column %r (%s) looks like unix milliseconds; converting to seconds "
                 "(set ts_format: unix to keep them as seconds)", locate(frame, 0)[0], column, role)
    return values, Unparsed(frame, column, role, bad, what)


def to_unix_seconds(frame: pd.DataFrame, column: str, *, fmt: str = "auto", role: str = "ts") -> pd.Series:
    """`unix_seconds_column` that raises DataError naming file, column and the first row that does not parse."""
    values, bad = unix_seconds_column(frame, column, fmt=fmt, role=role)
    if bad.count:
        row = _first_bad(bad.mask)
        file, where = _where(frame, row)
        raise DataError(f"{file}: {bad.label} {where}: value {frame[column].iloc[row]!r} {bad.what}")
    return values


# ---- atomic writes: the project's one implementation lives in feature_store.io (write aside, fsync, rename) ----

def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Atomic write; creates the parent folder (feature_store.io expects it to exist)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fs_io.atomic_write_bytes(path, data)


def atomic_write_json(path: Path, obj) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fs_io.atomic_write_json(path, obj)


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    """A DataFrame as Parquet, atomically (index dropped)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fs_io.atomic_write_parquet(path, pa.Table.from_pandas(frame, preserve_index=False))
