"""Shared record-level validation: every source hands its contract-shaped tables to `finalize`.

Whole-file problems (missing column, unreadable file) are errors raised by the readers. Record-level problems are
not errors: each bad record becomes one row of `rejects` with a reason, and the rest loads. A value that does not
parse (an id that is not an integer, a timestamp `notadate`, a label `abc`) is a record-level problem too, up to
`DataSpec.max_bad_fraction` of a table's rows: past that the file is probably the wrong one, and it is an error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from feature_store.clock import EventClock
from pipelines.data.images import ImageError, check_image
from pipelines.data.io import DataError
from pipelines.data.schema import REJECT_COLUMNS, REJECT_REASONS, DataSpec, Dataset

log = logging.getLogger(__name__)


class RejectLog:
    """Collects rejected records; `frame()` gives the rejects table (REJECT_COLUMNS)."""

    def __init__(self):
        self._parts: list[pd.DataFrame] = []

    def add(self, source: str, rows, reason: str, action: str, item_id=None, user_id=None, detail=None,
            item_dense_id=None, user_dense_id=None) -> None:
        """Record rejects in bulk. `source`, the ids and `detail` are scalars or arrays as long as `rows`.

        `item_id` / `user_id` are the ids as the source wrote them; `item_dense_id` / `user_dense_id` the int64 ids
        the loader gave them, where it did."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to schema.REJECT_REASONS")
        rows = np.atleast_1d(np.asarray(rows))
        n = len(rows)
        if n == 0:
            return
        source = np.atleast_1d(np.asarray(source, dtype=object))

        def col(value):
            if value is None:
                return [None] * n
            arr = np.atleast_1d(np.asarray(value, dtype=object))
            return list(arr) if len(arr) == n else [arr[0]] * n

        self._parts.append(pd.DataFrame({
            "source": list(source) if len(source) == n else [source[0]] * n, "row": rows.astype("int64"),
            "item_id": col(item_id),
            "user_id": col(user_id), "item_dense_id": col(item_dense_id), "user_dense_id": col(user_dense_id),
            "reason": [reason] * n, "detail": col(detail), "action": [action] * n,
        }))

    def frame(self) -> pd.DataFrame:
        if not self._parts:
            return empty_rejects()
        out = pd.concat(self._parts, ignore_index=True)
        # Ids are kept as strings: a reject may carry a raw id that never got a dense int id.
        for c in ("item_id", "user_id", "detail"):
            out[c] = pd.Series([None if _is_missing(v) else str(v) for v in out[c].tolist()], dtype=object)
        for c in ("item_dense_id", "user_dense_id"):
            out[c] = pd.array([None if _is_missing(v) else int(v) for v in out[c].tolist()], dtype="Int64")
        return out[list(REJECT_COLUMNS)]


PARSE_REASONS = ("bad_id", "bad_timestamp", "bad_label")  # the reasons of values that do not parse


