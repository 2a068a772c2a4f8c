import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from feature_store import (CorruptVersionError, FeatureStore, StoreConflictError, StoreLockedError,
                           VersionNotFoundError, write_embeddings)
from feature_store.store import VERSION_RE

REPO = Path(__file__).resolve().parents[2]


def test_publish_read_round_trip(store, tmp_path, fill):
    with store.stage() as st:
        written = fill(st.path, seed=3)
        (st.path / "encoder").mkdir()
        (st.path / "encoder" / "config.json").write_text('{"dim": 4}')
        config = {"encoder": {"name": "tiny"}, "quantizer": {"method": "rq-kmeans", "levels": 2}, "seed": 3}
        version = st.publish(config=config, metrics={"collision_rate": 0.1}, extra={"watermark": 1234})
    assert not st.path.exists()
    assert VERSION_RE.match(version.id) and version.id.startswith("v000001-")
    assert store.current_id() == version.id

    v = store.read()
    m = v.manifest
    assert m["parent"] is None and m["extra"] == {"watermark": 1234}
    assert m["encoder"] == {"name": "tiny"} and m["quantizer"]["levels"] == 2
    assert m["rows"] == {"item_codes.parquet": 20, "item_embeddings.parquet": 20}
    assert m["tensors"]["codebooks.safetensors"]["rq.level1"] == [8, 4]
    assert set(m["files"]) == {"codebooks.safetensors", "encoder/config.json", "item_codes.parquet",
                               "item_embeddings.parquet"}
    assert len(m["config_sha256"]) == 64 and m["metrics"] == {"collision_rate": 0.1}

    ids, emb = v.embeddings()
    order = np.argsort(written["ids"])
    assert ids.tolist() == sorted(written["ids"].tolist())
    np.testing.assert_array_equal(emb, written["emb"][order])
    codes = v.codes()
    np.testing.assert_array_equal(codes.rq, written["rq"][order])
    np.testing.assert_array_equal(codes.vq, written["vq"][order])
    books = v.codebooks()
    np.testing.assert_array_equal(books["rq.level0"].numpy(), written["books"]["rq.level0"])
    assert v.file("encoder/config.json").read_text() == '{"dim": 4}'
    with pytest.raises(FileNotFoundError, match="has no file 'item_codes_unaligned'"):
        v.codes("item_codes_unaligned")


def test_parent_chain_and_list(store, publish):
    v1 = publish(0)
    v2 = publish(1)
    assert v2.parent == v1.id
    listed = store.list()
    assert [x.id for x in listed] == [v1.id, v2.id]
    assert [x.current for x in listed] == [False, True]
    assert listed[1].rows["item_embeddings.parquet"] == 20
    assert store.history()[-1]["action"] == "publish"


def test_same_content_same_hash_different_sequence(store, publish, fill):
    a = publish(0, config={"x": 1})
    with store.stage(parent=None) as st:
        fill(st.path, seed=0)
        b = st.publish(config={"x": 1}, set_current=False)  # a second root beside a (not served)
    assert a.id.split("-")[1] == b.id.split("-")[1]  # content hash is reproducible
    assert a.id != b.id


def test_aborted_or_failed_stage_leaves_nothing(store, publish, fill):
    v1 = publish(0)
    with pytest.raises(RuntimeError, match="boom"):
        with store.stage() as st:
            fill(st.path, seed=1)
            raise RuntimeError("boom")
    with store.stage() as st:
        fill(st.path, seed=2)  # never published
    assert [x.id for x in store.list()] == [v1.id]
    assert store.current_id() == v1.id
    assert list((store.root / ".staging").iterdir()) == []


