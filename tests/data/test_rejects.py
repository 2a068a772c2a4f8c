"""Every per-record problem is counted by reason, kept in `rejects`, and never crashes the load."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.data import REJECT_REASONS, DataError, DataSpec, load_dataset, write_rejects


def _load(catalog_dir, **kw):
    return load_dataset(DataSpec(dataset="generic", mapping=catalog_dir / "mapping.yaml", **kw))


def test_every_reason_is_counted_and_kept(catalog_dir):
    ds = _load(catalog_dir)
    assert ds.reject_counts == {
        "bad_label": 1, "bad_timestamp": 1, "corrupt_image": 1, "duplicate_interaction": 1, "duplicate_item": 1, "empty_text": 2,
        "image_escapes_root": 1,
        "missing_image": 1, "missing_value": 1, "unknown_item": 2,
    }
    # the fixture injects every reason there is but bad_id (string ids cannot be "not an integer"): see
    # test_unparseable_values_are_rejects_below_the_share for that one
    assert set(ds.reject_counts) == set(REJECT_REASONS) - {"bad_id"}
    rej = ds.rejects
    assert list(rej.columns) == ["source", "row", "item_id", "user_id", "item_dense_id", "user_dense_id", "reason",
                                 "detail", "action"]

    def one(reason, **match):
        sel = rej[rej["reason"] == reason]
        for k, v in match.items():
            sel = sel[sel[k] == v]
        assert len(sel) == 1, (reason, match, rej)
        return sel.iloc[0]

    # item-side rejects name the items file and its data row
    assert one("duplicate_item")["row"] == 4 and one("duplicate_item")["source"] == "items.csv"
    assert one("missing_image")["action"] == "kept_text_only" and "missing.png" in one("missing_image")["detail"]
    assert one("corrupt_image")["row"] == 3
    assert one("image_escapes_root")["row"] == 7
    assert one("empty_text", action="kept_image_only")["row"] == 5
    assert one("empty_text", action="dropped")["row"] == 6
    # interaction-side rejects keep the raw ids
    assert one("unknown_item", row=3)["item_id"] == "Z-9"
    assert one("unknown_item", row=4)["source"] == "events.csv"
    assert one("missing_value")["row"] == 5
    assert one("bad_label")["user_id"] == "u3"
    # every reject names the ids as the source wrote them (never the dense ids the loader made)
    assert one("duplicate_item")["item_id"] == "A-1" and one("corrupt_image")["item_id"] == "D-4"
    assert (one("unknown_item", row=4)["item_id"], one("unknown_item", row=4)["user_id"]) == ("F-6", "u2")
    assert one("missing_value")["user_id"] is None
    assert one("duplicate_interaction")["row"] == 9
    assert (one("bad_timestamp")["row"], one("bad_timestamp")["item_id"]) == (11, "A-1")


def test_bad_images_demote_items_to_text_only(catalog_dir):
    ds = _load(catalog_dir)
    items = ds.items.set_index("item_id")
    # C-3 (missing), D-4 (corrupt), G-7 (escapes root) are text-only; E-5 is image-only; F-6 and the dup are gone
    assert items.loc[2, "image_uri"] is None and items.loc[3, "image_uri"] is None and items.loc[6, "image_uri"] is None
    assert items.loc[4, "image_uri"] == "e.png" and items.loc[4, "title"] == ""
    assert 5 not in items.index
    assert items.loc[0, "title"] == "Red mug"  # the first A-1 row wins over the duplicate
    assert ds.stats()["items_with_image"] == 3 and ds.stats()["items"] == 6


def test_nothing_silently_lost(catalog_dir):
    ds = _load(catalog_dir)
    n_events = len(pd.read_csv(catalog_dir / "events.csv"))
    dropped = ds.rejects[(ds.rejects["source"] == "events.csv") & (ds.rejects["action"] == "dropped")]
    assert len(ds.interactions) + len(dropped) == n_events
    n_items = len(pd.read_csv(catalog_dir / "items.csv"))
    dropped_items = ds.rejects[(ds.rejects["source"] == "items.csv") & (ds.rejects["action"] == "dropped")]
    assert len(ds.items) + len(dropped_items) == n_items


def test_require_image_filters_without_calling_it_bad(catalog_dir):
    items, events = catalog_dir / "items.csv", catalog_dir / "events.csv"
    items.write_text(items.read_text() + "I-9,Fork,steel fork,,acme\n")  # row 8: text, no image uri at all
    events.write_text(events.read_text() + "u1,I-9,2024-01-09,1\n")
    ds = _load(catalog_dir, require_image=True)
    assert ds.items["image_uri"].notna().all() and len(ds.items) == 3
    # an item without an image (and its interactions) is filtered, not a bad record
    assert ds.filtered["items_without_image"] == 1 and ds.filtered["interactions_on_items_without_image"] == 1
    assert "I-9" not in set(ds.rejects["item_id"].dropna())


def test_require_image_drops_bad_images_once_and_the_rejects_agree_with_the_counts(catalog_dir):
    """Issue 19 case 3: under --require-image the rejects said `kept_text_only` for images whose items the
    `filtered` counts said were removed. Each item that loses its image is one reject, under its image reason,
    whose action says what happened to it."""
    ds = _load(catalog_dir, require_image=True)
    rej = ds.rejects
    images = rej[rej["reason"].isin(["missing_image", "corrupt_image", "image_escapes_root"])]
    assert sorted(images["item_id"]) == ["C-3", "D-4", "G-7"] and set(images["action"]) == {"dropped"}
    assert images["detail"].str.contains("--require-image drops it").all()
    assert rej.groupby(["source", "row"]).size().max() == 1  # one reject per record
    assert ds.filtered["items_without_image"] == 0
    # their interactions are dropped with them (C-3, G-7, D-4 twice), counted as rejects, not as filtered
    assert ds.reject_counts["unknown_item"] == 2 + 4
    assert ds.filtered["interactions_on_items_without_image"] == 0
    assert len(ds.interactions) == 2
    n_items = len(pd.read_csv(catalog_dir / "items.csv"))
    dropped = rej[(rej["source"] == "items.csv") & (rej["action"] == "dropped")]
    assert len(ds.items) + len(dropped) + ds.filtered["items_without_image"] == n_items


def test_an_item_without_text_that_loses_its_image_is_one_dropped_reject(catalog_dir):
    """An item with no text whose image is broken was two rejects (corrupt_image kept_text_only, then
    empty_text dropped): now one, under the image's reason, and its action says it was dropped."""
    items = catalog_dir / "items.csv"
    items.write_text(items.read_text() + "H-8,,,broken.png,acme\n")  # row 8: no text, corrupt image
    ds = _load(catalog_dir)
    rows = ds.rejects[ds.rejects["row"].eq(8) & ds.rejects["source"].eq("items.csv")]
    assert rows[["reason", "action"]].values.tolist() == [["corrupt_image", "dropped"]]
    assert "no title and no text either" in rows["detail"].iloc[0]
    assert 8 not in set(ds.items["item_id"])


