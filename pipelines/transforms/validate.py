"""Record validation in the job: bad items and interactions go to a dead-letter output, counted by reason.

The loader (`pipelines.data.load_dataset`) already checks what it reads; these steps re-check every record as it
enters the job, in parallel, so a job fed by any source (or by a later snapshot) never lets a bad record through
silently. Image checks use the sources' own `check_image` at the level the job asks for. Reasons are the data
contract's (`pipelines.data.schema.REJECT_REASONS`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import apache_beam as beam

from pipelines.transforms.common import counter, count, reject, stage_timer

DEAD = "dead_letter"


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _missing_number(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


class _SplitDuplicates(beam.DoFn):
    """The first row of an item id (lowest source row) survives; later rows are dead letters."""

    def process(self, keyed):
        item_id, rows = keyed
        rows = sorted(rows, key=lambda r: (r.get("_row") is None, r.get("_row") or 0))
        yield rows[0]
        for r in rows[1:]:
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", "items", "duplicate_item", row=r.get("_row"), item_id=item_id,
                detail=f"item_id {item_id} already defined at row {rows[0].get('_row')}"))


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
        row, item_id = item.get("_row"), item.get("item_id")
        has_image = not _blank(item.get("image_uri"))
        if has_image:
            try:
                check_image(str(item["image_uri"]), Path(self.image_root) if self.image_root else None,
                            self.image_check)
            except ImageError as exc:
                action = "dropped" if self.require_image else "kept_text_only"
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_items", "items", exc.reason, row=row, item_id=item_id, detail=str(exc), action=action))
                if self.require_image:
                    self._rejected.inc()
                    return
                item["image_uri"], has_image = None, False
        elif self.require_image:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", "items", "missing_image", row=row, item_id=item_id, detail="no image_uri"))
            return
        if _blank(item.get("title")) and _blank(item.get("text")):
            action = "kept_image_only" if has_image else "dropped"
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", "items", "empty_text", row=row, item_id=item_id, detail="no title and no text",
                action=action))
            if not has_image:
                self._rejected.inc()
                return
        yield item


def _null_id(item):
    if _missing_number(item.get("item_id")):
        yield beam.pvalue.TaggedOutput(DEAD, reject("validate_items", "items", "missing_value", row=item.get("_row"),
                                                    detail="item_id is empty"))
    else:
        yield item


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
        ids = counted | "CheckItemId" >> beam.FlatMap(_null_id).with_outputs(DEAD, main="ok")
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
        row = r.get("_row")
        for name in ("user_id", "item_id", "ts"):
            if _missing_number(r.get(name)):
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_interactions", "interactions", "missing_value", row=row,
                    item_id=None if _missing_number(r.get("item_id")) else r["item_id"],
                    user_id=None if _missing_number(r.get("user_id")) else r["user_id"], detail=f"{name} is empty"))
                return
        label = r.get("label")
        if _missing_number(label) or not 0.0 <= float(label) <= 1.0:
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", "interactions", "bad_label", row=row, item_id=r["item_id"],
                user_id=r["user_id"], detail=f"label {label!r} not in [0, 1]"))
            return
        yield {"user_id": int(r["user_id"]), "item_id": int(r["item_id"]), "ts": int(r["ts"]),
               "label": float(label), "_row": row}


def _join_known(keyed):
    item_id, grouped = keyed
    known = bool(list(grouped["item"]))
    for r in grouped["events"]:
        if known:
            yield r
        else:
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", "interactions", "unknown_item", row=r.get("_row"), item_id=item_id,
                user_id=r["user_id"], detail=f"item_id {item_id} is not in the validated catalog"))


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