def test_publish_refuses_bad_table_and_keeps_current(store, publish):
    v1 = publish(0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    with store.stage() as st:
        pq.write_table(pa.table({"item_id": [1, 1], "embedding": [[1.0], [2.0]]}), st.path / "item_embeddings.parquet")
        with pytest.raises(ValueError, match="duplicate item_id 1"):
            st.publish(config={})
    assert store.current_id() == v1.id and len(store.list()) == 1


def test_publish_without_serving(store, publish):
    v1 = publish(0)
    v2 = publish(1, set_current=False)
    assert store.current_id() == v1.id
    assert store.read(v2.id).id == v2.id


def _writable(path: Path) -> Path:
    """Published files are read-only (0444); tests that simulate damage make them writable first."""
    os.chmod(path, 0o644)
    return path


def _corrupt_byte(path: Path, offset: int = 10) -> None:
    _writable(path)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected(store, publish):
    v = publish(0)
    target = v.path / "item_codes.parquet"
    assert target.stat().st_mode & 0o777 == 0o444  # published files are read-only
    _corrupt_byte(target)
    with pytest.raises(CorruptVersionError, match=r"item_codes\.parquet: sha256 .* does not match"):
        store.read()
    assert store.list()[0].error is None  # list() reads manifests only...
    assert "item_codes.parquet" in store.list(verify=True)[0].error  # ...unless asked to verify


def test_missing_truncated_and_extra_files_are_detected(store, publish):
    v = publish(0)
    (v.path / "codebooks.safetensors").unlink()
    with pytest.raises(CorruptVersionError, match=r"codebooks\.safetensors: listed in the manifest .* but missing"):
        store.read(v.id)
    v2 = publish(1)
    with open(_writable(v2.path / "item_embeddings.parquet"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CorruptVersionError, match="item_embeddings.parquet: size 100 bytes"):
        store.read(v2.id)
    v3 = publish(2)
    (v3.path / "sneaky.txt").write_text("x")
    with pytest.raises(CorruptVersionError, match="sneaky.txt: not in the manifest"):
        store.read(v3.id)


def test_tampered_manifest_is_detected(store, publish):
    v = publish(0)
    manifest_path = _writable(v.path / "manifest.json")
    m = json.loads(manifest_path.read_text())
    m["files"]["item_codes.parquet"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(CorruptVersionError, match="manifest content hash does not match"):
        store.read(v.id)
    v2 = publish(1)
    m = json.loads((v2.path / "manifest.json").read_text())
    m["config"]["seed"] = 99
    _writable(v2.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptVersionError, match="config does not match config_sha256"):
        store.read(v2.id)
    v3 = publish(2)
    _writable(v3.path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptVersionError, match="manifest is not valid JSON"):
        store.read(v3.id)


def test_empty_store_and_unknown_version(store):
    assert store.list() == [] and store.current_id() is None
    with pytest.raises(FileNotFoundError, match="has no CURRENT version"):
        store.read()
    with pytest.raises(ValueError, match="not a version id"):
        store.read("../etc")
    with pytest.raises(VersionNotFoundError, match="v000009-00000000 not found"):
        store.read("v000009-00000000")


def test_rollback(store, publish):
    v1, v2 = publish(0), publish(1)
    result = store.rollback(v1.id)
    assert result == {"current": v1.id, "previous": v2.id}
    assert store.current_id() == v1.id and store.read().id == v1.id
    assert store.history()[-1]["action"] == "rollback"
    # a corrupt target is refused and CURRENT stays
    _corrupt_byte(v2.path / "item_embeddings.parquet")
    with pytest.raises(CorruptVersionError):
        store.rollback(v2.id)
    assert store.current_id() == v1.id


def test_retain_keeps_newest_and_current(store, publish):
    versions = [publish(i) for i in range(5)]
    store.rollback(versions[1].id)
    removed = store.retain(2)
    assert removed == [versions[0].id, versions[2].id]
    assert [x.id for x in store.list()] == [versions[1].id, versions[3].id, versions[4].id]
    assert store.current_id() == versions[1].id
    assert not any((store.root / ".trash").iterdir())
    with pytest.raises(ValueError, match="keep must be >= 1"):
        store.retain(0)
    # sequence numbers are never reused, even after the newest versions are gone
    store.rollback(versions[3].id)
    store.retain(1)
    assert [x.id for x in store.list()] == [versions[3].id, versions[4].id]
    nxt = publish(9)
    assert nxt.id.startswith("v000006-")


def test_require_parent_current_conflict(store, publish, fill):
    v1 = publish(0)
    with store.stage(require_parent_current=True) as st:  # noqa: SIM117
        fill(st.path, seed=1)
        publish(2)  # someone else publishes meanwhile
        with pytest.raises(StoreConflictError, match=f"after this job started from {v1.id}"):
            st.publish(config={})


def test_lock_is_reentrant_for_the_holder(store, publish):
    publish(0)
    with store.lock(purpose="retrain"):
        holder = json.loads((store.root / "LOCK").read_text())
        assert holder["pid"] == os.getpid() and holder["purpose"] == "retrain"
        v = publish(1)
        store.rollback(v.parent)
        store.retain(5)
    assert (store.root / "LOCK").read_text() == ""  # released, no stale holder details


def _python(code: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_process_is_refused_while_lock_held(store, publish):
    publish(0)
    holder = _python("""
        import sys, time
        from feature_store import FeatureStore
        with FeatureStore(sys.argv[1]).lock(purpose="nightly retrain"):
            print("locked", flush=True)
            time.sleep(60)
    """, store.root)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as err:
            publish(1, lock_timeout=0)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and "nightly retrain" in msg and "LOCK" in msg
        assert err.value.holder["pid"] == holder.pid
        with pytest.raises(StoreLockedError):
            store.rollback(store.current_id())
        assert len(store.list()) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's flock: no stale lock to clear by hand
    assert publish(2).id.startswith("v000002-")


def test_abandoned_staging_is_swept_but_live_one_is_not(store, publish, fill):
    publish(0)
    staging = store.root / ".staging"
    with store.stage() as live:
        crashed = _python("""
            import os, sys
            from feature_store import FeatureStore
            store = FeatureStore(sys.argv[1])
            cm = store.stage()  # keep a reference: a collected generator would clean up
            st = cm.__enter__()
            (st.path / "item_embeddings.parquet").write_bytes(b"half written")
            os._exit(0)  # dies without cleaning up, like a SIGKILL
        """, store.root)
        assert crashed.wait() == 0, crashed.stderr.read()
        assert len([p for p in staging.iterdir() if p.is_dir()]) == 2
        assert len(store.list()) == 1  # staging folders are never listed
        assert store.cleanup()["staging"] == 1  # the dead writer's folder goes...
        assert live.path.is_dir()  # ...the live one (its flock is held) stays
        fill(live.path, seed=5)
        live.publish(config={})
    assert list(staging.iterdir()) == []
    assert len(store.list()) == 2


def test_pinned_version_survives_retain(store, publish):
    v1, v2, v3 = publish(0), publish(1), publish(2)
    with store.pinned(v1.id) as pinned:
        assert pinned.id == v1.id
        assert store.retain(1) == [v2.id]  # v1 is pinned by this reader: kept for now
        ids, _ = pinned.embeddings()
        assert len(ids) == 20
    assert store.retain(1) == [v1.id]
    with store.pinned() as current:
        assert current.id == v3.id
    with pytest.raises(VersionNotFoundError):
        with store.pinned(v1.id):
            pass


def test_publish_rejects_symlinks_and_unserialisable_config(store, fill, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    with store.stage() as st:
        fill(st.path)
        (st.path / "link.bin").symlink_to(outside)
        with pytest.raises(ValueError, match="link.bin: symbolic links cannot be published"):
            st.publish(config={})
    with store.stage() as st:
        fill(st.path)
        (st.path / "linked_dir").symlink_to(tmp_path)
        with pytest.raises(ValueError, match="linked_dir: symbolic links"):
            st.publish(config={})
    with store.stage() as st:
        fill(st.path)
        with pytest.raises(ValueError, match="JSON-serialisable"):
            st.publish(config={"bad": object()})
    assert store.list() == []


def test_resumable_staging_survives_failure_and_resumes(store, publish, fill):
    publish(0)
    key = "retrain-v000001-1700000000"
    with pytest.raises(RuntimeError, match="crash in stage 3"):
        with store.stage(resume_key=key) as st:
            assert not st.resumed
            fill(st.path, seed=4)
            (st.path / "stage2.done").write_text("ok")
            raise RuntimeError("crash in stage 3")
    assert len(store.list()) == 1  # nothing published, CURRENT untouched
    store.cleanup()  # a sweep does not take a resumable staging that is still fresh
    with store.stage(resume_key=key) as st:
        assert st.resumed and (st.path / "stage2.done").read_text() == "ok"
        version = st.publish(config={})
    assert "stage2.done" in version.files()
    assert not any(p.is_dir() for p in (store.root / ".staging").iterdir())
    with store.stage(resume_key=key) as st:  # published: a new run with the key starts empty
        assert not st.resumed
        st.abort()
    assert not (store.root / ".staging" / f"r-{key}").exists()
    with pytest.raises(ValueError, match="resume_key must be"):
        with store.stage(resume_key="../escape"):
            pass


def test_resumable_staging_one_holder_and_ttl(store, publish):
    publish(0)
    crashed = _python("""
        import os, sys
        from feature_store import FeatureStore
        cm = FeatureStore(sys.argv[1]).stage(resume_key="nightly")
        st = cm.__enter__()
        (st.path / "embeddings.done").write_text("ok")
        print("staged", flush=True)
        if sys.argv[2] == "die":
            os._exit(0)
        import time; time.sleep(60)
    """, store.root, "hold")
    try:
        assert crashed.stdout.readline().strip() == "staged"
        with pytest.raises(StoreLockedError, match=f"resumable staging 'nightly' .* pid {crashed.pid}"):
            with store.stage(resume_key="nightly"):
                pass
    finally:
        crashed.kill()
        crashed.wait()
    assert store.cleanup()["staging"] == 0  # holder dead, but the folder is fresh: kept for the rerun
    assert store.cleanup(resume_ttl_s=0)["staging"] == 1  # past its TTL: garbage
    assert not (store.root / ".staging" / "r-nightly").exists()


def test_config_with_numpy_and_int_keys_round_trips_its_hash(store, fill):
    with store.stage() as st:
        fill(st.path)
        version = st.publish(config={"sizes": {10: np.int64(3), 9: np.float32(0.5)}, "arr": np.arange(3)},
                             metrics={"auc": np.float64(0.7)})
    again = store.read(version.id)  # verification recomputes the config hash from the JSON on disk
    assert again.config == {"sizes": {"10": 3, "9": 0.5}, "arr": [0, 1, 2]} == version.config


def test_publish_waits_for_a_short_lock_holder(store, publish):
    publish(0)
    holder = _python("""
        import sys, time
        from feature_store import FeatureStore
        with FeatureStore(sys.argv[1]).lock(purpose="retain"):
            print("locked", flush=True)
            time.sleep(1.0)
    """, store.root)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match="after waiting 0.2s"):
            publish(1, lock_timeout=0.2)
        assert publish(2, lock_timeout=30).id.startswith("v000002-")  # waits for the holder, then publishes
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_publishers_serialise_with_unique_sequence(store, publish):
    publish(0)
    writers = [_python("""
        import sys
        import numpy as np
        from feature_store import FeatureStore, write_embeddings
        store, wid = FeatureStore(sys.argv[1]), int(sys.argv[2])
        for i in range(3):
            with store.stage() as st:
                write_embeddings(st.path / "item_embeddings.parquet", np.arange(5), np.full((5, 2), wid * 10 + i))
                st.publish(config={"writer": wid, "i": i}, lock_timeout=60)
    """, store.root, wid) for wid in range(2)]
    for proc in writers:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    versions = store.list()
    seqs = [int(VERSION_RE.match(v.id).group(1)) for v in versions]
    assert seqs == list(range(1, 8))  # 1 + 2 x 3, no number taken twice
    history = store.history()
    assert [h["version"] for h in history] == [v.id for v in versions]  # CURRENT moved once per publish, in order
    assert all(h["previous"] == prev["version"] for prev, h in zip(history, history[1:]))
    assert {(v.config.get("writer"), v.config.get("i")) for v in map(store.read, [v.id for v in versions[1:]])} == \
        {(w, i) for w in range(2) for i in range(3)}


def test_garbled_current_pointer_is_refused_and_repairable(store, publish):
    v1, v2 = publish(0), publish(1)
    (store.root / "CURRENT").write_text("rm -rf /\n")
    with pytest.raises(CorruptVersionError, match="CURRENT: not a version id"):
        store.read()
    assert [v.current for v in store.list()] == [False, False]  # list still works, with no CURRENT marked
    assert store.rollback(v1.id) == {"current": v1.id, "previous": None}  # the repair path works
    assert store.read().id == v1.id
    (store.root / "CURRENT").write_text("v000099-0123abcd\n")  # names a version that does not exist
    with pytest.raises(CorruptVersionError, match="names v000099-0123abcd but .* does not exist"):
        store.read()


def test_read_of_current_survives_a_concurrent_rollback_and_retain(store, publish, monkeypatch):
    import feature_store.store as store_module

    v1, v2 = publish(0), publish(1)
    publish(2, set_current=False)  # a newer candidate, so retain(1) may drop v2 once it is not CURRENT
    real_load = store_module.load_manifest
    calls = []

    def racing_load(path):
        if not calls:  # another writer strikes between our CURRENT lookup and our read of the folder
            calls.append(path.name)
            store.rollback(v1.id)
            assert store.retain(1) == [v2.id]  # v2 is no longer CURRENT, so it goes
        return real_load(path)

    monkeypatch.setattr(store_module, "load_manifest", racing_load)
    assert store.read().id == v1.id  # retried on the new CURRENT instead of failing
    assert calls == [v2.id]


def test_lock_refuses_another_thread_of_the_same_process(store):
    import threading

    errors = []

    def contender():
        try:
            with store.lock():
                errors.append(None)
        except StoreLockedError as exc:
            errors.append(str(exc))

    with store.lock(purpose="main thread job"):
        thread = threading.Thread(target=contender)
        thread.start()
        thread.join(timeout=30)
    assert errors and errors[0] is not None and "another thread of this process" in errors[0]
    thread = threading.Thread(target=contender)  # released: now the other thread gets it
    thread.start()
    thread.join(timeout=30)
    assert errors[1] is None
