"""Record validation in the job: bad items and interactions go to a dead-letter output, counted by reason.

The loader (`pipelines.data.load_dataset`) already checks what it reads; these steps re-check every record as it
enters the job, in parallel, so a job fed by any source (or by a later snapshot) never lets a bad record through
silently. The rules are the loader's own, not a copy: `pipelines.data.rules` (the parse rules and the
INTERACTION_RULES / ITEM_ID_RULES tables applied to batches of records, `item_content_verdict` per item, the
duplicate and unknown-item details) and the sources' `check_image` at the level the job asks for. Reasons are the
data contract's (`pipelines.data.schema.REJECT_REASONS`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import apache_beam as beam

from pipelines.beam.common import counter, count, reject, stage_timer
from pipelines.data.rules import DUPLICATE_INTERACTION, UNKNOWN_ITEM

DEAD = "dead_letter"
# Marks dead letters of values that do not parse (not of values out of range: a -1 timestamp sentinel, a label of
# 3): only those count towards max_bad_fraction, as in the loader. WriteRejects keeps REJECT_FIELDS only.
UNPARSED = "_unparsed"
BATCH = 4096  # records per batch the vectorised rules see at most


def dead_letter(stage: str, source, rule, detail: str, **ids) -> dict:
    """The dead letter of a record a rule of a `pipelines.data.rules` table rejected (marked UNPARSED when the
    rule counts against --max-bad-fraction)."""
    return {**reject(stage, source, rule.reason, detail=detail, **ids), UNPARSED: rule.counted}


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
        from pipelines.data.rules import duplicate_item_detail

        item_id, rows = keyed
        rows = sorted(rows, key=lambda r: (r.get("_row") is None, r.get("_row") or 0))
        yield rows[0]
        first_src, first_row = _where(rows[0], "items")
        for r in rows[1:]:
            raw = _ids(r)["item_id"]
            src, row = _where(r, "items")
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_items", src, "duplicate_item", row=row, item_id=raw, item_dense_id=item_id,
                detail=duplicate_item_detail(raw, first_src, first_row)))


class _CheckItems(beam.DoFn):
    """Batches of items -> items kept + dead letters, by `pipelines.data.rules.item_content_verdict`."""

    def __init__(self, image_root: Optional[str], image_check: str, require_image: bool, recheck: bool):
        self.image_root = image_root
        self.image_check = image_check
        self.require_image = require_image
        self.recheck = recheck

    def setup(self):
        self._rejected = counter("validate_items", "rejected")

    def process(self, batch):
        with stage_timer("validate_items"):  # collect first: a yield runs the fused downstream steps
            out = list(self._check(batch))
        yield from out

    def _check(self, batch):
        import pandas as pd

        from pipelines.data.images import ImageError, check_image
        from pipelines.data.rules import blank, item_content_verdict

        frame = pd.DataFrame({c: pd.Series([r.get(c) for r in batch], dtype=object)
                              for c in ("title", "text", "image_uri")})
        has_text = ~(blank(frame["title"]) & blank(frame["text"]))
        has_image = ~blank(frame["image_uri"])
        root = Path(self.image_root) if self.image_root else None
        for item, text_ok, image in zip(batch, has_text, has_image):
            error = None
            if image:
                try:
                    check_image(str(item["image_uri"]), root, self.image_check)
                except ImageError as exc:
                    error = exc
            verdict = item_content_verdict(bool(text_ok), bool(image), error, self.require_image)
            # a loader's table (recheck) holds its image-only items on purpose: the loader reported them already
            noted = self.recheck and verdict.action == "kept_image_only"
            if verdict.reason is not None and not noted:
                (src, row), ids = _where(item, "items"), _ids(item)
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    "validate_items", src, verdict.reason, row=row, item_id=ids["item_id"],
                    item_dense_id=ids["item_dense_id"], detail=verdict.detail, action=verdict.action))
            if not verdict.kept:
                self._rejected.inc()
                continue
            yield item if verdict.image_ok or not image else {**item, "image_uri": None}


def _check_ids(batch):
    """Batches of items -> items with int ids + dead letters of `pipelines.data.rules.ITEM_ID_RULES` (an empty id
    is a missing_value, one that is not an integer a bad_id, as in the loader)."""
    from pipelines.data.rules import check_item_ids

    values, verdicts = check_item_ids([item.get("item_id") for item in batch])
    index = verdicts.rule_index()
    for i, item in enumerate(batch):
        if index[i] < 0:
            yield {**item, "item_id": int(values.iloc[i])}
            continue
        rule, detail = verdicts.of(i, index)
        src, row = _where(item, "items")
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter("validate_items", src, rule, detail, row=row,
                                                         item_id=_ids(item)["item_id"]))


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
        recheck: the items are the loader's validated table (the snapshot path): the image-only items the loader
            reported (empty_text, kept_image_only) are not reported twice; images are checked again (a file can
            break after the load).
    """

    def __init__(self, image_root: Optional[str], image_check: str = "draft", require_image: bool = False,
                 max_bad_fraction: Optional[float] = None, recheck: bool = False, label: str | None = None):
        super().__init__(label)
        self.image_root = None if image_root is None else str(image_root)
        self.image_check = image_check
        self.require_image = require_image
        self.max_bad_fraction = max_bad_fraction
        self.recheck = bool(recheck)

    def expand(self, items):
        counted = items | "CountItemsIn" >> count("validate_items", "in")
        ids = (counted | "BatchItems" >> beam.BatchElements(min_batch_size=1, max_batch_size=BATCH)
               | "CheckItemId" >> beam.FlatMap(_check_ids).with_outputs(DEAD, main="ok"))
        dedup = (ids.ok | "KeyByItemId" >> beam.Map(lambda r: (int(r["item_id"]), r))
                 | "GroupByItemId" >> beam.GroupByKey()
                 | "DropDuplicateIds" >> beam.ParDo(_SplitDuplicates()).with_outputs(DEAD, main="ok"))
        checked = (dedup.ok | "BatchUniqueItems" >> beam.BatchElements(min_batch_size=1, max_batch_size=BATCH)
                   | "CheckImageAndText" >> beam.ParDo(_CheckItems(
                       self.image_root, self.image_check, self.require_image, self.recheck)).with_outputs(
                           DEAD, main="ok"))
        dead = ((ids[DEAD], dedup[DEAD], checked[DEAD]) | "FlattenItemRejects" >> beam.Flatten())
        dropped = (ids[DEAD], dedup[DEAD]) | "FlattenDroppedIds" >> beam.Flatten()
        _ = dropped | "CountDroppedItems" >> count("validate_items", "rejected")
        valid = checked.ok | "CountItemsOut" >> count("validate_items", "out")
        if self.max_bad_fraction is not None:
            _ = (counted, ids[DEAD]) | "FailPastBadShare" >> FailPastBadShare("validate_items", self.max_bad_fraction)
        return {"items": valid, DEAD: dead}


