"""Issue 19 case 3: truncated and undecodable images are caught by the default check, and every item that loses
its image is one dead letter (one reason), whichever stage found it."""
from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.data import DataSpec, load_dataset
from pipelines.data.images import ImageError, check_image
from pipelines.beam.validate_records import DEAD, ValidateItems


def _jpeg(path, seed=0, size=(120, 90)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    _jpeg(folder / "ok.jpg")
    data = _jpeg(folder / "whole.jpg", seed=1).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])  # a cut-off download: header intact
    (folder / "noise.jpg").write_bytes(data[:600] + bytes(np.random.default_rng(2).integers(0, 255, 2000,
                                                                                              dtype=np.uint8)))
    return folder


def test_the_default_check_catches_a_truncated_jpeg_that_the_header_check_passes(images):
    check_image("truncated.jpg", images, "header")  # why the default is no longer "header"
    assert DataSpec().validate_images == "draft"
    for name in ("truncated.jpg", "noise.jpg"):
        with pytest.raises(ImageError) as exc:
            check_image(name, images)  # the default level
        assert exc.value.reason == "corrupt_image" and name in str(exc.value)
    assert check_image("ok.jpg", images) == images / "ok.jpg"


def test_loader_and_job_validation_report_the_same_single_reject(images, tmp_path):
    """The loader's rejects and the job's ValidateItems agree: one reject per item, under its image reason;
    an item without text that loses its image is dropped (not kept_text_only and then empty_text)."""
    (tmp_path / "items.csv").write_text("item_id,title,image_uri\n1,a,ok.jpg\n2,b,truncated.jpg\n3,,noise.jpg\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,ts\n1,1,100\n1,2,200\n")
    ds = load_dataset(DataSpec(dataset="generic", items=tmp_path / "items.csv", interactions=tmp_path / "events.csv",
                               mapping=None, now=10_000, column_map=("image_root=" + str(images),)))
    loader = sorted(ds.rejects[["item_id", "reason", "action"]].itertuples(index=False, name=None))
    assert loader == [("2", "corrupt_image", "kept_text_only"), ("3", "corrupt_image", "dropped")]
    items = [{"item_id": 1, "title": "a", "text": None, "image_uri": "ok.jpg", "_row": 0},
             {"item_id": 2, "title": "b", "text": None, "image_uri": "truncated.jpg", "_row": 1},
             {"item_id": 3, "title": "", "text": None, "image_uri": "noise.jpg", "_row": 2}]
    with TestPipeline() as p:
        out = p | beam.Create(items) | ValidateItems(str(images))
        assert_that(out[DEAD] | beam.Map(lambda r: (r["item_id"], r["reason"], r["action"])),
                    equal_to(loader), label="same rejects")
        assert_that(out["items"] | beam.Map(lambda r: (r["item_id"], r["image_uri"])),
                    equal_to([(1, "ok.jpg"), (2, None)]), label="kept")


def test_an_image_that_breaks_after_validation_is_a_dead_letter_of_the_side_cache(tmp_path):
    """Side mode's one backbone pass used to log "image unusable, encoding text only" and count nothing: the
    item now comes out of the cache build as one dead letter (kept text-only)."""
    from pipelines.encoder import EncoderConfig
    from pipelines.beam.side_cache import BuildSideCache, CacheImageRejects

    ds = load_dataset(DataSpec(dataset="synthetic", data=tmp_path / "data", n_items=12, n_users=5, n_events=100,
                               n_clusters=2, image_size=16, now=2_000_000_000))
    records = ds.items.to_dict("records")
    broken = records[3]
    path = ds.image_root / broken["image_uri"]
    path.write_bytes(path.read_bytes()[:40])  # the file breaks after validation
    out = tmp_path / "dead.json"
    cache_dir = tmp_path / "cache"
    for run in range(2):  # the second run reuses the shards and still reports the item
        with TestPipeline("FnApiRunner") as p:
            done = p | beam.Create(records) | BuildSideCache(EncoderConfig.named("tiny").to_dict(), 2,
                                                             str(ds.image_root), str(cache_dir), shard_size=8,
                                                             batch_size=8)
            _ = (done | CacheImageRejects(str(cache_dir)) | beam.combiners.ToList()
                 | beam.Map(lambda rows, f=str(out): open(f, "w").write(json.dumps(rows, default=str))))
        dead = json.loads(out.read_text())
        assert [(d["item_dense_id"], d["reason"], d["action"]) for d in dead] == \
            [(broken["item_id"], "corrupt_image", "kept_text_only")], (run, dead)
        assert str(path) in dead[0]["detail"]