def test_decode_level_catches_truncated_image(catalog_dir):
    data = (catalog_dir / "img" / "a.png").read_bytes()
    (catalog_dir / "img" / "a.png").write_bytes(data[: len(data) // 2])
    ds = _load(catalog_dir, validate_images="decode")
    assert ds.reject_counts["corrupt_image"] == 2  # broken.png and the truncated a.png


@pytest.mark.parametrize("name", ["rejects.parquet", "rej.csv", "rej.jsonl"])
def test_write_rejects_in_the_format_the_extension_names(catalog_dir, tmp_path, name):
    """Issue 10 bug 3: `--rejects rej.csv` wrote Parquet bytes under a .csv name."""
    ds = _load(catalog_dir)
    out = write_rejects(ds, tmp_path / "out" / name)
    data = out.read_bytes()
    if name.endswith(".parquet"):
        assert data[:4] == b"PAR1"
        back = pd.read_parquet(out)
    elif name.endswith(".csv"):
        assert data[:4] != b"PAR1" and data.decode().splitlines()[0] == ",".join(ds.rejects.columns)
        back = pd.read_csv(out, dtype=str, keep_default_na=False, na_values=[""])
    else:
        rows = [json.loads(line) for line in data.decode().splitlines()]  # strict JSON: null, never NaN
        back = pd.DataFrame(rows)
        assert rows[0].keys() == set(ds.rejects.columns)
    assert len(back) == len(ds.rejects) and set(back["reason"]) == set(ds.reject_counts)
    assert sorted(back["item_id"].dropna()) == sorted(ds.rejects["item_id"].dropna())  # raw string ids survive
    summary = tmp_path / "out" / (name.rsplit(".", 1)[0] + ".summary.json")
    assert json.loads(summary.read_text())["counts"] == ds.reject_counts and summary != out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([name, summary.name])  # no temp files
    assert out.stat().st_mode & 0o044  # readable by others, like a plain write (not mkstemp's 0600)


@pytest.mark.parametrize("name", ["rej.txt", "rej", "rej.json", "rej.summary.json"])
def test_write_rejects_refuses_other_extensions(catalog_dir, tmp_path, name):
    ds = _load(catalog_dir)
    with pytest.raises(DataError, match=r"unsupported extension.*\.csv.*\.parquet.*\.jsonl"):
        write_rejects(ds, tmp_path / name)
    assert not list(tmp_path.glob("rej*"))  # nothing written


def test_data_stats_cli_writes_csv_rejects(catalog_dir, tmp_path, capsys):
    from pipelines import cli

    out = tmp_path / "rej.csv"
    assert cli.main(["data", "stats", "--dataset", "generic", "--mapping", str(catalog_dir / "mapping.yaml"),
                     "--rejects", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rejects_file"] == str(out)
    assert pd.read_csv(out)["reason"].value_counts().to_dict() == result["rejected"]
    assert (tmp_path / "rej.summary.json").exists()
    # a bad extension is refused up front, with a usage error
    assert cli.main(["data", "stats", "--dataset", "generic", "--mapping", str(catalog_dir / "mapping.yaml"),
                     "--rejects", str(tmp_path / "rej.xlsx"), "--json"]) != 0
    assert not (tmp_path / "rej.xlsx").exists()


def _log_with_unparseable_values(folder):
    """10 interactions; rows 2, 4, 6, 7 hold a value that does not parse (ids are integers: `ids: int`)."""
    folder.mkdir(exist_ok=True)
    (folder / "items.csv").write_text("item_id,title\n1,a\n2,b\n3,c\n")
    (folder / "events.csv").write_text(
        "user_id,item_id,ts,label\n"
        "10,1,100,1\n10,2,200,0\n"
        "11,1,notadate,1\n"       # row 2: bad_timestamp
        "11,2,300,1\n"
        "12,3,400,abc\n"          # row 4: bad_label
        "12,1,500,1\n"
        "u7,2,600,1\n"            # row 6: bad_id (user)
        "13,x9,700,0\n"           # row 7: bad_id (item)
        "13,3,800,1\n14,1,900,0\n")
    return DataSpec(dataset="generic", items=folder / "items.csv", interactions=folder / "events.csv",
                    column_map=("ids=int",))


def test_unparseable_values_are_rejects_below_the_share(tmp_path):
    """Issue 10 bug 2: one unparseable value aborted the whole load; below the share it is a per-record reject."""
    import dataclasses

    spec = dataclasses.replace(_log_with_unparseable_values(tmp_path), max_bad_fraction=0.5)
    ds = load_dataset(spec)
    assert ds.reject_counts == {"bad_id": 2, "bad_label": 1, "bad_timestamp": 1}
    assert len(ds.interactions) == 6 and sorted(ds.interactions["ts"]) == [100, 200, 300, 500, 800, 900]
    rej = ds.rejects.set_index("row")
    assert set(rej["source"]) == {"events.csv"}
    assert (rej.loc[2, "reason"], rej.loc[2, "detail"]) == ("bad_timestamp", "column 'ts' (ts): value 'notadate' "
                                                            "is not a unix timestamp or an ISO-8601 date")
    assert rej.loc[4, "reason"] == "bad_label" and "'abc' is not a number" in rej.loc[4, "detail"]
    assert rej.loc[6, "reason"] == "bad_id" and "column 'user_id'" in rej.loc[6, "detail"]
    assert (rej.loc[6, "user_id"], rej.loc[6, "item_id"], rej.loc[6, "item_dense_id"]) == ("u7", "2", 2)
    assert rej.loc[7, "reason"] == "bad_id" and "'x9'" in rej.loc[7, "detail"]
    assert pd.isna(rej.loc[7, "item_dense_id"]) and rej.loc[7, "user_dense_id"] == 13


def test_past_the_share_the_load_fails_naming_file_column_count_and_rows(tmp_path):
    spec = _log_with_unparseable_values(tmp_path)          # default --max-bad-fraction 0.001; 4 of 10 rows are bad
    with pytest.raises(DataError) as err:
        load_dataset(spec)
    msg = str(err.value)
    assert "4 of 10 rows (40.00%)" in msg and "--max-bad-fraction 0.001" in msg
    assert "events.csv: column 'ts' (ts) row 2 (line 4): value 'notadate'" in msg
    assert "column 'label' (label) row 4 (line 6): value 'abc'" in msg
    assert "column 'user_id' (user_id) row 6 (line 8): value 'u7'" in msg and "'x9'" in msg
    import dataclasses
    with pytest.raises(DataError, match=r"(?s)2 of 3 rows .*items.csv: column 'item_id' \(item_id\) row 1 .*"
                                        r"2 bad value\(s\) in this column; first: items.csv row 1 \(line 3\) 'x', "
                                        r"items.csv row 2 \(line 4\) 'y'"):
        (tmp_path / "items.csv").write_text("item_id,title\n1,a\nx,b\ny,c\n")
        load_dataset(dataclasses.replace(spec, max_bad_fraction=0.5))


def test_one_bad_value_in_a_long_log_is_rejected_at_the_default_share(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n2,b\n")
    rows = [f"{u},{1 + u % 2},{1000 + u},1" for u in range(2000)]
    rows[1234] = "1234,1,notadate,1"
    (tmp_path / "r.csv").write_text("user_id,item_id,ts,label\n" + "\n".join(rows) + "\n")
    ds = load_dataset(DataSpec(dataset="generic", items=tmp_path / "i.csv", interactions=tmp_path / "r.csv"))
    assert ds.reject_counts == {"bad_timestamp": 1} and len(ds.interactions) == 1999   # 1 / 2000 <= 0.001
    assert ds.rejects.iloc[0]["row"] == 1234 and "'notadate'" in ds.rejects.iloc[0]["detail"]


def test_missing_column_and_wrong_file_stay_hard_errors(tmp_path):
    import dataclasses

    spec = dataclasses.replace(_log_with_unparseable_values(tmp_path), max_bad_fraction=1.0)
    (tmp_path / "events.csv").write_text("user_id,item_id,label\n1,1,1\n")
    with pytest.raises(DataError, match=r"events\.csv: missing column\(s\) \['ts'\]"):
        load_dataset(spec)
    (tmp_path / "events.csv").write_bytes(b"PAR1 not really")
    (tmp_path / "items.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"items\.parquet: unreadable parquet"):
        load_dataset(dataclasses.replace(spec, items=tmp_path / "items.parquet"))


def test_max_bad_fraction_flag_reaches_the_spec():
    import argparse

    from pipelines.beam.data_flags import add_data_arguments, data_spec_from_args

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert data_spec_from_args(parser.parse_args([])).max_bad_fraction == 0.001
    assert data_spec_from_args(parser.parse_args(["--max-bad-fraction", "0.05"])).max_bad_fraction == 0.05
    with pytest.raises(ValueError, match="max_bad_fraction.*must be in \\[0, 1\\]"):
        data_spec_from_args(parser.parse_args(["--max-bad-fraction", "1.5"]))
    assert DataSpec.from_dict(DataSpec(max_bad_fraction=0.2).to_dict()).max_bad_fraction == 0.2


def test_movielens_unparseable_values_are_rejects_too(tmp_path):
    ml = tmp_path / "ml-latest-small"
    ml.mkdir()
    (ml / "movies.csv").write_text("movieId,title,genres\n1,A (1999),Drama\n2,B (2000),Comedy\nzz,C (2001),Drama\n")
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,five,200\n2,1,3.0,notadate\n"
                                    "2,2,5.0,300\n")
    with pytest.raises(DataError, match=r"movies\.csv \(items\): 1 of 3 rows"):
        load_dataset(DataSpec(dataset="movielens", data=tmp_path))
    ds = load_dataset(DataSpec(dataset="movielens", data=tmp_path, max_bad_fraction=0.5))
    assert ds.reject_counts == {"bad_id": 1, "bad_label": 1, "bad_timestamp": 1}
    rej = ds.rejects.set_index(["source", "row"])
    assert rej.loc[("ratings.csv", 1), "reason"] == "bad_label" and "'five'" in rej.loc[("ratings.csv", 1), "detail"]
    assert rej.loc[("ratings.csv", 2), "reason"] == "bad_timestamp"
    assert rej.loc[("movies.csv", 2), "item_id"] == "zz"
    assert len(ds.interactions) == 2
