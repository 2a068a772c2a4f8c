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

from pipelines.beam.common import counter, count, reject, stage_timer

DEAD = "dead_letter"
# Marks dead letters of values that do not parse (not of values out of range: a -1 timestamp sentinel, a label of
# 3): only those count towards max_bad_fraction, as in the loader. WriteRejects keeps REJECT_FIELDS only.
UNPARSED = "_unparsed"


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


def _where(r: dict, table: str) -> tuple:
    """(source, row) a reject names: the part file and its row for records read on the workers
    (`pipelines.beam.read_source`), else the table and the snapshot row."""
    if "_source" in r and r.get("_file_row") is not None:
        return r["_source"], r["_file_row"]
    return table, r.get("_row")


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
        first_src, first_row = _where(rows[0], "items")
        for r in rows[1:]:
            raw = _ids(r)["item_id"]
            src, row = _where(r, "items")
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", src, "duplicate_item", row=row, item_id=raw, item_dense_id=item_id,
                detail=f"item_id {raw} already defined at {first_src} row {first_row}"))


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
        from pipelines.data.validate import image_loss_action

        item = dict(item)
        (src, row), ids = _where(item, "items"), _ids(item)
        ids = {"item_id": ids["item_id"], "item_dense_id": ids["item_dense_id"]}
        has_image = not _blank(item.get("image_uri"))
        has_text = not (_blank(item.get("title")) and _blank(item.get("text")))
        if has_image:
            try:
                check_image(str(item["image_uri"]), Path(self.image_root) if self.image_root else None,
                            self.image_check)
            except ImageError as exc:
                # one dead letter per item, as the loader: dropped under the image's reason when nothing is left
                action, why = image_loss_action(self.require_image or not has_text, self.require_image, has_text)
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_items", src, exc.reason, row=row, **ids, detail=str(exc) + why, action=action))
                if action == "dropped":
                    self._rejected.inc()
                    return
                item["image_uri"], has_image = None, False
        elif self.require_image:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", src, "missing_image", row=row, **ids, detail="no image_uri"))
            return
        if not has_text:
            action = "kept_image_only" if has_image else "dropped"
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", src, "empty_text", row=row, **ids, detail="no title and no text",
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
        yield beam.pvalue.TaggedOutput(DEAD, {**reject(
            "validate_items", "items", "bad_id" if bad else "missing_value", row=item.get("_row"),
            item_id=raw if bad else None, detail=f"item_id {raw!r} is not an integer" if bad else "item_id is empty"),
            UNPARSED: bad})
    else:
        yield {**item, "item_id": value}




def _check_share(n_in, n_bad, first, stage: str, max_bad_fraction: float):
    if n_in and n_bad > max_bad_fraction * n_in:
        from pipelines.data.io import DataError

        examples = "; ".join(f"{r['reason']} {r['source']} row {r['row']}: {r['detail']}" for r in first)
        raise DataError(f"{stage}: {n_bad} of {n_in} records ({n_bad / n_in:.2%}) hold a value that does not parse, "
                        f"more than --max-bad-fraction {max_bad_fraction:g} allows; first: {examples}")
    return n_bad


def _row_key(r):
    return (r["row"] is None, r["row"] or 0)


class _FirstRows(beam.CombineFn):
    """The n records with the smallest row numbers (rows without a number last)."""

    def __init__(self, n: int):
        self.n = n

    def create_accumulator(self):
        return []

    def add_input(self, acc, r):
        return sorted(acc + [r], key=_row_key)[: self.n]

    def merge_accumulators(self, accs):
        return sorted([r for a in accs for r in a], key=_row_key)[: self.n]

    def extract_output(self, acc):
        return acc