def reject_unparsed(rejects: RejectLog, unparsed: list, *, src: np.ndarray, rows: np.ndarray,
                    max_bad_fraction: float, what: str, skip: Optional[np.ndarray] = None,
                    ids: Optional[dict] = None) -> np.ndarray:
    """Reject the rows of one table that hold a value that does not parse, or fail past the share the user allows.

    A row gets one reason: that of the first column in `unparsed` (ids, then timestamp, then label) whose cell
    does not parse; the detail names the column and the value. Rows in `skip` (already rejected, e.g. for a
    missing value) are neither rejected again nor counted.

    Args:
        unparsed: `pipelines.data.io.Unparsed` of each parsed column, in precedence order.
        src, rows: (N,) part file name and row in it, per row (`row_sources`).
        max_bad_fraction: the most rows (share of N) that may be rejected here (`DataSpec.max_bad_fraction`).
        what: the table, for the error ("interactions", "items").
        ids: per-row arrays for the rejects' id columns (item_id, user_id, item_dense_id, user_dense_id).
    Returns:
        (N,) bool, True for the rows rejected here.
    Raises:
        DataError: more than `max_bad_fraction` of the rows do not parse; names each column's file, count and
            first offending rows and values.
    """
    n = len(src)
    taken = np.zeros(n, bool) if skip is None else np.asarray(skip, bool).copy()
    masks = []
    for u in unparsed:
        mask = u.mask & ~taken
        taken |= mask
        masks.append(mask)
    bad = np.logical_or.reduce(masks) if masks else np.zeros(n, bool)
    total = int(bad.sum())
    if n and total > max_bad_fraction * n:
        columns = "\n  ".join(u.describe() for u in unparsed if u.count)
        raise DataError(f"{what}: {total} of {n} rows ({total / n:.2%}) hold a value that does not parse (or a "
                        f"timestamp later than the clock), more "
                        f"than --max-bad-fraction {max_bad_fraction:g} allows (below it such rows are rejected as "
                        f"{' / '.join(PARSE_REASONS)}):\n  {columns}")
    for u, mask in zip(unparsed, masks):
        if mask.any():
            idx = np.flatnonzero(mask)
            rejects.add(src[mask], rows[mask], u.reason, "dropped", detail=[u.detail(int(i)) for i in idx],
                        **{k: np.asarray(v, dtype=object)[mask] for k, v in (ids or {}).items()})
    if total:
        log.warning("%s: rejected %d of %d rows (%.3f%%) whose values do not parse (%s)", what, total, n,
                    100.0 * total / n, ", ".join(f"{u.label}: {int(m.sum())}" for u, m in zip(unparsed, masks)
                                                 if m.any()))
    return bad


def _is_missing(value) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes: never missing as a whole
        return False


def empty_rejects() -> pd.DataFrame:
    dtypes = {"row": "int64", "item_dense_id": "Int64", "user_dense_id": "Int64"}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in REJECT_COLUMNS})


def _blank(series: pd.Series) -> pd.Series:
    return series.isna() | series.astype("string").str.strip().fillna("").eq("")


def _bad_images(items: pd.DataFrame, image_root: Optional[Path], level: str, desc: str) -> pd.DataFrame:
    """Check every item image; one row per unusable one (index = the item's index in `items`).

    Returns:
        DataFrame(source, row, item_id, reason, detail) indexed like `items`.
    """
    has_uri = items["image_uri"].notna()
    bad, index = [], []
    checks = zip(items.index[has_uri], items.loc[has_uri, "_source"], items.loc[has_uri, "row"],
                 items.loc[has_uri, "item_id"], items.loc[has_uri, "image_uri"])
    for idx, source, row_no, item_id, uri in tqdm(checks, total=int(has_uri.sum()), desc=desc, disable=None,
                                                  leave=False, mininterval=1.0):
        try:
            check_image(uri, image_root, level)
        except ImageError as exc:
            index.append(idx)
            bad.append((source, row_no, item_id, exc.reason, str(exc)))
    return pd.DataFrame(bad, columns=["source", "row", "item_id", "reason", "detail"], index=index)


def image_loss_action(dropped: bool, require_image: bool, has_text: bool) -> tuple[str, str]:
    """(action, detail suffix) of an item that loses its image: kept text-only, or dropped with why (the loader
    and the job's ValidateItems say the same)."""
    if not dropped:
        return "kept_text_only", ""
    return "dropped", ("; --require-image drops it" if require_image else "") + \
        ("" if has_text else "; no title and no text either")


def _reject_bad_images(items: pd.DataFrame, image_root: Optional[Path], spec: DataSpec, name: str,
                       rejects: RejectLog, raw) -> pd.DataFrame:
    """Check every image at ``spec.validate_images``; one reject per item that loses its image (kept text-only,
    or dropped when it has no text or under --require-image). Returns the items left, bad uris set to None."""
    no_text = _blank(items["title"]) & _blank(items["text"])
    bad = _bad_images(items, image_root, spec.validate_images, desc=f"{name}: checking images")
    text_less = no_text.loc[bad.index].to_numpy()
    dropped = text_less | bool(spec.require_image)
    why = [image_loss_action(d, spec.require_image, not t) for d, t in zip(dropped, text_less)]
    bad = bad.assign(action=[w[0] for w in why],
                     detail=bad["detail"] + pd.Series([w[1] for w in why], index=bad.index))
    for (reason, action), group in bad.groupby(["reason", "action"], sort=True):
        rejects.add(group["source"], group["row"], reason, action, **raw("item_id", group["item_id"]),
                    detail=group["detail"])
    items.loc[bad.index, "image_uri"] = None
    return items.drop(index=bad.index[dropped])