class _CheckInteractions(beam.DoFn):
    """Batches of interaction records -> typed records + dead letters: `pipelines.data.rules.check_records`, one
    reason per record in the order of `INTERACTION_RULES` (missing_value, bad_id, bad_timestamp, bad_label)."""

    FIELDS = ("user_id", "item_id", "ts", "label")

    def __init__(self, clock=None):
        self.clock = clock  # feature_store.clock.EventClock resolved in the driver (None: no clock check)

    def process(self, batch):
        with stage_timer("validate_interactions"):
            out = list(self._check(batch))
        yield from out

    def _check(self, batch):
        import pandas as pd

        from pipelines.data.rules import check_records

        frame = pd.DataFrame({f: pd.Series([r.get(f) for r in batch], dtype=object) for f in self.FIELDS})
        parsed, verdicts = check_records(frame, self.clock)
        index = verdicts.rule_index()
        values = {f: parsed[f].tolist() for f in self.FIELDS}
        for i, r in enumerate(batch):
            if index[i] >= 0:
                src, row = _where(r, "interactions")
                rule, detail = verdicts.of(i, index)
                # the dense ids are the ids that parse, as in the loader's rejects (None where one does not)
                dense = {f"{f[:-3]}_dense_id": None if pd.isna(values[f][i]) else values[f][i]
                         for f in ("item_id", "user_id")}
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter("validate_interactions", src, rule, detail,
                                                                 row=row, **{**_ids(r), **dense}))
                continue
            out = {"user_id": int(values["user_id"][i]), "item_id": int(values["item_id"][i]),
                   "ts": int(values["ts"][i]), "label": float(values["label"][i]), "_row": r.get("_row")}
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
            "validate_interactions", src, "duplicate_interaction", row=row, **_ids(r), detail=DUPLICATE_INTERACTION))


def _join_known(keyed):
    item_id, grouped = keyed
    known = bool(list(grouped["item"]))
    for r in grouped["events"]:
        if known:
            yield r
        else:
            src, row = _where(r, "interactions")
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                "validate_interactions", src, "unknown_item", row=row, **_ids(r), detail=UNKNOWN_ITEM))


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
        checked = (counted | "BatchInteractions" >> beam.BatchElements(min_batch_size=1, max_batch_size=BATCH)
                   | "CheckFields" >> beam.ParDo(_CheckInteractions(self.clock)).with_outputs(DEAD, main="ok"))
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
