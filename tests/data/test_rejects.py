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
    assert set(ds.reject_counts) == set(REJECT_REASONS)  # the fixture injects every reason there is
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
    ds = _load(catalog_dir, require_image=True)
    assert ds.items["image_uri"].notna().all() and len(ds.items) == 3
    assert ds.filtered["items_without_image"] == 3
    # interactions on the text-only items (C-3, D-4, G-7) are filtered, not rejected as unknown
    assert ds.reject_counts["unknown_item"] == 2
    assert ds.filtered["interactions_on_items_without_image"] == 4  # C-3, G-7 and D-4 twice
    assert len(ds.interactions) == 2


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