class FailPastBadShare(beam.PTransform):
    """(records in, dead letters) -> the count of parse rejects; raises DataError (failing the job) when they are
    more than `max_bad_fraction` of the records, as the loader does (`DataSpec.max_bad_fraction`).

    Args:
        sized: the first input holds row counts (one per chunk read) instead of one element per record.
    """

    def __init__(self, stage: str, max_bad_fraction: float, sized: bool = False, label: str | None = None):
        super().__init__(label)
        self.stage, self.max_bad_fraction, self.sized = stage, float(max_bad_fraction), bool(sized)

    def expand(self, pcolls):
        records, dead = pcolls
        n_in = (records | "SumRecords" >> beam.CombineGlobally(sum) if self.sized
                else records | "CountRecords" >> beam.combiners.Count.Globally())
        bad = dead | "ParseRejects" >> beam.Filter(lambda r: r.get(UNPARSED, False))
        n_bad = bad | "CountParseRejects" >> beam.combiners.Count.Globally()
        # a plain CombineFn: Beam's Top combiner trips the BundleBasedDirectRunner's GroupByKey (elements after
        # completion) in this graph
        first = bad | "FirstParseRejects" >> beam.CombineGlobally(_FirstRows(5))
        return n_in | "CheckBadShare" >> beam.Map(_check_share, beam.pvalue.AsSingleton(n_bad),
                                                  beam.pvalue.AsSingleton(first), self.stage, self.max_bad_fraction)


class ValidateItems(beam.PTransform):
    """items (dicts in contract form, optional ``_row``) -> {"items": valid items, "dead_letter": rejects}.

    Args:
        image_root: folder relative image uris resolve against (None: uris must be absolute).
        image_check: "exists" | "header" | "draft" | "decode" (see `pipelines.data.images.check_image`).
        require_image: drop (instead of keeping text-only) items without a usable image.
        max_bad_fraction: when set, fail the job if more than this share of the items have an id that does not
            parse (bad_id), like the loader (`DataSpec.max_bad_fraction`); None: only reject them.
    """

    def __init__(self, image_root: Optional[str], image_check: str = "draft", require_image: bool = False,
                 max_bad_fraction: Optional[float] = None, label: str | None = None):
        super().__init__(label)
        self.image_root = None if image_root is None else str(image_root)
        self.image_check = image_check
        self.require_image = require_image
        self.max_bad_fraction = max_bad_fraction

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
        if self.max_bad_fraction is not None:
            _ = (counted, ids[DEAD]) | "FailPastBadShare" >> FailPastBadShare("validate_items", self.max_bad_fraction)
        return {"items": valid, DEAD: dead}


class _CheckInteraction(beam.DoFn):
    def __init__(self, clock=None):
        self.clock = clock  # feature_store.clock.EventClock resolved in the driver (None: no clock check)

    def process(self, r):
        with stage_timer("validate_interactions"):
            out = list(self._check(r))
        yield from out

    def _check(self, r):
        """One reason per bad record, in the loader's order: missing_value, bad_id, bad_timestamp, bad_label."""
        src, row = _where(r, "interactions")
        parsed = {name: parse_int(r.get(name)) for name in ("user_id", "item_id", "ts")}
        ids = _ids(r)  # a dense id that is not an integer is left out by `reject`
        label, label_bad = parse_float(r.get("label"))
        for name, (value, bad) in [*parsed.items(), ("label", (label, label_bad))]:
            if value is None and not bad:
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_interactions", src, "missing_value", row=row, **ids,
                    detail=f"{name} is empty"))
                return
        for name, reason, what in (("user_id", "bad_id", "is not an integer"), ("item_id", "bad_id", "is not an integer"),
                                   ("ts", "bad_timestamp", "is not a unix timestamp")):
            if parsed[name][1]:
                yield beam.pvalue.TaggedOutput(DEAD, {**reject(
                    "validate_interactions", src, reason, row=row, **ids,
                    detail=f"{name} {r.get(name)!r} {what}"), UNPARSED: True})
                return
        if parsed["ts"][0] < 0:  # the loader's rule: negative unix times are sentinels, never event times
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", src, "bad_timestamp", row=row, **ids,
                detail=f"timestamp {parsed['ts'][0]} before 1970-01-01"))
            return
        if self.clock is not None and self.clock.in_future(parsed["ts"][0]):  # the loader's clock rule
            yield beam.pvalue.TaggedOutput(DEAD, {**reject(
                "validate_interactions", src, "bad_timestamp", row=row, **ids,
                detail=self.clock.detail(parsed["ts"][0])), UNPARSED: True})
            return
        if label is None or not 0.0 <= label <= 1.0:
            yield beam.pvalue.TaggedOutput(DEAD, {**reject(
                "validate_interactions", src, "bad_label", row=row, **ids,
                detail=f"label {r.get('label')!r} " + ("is not a number" if label_bad else "not in [0, 1]")),
                UNPARSED: label_bad})
            return
        out = {"user_id": parsed["user_id"][0], "item_id": parsed["item_id"][0], "ts": parsed["ts"][0],
               "label": label, "_row": r.get("_row")}
        for key in ("_raw_item_id", "_raw_user_id", "_source", "_file_row"):
            if key in r:
                out[key] = r[key]
        yield out


