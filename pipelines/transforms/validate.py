"""Record validation in the job: bad items and interactions go to a dead-letter output, counted by reason.

The loader (`pipelines.data.load_dataset`) already checks what it reads; these steps re-check every record as it
enters the job, in parallel, so a job fed by any source (or by a later snapshot) never lets a bad record through
silently. Image checks use the sources' own `check_image` at the level the job asks for. Reasons are the data
contract's (`pipelines.data.schema.REJECT_REASONS`).
"""
from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Optional

import apache_beam as beam

from pipelines.transforms.common import counter, count, reject, stage_timer

DEAD = "dead_letter"


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


_INT_TEXT = re.compile(r"[+-]?\d+(?:\.0*)?")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def parse_int(value):
    """(int or None, bad): the same rule as the loader's `pipelines.data.io.parse_int64`, for one value.

    Empty (None, NaN, blank text) is (None, False); integers, integral floats and integer text ("12", " 12 ",
    "12.0") parse; anything else ("1.5", "abc", a bool, out of int64 range) is (None, True).
    """
    if _blank(value):
        return None, False
    if isinstance(value, bool):
        return None, True
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            return None, True
        v = int(value)
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        v = int(value.strip().split(".")[0])
    else:
        return None, True
    return (v, False) if _INT64[0] <= v <= _INT64[1] else (None, True)


def parse_float(value):
    """(float or None, bad) for a label: numbers and numeric text ("true" / "false" are 1 / 0, as in the loader).

    Empty is (None, False); NaN is (None, True) (a label computed into NaN is a bad label, not a missing one)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, False
    if isinstance(value, bool):
        return float(value), False
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "false"):
            return float(text == "true"), False
        try:
            value = float(text)
        except ValueError:
            return None, True
    if not isinstance(value, numbers.Real):
        return None, True
    value = float(value)
    return (value, False) if math.isfinite(value) else (None, True)


def _ids(r: dict) -> dict:
    """Reject id fields of a record: raw ids (``_raw_item_id`` / ``_raw_user_id`` when the record carries them,
    else the ids it holds, which are the raw ones for integer-id sources) and the dense int ids where known."""
    return {"item_id": r.get("_raw_item_id", r.get("item_id")), "user_id": r.get("_raw_user_id", r.get("user_id")),
            "item_dense_id": r.get("item_id"), "user_dense_id": r.get("user_id")}


class _SplitDuplicates(beam.DoFn):
    """The first row of an item id (lowest source row) survives; later rows are dead letters."""

    def process(self, keyed):
        item_id, rows = keyed
        rows = sorted(rows, key=lambda r: (r.get("_row") is None, r.get("_row") or 0))
        yield rows[0]
        for r in rows[1:]:
            raw = _ids(r)["item_id"]
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", "items", "duplicate_item", row=r.get("_row"), item_id=raw, item_dense_id=item_id,
                detail=f"item_id {raw} already defined at row {rows[0].get('_row')}"))


class _CheckItem(beam.DoFn):
    def __init__(self, image_root: Optional[str], image_check: str, require_image: bool):
        self.image_root = image_root
        self.image_check = image_check
        self.require_image = require_image

    def setup(self):
        self._rejected = counter("validate_items", "rejected")

    def process(self, item):
        with stage_timer("validate_items"):  # collect first: a yield runs the fused downstream steps
            out = list(self._check(item))
        yield from out

    def _check(self, item):
        from pipelines.data.images import ImageError, check_image

        item = dict(item)
        row, ids = item.get("_row"), _ids(item)
        ids = {"item_id": ids["item_id"], "item_dense_id": ids["item_dense_id"]}
        has_image = not _blank(item.get("image_uri"))
        if has_image:
            try:
                check_image(str(item["image_uri"]), Path(self.image_root) if self.image_root else None,
                            self.image_check)
            except ImageError as exc:
                action = "dropped" if self.require_image else "kept_text_only"
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_items", "items", exc.reason, row=row, **ids, detail=str(exc), action=action))
                if self.require_image:
                    self._rejected.inc()
                    return
                item["image_uri"], has_image = None, False
        elif self.require_image:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", "items", "missing_image", row=row, **ids, detail="no image_uri"))
            return
        if _blank(item.get("title")) and _blank(item.get("text")):
            action = "kept_image_only" if has_image else "dropped"
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", "items", "empty_text", row=row, **ids, detail="no title and no text",
                action=action))
            if not has_image:
                self._rejected.inc()
                return
        yield item


def _check_id(item):
    """An empty item id is a missing_value, one that is not an integer a bad_id (as in the loader)."""
    value, bad = parse_int(item.get("item_id"))
    if value is None:
        raw = item.get("_raw_item_id", item.get("item_id"))
        yield beam.pvalue.TaggedOutput(DEAD, reject(
            "validate_items", "items", "bad_id" if bad else "missing_value", row=item.get("_row"),
            item_id=raw if bad else None, detail=f"item_id {raw!r} is not an integer" if bad else "item_id is empty"))
    else:
        yield {**item, "item_id": value}


class ValidateItems(beam.PTransform):
    """items (dicts in contract form, optional ``_row``) -> {"items": valid items, "dead_letter": rejects}.

    Args:
        image_root: folder relative image uris resolve against (None: uris must be absolute).
        image_check: "exists" | "header" | "decode" (see `pipelines.data.images.check_image`).
        require_image: drop (instead of keeping text-only) items without a usable image.
    """

    def __init__(self, image_root: Optional[str], image_check: str = "header", require_image: bool = False,
                 label: str | None = None):
        super().__init__(label)
        self.image_root = None if image_root is None else str(image_root)
        self.image_check = image_check
        self.require_image = require_image

    def expand(self, items):
        counted = items | "CountItemsIn" >> count("validate_items", "in")
        ids = counted | "CheckItemId" >> beam.FlatMap(_check_id).with_outputs(DEAD, main="ok")
        dedup = (ids.ok | "KeyByItemId" >> beam.Map(lambda r: (int(r["item_id"]), r))
                 | "GroupByItemId" >> beam.GroupByKey()
                 | "DropDuplicateIds" >> beam.ParDo(_SplitDuplicates()).with_outputs(DEAD, main="ok"))
        checked = dedup.ok | "CheckImageAndText" >> beam.ParDo(
            _CheckItem(self.image_root, self.image_check, self.require_image)).with_outputs(DEAD, main="ok")
        dead = ((ids[DEAD], dedup[DEAD], checked[DEAD]) | "FlattenItemRejects" >> beam.Flatten())
        dropped = (ids[DEAD], dedup[DEAD]) | "FlattenDroppedIds" >> beam.Flatten()
        _ = dropped | "CountDroppedItems" >> count("validate_items", "rejected")
        valid = checked.ok | "CountItemsOut" >> count("validate_items", "out")
        return {"items": valid, DEAD: dead}


class _CheckInteraction(beam.DoFn):
    def process(self, r):
        with stage_timer("validate_interactions"):
            out = list(self._check(r))
        yield from out

    def _check(self, r):
        """One reason per bad record, in the loader's order: missing_value, bad_id, bad_timestamp, bad_label."""
        row = r.get("_row")
        parsed = {name: parse_int(r.get(name)) for name in ("user_id", "item_id", "ts")}
        ids = _ids(r)  # a dense id that is not an integer is left out by `reject`
        label, label_bad = parse_float(r.get("label"))
        for name, (value, bad) in [*parsed.items(), ("label", (label, label_bad))]:
            if value is None and not bad:
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_interactions", "interactions", "missing_value", row=row, **ids,
                    detail=f"{name} is empty"))
                return
        for name, reason, what in (("user_id", "bad_id", "is not an integer"), ("item_id", "bad_id", "is not an integer"),
                                   ("ts", "bad_timestamp", "is not a unix timestamp")):
            if parsed[name][1]:
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_interactions", "interactions", reason, row=row, **ids,
                    detail=f"{name} {r.get(name)!r} {what}"))
                return
        if parsed["ts"][0] < 0:  # the loader's rule: negative unix times are sentinels, never event times
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", "interactions", "bad_timestamp", row=row, **ids,
                detail=f"timestamp {parsed['ts'][0]} before 1970-01-01"))
            return
        if label is None or not 0.0 <= label <= 1.0:
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", "interactions", "bad_label", row=row, **ids,
                detail=f"label {r.get('label')!r} " + ("is not a number" if label_bad else "not in [0, 1]")))
            return
        out = {"user_id": parsed["user_id"][0], "item_id": parsed["item_id"][0], "ts": parsed["ts"][0],
               "label": label, "_row": row}
        for key in ("_raw_item_id", "_raw_user_id"):
            if key in r:
                out[key] = r[key]
        yield out


