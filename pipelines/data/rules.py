"""The one table of parse and validation rules: what a value must look like, and which reason a bad record gets.

Every path calls these functions, never a copy of its own: the loader applies them to whole tables
(`generic`, `movielens`, `validate.finalize`); the Beam job to each chunk it reads (`pipelines.beam.read_source`,
through the loader's own `generic.parse_items` / `parse_interactions`) and to each batch of records it re-checks
(`pipelines.beam.validate_records`). They are pure functions over a column chunk (a pandas Series) or over arrays
aligned with a chunk's rows; the caller says where a value came from (file, column and row for a source chunk,
the contract field for a record), the rule says what is wrong with it.

Column rules (a chunk of values -> parsed values + the cells that do not parse):
    ids          `parse_int64`        integers, exactly (never through float64)               -> bad_id
    timestamps   `parse_unix_seconds` unix seconds / milliseconds (`ms_decision`) / ISO-8601     -> bad_timestamp;
                 `before_epoch`       a time before 1970 is a sentinel (-1), not an event time
                 clock                later than the job's clock + tolerance, `feature_store.clock.EventClock`
    labels       `parse_numbers`      numbers, "true" / "false"; `label_out_of_range`: outside [0, 1] -> bad_label
    text, image  `blank`              None, NaN or whitespace only is no value (title, text, image uri)
Record rules: one reason per record, the first rule of `INTERACTION_RULES` / `ITEM_ID_RULES` that rejects it
(`first_failure`); an item's content (`item_content_verdict`: image loss, empty text, --require-image); duplicates
keep the first source row (`duplicate_item_detail`, `DUPLICATE_INTERACTION`); `UNKNOWN_ITEM`.
Rejects: `reject_record` is the one shape of a reject (`schema.REJECT_COLUMNS`), ids as the source wrote them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

MS_THRESHOLD = 1e11  # as unix seconds this is year 5138: such integer timestamps are milliseconds
INT64_MAX = np.iinfo(np.int64).max

# What a failing value is, in words: the tail of a reject's detail, whoever names the value.
NOT_AN_INTEGER = "is not an integer"
NOT_A_NUMBER = "is not a number"
NOT_UNIX_SECONDS = "is not a unix timestamp"
LABEL_RANGE = "is not in [0, 1]"
UNKNOWN_ITEM = "item id not in the accepted item catalog"
DUPLICATE_INTERACTION = "same user, item, timestamp and label as an earlier row"
EMPTY_TEXT_KEPT = "no title and no text"
EMPTY_TEXT_DROPPED = "no title, no text and no usable image"
NO_IMAGE = "no image_uri"


# --------------------------------------------------------------------------------------------- reject records

def column_label(column: str, role: str = "") -> str:
    """How a reject names where a value came from: the source column and the contract field it feeds."""
    return f"column {column!r}" + (f" ({role})" if role else "")


def value_detail(column: str, role: str, value, what: str) -> str:
    """The reject detail of one value that fails a rule: column, value and why ("column 'ts' (ts): value 'x' is not a
    unix timestamp"), whoever read the value (a source cell in the loader or on a worker, a record's field)."""
    return f"{column_label(column, role)}: value {value!r} {what}"


def empty_detail(column: str, role: str = "") -> str:
    """The reject detail of an empty value where the contract needs one (missing_value)."""
    return f"{column_label(column, role)} is empty"


def raw_id_text(value) -> Optional[str]:
    """An id as the source wrote it, as text without surrounding blanks (None when absent or blank); integral
    floats lose their ``.0``."""
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def dense_id(value) -> Optional[int]:
    """A dense int64 id (or row number), or None when `value` is absent or not an integer (never raises)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return None


def reject_record(source, reason: str, *, row=None, item_id=None, user_id=None, item_dense_id=None,
                  user_dense_id=None, detail="", action: str = "dropped") -> dict:
    """One reject (`schema.REJECT_COLUMNS`): the loader's rejects table rows and the job's dead letters alike.

    Args:
        item_id, user_id: the ids as the source wrote them (raw strings for string-id sources); stored as text,
            never parsed, so a reject can always be recorded whatever the id looks like.
        item_dense_id, user_dense_id: the dense int64 ids where known (None otherwise).
    """
    return {"source": None if source is None else str(source), "row": dense_id(row),
            "item_id": raw_id_text(item_id), "user_id": raw_id_text(user_id),
            "item_dense_id": dense_id(item_dense_id), "user_dense_id": dense_id(user_dense_id),
            "reason": reason, "detail": str(detail)[:500], "action": action}


# ----------------------------------------------------------------------------------------------- column rules

def blank(series: pd.Series) -> np.ndarray:
    """(N,) bool: no value (None, NA, NaN or whitespace-only text)."""
    return (series.isna() | series.astype("string").str.strip().fillna("").eq("")).to_numpy(dtype=bool)


def _integral_objects(series: pd.Series) -> pd.Series:
    """Python floats among object values as their integer text when integral (1e17 -> "100000000000000000"):
    `str` would write them in exponent form, which is no integer text."""
    kind = pd.api.types.infer_dtype(series, skipna=True)
    if kind in ("string", "empty", "integer"):
        return series
    return series.map(lambda v: str(int(v)) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else v)


def parse_int64(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Parse ids / integers exactly (never through float64, so ids above 2**53 survive).

    Returns:
        (values nullable Int64, bad (N,) bool): bad marks non-empty cells that are not integers in int64 range
        (text like "12", " 12 ", "12.0" is fine; "1.5", "abc", 1.5, True are not). Empty cells are <NA>, not bad.
    """
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.astype("Int64"), np.zeros(len(series), bool)
    if pd.api.types.is_float_dtype(series.dtype):
        frac = (series.notna() & (series.fillna(0) % 1 != 0)) | (series.abs() > INT64_MAX)
        return series.where(~frac).astype("Int64"), frac.to_numpy()
    if series.dtype == object:
        series = _integral_objects(series)
    text = series.astype("string").str.strip()
    empty = (text.isna() | text.eq("")).fillna(True).to_numpy()
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
    return out, ~ok & ~empty


def _bool_text(value):
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return 1.0 if value.strip().lower() == "true" else 0.0
    return value


def parse_numbers(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Labels: numbers and numeric text ("true" / "false" are 1 / 0; booleans too).

    Returns:
        (values float32, NaN where empty or bad; bad (N,) bool): bad marks present values that are not finite
        numbers ("abc", "inf", "nan"). Empty cells (`blank`: None, blank text, NaN, which is how readers store an
        empty cell) are NaN, not bad.
    """
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype("float32"), np.zeros(len(series), bool)
    empty = blank(series)
    numeric = pd.to_numeric(series.map(_bool_text) if series.dtype == object else series,
                            errors="coerce").astype("float64")
    bad = ~np.isfinite(numeric.to_numpy()) & ~empty
    return numeric.where(~bad).astype("float32"), bad


def parse_unix_seconds(series: pd.Series, fmt: str = "auto", ms: Optional[bool] = None
                       ) -> tuple[pd.Series, np.ndarray, str, bool]:
    """Timestamps as nullable Int64 unix seconds (empty and unparseable cells are <NA>).

    Args:
        fmt: "unix" (seconds), "unix_ms" (milliseconds), "iso" (ISO-8601 dates / datetimes; naive ones are taken
            as UTC) or "auto": per value, numbers are unix seconds (milliseconds when the chunk's numbers are
            beyond year 5000 as seconds, `ms_decision`) and anything else is parsed as ISO-8601.
        ms: with "auto", whether the numbers are milliseconds; None decides from this chunk's median.
    Returns:
        (values, bad (N,) bool: present cells that do not parse, what they are not, whether numbers were taken
        as milliseconds).
    """
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        parsed = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
        return _datetime_to_seconds(parsed), np.zeros(len(series), bool), "", False
    present = ~blank(series)
    numeric = pd.to_numeric(series, errors="coerce").astype("float64")
    is_num = numeric.notna().to_numpy() & present
    out = pd.Series(pd.NA, index=series.index, dtype="Int64")
    as_ms = fmt == "unix_ms"
    if fmt != "iso" and is_num.any():
        values = numeric[is_num]
        if fmt == "auto":
            as_ms = bool(values.abs().median() > MS_THRESHOLD if ms is None else ms)
        out[is_num] = (values / 1000.0 if as_ms else values).round().astype("int64")
    if fmt in ("unix", "unix_ms"):
        return out, present & ~is_num, NOT_UNIX_SECONDS, as_ms
    to_parse = present & (~is_num if fmt == "auto" else np.ones(len(series), bool))
    parsed = pd.to_datetime(series[to_parse].astype("string"), errors="coerce", utc=True, format="ISO8601")
    out[to_parse] = _datetime_to_seconds(parsed)
    what = "is not a unix timestamp or an ISO-8601 date" if fmt == "auto" else "is not an ISO-8601 date"
    return out, present & out.isna().to_numpy(), what, as_ms


def _datetime_to_seconds(parsed: pd.Series) -> pd.Series:
    out = pd.Series(pd.NA, index=parsed.index, dtype="Int64")
    ok = parsed.notna()
    epoch = pd.Timestamp(0, tz="UTC")
    out[ok] = ((parsed[ok] - epoch) // pd.Timedelta(seconds=1)).astype("int64")
    return out


def ms_stats(frame: pd.DataFrame, column: str) -> tuple[int, int, Optional[float], Optional[float]]:
    """(numbers, numbers above MS_THRESHOLD, largest at or below it, smallest above it) of the column's absolute
    numeric values: a block's part of the auto-timestamp rule, merged with `merge_ms_stats`."""
    series = frame[column]
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return (0, 0, None, None)
    values = pd.to_numeric(series, errors="coerce").astype("float64").abs().to_numpy()[~blank(series)]
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


def before_epoch(ts: pd.Series) -> np.ndarray:
    """(N,) bool: timestamps before 1970-01-01 (a logged -1 means "unknown"; it is never an event time)."""
    return (ts < 0).fillna(False).to_numpy(dtype=bool)


def before_epoch_detail(ts) -> str:
    return f"timestamp {int(ts)} before 1970-01-01"


def in_future(ts: pd.Series, clock) -> np.ndarray:
    """(N,) bool: timestamps later than the clock's cutoff (`feature_store.clock.EventClock`; None: no clock)."""
    if clock is None:
        return np.zeros(len(ts), bool)
    return clock.in_future(ts.astype("Int64").fillna(clock.cutoff).to_numpy(dtype="int64"))  # empty: not future


def label_out_of_range(label: pd.Series) -> np.ndarray:
    """(N,) bool: labels outside [0, 1] (1 = positive); empty labels are not."""
    return (label.notna() & ((label < 0) | (label > 1))).to_numpy(dtype=bool)


# ----------------------------------------------------------------------------------------------- record rules

@dataclass(frozen=True)
class Rule:
    """One row of a rule table: the reject reason of the records a check catches.

    Args:
        key: the check it applies (a field's "missing:<field>" / "<field>", or a named rule).
        counted: its rejects count against --max-bad-fraction (values that do not parse, times past the clock).
    """

    reason: str
    key: str
    counted: bool = False


# One reason per interaction: the first of these that rejects it, in this order.
INTERACTION_RULES = (
    Rule("missing_value", "missing:user_id"), Rule("missing_value", "missing:item_id"),
    Rule("missing_value", "missing:ts"), Rule("missing_value", "missing:label"),
    Rule("bad_id", "user_id", True), Rule("bad_id", "item_id", True),
    Rule("bad_timestamp", "ts", True), Rule("bad_timestamp", "before_epoch"), Rule("bad_timestamp", "future", True),
    Rule("bad_label", "label", True), Rule("bad_label", "label_range"),
    Rule("unknown_item", "unmapped_item"),
)
ITEM_ID_RULES = (Rule("missing_value", "missing:item_id"), Rule("bad_id", "item_id", True))
PARSE_REASONS = tuple(dict.fromkeys(r.reason for r in INTERACTION_RULES if r.counted))  # bad_id, bad_timestamp, ...


class Cells:
    """The rows of a chunk one check catches, with the detail of each (for records, or typed values).

    Args:
        mask: (N,) bool.
        detail: the reject detail of row i (a callable) or one text for every row.
        label: what was checked, for the loader's error message.
    """

    def __init__(self, mask, detail, label: str = ""):
        self.mask = np.asarray(mask, dtype=bool)
        self._detail, self.label = detail, label

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def detail(self, i: int) -> str:
        return self._detail(int(i)) if callable(self._detail) else str(self._detail)

    def describe(self, examples: int = 5) -> str:
        first = np.flatnonzero(self.mask)[:examples]
        return f"{self.label}: {self.count} row(s); first: " + "; ".join(f"row {i}: {self.detail(i)}" for i in first)


@dataclass
class Verdicts:
    """Per row of a chunk, the first rule of a table that rejects it (one reason per record).

    Attributes:
        rules, cells: the rules that had a check, in table order, and the check of each.
        taken: per rule, (N,) bool of the rows it rejects (each row in at most one).
    """

    rules: list
    cells: list
    taken: list
    n: int

    @property
    def rejected(self) -> np.ndarray:
        return np.logical_or.reduce(self.taken) if self.taken else np.zeros(self.n, bool)

    @property
    def counted(self) -> np.ndarray:
        """(N,) bool: rows rejected by a rule that counts against --max-bad-fraction."""
        masks = [t for r, t in zip(self.rules, self.taken) if r.counted]
        return np.logical_or.reduce(masks) if masks else np.zeros(self.n, bool)

    def rule_index(self) -> np.ndarray:
        """(N,) int: per row, the index in `rules` of the rule that rejects it, -1 when none does."""
        index = np.full(self.n, -1, dtype=np.int64)
        for k, taken in enumerate(self.taken):
            index[taken] = k
        return index

    def of(self, i: int, index: Optional[np.ndarray] = None) -> Optional[tuple[Rule, str]]:
        """(rule, detail) of row i, or None when no rule rejects it (``index``: `rule_index`, computed once for a
        loop over rows)."""
        k = int((self.rule_index() if index is None else index)[i])
        return None if k < 0 else (self.rules[k], self.cells[k].detail(i))


def missing_cells(column: str, role: str, values: pd.Series, *explained) -> Cells:
    """The rows whose value is empty where the contract needs one (missing_value): <NA> once parsed, less the
    cells another rule names (``explained``: masks or `Cells`, e.g. a value that does not parse, an unmapped id)."""
    mask = values.isna().to_numpy()
    for other in explained:
        mask = mask & ~np.asarray(getattr(other, "mask", other), dtype=bool)
    return Cells(mask, empty_detail(column, role), column_label(column, role))


def first_failure(table, checks: dict, n: int, skip: Optional[np.ndarray] = None) -> Verdicts:
    """Apply a rule table to a chunk of n rows: each row gets the first rule (in table order) whose check catches
    it. `checks` maps a rule's key to its `Cells` (or `pipelines.data.io.Unparsed`); rules without one are not
    checked here. Rows in `skip` (already rejected) get none."""
    taken = np.zeros(n, bool) if skip is None else np.asarray(skip, bool).copy()
    rules, cells, masks = [], [], []
    for rule in table:
        check = checks.get(rule.key)
        if check is None:
            continue
        mask = check.mask & ~taken
        taken |= mask
        rules.append(rule)
        cells.append(check)
        masks.append(mask)
    return Verdicts(rules, cells, masks, n)


def _object_column(values) -> pd.Series:
    """Record values as one object column (ints stay exact: no float64 column for ints mixed with None)."""
    return pd.Series(list(values), dtype=object)


def check_records(frame: pd.DataFrame, clock=None) -> tuple[dict, Verdicts]:
    """The job's re-check of interaction records in contract form (fields user_id, item_id, ts, label; values of
    any type: the loader's typed table, or records from any other producer).

    Args:
        frame: one row per record, the four fields as columns (missing fields as None).
        clock: `feature_store.clock.EventClock`; None: no clock check.
    Returns:
        ({field: parsed values}, `Verdicts` of INTERACTION_RULES). Details name the field and the value as the
        loader's name a source column and cell (`value_detail`: "column 'ts' (ts): value 'notadate' is not a unix
        timestamp").
    """
    raw = {f: _object_column(frame[f]) for f in ("user_id", "item_id", "ts", "label")}
    # a NaN label in a record is a value (a label computed into NaN), not an empty field: it parses as the text
    # "nan" would in a file, which is not a number (a NaN id or time is an empty field)
    labels = raw["label"].map(lambda v: "nan" if isinstance(v, float) and v != v else v)
    parsed, checks = {}, {}
    for field, what in (("user_id", NOT_AN_INTEGER), ("item_id", NOT_AN_INTEGER), ("ts", NOT_UNIX_SECONDS),
                        ("label", NOT_A_NUMBER)):
        values, bad = parse_numbers(labels) if field == "label" else parse_int64(raw[field])
        parsed[field] = values
        checks[f"missing:{field}"] = missing_cells(field, field, values, bad)
        checks[field] = _value_cells(bad, raw[field], field, what)
    ts, label = parsed["ts"], parsed["label"]
    checks["before_epoch"] = Cells(before_epoch(ts), lambda i: before_epoch_detail(ts.iloc[i]))
    if clock is not None:
        checks["future"] = _value_cells(in_future(ts, clock), raw["ts"], "ts", clock.what())
    checks["label_range"] = _value_cells(label_out_of_range(label), raw["label"], "label", LABEL_RANGE)
    return parsed, first_failure(INTERACTION_RULES, checks, len(frame))


def _value_cells(mask, values: pd.Series, field: str, what: str) -> Cells:
    """The records of a batch whose ``field`` fails a rule, each named by its value (`value_detail`)."""
    return Cells(mask, lambda i: value_detail(field, field, values.iloc[i], what), column_label(field, field))


def check_item_ids(ids) -> tuple[pd.Series, Verdicts]:
    """The job's re-check of item ids in contract form: (parsed Int64 ids, `Verdicts` of ITEM_ID_RULES)."""
    raw = _object_column(ids)
    values, bad = parse_int64(raw)
    checks = {"missing:item_id": missing_cells("item_id", "item_id", values, bad),
              "item_id": _value_cells(bad, raw, "item_id", NOT_AN_INTEGER)}
    return values, first_failure(ITEM_ID_RULES, checks, len(raw))


def duplicate_item_detail(raw_id, first_source, first_row) -> str:
    """The detail of a later row of an item id: the first row (lowest source row) is the one kept."""
    return f"item_id {raw_id} already defined at {first_source} row {first_row}"


def image_loss_action(dropped: bool, require_image: bool, has_text: bool) -> tuple[str, str]:
    """(action, detail suffix) of an item that loses its image: kept text-only, or dropped with why."""
    if not dropped:
        return "kept_text_only", ""
    return "dropped", ("; --require-image drops it" if require_image else "") + \
        ("" if has_text else "; no title and no text either")


@dataclass(frozen=True)
class ItemVerdict:
    """What becomes of one item after its content checks.

    Attributes:
        reason, action, detail: its one reject (reason None: none). action "dropped" means the item is gone.
        image_ok: its image stays (False: kept text-only, or it named none).
        filtered: removed by --require-image for naming no image at all: not a bad record (the loader counts it
            in `Dataset.filtered`; the job, which keeps no such count, dead-letters it as missing_image).
    """

    reason: Optional[str] = None
    action: str = ""
    detail: str = ""
    image_ok: bool = True
    filtered: bool = False

    @property
    def kept(self) -> bool:
        return self.action != "dropped" and not self.filtered


def item_content_verdict(has_text: bool, has_image: bool, image_error, require_image: bool) -> ItemVerdict:
    """The content rules of one item, in order: an image that fails its check is lost (kept text-only, or dropped
    when the item has no text or under --require-image: one reject, under the image's reason); an item with no
    title and no text is kept image-only, or dropped when no usable image is left; under --require-image an item
    that names no image is filtered.

    Args:
        has_text: a title or a text that is not `blank`; has_image: an image uri that is not blank.
        image_error: the `pipelines.data.images.ImageError` of its image check (None: fine or not checked).
    """
    if has_image and image_error is not None:
        action, why = image_loss_action(require_image or not has_text, require_image, has_text)
        return ItemVerdict(image_error.reason, action, str(image_error) + why, image_ok=False)
    if not has_text:
        if has_image:
            return ItemVerdict("empty_text", "kept_image_only", EMPTY_TEXT_KEPT)
        return ItemVerdict("empty_text", "dropped", EMPTY_TEXT_DROPPED, image_ok=False)
    if require_image and not has_image:
        return ItemVerdict("missing_image", "dropped", NO_IMAGE, image_ok=False, filtered=True)
    return ItemVerdict(image_ok=has_image)


def clean_item_text(items: pd.DataFrame) -> pd.DataFrame:
    """Items in contract form: title never None, blank text / image uri None (str or None, object dtype)."""
    items = items.copy()
    items["title"] = [("" if v is None or v is pd.NA or (isinstance(v, float) and v != v) else str(v))
                      for v in items["title"].tolist()]
    for col in ("text", "image_uri"):
        keep = ~blank(items[col])
        items[col] = pd.Series([str(v) if k else None for v, k in zip(items[col].tolist(), keep)],
                               index=items.index, dtype=object)
    return items