def _split_repeats(keyed):
    """Exact repeats of an event (same user, item, ts and label): the first source row survives (the loader's
    duplicate_interaction)."""
    _, rows = keyed
    rows = sorted(rows, key=lambda r: r["_row"])
    yield rows[0]
    for r in rows[1:]:
        src, row = _where(r, "interactions")
        yield beam.pvalue.TaggedOutput(DEAD, reject(
            "validate_interactions", src, "duplicate_interaction", row=row, **_ids(r),
            detail="same user, item, timestamp and label as an earlier row"))


def _join_known(keyed):
    item_id, grouped = keyed
    known = bool(list(grouped["item"]))
    for r in grouped["events"]:
        if known:
            yield r
        else:
            src, row = _where(r, "interactions")
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", src, "unknown_item", row=row, **_ids(r),
                detail=f"item_id {_ids(r)['item_id']} is not in the validated catalog"))


class ValidateInteractions(beam.PTransform):
    """interactions (dicts) + valid items -> {"interactions": valid, "dead_letter": rejects}.

    Unknown items are found with a CoGroupByKey against the validated catalog (scales with the catalog; no side
    input holding every id). Values that do not parse, and with ``clock`` (a `feature_store.clock.EventClock`)
    timestamps later than it, are rejected as the loader rejects them (bad_id, bad_timestamp, bad_label); with
    `max_bad_fraction` set, more than that share of them fails the job.
    """

    def __init__(self, items, max_bad_fraction: Optional[float] = None, dedupe: bool = False,
                 clock=None, label: str | None = None):
        super().__init__(label)
        self.items = items
        self.max_bad_fraction = max_bad_fraction
        self.dedupe = dedupe  # records straight from the source (not the loader's table): drop exact repeats
        self.clock = clock

    def expand(self, interactions):
        counted = interactions | "CountInteractionsIn" >> count("validate_interactions", "in")
        checked = counted | "CheckFields" >> beam.ParDo(_CheckInteraction(self.clock)).with_outputs(DEAD, main="ok")
        ok, dead_parts = checked.ok, [checked[DEAD]]
        if self.dedupe:
            repeats = (ok | "KeyByEvent" >> beam.Map(lambda r: ((r["user_id"], r["item_id"], r["ts"], r["label"]), r))
                       | "GroupRepeats" >> beam.GroupByKey()
                       | "DropRepeats" >> beam.FlatMap(_split_repeats).with_outputs(DEAD, main="ok"))
            ok = repeats.ok
            dead_parts.append(repeats[DEAD])
        item_keys = self.items | "CatalogKeys" >> beam.Map(lambda it: (int(it["item_id"]), True))
        events = ok | "KeyEventsByItem" >> beam.Map(lambda r: (r["item_id"], r))
        joined = ({"item": item_keys, "events": events} | "JoinCatalog" >> beam.CoGroupByKey()
                  | "DropUnknownItems" >> beam.FlatMap(_join_known).with_outputs(DEAD, main="ok"))
        dead = (*dead_parts, joined[DEAD]) | "FlattenInteractionRejects" >> beam.Flatten()
        _ = dead | "CountInteractionRejects" >> count("validate_interactions", "rejected")
        valid = joined.ok | "CountInteractionsOut" >> count("validate_interactions", "out")
        if self.max_bad_fraction is not None:
            _ = ((counted, checked[DEAD])
                 | "FailPastBadShare" >> FailPastBadShare("validate_interactions", self.max_bad_fraction))
        return {"interactions": valid, DEAD: dead}


class CountByReason(beam.PTransform):
    """dead-letter records -> (reason, count) pairs."""

    def expand(self, dead):
        return (dead | "ReasonKey" >> beam.Map(lambda r: (r["reason"], 1))
                | "SumByReason" >> beam.CombinePerKey(sum))
