"""Generic Parquet/CSV sources: mapping, string ids, ISO dates, errors naming file / column / row."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.data import DataError, DataSpec, load_dataset, load_id_maps, save_id_maps


def test_csv_with_yaml_mapping(catalog_dir):
    ds = load_dataset(DataSpec(dataset="generic", mapping=catalog_dir / "mapping.yaml"))
    items = ds.items.set_index("item_id")
    # string ids -> dense int64 in sorted raw order; the map is kept
    imap = dict(zip(ds.id_maps["item_id"]["raw"], ds.id_maps["item_id"]["id"]))
    assert imap == {"A-1": 0, "B-2": 1, "C-3": 2, "D-4": 3, "E-5": 4, "F-6": 5, "G-7": 6}
    assert str(ds.items["item_id"].dtype) == "int64"
    assert items.loc[0, "title"] == "Red mug" and items.loc[0, "text"] == "ceramic mug"
    assert items.loc[0, "brand"] == "acme"            # attribute carried through
    assert items.loc[1, "text"] is None                # empty description -> None, item kept
    assert items.loc[0, "image_uri"] == "a.png" and ds.image_root == catalog_dir / "img"
    umap = dict(zip(ds.id_maps["user_id"]["raw"], ds.id_maps["user_id"]["id"]))
    assert umap == {"u1": 0, "u2": 1, "u3": 2}
    inter = ds.interactions
    # sorted by ts; ISO dates (with and without time / zone) -> unix seconds
    assert inter["ts"].is_monotonic_increasing
    first = inter.iloc[0]
    assert first["ts"] == int(pd.Timestamp("2024-01-01T09:00:00Z").timestamp()) and first["item_id"] == 3
    assert int(pd.Timestamp("2024-01-02", tz="UTC").timestamp()) in set(inter["ts"])
    assert set(inter["label"]) == {0.0, 1.0} and str(inter["label"].dtype) == "float32"
    assert len(inter) == 6  # 12 rows - unknown x2 - missing user - bad label - duplicate - bad timestamp


def test_parquet_with_flags_int_ids_and_implicit_positives(tmp_path):
    items = pd.DataFrame({"id": [10, 20, 30], "name": ["x", "y", "z"]})
    events = pd.DataFrame({"user": [7, 8, 7], "id": [20, 10, 30], "t": [300, 100, 200]})
    items.to_parquet(tmp_path / "items.parquet")
    events.to_parquet(tmp_path / "events.parquet")
    spec = DataSpec(dataset="generic", items=tmp_path / "items.parquet", interactions=tmp_path / "events.parquet",
                    column_map=("items.item_id=id", "items.title=name", "interactions.user_id=user",
                                "interactions.item_id=id", "interactions.ts=t"))
    ds = load_dataset(spec)
    assert ds.id_maps == {}                       # integer ids stay as they are
    assert list(ds.items["item_id"]) == [10, 20, 30]
    assert list(ds.interactions["item_id"]) == [10, 30, 20]   # sorted by ts
    assert list(ds.interactions["label"]) == [1.0, 1.0, 1.0]  # no label column: implicit positives
    assert ds.items["image_uri"].isna().all()


def test_json_mapping_unix_ms_and_label_threshold(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n2,b\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ms,stars\n1,1,1700000000500,4.5\n1,2,1700000001000,2\n")
    (tmp_path / "m.json").write_text(json.dumps({
        "items": {"path": "i.csv"},
        "interactions": {"path": "r.csv", "columns": {"ts": "ms", "label": "stars"}, "ts_format": "unix_ms",
                         "label_threshold": 4.0}}))
    ds = load_dataset(DataSpec(dataset="generic", mapping=tmp_path / "m.json"))
    assert list(ds.interactions["ts"]) == [1700000000, 1700000001]
    assert list(ds.interactions["label"]) == [1.0, 0.0]


def test_id_maps_saved_and_extended(catalog_dir, tmp_path):
    ds = load_dataset(DataSpec(dataset="generic", mapping=catalog_dir / "mapping.yaml"))
    save_id_maps(ds, tmp_path / "ids")
    assert load_id_maps(tmp_path / "ids")["item_id"].equals(ds.id_maps["item_id"])
    # Next day: a new item "AA-0" sorts first but must not renumber the old ones.
    text = (catalog_dir / "items.csv").read_text() + "AA-0,Fork,steel fork,,acme\n"
    (catalog_dir / "items.csv").write_text(text)
    ds2 = load_dataset(DataSpec(dataset="generic", mapping=catalog_dir / "mapping.yaml", id_map_dir=tmp_path / "ids"))
    imap = dict(zip(ds2.id_maps["item_id"]["raw"], ds2.id_maps["item_id"]["id"]))
    assert imap["A-1"] == 0 and imap["G-7"] == 6 and imap["AA-0"] == 7


def test_missing_column_names_file_and_column(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n")
    (tmp_path / "r.csv").write_text("user_id,item,ts\n1,1,5\n")
    with pytest.raises(ValueError) as err:
        load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    msg = str(err.value)
    assert "r.csv" in msg and "'item_id'" in msg and "item" in msg


def test_wrong_dtype_names_file_column_and_row(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n2,b\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts,label\n1,1,100,1\n1,2,200,1\n2,1,300,yes\n")
    with pytest.raises(DataError) as err:
        load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    msg = str(err.value)
    assert "r.csv" in msg and "'label'" in msg and "row 2" in msg and "line 4" in msg and "'yes'" in msg


def test_bad_timestamp_names_row(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,2024-01-01\n1,1,last tuesday\n")
    with pytest.raises(DataError, match=r"r\.csv: column 'ts' \(ts\) row 1 .*'last tuesday'"):
        load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))


def test_ids_int_mode_rejects_string_id_with_row(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\nx7,b\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,5\n")
    with pytest.raises(DataError, match=r"i\.csv: column 'item_id' \(item_id\) row 1 .*'x7'"):
        load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv",
                              column_map=("ids=int",)))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "i.parquet").write_bytes(b"PAR1 garbage")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,5\n")
    with pytest.raises(DataError, match=r"i\.parquet: unreadable parquet"):
        load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.parquet", interactions=tmp_path / "r.csv"))
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_dataset(DataSpec(dataset="generic", items=tmp_path / "nope.csv", interactions=tmp_path / "r.csv"))


def test_mapping_with_unknown_key_is_refused(tmp_path):
    (tmp_path / "m.yaml").write_text("items:\n  columns: {item_idd: sku}\n")
    with pytest.raises(DataError, match=r"m\.yaml: items\.columns: unknown key\(s\) \['item_idd'\]"):
        load_dataset(DataSpec(dataset="generic", mapping=tmp_path / "m.yaml"))


def test_parquet_datetimes_and_string_ids(tmp_path):
    items = pd.DataFrame({"item_id": ["b", "a"], "title": ["B", "A"], "noise": [1, 2]})
    events = pd.DataFrame({"user_id": ["x", "y"], "item_id": ["a", "b"],
                           "ts": pd.to_datetime(["2024-03-01T12:00:00+01:00", "2024-03-01T10:00:00+00:00"], utc=True),
                           "dwell_s": pd.array([3, None], dtype="Int64")})
    items.to_parquet(tmp_path / "i.parquet")
    events.to_parquet(tmp_path / "e.parquet")
    (tmp_path / "m.yaml").write_text("items: {path: i.parquet}\n"
                                     "interactions: {path: e.parquet, attributes: [dwell_s]}\n")
    ds = load_dataset(DataSpec(dataset="generic", mapping=tmp_path / "m.yaml"))
    inter = ds.interactions
    # 12:00+01:00 is 11:00Z, after 10:00Z: order by instant, not by wall-clock text
    assert list(inter["ts"]) == [int(pd.Timestamp("2024-03-01T10:00Z").timestamp()),
                                 int(pd.Timestamp("2024-03-01T11:00Z").timestamp())]
    assert list(inter["item_id"]) == [1, 0]          # "b" -> 1, "a" -> 0
    assert str(inter["dwell_s"].dtype) == "Int64" and inter["dwell_s"].isna().sum() == 1
    assert "noise" not in ds.items                   # unmapped columns are not read


def test_auto_timestamps_in_milliseconds(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,1700000000123\n")
    ds = load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    assert list(ds.interactions["ts"]) == [1700000000]


def test_export_round_trip(catalog_dir, tmp_path):
    from pipelines.data import export_dataset
    ds = load_dataset(DataSpec(dataset="generic", mapping=catalog_dir / "mapping.yaml"))
    export_dataset(ds, tmp_path / "exp")
    back = load_dataset(DataSpec(dataset="generic", mapping=tmp_path / "exp" / "mapping.json"))
    pd.testing.assert_frame_equal(back.items, ds.items)
    pd.testing.assert_frame_equal(back.interactions, ds.interactions)
    assert back.image_root == ds.image_root.resolve()
    # the image-only item still has no text: flagged again (kept), nothing else
    assert back.reject_counts == {"empty_text": 1} and set(back.rejects["action"]) == {"kept_image_only"}
    assert len(pd.read_parquet(tmp_path / "exp" / "rejects.parquet")) == len(ds.rejects)


def test_text_from_several_columns_and_mapped_columns_are_required(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,name,desc,cat\n1,Mug,ceramic,kitchen\n2,Cup,,\n3,,,\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,5\n")
    spec = dict(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv")
    ds = load_dataset(DataSpec(**spec, column_map=("items.title=name", "items.text=desc,cat")))
    texts = ds.items.set_index("item_id")["text"]
    assert texts[1] == "ceramic. kitchen" and texts[2] is None
    assert ds.reject_counts == {"empty_text": 1}  # item 3: nothing at all
    with pytest.raises(DataError, match=r"i\.csv: missing column\(s\) \['photo'\]"):
        load_dataset(DataSpec(**spec, column_map=("items.title=name", "items.image_uri=photo")))


def test_string_item_id_in_log_of_integer_catalog_is_an_unknown_item(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n10,a\n20,b\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,10,5\n1,oops,6\n2,20,7\n")
    ds = load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    assert list(ds.items["item_id"]) == [10, 20] and ds.id_maps == {}   # not renumbered
    assert ds.reject_counts == {"unknown_item": 1}
    assert ds.rejects.iloc[0]["item_id"] == "oops" and ds.rejects.iloc[0]["row"] == 1


def test_large_integer_ids_survive_exactly(tmp_path):
    big = 2**60 + 1  # not representable in float64
    (tmp_path / "i.csv").write_text(f"item_id,title\n{big},a\n,empty id\n")
    (tmp_path / "r.csv").write_text(f"user_id,item_id,ts\n{big},{big},5\n")
    ds = load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    assert ds.items["item_id"].tolist() == [big] and ds.interactions["user_id"].tolist() == [big]
    assert ds.reject_counts == {"missing_value": 1}


def test_event_type_labels(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts,event\n1,1,1,impression\n1,1,2,click\n1,1,3,share\n1,1,4,\n")
    (tmp_path / "m.yaml").write_text("items: {path: i.csv}\ninteractions:\n  path: r.csv\n  columns: {label: event}\n"
                                     "  label_values: {impression: 0, click: 1}\n")
    ds = load_dataset(DataSpec(dataset="generic", mapping=tmp_path / "m.yaml"))
    assert list(ds.interactions["label"]) == [0.0, 1.0]
    assert ds.reject_counts == {"bad_label": 1, "missing_value": 1}  # "share" is unmapped; row 3 is empty
    (tmp_path / "m.yaml").write_text("interactions:\n  label_values: {click: yes}\n")
    with pytest.raises(DataError, match="label_values"):
        load_dataset(DataSpec(dataset="generic", mapping=tmp_path / "m.yaml", items=tmp_path / "i.csv",
                              interactions=tmp_path / "r.csv"))


def test_partitioned_log_folder_and_glob(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n2,b\n")
    log = tmp_path / "events"
    log.mkdir()
    (log / "day=01.csv").write_text("user_id,item_id,ts\n1,1,10\n1,2,11\n")
    pd.DataFrame({"user_id": [2, 2], "item_id": [2, 99], "ts": [20, 21]}).to_parquet(log / "day=02.parquet")
    (log / "_SUCCESS").write_text("")            # marker files are not parts
    spec = dict(dataset="generic", items=tmp_path / "i.csv")
    ds = load_dataset(DataSpec(**spec, interactions=log))
    assert len(ds.interactions) == 3
    rej = ds.rejects.iloc[0]
    assert (rej["reason"], rej["source"], rej["row"]) == ("unknown_item", "day=02.parquet", 1)
    globbed = load_dataset(DataSpec(**spec, interactions=tmp_path / "events" / "*.csv"))
    assert len(globbed.interactions) == 2
    (log / "day=03.csv").write_text("user_id,item_id,ts\n3,1,30\n3,1,soon\n")
    with pytest.raises(DataError, match=r"day=03\.csv: column 'ts' \(ts\) row 1 \(line 3\)"):
        load_dataset(DataSpec(**spec, interactions=log))
    (log / "day=03.csv").write_text("user_id,item,ts\n3,1,30\n")
    with pytest.raises(DataError, match=r"day=03\.csv: missing column\(s\) \['item_id'\]"):
        load_dataset(DataSpec(**spec, interactions=log))


def test_auto_timestamps_mix_formats_per_value():
    from pipelines.data.io import to_unix_seconds
    frame = pd.DataFrame({"ts": ["1700000000", "2023-11-14T22:13:20Z", None, " "]})
    assert to_unix_seconds(frame, "ts").tolist() == [1700000000, 1700000000, pd.NA, pd.NA]
    with pytest.raises(DataError, match="is not a unix timestamp$"):
        to_unix_seconds(frame, "ts", fmt="unix")


def test_csv_with_byte_order_mark(tmp_path):
    (tmp_path / "i.csv").write_bytes("\ufeffitem_id,title\n1,Crème brûlée\n".encode("utf-8"))
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,5\n")
    ds = load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    assert ds.items["title"].tolist() == ["Crème brûlée"]