def _reject_future(interactions: pd.DataFrame, clock: EventClock, max_bad_fraction: float, what: str,
                   rejects: RejectLog, raw) -> pd.DataFrame:
    """Reject the events later than the clock as bad_timestamp; DataError when they are more than
    ``max_bad_fraction`` of the events (a wrong ``--now``, or a log in the wrong unit), naming the first rows."""
    future = clock.in_future(interactions["ts"].to_numpy(dtype="int64"))
    if not future.any():
        return interactions
    bad, n = interactions.loc[future], len(interactions)
    if len(bad) > max_bad_fraction * n:
        first = "; ".join(f"{src} row {row}: ts {ts}" for src, row, ts in
                          bad[["_source", "row", "ts"]].head(5).itertuples(index=False))
        raise DataError(f"{what}: {len(bad)} of {n} interactions ({len(bad) / n:.2%}) have a timestamp that "
                        f"{clock.what()}, more than --max-bad-fraction {max_bad_fraction:g} allows (check --now "
                        f"and the timestamp unit); first: {first}")
    rejects.add(bad["_source"], bad["row"], "bad_timestamp", "dropped", **raw("item_id", bad["item_id"]),
                **raw("user_id", bad["user_id"]), detail=[clock.detail(t) for t in bad["ts"]])
    return interactions.loc[~future]


