"""The side cache built and read on the workers equals the in-process one-pass API (pipelines.encoder.onepass)."""
import json

import numpy as np
import pytest
import torch

from pipelines.encoder import EncoderConfig
from pipelines.encoder.alignment import AlignConfig, train_side
from pipelines.encoder.cache import load_cache
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.onepass import build_mllm_cache, embed_from_cache
from pipelines.encoder.side import SideConfig
from pipelines.beam.side_cache import BuildSideCache, EmbedFromCache, shard_of

TINY = EncoderConfig.named("tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipelines.data import load_dataset
    from pipelines.data.schema import DataSpec
    from pipelines.mining.pairs import PairConfig, mine_pairs

    folder = tmp_path_factory.mktemp("side_cache_world")
    ds = load_dataset(DataSpec(dataset="synthetic", data=str(folder), n_items=40, n_users=30, n_events=1200,
                               n_clusters=4, image_size=16, seed=0))
    pairs = mine_pairs(ds.interactions, PairConfig(heldout_frac=0.0, min_support=2)).train
    return ds, pairs


def _run_build(ds, cache_dir, shard_size=16, items=None):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    records = (ds.items if items is None else items).to_dict("records")
    with TestPipeline("FnApiRunner") as p:
        _ = (p | beam.Create(records)
             | BuildSideCache(TINY.to_dict(), 2, str(ds.image_root), str(cache_dir), shard_size=shard_size,
                              batch_size=8))


def test_worker_built_cache_holds_the_in_process_states(world, tmp_path):
    ds, _ = world
    _run_build(ds, tmp_path / "beam")
    beam_cache = load_cache(tmp_path / "beam")
    assert len(beam_cache.shards) == 3 and len(beam_cache) == 40  # 40 items / 16 per shard
    ref = build_mllm_cache(TINY, ItemCatalog.from_dataset(ds, TINY), SideConfig(layer_stride=2),
                           cache_dir=tmp_path / "ref", progress=False)
    assert beam_cache.layout == ref.layout and beam_cache.stats["n_items"] == ref.stats["n_items"] == 40
    ids = ref.item_ids
    for key, want in ref.gather(ids).items():
        torch.testing.assert_close(beam_cache.gather(ids)[key], want, rtol=1e-4, atol=1e-5)
    # every shard holds the items of its hash bucket
    for shard in beam_cache.shards:
        from pipelines.encoder.cache import read_shard

        shard_ids, _ = read_shard(tmp_path / "beam", shard)
        assert len({shard_of(i, 3) for i in shard_ids.tolist()}) == 1


def test_a_rerun_reuses_every_shard_and_the_manifest(world, tmp_path):
    ds, _ = world
    _run_build(ds, tmp_path / "c")
    files = sorted((tmp_path / "c").glob("*"))
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    _run_build(ds, tmp_path / "c")
    assert {f.name: f.stat().st_mtime_ns for f in sorted((tmp_path / "c").glob("*"))} == stamps
    # another shard size is another set of shards: the old files are swept when the new manifest lands
    _run_build(ds, tmp_path / "c", shard_size=25)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == sorted(s["file"] for s in manifest["shards"])


def test_embed_from_cache_on_the_workers_equals_the_in_process_embedding(world, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    ds, pairs = world
    _run_build(ds, tmp_path / "c")
    cache = load_cache(tmp_path / "c")
    cfg = AlignConfig(mode="side", epochs=1, batch_size=16, progress=False, side=SideConfig(layer_stride=2))
    result = train_side(cache, pairs, None, cfg, out_dir=tmp_path / "run")
    want = embed_from_cache(result.encoder, load_cache(tmp_path / "c"), progress=False)
    with TestPipeline("FnApiRunner") as p:
        done = p | "Cache" >> beam.Create([str(tmp_path / "c")])
        ckpt = p | "Ckpt" >> beam.Create([str(tmp_path / "run")])
        out = done | EmbedFromCache(str(tmp_path / "c"), ckpt, ("aligned", "unaligned", "text", "image"))
        for kind in ("aligned", "unaligned", "text", "image"):
            _ = (out[kind] | f"Keep{kind}" >> beam.combiners.ToList()
                 | f"Store{kind}" >> beam.Map(_save, str(tmp_path / f"{kind}.npz")))
        assert_that(out["dead_letter"], equal_to([]), label="NoDeadLetter")
    assert set(want) == {"aligned", "unaligned", "text", "image"}
    for kind, (ids, emb) in want.items():
        saved = np.load(tmp_path / f"{kind}.npz")
        order = np.argsort(saved["ids"])
        assert np.array_equal(saved["ids"][order], np.sort(ids)), kind
        np.testing.assert_allclose(saved["emb"][order], emb[np.argsort(ids)], rtol=1e-5, atol=1e-6)


def _save(rows, path):
    np.savez(path, ids=np.array([r[0] for r in rows], np.int64), emb=np.stack([r[1] for r in rows]))


def test_an_edited_item_text_is_a_new_shard(world, tmp_path):
    ds, _ = world
    _run_build(ds, tmp_path / "c")
    before = {s["file"] for s in json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]}
    edited = ds.items.copy()
    edited.loc[edited.index[0], "text"] = "an entirely new description"
    _run_build(ds, tmp_path / "c", items=edited)
    after = {s["file"] for s in json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]}
    assert len(before - after) == 1 and len(after - before) == 1  # only the edited item's shard is rebuilt


def test_items_the_encoder_reads_nothing_of_are_counted_in_the_dead_letter(world, tmp_path):
    """Issue 18 point 6: an item with no title, no text and no image the encoder reads embeds to the same vector
    as every other such item (so they all share one code); each is recorded, reason no_readable_content."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    ds, pairs = world
    items = ds.items.copy()
    blind = items["item_id"].to_numpy()[:3]
    items.loc[items["item_id"].isin(blind), ["title", "text", "image_uri"]] = ["", None, None]
    _run_build(ds, tmp_path / "c", items=items)
    cfg = AlignConfig(mode="side", epochs=1, batch_size=16, progress=False, side=SideConfig(layer_stride=2))
    train_side(load_cache(tmp_path / "c"), pairs, None, cfg, out_dir=tmp_path / "run")
    with TestPipeline("FnApiRunner") as p:
        done = p | "Cache" >> beam.Create([str(tmp_path / "c")])
        ckpt = p | "Ckpt" >> beam.Create([str(tmp_path / "run")])
        out = done | EmbedFromCache(str(tmp_path / "c"), ckpt, ("aligned",))
        _ = out["aligned"] | "Keep" >> beam.combiners.ToList() | beam.Map(_save, str(tmp_path / "aligned.npz"))
        _ = (out["dead_letter"] | "KeepDead" >> beam.combiners.ToList()
             | beam.Map(_save_json, str(tmp_path / "dead.json")))
    dead = json.loads((tmp_path / "dead.json").read_text())
    assert sorted(int(r[0]) for r in dead) == sorted(blind.tolist())
    assert {(r[1], r[2]) for r in dead} == {("no_readable_content", "kept_shared_embedding")}
    saved = np.load(tmp_path / "aligned.npz")
    rows = saved["emb"][np.isin(saved["ids"], blind)]
    assert len(rows) == 3 and np.array_equal(rows[0], rows[1]) and np.array_equal(rows[0], rows[2])


def _save_json(rows, path):
    from pathlib import Path

    Path(path).write_text(json.dumps([[int(r["item_dense_id"]), r["reason"], r["action"]] for r in rows]))
