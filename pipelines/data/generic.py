"""Bring-your-own data: any Parquet/CSV item catalog + interaction log, mapped onto the contract without code.

Mapping file (JSON or YAML; every key optional; relative paths are relative to the mapping file)::

    items:
      path: catalog.csv
      columns: {item_id: sku, title: name, text: [description, category], image_uri: picture}
      attributes: [brand]            # extra columns carried through unchanged
    interactions:
      path: events.parquet
      columns: {user_id: uid, item_id: sku, ts: event_time, label: clicked}
      ts_format: auto                # auto | unix | unix_ms | iso
      label_threshold: 4.0           # optional: label = value >= threshold (e.g. star ratings)
      label_values: {click: 1, purchase: 1, impression: 0}   # optional: event-type column -> label
      attributes: [dwell_s]          # extra columns carried through unchanged
    image_root: images/              # image_uri is relative to it (default: the items file's folder)
    ids: auto                        # auto | int | string

Unmapped fields default to the contract names (a column called `item_id` needs no mapping); a column the mapping
names must exist. `text` may list several columns: their non-empty values are joined with ". ". Flags override the
file: `--items`, `--interactions`, and `--map items.item_id=sku`, `--map items.text=description,category`,
`--map interactions.ts_format=iso`,
`--map image_root=imgs`, `--map ids=string` (repeatable).

- Timestamps: unix seconds, unix milliseconds, or ISO-8601 dates/datetimes (naive = UTC). With `auto`, integer
  timestamps beyond year 5000 as seconds (> 1e11) are taken as milliseconds, with a log line saying so.
- Only the mapped and attribute columns are read, so wide logs cost what they use.
- Ids: integer columns stay as they are; string ids (or `ids: string`) get dense int64 ids (sorted raw order,
  catalog items first), and the maps are kept in `Dataset.id_maps` (save with `save_id_maps`; pass the folder
  back as `--id-maps` to extend rather than renumber on the next run).
- No label column: every interaction is an implicit positive (label 1.0).
- A value that does not parse (timestamp `notadate`, label `abc`, an id that is not an integer with `ids: int`)
  rejects its row (bad_timestamp / bad_label / bad_id, with file, row, column and value); more than
  `--max-bad-fraction` (default 0.001) of a table's rows like that is an error naming them. A missing column
  or an unreadable file is always an error.
- A table path may be a file, a folder of part files (a partitioned log: every .parquet/.csv/.tsv below it,
  sorted by name) or a glob (`events/2024-*.parquet`); errors and rejects name the part file and its row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from feature_store.clock import EventClock
from pipelines.data.io import (DataError, Unparsed, empty_table_error, float32_column, int64_column, parse_int64,
                               read_table, row_sources, unix_seconds_column)
from pipelines.data.loader import load_id_maps
from pipelines.data.schema import DataSpec, Dataset
from pipelines.data.validate import RejectLog, finalize, reject_unparsed

ITEM_FIELDS = ("item_id", "title", "text", "image_uri")
INTERACTION_FIELDS = ("user_id", "item_id", "ts", "label")
TABLE_KEYS = {"items": {"path", "columns", "attributes"},
              "interactions": {"path", "columns", "ts_format", "label_threshold", "label_values",
                               "attributes"}}
TOP_KEYS = {"items", "interactions", "image_root", "ids"}


def read_mapping(path: Optional[Path]) -> dict:
    """Parse a JSON/YAML mapping file and check its keys (DataError naming the file and the bad key)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: mapping file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: both are parse errors of this file
        raise DataError(f"{path}: unreadable mapping file: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: mapping must be an object with keys {sorted(TOP_KEYS)}")
    _check_keys(raw, TOP_KEYS, str(path))
    for table, allowed in TABLE_KEYS.items():
        section = raw.get(table) or {}
        if not isinstance(section, dict):
            raise DataError(f"{path}: '{table}' must be an object")
        _check_keys(section, allowed, f"{path}: {table}")
        threshold = section.get("label_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise DataError(f"{path}: interactions.label_threshold must be a number, got {threshold!r}")
        values = section.get("label_values")
        if values is not None:
            if not isinstance(values, dict) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values.values()):
                raise DataError(f"{path}: interactions.label_values must map raw label values to numbers in [0, 1], "
                                f"got {values!r}")
            if section.get("label_threshold") is not None:
                raise DataError(f"{path}: interactions: set label_threshold or label_values, not both")
        fields = ITEM_FIELDS if table == "items" else INTERACTION_FIELDS
        cols = section.get("columns") or {}
        if not isinstance(cols, dict):
            raise DataError(f"{path}: {table}.columns must map contract fields to column names")
        _check_keys(cols, set(fields), f"{path}: {table}.columns")
        for field, col in cols.items():
            ok = isinstance(col, str) or (table == "items" and field == "text" and isinstance(col, list)
                                          and col and all(isinstance(c, str) for c in col))
            if not ok:
                raise DataError(f"{path}: {table}.columns.{field} must be a column name"
                                + (" (or, for text, a list of names)" if field == "text" else "") + f", got {col!r}")
        if section.get("path") is not None:
            section["path"] = str((path.parent / section["path"]).resolve())
        raw[table] = section
    if raw.get("image_root") is not None:
        raw["image_root"] = str((path.parent / raw["image_root"]).resolve())
    return raw


