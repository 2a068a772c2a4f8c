"""Shared record-level validation: every source hands its contract-shaped tables to `finalize`.

Whole-file problems (missing column, unreadable file) are errors raised by the readers. Record-level problems are
not errors: each bad record becomes one row of `rejects` with a reason, and the rest loads. A value that does not
parse (an id that is not an integer, a timestamp `notadate`, a label `abc`) is a record-level problem too, up to
`DataSpec.max_bad_fraction` of a table's rows: past that the file is probably the wrong one, and it is an error.
The rules themselves (what parses, which reason, in which order) are `pipelines.data.rules`, which the Beam job
applies too; this module applies them to whole tables.
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
from pipelines.data.rules import (DUPLICATE_INTERACTION, INTERACTION_RULES, PARSE_REASONS, UNKNOWN_ITEM, Cells,
                                  Verdicts, before_epoch, before_epoch_detail, blank, clean_item_text,
                                  duplicate_item_detail, first_failure, in_future, item_content_verdict,
                                  reject_record, value_detail)
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

    def add_verdicts(self, verdicts: Verdicts, src: np.ndarray, rows: np.ndarray, ids: Optional[dict] = None) -> None:
        """One reject per row a rule of `verdicts` caught, under that rule's reason (`rules.first_failure`).

        Args:
            src, rows: (N,) part file name and row in it, per row of the chunk the verdicts are over.
            ids: per-row arrays for the rejects' id columns (item_id, user_id, item_dense_id, user_dense_id).
        """
        for rule, cells, taken in zip(verdicts.rules, verdicts.cells, verdicts.taken):
            if taken.any():
                idx = np.flatnonzero(taken)
                self.add(np.asarray(src, dtype=object)[taken], np.asarray(rows)[taken], rule.reason, "dropped",
                         detail=[cells.detail(int(i)) for i in idx],
                         **{k: np.asarray(v, dtype=object)[taken] for k, v in (ids or {}).items()})

    def frame(self) -> pd.DataFrame:
        if not self._parts:
            return empty_rejects()
        out = pd.concat(self._parts, ignore_index=True)
        # one shape for every reject (`rules.reject_record`): ids as text, as the source wrote them
        records = [reject_record(**r) for r in out.to_dict("records")]
        return _rejects_frame({c: [r[c] for r in records] for c in REJECT_COLUMNS})


def reject_failures(rejects: RejectLog, verdicts: Verdicts, *, src: np.ndarray, rows: np.ndarray,
                    max_bad_fraction: float, what: str, ids: Optional[dict] = None) -> np.ndarray:
    """Reject the rows of one table that a rule caught (`rules.first_failure`), or fail past the share the user
    allows of rows whose values do not parse (the rules marked ``counted``).

    Args:
        src, rows: (N,) part file name and row in it, per row (`row_sources`).
        max_bad_fraction: the most rows (share of N) a counted rule may reject (`DataSpec.max_bad_fraction`).
        what: the table, for the error ("interactions", "items").
        ids: per-row arrays for the rejects' id columns (item_id, user_id, item_dense_id, user_dense_id).
    Returns:
        (N,) bool, True for the rows rejected here.
    Raises:
        DataError: more than `max_bad_fraction` of the rows do not parse; names each column's file, count and
            first offending rows and values.
    """
    n = verdicts.n
    counted = [(c, t) for r, c, t in zip(verdicts.rules, verdicts.cells, verdicts.taken) if r.counted]
    total = int(verdicts.counted.sum())
    if n and total > max_bad_fraction * n:
        columns = "\n  ".join(c.describe() for c, _ in counted if c.count)
        raise DataError(f"{what}: {total} of {n} rows ({total / n:.2%}) hold a value that does not parse (or a "
                        f"timestamp later than the clock), more "
                        f"than --max-bad-fraction {max_bad_fraction:g} allows (below it such rows are rejected as "
                        f"{' / '.join(PARSE_REASONS)}):\n  {columns}")
    rejects.add_verdicts(verdicts, src, rows, ids)
    if total:
        log.warning("%s: rejected %d of %d rows (%.3f%%) whose values do not parse (%s)", what, total, n,
                    100.0 * total / n, ", ".join(f"{c.label}: {int(t.sum())}" for c, t in counted if t.any()))
    return verdicts.rejected


def empty_rejects() -> pd.DataFrame:
    return _rejects_frame({c: [] for c in REJECT_COLUMNS})


_REJECT_DTYPES = {"row": "int64", "item_dense_id": "Int64", "user_dense_id": "Int64"}


def _rejects_frame(columns: dict) -> pd.DataFrame:
    """The rejects table from REJECT_COLUMNS lists: text columns hold str or None (object dtype, never the string
    dtype's NaN: consumers test `is None`), dense ids are nullable Int64."""
    return pd.DataFrame({c: pd.Series(columns[c], dtype=_REJECT_DTYPES.get(c, object)) for c in REJECT_COLUMNS})


def _content_verdicts(items: pd.DataFrame, image_root: Optional[Path], spec: DataSpec, check_images: bool,
                      desc: str) -> list:
    """`rules.item_content_verdict` of every item, after checking its image at ``spec.validate_images``."""
    has_text = ~(blank(items["title"]) & blank(items["text"]))
    has_image = items["image_uri"].notna().to_numpy()
    errors = [None] * len(items)
    if check_images:
        todo = np.flatnonzero(has_image)
        for k in tqdm(todo, total=len(todo), desc=desc, disable=None, leave=False, mininterval=1.0):
            try:
                check_image(items["image_uri"].iloc[k], image_root, spec.validate_images)
            except ImageError as exc:
                errors[k] = exc
    return [item_content_verdict(bool(t), bool(i), e, spec.require_image)
            for t, i, e in zip(has_text, has_image, errors)]


def _reject_by_clock(interactions: pd.DataFrame, clock: EventClock, max_bad_fraction: float, what: str,
                     rejects: RejectLog, ids: dict) -> pd.DataFrame:
    """The typed timestamp rules (`rules.INTERACTION_RULES`): times before 1970 (sentinels) and later than the
    clock are bad_timestamp rejects; DataError when the future ones are more than ``max_bad_fraction`` of the
    events left (a wrong ``--now``, or a log in the wrong unit), naming the first rows."""
    ts = interactions["ts"].reset_index(drop=True)
    checks = {"before_epoch": Cells(before_epoch(ts), lambda i: before_epoch_detail(ts.iloc[i])),
              "future": Cells(in_future(ts, clock), lambda i: value_detail("ts", "ts", int(ts.iloc[i]), clock.what()))}
    verdicts = first_failure(INTERACTION_RULES, checks, len(ts))
    future = verdicts.counted
    n = int(len(ts) - (verdicts.rejected & ~future).sum())  # the events left once the sentinels are out
    if future.sum() > max_bad_fraction * n:
        first = "; ".join(f"{src} row {row}: ts {t}" for src, row, t in
                          interactions.loc[future, ["_source", "row", "ts"]].head(5).itertuples(index=False))
        raise DataError(f"{what}: {int(future.sum())} of {n} interactions ({future.sum() / n:.2%}) have a "
                        f"timestamp that {clock.what()}, more than --max-bad-fraction {max_bad_fraction:g} allows "
                        f"(check --now and the timestamp unit); first: {first}")
    rejects.add_verdicts(verdicts, interactions["_source"].to_numpy(), interactions["row"].to_numpy(), ids)
    return interactions.loc[~verdicts.rejected]


def finalize(items: pd.DataFrame, interactions: pd.DataFrame, *, spec: DataSpec, name: str,
             image_root: Optional[Path], rejects: RejectLog, items_source: str, interactions_source: str,
             id_maps: Optional[dict] = None, check_images: bool = True,
             clock: Optional[EventClock] = None) -> Dataset:
    """Apply the record-level checks shared by all sources (`pipelines.data.rules`) and build the `Dataset`.

    The steps, in order: the item rules (`_finalize_items`: duplicate ids, image and text), the typed timestamp
    rules (`_reject_by_clock`), exact repeats (`_reject_repeats`), events on items not in the accepted catalog
    (`_reject_unknown_items`), then the contract tables (`_contract_dataset`).

    Args:
        items: item_id int64, title, text, image_uri (+ attributes); `row` column = source row number if present.
        interactions: user_id int64, item_id int64, ts int64, label float32; optional `row` column.
        items_source, interactions_source: names used in the rejects' `source` column (file names).
        check_images: validate each image file at `spec.validate_images` (sources that generated the images
            themselves may skip it).
        clock: events later than ``clock.cutoff`` are bad_timestamp rejects (default ``spec.clock()``).
    """
    items = _with_sources(items, items_source)
    interactions = _with_sources(interactions, interactions_source)
    ids = _RejectIds(id_maps)
    filtered: dict = {}
    items, accepted_ids = _finalize_items(items, spec, image_root, check_images, name, rejects, ids, filtered)
    interactions = _reject_by_clock(interactions, clock or spec.clock(), spec.max_bad_fraction, name, rejects,
                                    ids(interactions, "item_id", "user_id"))
    interactions = _reject_repeats(interactions, rejects, ids)
    interactions = _reject_unknown_items(interactions, items["item_id"], accepted_ids, spec.require_image, rejects,
                                         ids, filtered)
    return _contract_dataset(items, interactions, rejects, image_root=image_root, id_maps=id_maps,
                             filtered=filtered, name=name, spec=spec)


class _RejectIds:
    """The rejects' id columns of dense ids: the ids as the source wrote them (raw strings for string-id sources,
    through the id maps) beside the dense ids."""

    def __init__(self, id_maps: Optional[dict]):
        self.to_raw = {f: pd.Series(m["raw"].to_numpy(), index=m["id"].to_numpy()) for f, m in (id_maps or {}).items()}

    def __call__(self, frame: pd.DataFrame, *fields: str) -> dict:
        """{field: raw ids, field's dense column: the dense ids} of the rows of `frame`."""
        out = {}
        for field in fields:
            dense = frame[field]
            out[field] = dense.map(self.to_raw[field]).to_numpy() if field in self.to_raw else dense.to_numpy()
            out[field.replace("_id", "_dense_id")] = dense.to_numpy()
        return out


def _reject_repeats(interactions: pd.DataFrame, rejects: RejectLog, ids: _RejectIds) -> pd.DataFrame:
    """Exact repeats of an event (same user, item, second and label) are double logging, not two events: the
    first row is kept, the others are duplicate_interaction rejects."""
    dup = interactions.duplicated(subset=["user_id", "item_id", "ts", "label"], keep="first")
    if dup.any():
        bad = interactions.loc[dup]
        rejects.add(bad["_source"], bad["row"], "duplicate_interaction", "dropped", **ids(bad, "item_id", "user_id"),
                    detail=DUPLICATE_INTERACTION)
    return interactions.loc[~dup]


def _reject_unknown_items(interactions: pd.DataFrame, kept_ids: pd.Series, accepted_ids: pd.Series,
                          require_image: bool, rejects: RejectLog, ids: _RejectIds, filtered: dict) -> pd.DataFrame:
    """Events on items not in the accepted catalog are unknown_item rejects. Under --require-image, events on the
    items the filter removed (`accepted_ids` less `kept_ids`) are not bad records: they are counted in
    ``filtered["interactions_on_items_without_image"]`` instead."""
    known = interactions["item_id"].isin(kept_ids)
    unknown = ~known
    if require_image:
        filtered_items = interactions["item_id"].isin(accepted_ids) & ~known
        unknown &= ~filtered_items
        filtered["interactions_on_items_without_image"] = int(filtered_items.sum())
    if unknown.any():
        bad = interactions.loc[unknown]
        rejects.add(bad["_source"], bad["row"], "unknown_item", "dropped", **ids(bad, "item_id", "user_id"),
                    detail=UNKNOWN_ITEM)
    return interactions.loc[known]


def _contract_dataset(items: pd.DataFrame, interactions: pd.DataFrame, rejects: RejectLog, *, name: str,
                      **fields) -> Dataset:
    """The `Dataset` in contract form: items sorted by id, interactions by (ts, user, item, source row), typed;
    the rejects table and its counts by reason. ``fields``: the rest of the Dataset's fields."""
    items = items.drop(columns=["row", "_source"]).sort_values("item_id", kind="stable").reset_index(drop=True)
    items["item_id"] = items["item_id"].astype("int64")
    interactions = (interactions.sort_values(["ts", "user_id", "item_id", "row"], kind="stable")
                    .drop(columns=["row", "_source"]).reset_index(drop=True))
    interactions = interactions.astype({"user_id": "int64", "item_id": "int64", "ts": "int64", "label": "float32"})
    frame = rejects.frame()
    counts = {r: int(c) for r, c in frame["reason"].value_counts().sort_index().items()}
    if counts:
        log.info("%s: rejected %d records: %s", name, len(frame), counts)
    fields["id_maps"] = fields.get("id_maps") or {}
    return Dataset(items=items, interactions=interactions, rejects=frame, reject_counts=counts, name=name, **fields)


def _with_sources(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """A copy with `row` (source row number) and `_source` (part file; single files use the given name)."""
    frame = frame.copy()
    if "row" not in frame:
        frame["row"] = np.arange(len(frame), dtype="int64")
    if "_source" not in frame:
        frame["_source"] = source
    return frame


def _finalize_items(items: pd.DataFrame, spec: DataSpec, image_root: Optional[Path], check_images: bool, name: str,
                    rejects: RejectLog, ids: _RejectIds, filtered: dict) -> tuple[pd.DataFrame, pd.Series]:
    """The item rules: duplicate ids (`_reject_duplicate_items`), then each item's content
    (`rules.item_content_verdict`: image loss, empty text, --require-image). Returns (the items left, in contract
    form, and the ids accepted before the --require-image filter)."""
    items = clean_item_text(_reject_duplicate_items(items, rejects, ids))
    verdicts = _content_verdicts(items, image_root, spec, check_images, desc=f"{name}: checking images")
    found = pd.DataFrame({"reason": [v.reason for v in verdicts], "action": [v.action for v in verdicts],
                          "detail": [v.detail for v in verdicts]}, index=items.index)
    found = found[[v.reason is not None and not v.filtered for v in verdicts]]
    # one reject per item: image reasons first, then empty_text (kept image-only before dropped)
    for (_, reason, action), group in found.groupby([found["reason"].eq("empty_text"), "reason", "action"],
                                                    sort=True):
        bad = items.loc[group.index]
        rejects.add(bad["_source"], bad["row"], reason, action, **ids(bad, "item_id"), detail=group["detail"])
    items.loc[[not v.image_ok for v in verdicts], "image_uri"] = None
    accepted_ids = items.loc[[v.kept or v.filtered for v in verdicts], "item_id"]
    if spec.require_image:
        filtered["items_without_image"] = int(sum(v.filtered for v in verdicts))
    return items.loc[[v.kept for v in verdicts]], accepted_ids


def _reject_duplicate_items(items: pd.DataFrame, rejects: RejectLog, ids: _RejectIds) -> pd.DataFrame:
    """The first row of an item id is kept; later rows are duplicate_item rejects naming that first row."""
    dup = items["item_id"].duplicated(keep="first")
    if not dup.any():
        return items
    first = items.groupby("item_id", sort=False)[["_source", "row"]].transform("first").loc[dup]
    bad = items.loc[dup]
    dup_ids = ids(bad, "item_id")
    rejects.add(bad["_source"], bad["row"], "duplicate_item", "dropped", **dup_ids,
                detail=[duplicate_item_detail(i, s, r) for i, s, r in zip(dup_ids["item_id"], first["_source"],
                                                                           first["row"])])
    return items.loc[~dup]
