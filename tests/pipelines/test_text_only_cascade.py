"""The cascade on a catalog without any image: the frozen MLLM runs text-only (no vision tower is built, no vision
weights are read, in the driver or on the in-process workers) and the version records it. The same run checks that
every long stage reports progress off a terminal (the interval shortened so a tiny run reaches it)."""
import logging

import pytest

from feature_store import FeatureStore
from oracle_world import oracle_world, write_world_files

pytestmark = pytest.mark.slow


def test_text_only_catalog_cascade_never_builds_the_vision_tower(tmp_path, monkeypatch, caplog):
    import open_clip.model

    import feature_store.progress

    from pipelines.encoder import towers
    from pipelines.jobs.cascade import run

    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower was built / its weights were read for a text-only catalog")

    monkeypatch.setattr(open_clip.model, "_build_vision_tower", refuse)
    monkeypatch.setattr(towers, "load_trunk_weights", refuse)
    monkeypatch.setattr(feature_store.progress, "EVERY_S", 1e-9)  # every update writes its line
    caplog.set_level(logging.INFO)
    world = oracle_world(n_items=60, n_users=40, n_events=1600, seed=3)
    items, inter = write_world_files(world, tmp_path / "data")  # item_id, title: no image column at all
    summary = run(["--dataset", "generic", "--items", str(items), "--interactions", str(inter), "--encoder", "tiny",
                   "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
                   "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0",
                   "--store", str(tmp_path / "store")], save_main_session=False)
    version = FeatureStore(tmp_path / "store").read(summary["version"])
    assert version.codes().rq.shape == (60, 2)
    assert '"vision": "none"' in (version.path / "manifest.json").read_text()
    lines = [r.getMessage() for r in caplog.records]
    for stage in ("side cache shard 0: ", "align[side]: ", "quantize: rq-kmeans levels: 2/2 levels",
                  "quantize: rq encode (this worker): ", "quantize: vq search (this worker): "):
        assert any(m.startswith(stage) and " elapsed" in m for m in lines), stage