def _check_keys(obj: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def apply_overrides(mapping: dict, overrides) -> dict:
    """Apply `--map KEY=VALUE` overrides (table.field=column, interactions.ts_format=..., image_root=..., ids=...)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in mapping.items()}
    for table in TABLE_KEYS:
        out.setdefault(table, {})
        out[table]["columns"] = dict(out[table].get("columns") or {})
    for item in overrides:
        if "=" not in item:
            raise DataError(f"--map {item!r}: expected KEY=VALUE, e.g. items.item_id=sku")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in ("image_root", "ids"):
            out[key] = value
            continue
        table, _, field = key.partition(".")
        if table not in TABLE_KEYS:
            raise DataError(f"--map {item!r}: key must start with items. or interactions. (or be image_root / ids)")
        fields = ITEM_FIELDS if table == "items" else INTERACTION_FIELDS
        if field in fields:
            out[table]["columns"][field] = ([v.strip() for v in value.split(",") if v.strip()]
                                            if table == "items" and field == "text" and "," in value else value)
        elif field in ("ts_format",) and table == "interactions":
            out[table][field] = value
        elif field == "label_threshold" and table == "interactions":
            try:
                out[table][field] = float(value)
            except ValueError:
                raise DataError(f"--map {item!r}: label_threshold must be a number") from None
        else:
            raise DataError(f"--map {item!r}: unknown field {field!r} for {table}; allowed: "
                            f"{list(fields) + (['ts_format', 'label_threshold'] if table == 'interactions' else [])}")
    if out.get("ids", "auto") not in ("auto", "int", "string"):
        raise DataError(f"mapping: ids must be auto, int or string, got {out['ids']!r}")
    return out


def resolve_generic(spec: DataSpec) -> dict:
    """The generic source's settings from the spec and mapping, before anything is read: table paths, column
    maps, attributes, and which columns each table needs (required) or reads when present (optional)."""
    mapping = apply_overrides(read_mapping(spec.mapping), spec.column_map)
    items_path = spec.items or _path_from(mapping, "items", spec)
    inter_path = spec.interactions or _path_from(mapping, "interactions", spec)
    if spec.data is not None:
        items_path = items_path if items_path.is_absolute() else spec.data / items_path
        inter_path = inter_path if inter_path.is_absolute() else spec.data / inter_path
    icols = {f: mapping["items"]["columns"].get(f, f) for f in ITEM_FIELDS}
    ecols = {f: mapping["interactions"]["columns"].get(f, f) for f in INTERACTION_FIELDS}
    item_attrs = list(mapping["items"].get("attributes") or [])
    inter_attrs = list(mapping["interactions"].get("attributes") or [])
    text_cols = icols["text"] if isinstance(icols["text"], list) else [icols["text"]]
    # Columns the mapping names are required; contract-named defaults are read when present.
    explicit = mapping["items"]["columns"]
    content = {"title": [icols["title"]], "text": text_cols, "image_uri": [icols["image_uri"]]}
    required = [c for f, cols in content.items() if f in explicit for c in cols]
    optional = [c for f, cols in content.items() if f not in explicit for c in cols]
    needed = [ecols["user_id"], ecols["item_id"], ecols["ts"]]
    if "label" in mapping["interactions"]["columns"]:
        needed.append(ecols["label"])
    return {"mapping": mapping, "items_path": Path(items_path), "interactions_path": Path(inter_path),
            "icols": icols, "ecols": ecols, "text_cols": text_cols, "item_attrs": item_attrs,
            "inter_attrs": inter_attrs, "items_columns": [icols["item_id"]] + required + item_attrs,
            "items_optional": optional, "inter_columns": needed + inter_attrs, "inter_optional": [ecols["label"]],
            "ids_mode": mapping.get("ids", "auto")}


def check_text_columns(r: dict, columns) -> None:
    """An item catalog needs its title or text column (DataError naming what is present)."""
    if r["icols"]["title"] not in columns and not any(c in columns for c in r["text_cols"]):
        raise DataError(f"{r['items_path']}: missing column(s) for item text: need {r['icols']['title']!r} (title) "
                        f"or {r['text_cols'][0]!r} (text); columns present: {list(columns)}")


def default_image_root(r: dict, has_uri: bool) -> Optional[Path]:
    """The mapping's image root, else the items file's folder when any item names an image."""
    image_root = r["mapping"].get("image_root")
    items_path = r["items_path"]
    default_root = items_path if items_path.is_dir() else items_path.parent
    return Path(image_root) if image_root else (default_root if has_uri else None)


def id_kinds(r: dict, items_raw: pd.DataFrame, inter_raw: pd.DataFrame) -> tuple[bool, bool]:
    """(item ids are strings, user ids are strings) of (a block of) the raw tables (see `_ids_are_strings`); the
    catalog decides the item id type."""
    return (_ids_are_strings([(items_raw, r["icols"]["item_id"])], r["ids_mode"]) if items_raw is not None else False,
            _ids_are_strings([(inter_raw, r["ecols"]["user_id"])], r["ids_mode"]) if inter_raw is not None else False)


def parse_items(r: dict, items_raw: pd.DataFrame, id_map: Optional[pd.DataFrame]) -> dict:
    """The loader's value parsing of a block of the raw catalog (the whole table, or one chunk on a worker).

    Returns:
        {"frame": items (item_id Int64, title, text, image_uri, attributes), "missing": (N,) bool empty id,
         "unparsed": [Unparsed] in precedence order, "raw_ids": (N,) raw item id text}
    """
    icols = r["icols"]
    item_ids, _, item_unparsed = _ids(items_raw, icols["item_id"], id_map, "item_id")
    missing = item_ids.isna().to_numpy() & ~item_unparsed.mask
    items = pd.DataFrame({"item_id": item_ids, "title": _text_col(items_raw, icols["title"]),
                          "text": _joined_text(items_raw, r["text_cols"]),
                          "image_uri": _text_col(items_raw, icols["image_uri"])})
    _carry_attributes(items, items_raw, r["item_attrs"], r["items_path"])
    return {"frame": items, "missing": missing, "unparsed": [item_unparsed],
            "raw_ids": items_raw[icols["item_id"]].astype("string").to_numpy()}


def parse_interactions(r: dict, inter_raw: pd.DataFrame, id_maps: dict, ms: Optional[bool] = None,
                       clock: Optional[EventClock] = None) -> dict:
    """The loader's value parsing of a block of the raw log: one reason per row, in order missing_value, bad_id,
    bad_timestamp (unparsed, then later than the clock), bad_label (unparsed), bad_label (out of range /
    unmapped), unknown_item (unmapped string id).

    Args:
        ms: auto timestamps: numbers are milliseconds (None: decide from this block's median, as the loader
            does over the whole table; workers pass the whole table's decision, `ms_decision`).
        clock: timestamps later than ``clock.cutoff`` are bad_timestamp rejects ("in the future"), counted with
            the values that do not parse against --max-bad-fraction (None: no clock check here).
    Returns:
        {"user_id", "item_id", "ts", "label": parsed columns, "missing", "bad_label", "unknown": (N,) bool,
         "unparsed": [Unparsed], "ids": reject id columns}
    """
    ecols, section = r["ecols"], r["mapping"]["interactions"]
    users, _, user_unparsed = _ids(inter_raw, ecols["user_id"], id_maps.get("user_id"), "user_id")
    inter_items, unmapped, item_unparsed = _ids(inter_raw, ecols["item_id"], id_maps.get("item_id"), "item_id",
                                                keep_unmapped=True, strict=r["ids_mode"] == "int")
    ts, ts_unparsed = unix_seconds_column(inter_raw, ecols["ts"], fmt=section.get("ts_format", "auto"), ms=ms)
    future = future_cells(inter_raw, ecols["ts"], ts, clock)
    label, label_bad, label_unparsed = _labels(inter_raw, ecols["label"], section)
    missing = ((users.isna().to_numpy() & ~user_unparsed.mask) | (ts.isna().to_numpy() & ~ts_unparsed.mask)
               | (inter_items.isna().to_numpy() & ~unmapped & ~item_unparsed.mask))
    if ecols["label"] in inter_raw:  # unmapped label values are bad_label
        missing = missing | (label.isna().to_numpy() & ~label_bad & ~label_unparsed.mask)
    ids = {"item_id": inter_raw[ecols["item_id"]].astype("string").to_numpy(),
           "user_id": inter_raw[ecols["user_id"]].astype("string").to_numpy(),
           "item_dense_id": _dense(inter_items), "user_dense_id": _dense(users)}
    return {"user_id": users, "item_id": inter_items, "ts": ts, "label": label, "missing": missing,
            "bad_label": label_bad, "unknown": unmapped,
            "unparsed": [user_unparsed, item_unparsed, ts_unparsed, future, label_unparsed], "ids": ids}


def future_cells(frame: pd.DataFrame, column: str, ts: pd.Series, clock: Optional[EventClock]) -> Unparsed:
    """The timestamps of a block later than the clock's cutoff, as bad_timestamp cells (`EventClock.in_future`)."""
    mask = np.zeros(len(frame), bool) if clock is None else \
        clock.in_future(ts.astype("Int64").fillna(clock.cutoff).to_numpy(dtype="int64"))  # empty: not future
    return Unparsed(frame, column, "ts", mask, clock.what() if clock is not None else "", "bad_timestamp")


def dense_map(raw: pd.Series, known: Optional[pd.DataFrame]) -> pd.DataFrame:
    """raw str ids (as read) -> the dense id map the loader builds (`_dense_map` over the stripped, non-empty
    ids); workers call it on the distinct ids gathered from the whole table."""
    return _dense_map(_raw_ids(raw), known)


def load_generic(spec: DataSpec) -> Dataset:
    """Load a user's item catalog + interaction log (see the module docstring for the mapping)."""
    r = resolve_generic(spec)
    items_path, inter_path, icols, ecols = r["items_path"], r["interactions_path"], r["icols"], r["ecols"]
    rejects = RejectLog()
    items_raw = _read(items_path, "items", r["items_columns"], r["items_optional"])
    check_text_columns(r, items_raw.columns)
    inter_raw = _read(inter_path, "interactions", r["inter_columns"], r["inter_optional"])
    for path, table, frame in ((items_path, "items", items_raw), (inter_path, "interactions", inter_raw)):
        if len(frame) == 0:
            raise empty_table_error(path, table, len(frame.attrs.get("parts", [1])))

    known_maps = load_id_maps(spec.id_map_dir) if spec.id_map_dir is not None else {}
    # The catalog decides the item id type: a stray string id in the log of an integer catalog is an unknown item
    # (rejected), not a reason to renumber the catalog.
    item_is_str, user_is_str = id_kinds(r, items_raw, inter_raw)
    id_maps = {}
    if item_is_str:
        id_maps["item_id"] = dense_map(items_raw[icols["item_id"]], known_maps.get("item_id"))
    if user_is_str:
        id_maps["user_id"] = dense_map(inter_raw[ecols["user_id"]], known_maps.get("user_id"))

    # Items. A value that does not parse is a per-record reject, up to spec.max_bad_fraction of the rows.
    item_src, item_rows = row_sources(items_raw)
    parsed = parse_items(r, items_raw, id_maps.get("item_id"))
    missing = parsed["missing"]
    rejects.add(item_src[missing], item_rows[missing], "missing_value", "dropped", detail="empty item id")
    unparsed = reject_unparsed(rejects, parsed["unparsed"], src=item_src, rows=item_rows,
                               max_bad_fraction=spec.max_bad_fraction, what=f"{items_path} (items)", skip=missing,
                               ids={"item_id": parsed["raw_ids"]})
    drop = missing | unparsed
    items = parsed["frame"].assign(row=item_rows, _source=item_src)
    items = items.loc[~drop]
    items["item_id"] = items["item_id"].astype("int64")

    # Interactions: one reason per row, in order missing_value, bad_id, bad_timestamp, bad_label, unknown_item.
    clock = spec.clock()  # one clock for the parse and finalize
    px = parse_interactions(r, inter_raw, id_maps, clock=clock)
    missing, ids = px["missing"], px["ids"]

    def add(mask, reason, detail):
        rejects.add(src[mask], rows[mask], reason, "dropped", detail=detail, **{k: v[mask] for k, v in ids.items()})

    src, rows = row_sources(inter_raw)
    add(missing, "missing_value", "empty user id, item id, timestamp or label")
    unparsed = reject_unparsed(rejects, px["unparsed"], src=src, rows=rows, max_bad_fraction=spec.max_bad_fraction,
                               what=f"{inter_path} (interactions)", skip=missing, ids=ids)
    bad_label = px["bad_label"] & ~missing & ~unparsed
    add(bad_label, "bad_label", BAD_LABEL_DETAIL)
    unknown = px["unknown"] & ~missing & ~unparsed & ~bad_label
    add(unknown, "unknown_item", "item id not in the item catalog")
    keep = ~(missing | unparsed | bad_label | unknown)
    interactions = pd.DataFrame({"user_id": px["user_id"][keep].astype("int64").to_numpy(),
                                 "item_id": px["item_id"][keep].astype("int64").to_numpy(),
                                 "ts": px["ts"][keep].astype("int64").to_numpy(),
                                 "label": px["label"][keep].to_numpy().astype("float32"), "row": rows[keep],
                                 "_source": src[keep]})
    _carry_attributes(interactions, inter_raw.loc[keep], r["inter_attrs"], inter_path)

    image_root = default_image_root(r, bool(items["image_uri"].notna().any()))
    return finalize(items, interactions, spec=spec, name=f"generic:{items_path.name}", image_root=image_root,
                    rejects=rejects, items_source=items_path.name, interactions_source=inter_path.name,
                    id_maps=id_maps, clock=clock)


BAD_LABEL_DETAIL = "label outside [0, 1], or not in interactions.label_values"


def _read(path: Path, table: str, columns: list, optional: list) -> pd.DataFrame:
    try:
        return read_table(path, columns, optional=optional)
    except DataError as exc:
        if "missing column" not in str(exc):
            raise
        raise DataError(f"{exc}. Map {table} columns onto the contract with --map {table}.FIELD=COLUMN or a "
                        f"--mapping file (fields: {', '.join(ITEM_FIELDS if table == 'items' else INTERACTION_FIELDS)})"
                        ) from None


def _carry_attributes(out: pd.DataFrame, raw: pd.DataFrame, attrs: list, path: Path) -> None:
    for attr in attrs:
        if attr in out:
            raise DataError(f"{path}: attribute column {attr!r} clashes with a contract column")
        out[attr] = raw[attr].array  # positional, keeps extension dtypes (Int64, string)


def _path_from(mapping: dict, table: str, spec: DataSpec) -> Path:
    path = mapping.get(table, {}).get("path")
    if path is None:
        raise DataError(f"generic dataset: no {table} file (pass --{table} FILE or set {table}.path in the mapping)")
    return Path(path)


def _raw_ids(series: pd.Series) -> pd.Series:
    return series.dropna().astype(str).str.strip().loc[lambda s: s.ne("")]


def _ids_are_strings(columns, mode: str) -> bool:
    """ids: string -> True; int -> False (cells that are not integers are bad_id rejects); auto -> any non-integer."""
    if mode in ("string", "int"):
        return mode == "string"
    for frame, col in columns:
        _, not_int = parse_int64(frame[col])
        if not_int.any():
            return True
    return False


def _dense_map(raw: pd.Series, known: Optional[pd.DataFrame]) -> pd.DataFrame:
    """raw str -> dense int64 id; ids already in `known` keep their number, new ones are appended in sorted order."""
    known = known if known is not None else pd.DataFrame({"raw": pd.Series(dtype=str), "id": pd.Series(dtype="int64")})
    new = np.array(sorted(set(raw.unique()) - set(known["raw"])), dtype=object)
    start = int(known["id"].max()) + 1 if len(known) else 0
    added = pd.DataFrame({"raw": new.astype(str), "id": np.arange(start, start + len(new), dtype="int64")})
    return pd.concat([known, added], ignore_index=True).astype({"raw": str, "id": "int64"})


def _ids(frame: pd.DataFrame, col: str, id_map: Optional[pd.DataFrame], role: str, keep_unmapped: bool = False,
         strict: bool = True):
    """Ids as nullable Int64: integers as they are, or through `id_map` for string ids.

    Returns:
        (ids Int64, unmapped (N,) bool, Unparsed): `unmapped` (with keep_unmapped) marks non-empty ids that have
        no int id (absent from the map, or, for integer ids with strict=False, not an integer): unknown items.
        `Unparsed` marks integer-id cells that are not integers (strict): bad_id rejects.
    """
    none = np.zeros(len(frame), bool)
    if id_map is None:
        if keep_unmapped and not strict:
            out, not_int = parse_int64(frame[col])
            return out, not_int, Unparsed(frame, col, role, none, "", "bad_id")
        out, unparsed = int64_column(frame, col, role=role)
        return out, none, unparsed
    raw = frame[col].astype("string").str.strip()
    lookup = pd.Series(id_map["id"].to_numpy(), index=id_map["raw"].to_numpy())
    out = raw.map(lookup).astype("Int64")
    out[raw.isna() | raw.eq("")] = pd.NA
    unmapped = (out.isna() & raw.notna() & raw.ne("")).to_numpy() if keep_unmapped else none
    return out, unmapped, Unparsed(frame, col, role, none, "", "bad_id")


def _dense(ids: pd.Series) -> np.ndarray:
    """(N,) object: the dense int id, or None where there is none (for the rejects' *_dense_id columns)."""
    return np.array([None if pd.isna(v) else int(v) for v in ids.tolist()], dtype=object)


def _text_col(frame: pd.DataFrame, col: str) -> pd.Series:
    if col not in frame:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    values = [None if pd.isna(v) else str(v) for v in frame[col].tolist()]
    return pd.Series(values, index=frame.index, dtype=object)


def _joined_text(frame: pd.DataFrame, cols: list) -> pd.Series:
    """One text per row from one or more columns: non-empty values joined with ". " (None when all empty)."""
    parts = [_text_col(frame, c) for c in cols]
    joined = []
    for values in zip(*parts):
        kept = [v.strip() for v in values if v is not None and v.strip()]
        joined.append(". ".join(kept) if kept else None)
    return pd.Series(joined, index=frame.index, dtype=object)


def _labels(frame: pd.DataFrame, col: str, section: dict):
    """(label float32 series, out-of-range / unmapped mask, Unparsed: cells that are not numbers).
    No label column -> implicit positives."""
    none = np.zeros(len(frame), bool)
    if col not in frame:
        return (pd.Series(np.ones(len(frame), np.float32), index=frame.index), none,
                Unparsed(frame, col, "label", none, "", "bad_label"))
    values = section.get("label_values")
    if values is not None:
        # Keys are compared as text: YAML may parse `1: 1` as ints while a CSV cell is the string "1".
        lookup = {str(k).strip(): float(v) for k, v in values.items()}
        raw = frame[col].astype("string").str.strip()
        mapped = raw.map(lookup).astype("Float32").astype("float32")
        bad = (raw.notna() & raw.ne("") & mapped.isna()).fillna(False).to_numpy(dtype=bool)
        return mapped, bad, Unparsed(frame, col, "label", none, "", "bad_label")
    value, unparsed = float32_column(frame, col, role="label")
    threshold = section.get("label_threshold")
    if threshold is not None:
        return value.where(value.isna(), (value >= float(threshold)).astype("float32")), none, unparsed
    bad = (value.notna() & ((value < 0) | (value > 1))).to_numpy()
    return value, bad, unparsed
