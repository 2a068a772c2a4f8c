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


log = logging.getLogger(__name__)
MS_THRESHOLD = 1e11  # as unix seconds this is year 5138: such integer timestamps are milliseconds


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
    """The cells of one column that are present but do not parse (a per-record problem, not a file error).

    Args:
        frame: the table read by `read_table` (its parts name the file and row of each cell).
        column: source column name; role: contract field it feeds ("ts", "label", "user_id", ...).
        mask: (N,) bool, True where the cell did not parse; what: why, e.g. "is not an integer".
        reason: the reject reason these rows get (schema.REJECT_REASONS: bad_id, bad_timestamp, bad_label).
    """

    def __init__(self, frame: pd.DataFrame, column: str, role: str, mask: np.ndarray, what: str, reason: str):
        self.frame, self.column, self.role, self.what, self.reason = frame, column, role, what, reason
        self.mask = np.asarray(mask, dtype=bool)

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    @property
    def label(self) -> str:
        return f"column {self.column!r}" + (f" ({self.role})" if self.role else "")

    def value(self, position: int):
        return self.frame[self.column].iloc[position]

    def detail(self, position: int) -> str:
        """The rejects table's detail for one bad row: column, value and why."""
        return f"{self.label}: value {self.value(position)!r} {self.what}"

    def describe(self, examples: int = 5) -> str:
        """'<file>: column 'ts' (ts) row 1 (line 3): value 'x' <what>; N bad value(s) ... first: ...'."""
        positions = np.flatnonzero(self.mask)
        file, where = _where(self.frame, int(positions[0]))
        first = ", ".join(f"{Path(f).name} {w} {self.value(int(i))!r}"
                          for i in positions[:examples] for f, w in [_where(self.frame, int(i))])
        return (f"{file}: {self.label} {where}: value {self.value(int(positions[0]))!r} {self.what} "
                f"({self.count} bad value(s) in this column; first: {first})")

    def raise_if_any(self) -> None:
        if self.count:
            raise DataError(self.describe())


INT64_MAX = np.iinfo(np.int64).max


