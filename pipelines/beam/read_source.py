"""The generic Parquet / CSV source read and parsed on the workers (the cascade's ``--read-sources workers`` path).

`ReadSource` turns a `SourcePlan` (small driver-side metadata: paths, column maps, headers) into contract-shaped
item and interaction records plus the parse rejects, with the loader's own value parsing
(`pipelines.data.generic.parse_items` / `parse_interactions`, applied to each chunk `ReadTableParts` reads):
column maps, text joins, ISO / unix / unix-ms timestamps, labels (threshold, value maps), reasons missing_value /
bad_id / bad_timestamp (timestamps later than the job's clock too: `feature_store.clock`) / bad_label /
unknown_item naming the part file, its row, the column and the value, and the ``--max-bad-fraction`` check over
the whole table. The whole-table decisions the loader takes are aggregates
computed first:

- whether ids are strings (``ids: auto``): an OR over chunks;
- whether auto timestamps are milliseconds: exact median rule from per-chunk counts (`pipelines.data.io.ms_stats`);
- the dense id map of a string-id field: the distinct raw ids, gathered into one sorted map (`dense_map`, with
  ``--id-maps`` extended as the loader does) and handed to the parse steps as a side input. That map is the
  documented bound of this path: one worker holds every distinct string id of a field (about 100 bytes per id:
  10 million ids ~ 1 GB); integer-id sources have no map at all.

Each record keeps ``_row`` (its row in the concatenated table, = the loader's), ``_source`` (part file) and
``_file_row`` (row inside it), so later job stages name rejects the way the user's files do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import apache_beam as beam

from pipelines.beam.common import counter, reject, stage_timer

STAGE = "read_sources"
SIZE = "size"  # tagged output: rows per chunk (for the bad-share check)


@dataclass(frozen=True)
class SourcePlan:
    """What the driver knows of a generic source before the job runs (no row is read).

    Args:
        resolved: `pipelines.data.generic.resolve_generic` (paths, column maps, mapping).
        name: the dataset name the loader gives (``generic:<items file>``).
        image_root: the loader's image root.
        id_map_dir: --id-maps folder to extend (None: fresh dense ids).
        max_bad_fraction: the loader's share of rows whose values may not parse.
        clock: the job's `feature_store.clock.EventClock`, resolved once in the driver: later events are
            bad_timestamp rejects, counted with the values that do not parse.
        image_column: the items table has an image column (without one the catalog is text-only: the encoder
            builds no vision tower).
    """

    resolved: dict
    name: str
    image_root: Optional[str]
    id_map_dir: Optional[str]
    max_bad_fraction: float
    clock: Optional[object] = None
    image_column: bool = True


def source_plan(spec) -> SourcePlan:
    """Resolve the generic source in the driver: mapping, paths and headers only (DataError as the loader's)."""
    from pathlib import Path

    from pipelines.data.generic import check_text_columns, default_image_root, resolve_generic
    from pipelines.data.io import require_rows, table_columns, table_files

    r = resolve_generic(spec)
    for table in ("items", "interactions"):  # an empty table is an error before the job starts
        require_rows(r[f"{table}_path"], table)
    columns = []
    for f in table_files(r["items_path"]):
        columns += [c for c in table_columns(Path(f)) if c not in columns]
    check_text_columns(r, columns)
    image_column = r["icols"]["image_uri"] in columns
    root = default_image_root(r, image_column)
    return SourcePlan(resolved=r, name=f"generic:{r['items_path'].name}", image_root=str(root) if root else None,
                      id_map_dir=str(spec.id_map_dir) if spec.id_map_dir is not None else None,
                      max_bad_fraction=float(spec.max_bad_fraction), clock=spec.clock(), image_column=image_column)


def _value(v):
    import math

    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _stripped(v):
    return None if v is None else str(v).strip()


class _ParseItems(beam.DoFn):
    def __init__(self, r: dict):
        self.r = r

    def setup(self):
        self._in, self._out, self._rej = (counter(STAGE, k) for k in ("in", "out", "rejected"))

    def process(self, chunk, id_map):
        with stage_timer(STAGE):
            out = list(self._parse(chunk, id_map))
        yield from out

    def _parse(self, chunk, id_map):
        from pipelines.data.generic import parse_items
        from pipelines.beam.validate_records import DEAD, UNPARSED

        frame, name, row0, local0 = chunk["frame"], chunk["file"], chunk["row"], chunk["file_row"]
        parsed = parse_items(self.r, frame, id_map)
        items, missing, (unparsed,) = parsed["frame"], parsed["missing"], parsed["unparsed"]
        bad = unparsed.mask & ~missing
        self._in.inc(len(frame))
        yield beam.pvalue.TaggedOutput(SIZE, len(frame))
        cols = list(items.columns)
        for i, values in enumerate(items.itertuples(index=False, name=None)):
            raw = _stripped(_value(parsed["raw_ids"][i]))
            if missing[i] or bad[i]:
                self._rej.inc()
                yield beam.pvalue.TaggedOutput(DEAD, {**reject(
                    STAGE, name, "missing_value" if missing[i] else "bad_id", row=local0 + i,
                    item_id=None if missing[i] else raw,
                    detail="empty item id" if missing[i] else unparsed.detail(i)), UNPARSED: bool(bad[i])})
                continue
            rec = {c: _value(v) for c, v in zip(cols, values)}
            # the loader's finalize: title never None, blank text / image uri are None
            rec["title"] = "" if rec["title"] is None else str(rec["title"])
            for c in ("text", "image_uri"):
                rec[c] = None if rec[c] is None or not str(rec[c]).strip() else str(rec[c])
            rec.update(item_id=int(rec["item_id"]), _row=row0 + i, _source=name, _file_row=local0 + i)
            if id_map is not None:
                rec["_raw_item_id"] = raw
            self._out.inc()
            yield rec


class _ParseInteractions(beam.DoFn):
    def __init__(self, r: dict, clock=None):
        self.r, self.clock = r, clock

    def setup(self):
        self._in, self._out, self._rej = (counter(STAGE, k) for k in ("in", "out", "rejected"))

    def process(self, chunk, item_map, user_map, ms):
        with stage_timer(STAGE):
            out = list(self._parse(chunk, item_map, user_map, ms))
        yield from out

    def _parse(self, chunk, item_map, user_map, ms):
        import numpy as np

        from pipelines.data.generic import BAD_LABEL_DETAIL, parse_interactions
        from pipelines.beam.validate_records import DEAD, UNPARSED

        frame, name, row0, local0 = chunk["frame"], chunk["file"], chunk["row"], chunk["file_row"]
        maps = {k: v for k, v in (("item_id", item_map), ("user_id", user_map)) if v is not None}
        px = parse_interactions(self.r, frame, maps, ms=ms, clock=self.clock)
        self._in.inc(len(frame))
        yield beam.pvalue.TaggedOutput(SIZE, len(frame))
        missing = px["missing"]
        taken = missing.copy()
        unparsed = []
        for u in px["unparsed"]:
            mask = u.mask & ~taken
            taken |= mask
            unparsed.append((u, mask))
        bad_label = px["bad_label"] & ~taken
        unknown = px["unknown"] & ~taken & ~bad_label
        ids = px["ids"]
        users, items = px["user_id"].to_numpy(), px["item_id"].to_numpy()
        ts, label = px["ts"].to_numpy(), px["label"].to_numpy()
        attrs = self.r["inter_attrs"]
        for i in range(len(frame)):
            rid = {"item_id": _stripped(_value(ids["item_id"][i])), "user_id": _stripped(_value(ids["user_id"][i])),
                   "item_dense_id": ids["item_dense_id"][i], "user_dense_id": ids["user_dense_id"][i]}
            where = {"row": local0 + i, **rid}
            dead = None
            if missing[i]:
                dead = reject(STAGE, name, "missing_value", **where,
                              detail="empty user id, item id, timestamp or label")
            elif taken[i]:
                u = next(u for u, m in unparsed if m[i])
                dead = {**reject(STAGE, name, u.reason, **where, detail=u.detail(i)), UNPARSED: True}
            elif bad_label[i]:
                dead = reject(STAGE, name, "bad_label", **where, detail=BAD_LABEL_DETAIL)
            elif unknown[i]:
                dead = reject(STAGE, name, "unknown_item", **where, detail="item id not in the item catalog")
            if dead is not None:
                self._rej.inc()
                yield beam.pvalue.TaggedOutput(DEAD, dead)
                continue
            rec = {"user_id": int(users[i]), "item_id": int(items[i]), "ts": int(ts[i]),
                   "label": float(np.float32(label[i])), "_row": row0 + i, "_source": name, "_file_row": local0 + i}
            for a in attrs:
                rec[a] = _value(frame[a].iloc[i])
            if item_map is not None:
                rec["_raw_item_id"] = rid["item_id"]
            if user_map is not None:
                rec["_raw_user_id"] = rid["user_id"]
            self._out.inc()
            yield rec


def _raw_ids(chunk, column: str, is_str: bool):
    if not is_str:
        return []
    from pipelines.data.generic import _raw_ids as loader_raw_ids

    return loader_raw_ids(chunk["frame"][column]).tolist()


def _build_map(raw_ids: list, is_str: bool, id_map_dir: Optional[str], field: str):
    """The loader's dense map over every distinct raw id (None for integer ids)."""
    if not is_str:
        return None
    import pandas as pd

    from pipelines.data.generic import dense_map
    from pipelines.data.loader import load_id_maps

    known = load_id_maps(id_map_dir).get(field) if id_map_dir else None
    return dense_map(pd.Series(sorted(raw_ids), dtype=object), known)


class _IdMap(beam.PTransform):
    """Chunks -> singleton: the dense id map of one string-id field (a DataFrame raw, id), or None."""

    def __init__(self, column: str, field: str, is_str, id_map_dir: Optional[str], label: str | None = None):
        super().__init__(label)
        self.column, self.field, self.is_str, self.id_map_dir = column, field, is_str, id_map_dir

    def expand(self, chunks):
        flag = beam.pvalue.AsSingleton(self.is_str)
        ids = (chunks | "RawIds" >> beam.FlatMap(_raw_ids, self.column, flag)
               | "Distinct" >> beam.Distinct() | "Gather" >> beam.combiners.ToList())
        return ids | "DenseMap" >> beam.Map(_build_map, flag, self.id_map_dir, self.field)


class ReadSource(beam.PTransform):
    """PBegin -> {"items": item records, "interactions": interaction records, "dead_letter": parse rejects}.

    Fails the job (DataError) when more than ``plan.max_bad_fraction`` of a table's rows hold a value that does not
    parse, as the loader does.
    """

    def __init__(self, plan: SourcePlan, label: str | None = None):
        super().__init__(label)
        self.plan = plan

    def expand(self, pbegin):
        from pipelines.data.generic import id_kinds
        from pipelines.data.io import merge_ms_stats, ms_decision, ms_stats
        from pipelines.beam.sources import ReadTableParts
        from pipelines.beam.validate_records import DEAD, FailPastBadShare

        plan, r = self.plan, self.plan.resolved
        item_chunks = pbegin | "ReadItems" >> ReadTableParts(r["items_path"], r["items_columns"],
                                                             optional=r["items_optional"], frames=True)
        inter_chunks = pbegin | "ReadInteractions" >> ReadTableParts(r["interactions_path"], r["inter_columns"],
                                                                     optional=r["inter_optional"], frames=True)
        mode = r["ids_mode"]
        if mode == "auto":
            item_str = (item_chunks | "ItemIdKind" >> beam.Map(lambda c: id_kinds(r, c["frame"], None)[0])
                        | "AnyItemString" >> beam.CombineGlobally(any))
            user_str = (inter_chunks | "UserIdKind" >> beam.Map(lambda c: id_kinds(r, None, c["frame"])[1])
                        | "AnyUserString" >> beam.CombineGlobally(any))
        else:
            item_str = pbegin | "ItemIdKind" >> beam.Create([mode == "string"])
            user_str = pbegin | "UserIdKind" >> beam.Create([mode == "string"])
        item_map = item_chunks | "ItemIdMap" >> _IdMap(r["icols"]["item_id"], "item_id", item_str, plan.id_map_dir)
        user_map = inter_chunks | "UserIdMap" >> _IdMap(r["ecols"]["user_id"], "user_id", user_str, plan.id_map_dir)
        ts_col = r["ecols"]["ts"]
        if r["mapping"]["interactions"].get("ts_format", "auto") == "auto":
            ms = (inter_chunks | "TsStats" >> beam.Map(lambda c: ms_stats(c["frame"], ts_col))
                  | "MergeTsStats" >> beam.CombineGlobally(merge_ms_stats) | "IsMillis" >> beam.Map(ms_decision))
        else:
            ms = pbegin | "IsMillis" >> beam.Create([None])
        items = item_chunks | "ParseItems" >> beam.ParDo(
            _ParseItems(r), beam.pvalue.AsSingleton(item_map)).with_outputs(DEAD, SIZE, main="ok")
        inter = inter_chunks | "ParseInteractions" >> beam.ParDo(
            _ParseInteractions(r, plan.clock), beam.pvalue.AsSingleton(item_map), beam.pvalue.AsSingleton(user_map),
            beam.pvalue.AsSingleton(ms)).with_outputs(DEAD, SIZE, main="ok")
        _ = (items[SIZE], items[DEAD]) | "ItemsBadShare" >> FailPastBadShare(
            f"{r['items_path']} (items)", plan.max_bad_fraction, sized=True)
        _ = (inter[SIZE], inter[DEAD]) | "InteractionsBadShare" >> FailPastBadShare(
            f"{r['interactions_path']} (interactions)", plan.max_bad_fraction, sized=True)
        dead = (items[DEAD], inter[DEAD]) | "ParseRejects" >> beam.Flatten()
        return {"items": items.ok, "interactions": inter.ok, DEAD: dead}