def finalize(items: pd.DataFrame, interactions: pd.DataFrame, *, spec: DataSpec, name: str,
             image_root: Optional[Path], rejects: RejectLog, items_source: str, interactions_source: str,
             id_maps: Optional[dict] = None, check_images: bool = True,
             clock: Optional[EventClock] = None) -> Dataset:
    """Apply the record-level checks shared by all sources and build the `Dataset`.

    Args:
        items: item_id int64, title, text, image_uri (+ attributes); `row` column = source row number if present.
        interactions: user_id int64, item_id int64, ts int64, label float32; optional `row` column.
        items_source, interactions_source: names used in the rejects' `source` column (file names).
        check_images: validate each image file at `spec.validate_images` (sources that generated the images
            themselves may skip it).
        clock: events later than ``clock.cutoff`` are bad_timestamp rejects (default ``spec.clock()``).
    """
    clock = clock or spec.clock()
    items = items.copy()
    interactions = interactions.copy()
    if "row" not in items:
        items["row"] = np.arange(len(items), dtype="int64")
    if "row" not in interactions:
        interactions["row"] = np.arange(len(interactions), dtype="int64")
    # Partitioned inputs carry the part file of each row in `_source`; single files use the given name.
    if "_source" not in items:
        items["_source"] = items_source
    if "_source" not in interactions:
        interactions["_source"] = interactions_source

    # Rejects show the ids as the source wrote them (raw strings for string-id sources), not dense ids.
    to_raw = {f: pd.Series(m["raw"].to_numpy(), index=m["id"].to_numpy()) for f, m in (id_maps or {}).items()}

    def raw(field: str, ids: pd.Series) -> dict:
        """Reject id columns of dense `ids`: {field: raw ids, field's dense column: the dense ids}."""
        dense = ids.to_numpy()
        raw_ids = ids.map(to_raw[field]).to_numpy() if field in to_raw else dense
        return {field: raw_ids, field.replace("_id", "_dense_id"): dense}

    # Duplicate item ids: keep the first row, reject the rest.
    dup = items["item_id"].duplicated(keep="first")
    if dup.any():
        rejects.add(items.loc[dup, "_source"], items.loc[dup, "row"], "duplicate_item", "dropped",
                    **raw("item_id", items.loc[dup, "item_id"]),
                    detail="item id already defined by an earlier row")
        items = items.loc[~dup]

    # Images: a bad image demotes the item to text-only, with the reason recorded. One reject per item: an item
    # that loses its image and has no text, or under --require-image, is dropped under the image's reason.
    items["image_uri"] = items["image_uri"].where(~_blank(items["image_uri"]), None)
    if check_images:
        items = _reject_bad_images(items, image_root, spec, name, rejects, raw)
    no_text = _blank(items["title"]) & _blank(items["text"])

    # Empty text: an item with neither title nor text is usable only through its image.
    if no_text.any():
        keep = no_text & items["image_uri"].notna()
        drop = no_text & items["image_uri"].isna()
        rejects.add(items.loc[keep, "_source"], items.loc[keep, "row"], "empty_text", "kept_image_only",
                    **raw("item_id", items.loc[keep, "item_id"]), detail="no title and no text")
        rejects.add(items.loc[drop, "_source"], items.loc[drop, "row"], "empty_text", "dropped",
                    **raw("item_id", items.loc[drop, "item_id"]),
                    detail="no title, no text and no usable image")
        items = items.loc[~drop]
    items["title"] = items["title"].fillna("").astype(str)
    items["text"] = items["text"].where(~_blank(items["text"]), None)

    filtered: dict = {}
    accepted_ids = items["item_id"]
    if spec.require_image:
        no_img = items["image_uri"].isna()
        filtered["items_without_image"] = int(no_img.sum())
        items = items.loc[~no_img]

    # Negative unix times are sentinels (-1, "unknown") in logs, never event times.
    early = interactions["ts"] < 0
    if early.any():
        bad = interactions.loc[early]
        rejects.add(bad["_source"], bad["row"], "bad_timestamp", "dropped", **raw("item_id", bad["item_id"]),
                    **raw("user_id", bad["user_id"]), detail="timestamp before 1970-01-01")
        interactions = interactions.loc[~early]

    # Events later than the clock (+ tolerance): counted against max_bad_fraction like values that do not parse
    # (the generic source already rejected them while parsing, `generic.future_cells`).
    interactions = _reject_future(interactions, clock, spec.max_bad_fraction, name, rejects, raw)

    # Exact repeats of an event (same user, item, second and label) are double logging, not two events.
    dup = interactions.duplicated(subset=["user_id", "item_id", "ts", "label"], keep="first")
    if dup.any():
        bad = interactions.loc[dup]
        rejects.add(bad["_source"], bad["row"], "duplicate_interaction", "dropped",
                    **raw("item_id", bad["item_id"]), **raw("user_id", bad["user_id"]),
                    detail="same user, item, timestamp and label as an earlier row")
        interactions = interactions.loc[~dup]

    # Interactions on items not in the accepted catalog.
    known = interactions["item_id"].isin(items["item_id"])
    if spec.require_image:
        # Items removed by the filter are not bad records: count them apart from unknown items.
        filtered_items = interactions["item_id"].isin(accepted_ids) & ~known
        unknown = ~known & ~filtered_items
        filtered["interactions_on_items_without_image"] = int(filtered_items.sum())
    else:
        unknown = ~known
    if unknown.any():
        bad = interactions.loc[unknown]
        rejects.add(bad["_source"], bad["row"], "unknown_item", "dropped", **raw("item_id", bad["item_id"]),
                    **raw("user_id", bad["user_id"]), detail="item id not in the accepted item catalog")
    interactions = interactions.loc[known]

    items = items.drop(columns=["row", "_source"]).sort_values("item_id", kind="stable").reset_index(drop=True)
    items["item_id"] = items["item_id"].astype("int64")
    # Nullable text columns hold str or None (object dtype), never NaN: consumers test `is None`.
    for col in ("text", "image_uri"):
        items[col] = pd.Series([None if _is_missing(v) else str(v) for v in items[col].tolist()], dtype=object)
    interactions = (interactions.sort_values(["ts", "user_id", "item_id", "row"], kind="stable")
                    .drop(columns=["row", "_source"]).reset_index(drop=True))
    interactions = interactions.astype({"user_id": "int64", "item_id": "int64", "ts": "int64", "label": "float32"})
    frame = rejects.frame()
    counts = {r: int(c) for r, c in frame["reason"].value_counts().sort_index().items()}
    if counts:
        log.info("%s: rejected %d records: %s", name, len(frame), counts)
    return Dataset(items=items, interactions=interactions, image_root=image_root, rejects=frame,
                   reject_counts=counts, id_maps=id_maps or {}, filtered=filtered, name=name, spec=spec)

