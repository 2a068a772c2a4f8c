"""Issue 20 point 4: one copy of each validation and parse rule. The loader and the Beam job (the generic source
read and validated on the workers, `--read-sources workers`) reject the same records with the same reasons,
actions, ids and details, for a source that trips every rule; and re-validating the loader's own table in the
job (`--read-sources driver`) rejects nothing more; and the job's record checks alone, fed the source's rows as
records, reject them as the loader does."""
from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

from pipelines.data import REJECT_REASONS, DataSpec, load_dataset

NOW = 1_717_200_000  # 2024-06-01T00:00:00Z: the fixed clock (events after it + 1 day are rejects)
FIELDS = ("source", "row", "item_id", "user_id", "item_dense_id", "user_dense_id", "reason", "action", "detail")


def _every_rule(folder, ids: str):
    """items.csv + events.csv with one record per rule (`ids`: the mapping's ids mode, int or string)."""
    img = folder / "img"
    img.mkdir(parents=True)
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 200, 30))):
        Image.new("RGB", (8, 8), colour).save(img / name)
    (img / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(folder / "outside.png")
    (folder / "items.csv").write_text(
        "item_id,title,text,image_uri\n"
        "1,Red mug,ceramic,a.png\n"          # row 0: fine
        "2,Cup,,missing.png\n"               # row 1: missing_image, kept text-only
        "3,Plate,flat,broken.png\n"          # row 2: corrupt_image, kept text-only
        "4,Spoon,,../outside.png\n"          # row 3: image_escapes_root, kept text-only
        "1,Again,dup,a.png\n"                # row 4: duplicate_item
        "5,,,b.png\n"                        # row 5: empty_text, kept image-only
        "6, ,,\n"                            # row 6: empty_text, dropped
        "7,,,broken.png\n"                   # row 7: corrupt_image, dropped (no text either)
        "x9,Fork,,\n"                        # row 8: bad_id (ids: int); a fine item with string ids
        ",Knife,,\n"                         # row 9: missing_value
        "8,Bowl,deep,b.png\n")               # row 10: fine
    future = NOW + 3 * 86_400
    (folder / "events.csv").write_text(
        "user_id,item_id,ts,label\n"
        "10,1,1700000000,1\n"                # row 0
        "10,2,1700000100,0\n"                # row 1
        "11,99,1700000200,1\n"               # row 2: unknown_item
        "11,6,1700000300,1\n"                # row 3: unknown_item (its item was dropped)
        ",1,1700000400,1\n"                  # row 4: missing_value
        "12,1,notadate,1\n"                  # row 5: bad_timestamp (does not parse)
        "12,1,-1,1\n"                        # row 6: bad_timestamp (a sentinel before 1970)
        f"12,1,{future},1\n"                 # row 7: bad_timestamp (in the future)
        "12,8,1700000500,abc\n"              # row 8: bad_label (does not parse)
        "12,8,1700000600,7\n"                # row 9: bad_label (outside [0, 1])
        "u7,1,1700000700,1\n"                # row 10: bad_id (ids: int)
        "13,x9,1700000800,1\n"               # row 11: bad_id (ids: int); fine with string ids
        "10,1,1700000000,1\n"                # row 12: duplicate_interaction (= row 0)
        "10,1,1700000000,0\n"                # row 13: another label: a distinct event
        "13,5,2024-01-01,1\n"                # row 14: an ISO date: fine
        "14,3,1700000900,1\n"                # row 15: fine (a text-only item)
        "15,7,1700001000,1\n")               # row 16: unknown_item (item 7 lost its image and had no text)
    return DataSpec(dataset="generic", items=folder / "items.csv", interactions=folder / "events.csv", now=NOW,
                    max_bad_fraction=0.5, validate_images="header", column_map=(f"ids={ids}", f"image_root={img}"))


def _rows(records) -> list[tuple]:
    def norm(v):
        return None if v is None or (isinstance(v, float) and v != v) or v is pd.NA else v

    return sorted(tuple(norm(r[k]) for k in FIELDS) for r in records)


def _job_dead_letters(spec, tmp_path, read_on_workers: bool) -> list[tuple]:
    """The dead letters of the job's source, validation and dedupe steps (the cascade graph's first stages)."""
    from pipelines.beam.plan import with_raw_ids
    from pipelines.beam.read_source import ReadSource, source_plan
    from pipelines.beam.validate_records import DEAD, ValidateInteractions, ValidateItems

    out = tmp_path / ("workers.jsonl" if read_on_workers else "driver.jsonl")
    with TestPipeline() as p:
        if read_on_workers:
            plan = source_plan(spec)
            src = p | "ReadSource" >> ReadSource(plan)
            items, events, parse_dead, root = src["items"], src["interactions"], src[DEAD], plan.image_root
        else:  # the loader's table, as the snapshot path hands it to the job
            ds = load_dataset(spec)
            items = p | "Items" >> beam.Create(with_raw_ids(ds.items, ds.id_maps, ("item_id",))
                                               .assign(_row=range(len(ds.items))).to_dict("records"))
            events = p | "Events" >> beam.Create(with_raw_ids(ds.interactions, ds.id_maps, ("user_id", "item_id"))
                                                 .assign(_row=range(len(ds.interactions))).to_dict("records"))
            parse_dead, root = p | "NoParse" >> beam.Create([]), str(ds.image_root)
        vi = items | ValidateItems(root, spec.validate_images, spec.require_image,
                                   max_bad_fraction=spec.max_bad_fraction, recheck=not read_on_workers)
        vx = events | ValidateInteractions(vi["items"], max_bad_fraction=spec.max_bad_fraction,
                                           dedupe=read_on_workers, clock=spec.clock())
        _ = ((parse_dead, vi[DEAD], vx[DEAD]) | beam.Flatten() | beam.Map(json.dumps, default=str)
             | beam.combiners.ToList()
             | beam.Map(lambda rows, path=str(out): open(path, "w").write("\n".join(rows))))
    return _rows(json.loads(line) for line in out.read_text().splitlines() if line)


@pytest.mark.parametrize("ids", ["int", "string"])
def test_loader_and_job_reject_the_same_records_for_the_same_reasons(tmp_path, ids):
    spec = _every_rule(tmp_path, ids)
    ds = load_dataset(spec)
    loader = _rows(ds.rejects.to_dict("records"))
    want = set(REJECT_REASONS) - ({"bad_id"} if ids == "string" else set())
    assert {r[6] for r in loader} == want  # the file trips every rule there is
    assert _job_dead_letters(spec, tmp_path, read_on_workers=True) == loader
    # the loader's table holds nothing the job's own checks reject
    assert _job_dead_letters(spec, tmp_path, read_on_workers=False) == []


def _csv_records(path, ids: tuple) -> list[dict]:
    """The rows of a CSV as the job's records: every cell as the file wrote it (str, None when empty), the ids
    kept raw, and where each came from (file and row, as `pipelines.beam.read_source` tags them)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{**r, **{f"_raw_{k}": r[k] for k in ids}, "_row": i, "_source": path.name, "_file_row": i}
            for i, r in enumerate(records)]


def test_the_job_s_record_checks_reject_what_the_loader_rejects(tmp_path):
    """The same bad records through the loader and through the job's DoFns alone (`ValidateItems`,
    `ValidateInteractions`, as records from any producer reach them): the same rejects, row by row, with the
    reason, the action, the ids and the detail (which names the column and the value)."""
    spec = _every_rule(tmp_path, "int")
    spec = dataclasses.replace(spec, column_map=spec.column_map + ("interactions.ts_format=unix",))
    from pipelines.beam.validate_records import DEAD, ValidateInteractions, ValidateItems

    loader = _rows(load_dataset(spec).rejects.to_dict("records"))
    out = tmp_path / "records.jsonl"
    with TestPipeline() as p:
        items = p | "Items" >> beam.Create(_csv_records(tmp_path / "items.csv", ("item_id",)))
        events = p | "Events" >> beam.Create(_csv_records(tmp_path / "events.csv", ("item_id", "user_id")))
        vi = items | ValidateItems(str(tmp_path / "img"), spec.validate_images, max_bad_fraction=0.5)
        vx = events | ValidateInteractions(vi["items"], max_bad_fraction=0.5, dedupe=True, clock=spec.clock())
        _ = ((vi[DEAD], vx[DEAD]) | beam.Flatten() | beam.Map(json.dumps, default=str) | beam.combiners.ToList()
             | beam.Map(lambda rows, path=str(out): open(path, "w").write("\n".join(rows))))
    job = _rows(json.loads(line) for line in out.read_text().splitlines() if line)
    by_reason = {}
    for r in loader:
        by_reason[r[6]] = by_reason.get(r[6], 0) + 1
    # ts_format unix: the ISO date of row 14 is a bad_timestamp too, on both paths
    assert by_reason == {"bad_id": 3, "bad_label": 2, "bad_timestamp": 4, "corrupt_image": 2,
                         "duplicate_interaction": 1, "duplicate_item": 1, "empty_text": 2, "image_escapes_root": 1,
                         "missing_image": 1, "missing_value": 2, "unknown_item": 3}
    assert ("events.csv", 5, "1", "12", 1, 12, "bad_timestamp", "dropped",
            "column 'ts' (ts): value 'notadate' is not a unix timestamp") in loader
    assert job == loader