def parse_int64(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Parse ids / integers exactly (never through float64, so ids above 2**53 survive).

    Returns:
        (values nullable Int64, bad (N,) bool): bad marks non-empty cells that are not integers in int64 range
        (text like "12", " 12 ", "12.0" is fine; "1.5", "abc", 1.5 are not). Empty cells are <NA>, not bad.
    """
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.astype("Int64"), np.zeros(len(series), bool)
    if pd.api.types.is_float_dtype(series.dtype):
        frac = (series.notna() & (series.fillna(0) % 1 != 0)) | (series.abs() > INT64_MAX)
        return series.where(~frac).astype("Int64"), frac.to_numpy()
    text = series.astype("string").str.strip()
    blank = (text.isna() | text.eq("")).fillna(True).to_numpy()
    digits = text.str.replace(r"\.0*$", "", regex=True)
    short = digits.str.fullmatch(r"[+-]?\d{1,18}").fillna(False).to_numpy(dtype=bool)   # always fits int64
    long_ = digits.str.fullmatch(r"[+-]?\d{19,20}").fillna(False).to_numpy(dtype=bool)  # check the range
    out = pd.Series(pd.NA, index=series.index, dtype="Int64")
    if short.any():  # no NaN in the subset, so to_numeric gives exact int64
        out.iloc[np.flatnonzero(short)] = pd.to_numeric(digits[short].to_numpy(dtype=object)).astype(np.int64)
    ok = short.copy()
    for i in np.flatnonzero(long_):
        v = int(digits.iloc[i])
        if -INT64_MAX - 1 <= v <= INT64_MAX:
            out.iloc[i] = v
            ok[i] = True
    return out, ~ok & ~blank


def int64_column(frame: pd.DataFrame, column: str, *, role: str = "") -> tuple[pd.Series, Unparsed]:
    """Column as nullable Int64 plus its unparseable cells (<NA> in the values; missing cells are <NA> too,
    but not in `Unparsed`: they are missing values).

    Raises:
        DataError: a boolean column (a wrong column, not a bad cell).
    """
    series = frame[column]
    label = f"column {column!r}" + (f" ({role})" if role else "")
    if pd.api.types.is_bool_dtype(series.dtype):
        raise DataError(f"{locate(frame, 0)[0]}: {label}: expected integers, got booleans")
    values, bad = parse_int64(series)
    return values, Unparsed(frame, column, role, bad, "is not an integer", "bad_id")


def to_int64(frame: pd.DataFrame, column: str, *, role: str = "") -> pd.Series:
    """Column as nullable Int64 (missing cells stay <NA>: they are per-record rejects, not file errors).

    Raises:
        DataError naming file, column and the first row whose value is not an integer.
    """
    values, bad = int64_column(frame, column, role=role)
    bad.raise_if_any()
    return values


def float32_column(frame: pd.DataFrame, column: str, *, role: str = "") -> tuple[pd.Series, Unparsed]:
    """Column as float32 (NaN for missing and for unparseable cells) plus its unparseable cells."""
    series = frame[column]
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype("float32"), Unparsed(frame, column, role, np.zeros(len(series), bool), "", "bad_label")
    numeric = pd.to_numeric(series.map(_bool_text) if series.dtype == object else series, errors="coerce")
    bad = numeric.isna().to_numpy() & series.notna().to_numpy()
    return numeric.astype("float32"), Unparsed(frame, column, role, bad, "is not a number", "bad_label")


def to_float32(frame: pd.DataFrame, column: str, *, role: str = "") -> pd.Series:
    """Column as float32 (NaN for missing). Raises DataError naming file, column and first non-numeric row."""
    values, bad = float32_column(frame, column, role=role)
    bad.raise_if_any()
    return values


def _bool_text(value):
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return 1.0 if value.strip().lower() == "true" else 0.0
    return value


def unix_seconds_column(frame: pd.DataFrame, column: str, *, fmt: str = "auto", role: str = "ts",
                        ms: Optional[bool] = None) -> tuple[pd.Series, Unparsed]:
    """Timestamps as nullable Int64 unix seconds (empty and unparseable cells are <NA>), plus the unparseable cells.

    Args:
        fmt: "unix" (seconds), "unix_ms" (milliseconds), "iso" (ISO-8601 dates / datetimes; naive ones are
            taken as UTC) or "auto": per value, numbers are unix seconds (milliseconds when the column's numbers
            are beyond year 5000 as seconds) and anything else is parsed as ISO-8601, so partitions written in
            different formats load together.
        ms: with "auto", whether the numbers are milliseconds; None decides from this frame's median (the whole
            table for the loader; workers reading it in chunks pass the whole table's `ms_decision`).
    Raises:
        DataError: an unknown `fmt`.
    """
    series = frame[column]
    label = f"column {column!r} ({role})"
    if fmt not in ("auto", "unix", "unix_ms", "iso"):
        raise DataError(f"timestamp format {fmt!r} is not one of auto, unix, unix_ms, iso")
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        parsed = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
        return _datetime_to_seconds(parsed), Unparsed(frame, column, role, np.zeros(len(series), bool), "",
                                                       "bad_timestamp")
    present = series.notna().to_numpy() & ~series.astype("string").str.strip().eq("").fillna(False).to_numpy(bool)
    numeric = pd.to_numeric(series, errors="coerce").astype("float64")
    is_num = numeric.notna().to_numpy() & present
    out = pd.Series(pd.NA, index=series.index, dtype="Int64")
    if fmt != "iso" and is_num.any():
        values = numeric[is_num]
        if fmt == "auto" and (values.abs().median() > MS_THRESHOLD if ms is None else ms):
            log.info("%s: %s looks like unix milliseconds (median %.0f); converting to seconds "
                     "(set ts_format: unix to keep them as seconds)", locate(frame, 0)[0], label, values.median())
            fmt = "unix_ms"
        out[is_num] = (values / 1000.0 if fmt == "unix_ms" else values).round().astype("int64")
    if fmt in ("unix", "unix_ms"):
        bad = present & ~is_num
        what = "is not a unix timestamp"
    else:
        to_parse = present & (~is_num if fmt == "auto" else np.ones(len(series), bool))
        parsed = pd.to_datetime(series[to_parse].astype("string"), errors="coerce", utc=True, format="ISO8601")
        out[to_parse] = _datetime_to_seconds(parsed)
        bad = present & out.isna().to_numpy()
        what = "is not a unix timestamp or an ISO-8601 date" if fmt == "auto" else "is not an ISO-8601 date"
    return out, Unparsed(frame, column, role, bad, what, "bad_timestamp")


def ms_stats(frame: pd.DataFrame, column: str) -> tuple[int, int, Optional[float], Optional[float]]:
    """(numbers, numbers above MS_THRESHOLD, largest at or below it, smallest above it) of the column's absolute
    numeric values: a block's part of the auto-timestamp rule, merged with `merge_ms_stats`."""
    series = frame[column]
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return (0, 0, None, None)
    present = series.notna().to_numpy() & ~series.astype("string").str.strip().eq("").fillna(False).to_numpy(bool)
    values = pd.to_numeric(series, errors="coerce").astype("float64").abs().to_numpy()[present]
    values = values[~np.isnan(values)]
    low, high = values[values <= MS_THRESHOLD], values[values > MS_THRESHOLD]
    return (int(len(values)), int(len(high)), float(low.max()) if len(low) else None,
            float(high.min()) if len(high) else None)


def merge_ms_stats(parts) -> tuple:
    n = c = 0
    low = high = None
    for a, b, lo, hi in parts:
        n, c = n + a, c + b
        low = lo if low is None else (low if lo is None else max(low, lo))
        high = hi if high is None else (high if hi is None else min(high, hi))
    return (n, c, low, high)


def ms_decision(stats) -> bool:
    """The loader's rule (median of the absolute numbers > MS_THRESHOLD) from merged `ms_stats`, exactly: the
    median is above the threshold when more than half the numbers are, below when fewer than half are, and, with
    exactly half above (n even), the mean of the two middle values (largest below, smallest above) decides."""
    n, c, low, high = stats
    if n == 0:
        return False
    if 2 * c > n:
        return True
    if 2 * c < n:
        return False
    return (low + high) / 2.0 > MS_THRESHOLD


def to_unix_seconds(frame: pd.DataFrame, column: str, *, fmt: str = "auto", role: str = "ts") -> pd.Series:
    """`unix_seconds_column` that raises DataError naming file, column and the first row that does not parse."""
    values, bad = unix_seconds_column(frame, column, fmt=fmt, role=role)
    if bad.count:
        row = _first_bad(bad.mask)
        file, where = _where(frame, row)
        raise DataError(f"{file}: {bad.label} {where}: value {frame[column].iloc[row]!r} {bad.what}")
    return values


def _datetime_to_seconds(parsed: pd.Series) -> pd.Series:
    out = pd.Series(pd.NA, index=parsed.index, dtype="Int64")
    ok = parsed.notna()
    epoch = pd.Timestamp(0, tz="UTC")
    out[ok] = ((parsed[ok] - epoch) // pd.Timedelta(seconds=1)).astype("int64")
    return out


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