def _join_known(keyed):
    item_id, grouped = keyed
    known = bool(list(grouped["item"]))
    for r in grouped["events"]:
        if known:
            yield r
        else:
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", "interactions", "unknown_item", row=r.get("_row"), **_ids(r),
                detail=f"item_id {_ids(r)['item_id']} is not in the validated catalog"))


class ValidateInteractions(beam.PTransform):
    """interactions (dicts) + valid items -> {"interactions": valid, "dead_letter": rejects}.

    Unknown items are found with a CoGroupByKey against the validated catalog (scales with the catalog; no side
    input holding every id).
    """

    def __init__(self, items, label: str | None = None):
        super().__init__(label)
        self.items = items

    def expand(self, interactions):
        counted = interactions | "CountInteractionsIn" >> count("validate_interactions", "in")
        checked = counted | "CheckFields" >> beam.ParDo(_CheckInteraction()).with_outputs(DEAD, main="ok")
        item_keys = self.items | "CatalogKeys" >> beam.Map(lambda it: (int(it["item_id"]), True))
        events = checked.ok | "KeyEventsByItem" >> beam.Map(lambda r: (r["item_id"], r))
        joined = ({"item": item_keys, "events": events} | "JoinCatalog" >> beam.CoGroupByKey()
                  | "DropUnknownItems" >> beam.FlatMap(_join_known).with_outputs(DEAD, main="ok"))
        dead = (checked[DEAD], joined[DEAD]) | "FlattenInteractionRejects" >> beam.Flatten()
        _ = dead | "CountInteractionRejects" >> count("validate_interactions", "rejected")
        valid = joined.ok | "CountInteractionsOut" >> count("validate_interactions", "out")
        return {"interactions": valid, DEAD: dead}


class CountByReason(beam.PTransform):
    """dead-letter records -> (reason, count) pairs."""

    def expand(self, dead):
        return (dead | "ReasonKey" >> beam.Map(lambda r: (r["reason"], 1))
                | "SumByReason" >> beam.CombinePerKey(sum))
