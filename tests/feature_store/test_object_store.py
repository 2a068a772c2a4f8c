"""The feature store on object storage (issue 21, point 2), against a real S3 API served locally (moto, one thread:
tests/feature_store/s3_server.py): publish order, the compare-and-swap of CURRENT between writer processes, a
publisher SIGKILLed mid-upload and before its swap, the lease, remote corruption, and `qarm store` on s3://."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore, StoreConflictError, StoreLockedError
from feature_store.objects import s3_client
from pipelines.cli import EXIT_ERROR, EXIT_LOCKED, EXIT_OK, main

REPO = Path(__file__).resolve().parents[2]
N_WRITERS = 4


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _bucket_keys(url: str) -> list[str]:
    bucket = url.split("/")[2]
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _env(s3_endpoint, tmp_path) -> dict:
    return {**os.environ, **s3_endpoint, "PYTHONPATH": str(REPO), "QARM_STORE_CACHE": str(tmp_path / "cache")}


def test_publish_uploads_every_file_then_the_manifest_then_swaps_current(s3_store, fill, tmp_path):
    """The order that keeps a partial version invisible, seen on the wire: data files, manifest (create-only),
    CURRENT (conditional), journal entry; the version reads back verified from a fresh cache."""
    calls = []
    client = s3_store.client
    for name in ("upload", "put"):
        original = getattr(client, name)

        def record(key, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, key.rsplit("stores/main/", 1)[-1], kwargs.get("if_absent", False),
                          kwargs.get("if_token") is not None))
            return _original(key, *args, **kwargs)

        setattr(client, name, record)
    with s3_store.stage() as st:
        wrote = fill(st.path, seed=3)
        version = st.publish(config={"seed": 3})
    vdir = f"versions/{version.id}/"
    writes = [c for c in calls if not c[1].startswith(("LOCK", ".qarm-probe"))]  # lease, one-off server probe
    assert sorted(c[1] for c in writes[:3]) == [vdir + "codebooks.safetensors", vdir + "item_codes.parquet",
                                                vdir + "item_embeddings.parquet"]
    assert all(c[0] == "upload" for c in writes[:3])
    assert writes[3:] == [("put", vdir + "manifest.json", True, False), ("put", "CURRENT", True, False),
                          ("put", f"history/00000001-{version.id}.json", True, False)]
    fresh = FeatureStore(s3_store.url, cache_dir=tmp_path / "other-cache")
    ids, emb = fresh.read().embeddings()
    order = np.argsort(wrote["ids"])
    assert np.array_equal(ids, wrote["ids"][order]) and np.array_equal(emb, wrote["emb"][order])
    assert fresh.read().path != version.path and fresh.current_id() == version.id


def test_a_second_publish_replaces_current_only_if_it_is_still_the_one_read(s3_store, fill):
    """The CAS itself: a writer that started from v1 is refused once CURRENT moved, naming the winner, and
    leaves nothing behind; a writer deriving from "CURRENT at publish" publishes over the winner."""
    with s3_store.stage() as st:
        fill(st.path, seed=0)
        v1 = st.publish(config={})
    with s3_store.stage(parent=v1.id, require_parent_current=True) as pinned, s3_store.stage() as floating:
        fill(pinned.path, seed=1)
        fill(floating.path, seed=2)
        with s3_store.stage() as other:
            fill(other.path, seed=3)
            v2 = other.publish(config={"other": True})
        with pytest.raises(StoreConflictError, match=f"another writer changed CURRENT to {v2.id}"):
            pinned.publish(config={})
        v3 = floating.publish(config={})
    assert v3.parent == v2.id and s3_store.current_id() == v3.id
    assert [v.id for v in s3_store.list()] == [v1.id, v2.id, v3.id]
    assert [(h["version"], h["previous"]) for h in s3_store.history()] == [(v1.id, None), (v2.id, v1.id),
                                                                           (v3.id, v2.id)]


def test_concurrent_writer_processes_exactly_one_publishes(s3_endpoint, s3_store, fill, tmp_path, race_writers):
    """N processes start from the same CURRENT and publish at once: exactly one conditional write of CURRENT wins;
    every other is refused naming the winner and deletes what it uploaded."""
    with s3_store.stage() as st:
        fill(st.path, seed=0)
        v1 = st.publish(config={})
    results = race_writers(s3_store.url, N_WRITERS, env=_env(s3_endpoint, tmp_path))
    winners = [r for r in results if "published" in r]
    losers = [r for r in results if "conflict" in r]
    assert len(winners) == 1 and len(losers) == N_WRITERS - 1, results
    won = winners[0]["published"]
    assert winners[0]["parent"] == v1.id and s3_store.current_id() == won
    assert all(r["current"] == won and r["expected"] == v1.id for r in losers)
    assert [v.id for v in s3_store.list()] == [v1.id, won]
    assert {k.split("/")[3] for k in _bucket_keys(s3_store.url) if "/versions/" in k} == {v1.id, won}
    assert [(h["version"], h["previous"]) for h in s3_store.history()] == [(v1.id, None), (won, v1.id)]


def _kill_at_marker(s3_endpoint, url, tmp_path, mode) -> None:
    marker = tmp_path / f"marker-{mode}"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("object_writer.py")), url,
                             str(tmp_path / "writer-cache"), mode, str(marker)],
                            env={**_env(s3_endpoint, tmp_path), "QARM_STORE_LEASE_TTL": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_publisher_killed_mid_upload_leaves_current_and_its_partial_version_is_swept(s3_endpoint, s3_store,
                                                                                       fill, tmp_path):
    with s3_store.stage() as st:
        fill(st.path, seed=0)
        v1 = st.publish(config={})
    _kill_at_marker(s3_endpoint, s3_store.url, tmp_path, "mid-upload")
    partial = {k.split("/")[3] for k in _bucket_keys(s3_store.url) if "/versions/" in k} - {v1.id}
    assert len(partial) == 1  # the kill landed mid-upload: some files of a version, no manifest
    partial_id = partial.pop()
    assert not any(k.endswith(f"{partial_id}/manifest.json") for k in _bucket_keys(s3_store.url))
    assert s3_store.current_id() == v1.id and s3_store.read().id == v1.id  # verified
    assert [v.id for v in s3_store.list()] == [v1.id]
    assert s3_store.cleanup()["partial_versions"] == 0  # younger than the TTL: may be a live upload
    assert s3_store.cleanup(partial_ttl_s=0)["partial_versions"] == 1
    assert not any(partial_id in k for k in _bucket_keys(s3_store.url))
    with s3_store.stage() as st:  # the store goes on
        fill(st.path, seed=1)
        assert st.publish(config={}).parent == v1.id


def test_a_publisher_killed_before_its_swap_never_serves_and_its_lease_expires(s3_endpoint, s3_store, fill,
                                                                               tmp_path):
    """Killed holding the lease right before the conditional write of CURRENT: CURRENT stays v1; its complete
    version is listed but never served, and cleanup removes it; the dead lease expires and the next publish
    takes it over."""
    with s3_store.stage() as st:
        fill(st.path, seed=0)
        v1 = st.publish(config={})
    _kill_at_marker(s3_endpoint, s3_store.url, tmp_path, "before-swap")
    unserved = [v.id for v in s3_store.list() if v.id != v1.id]
    assert len(unserved) == 1 and s3_store.current_id() == v1.id and s3_store.read().id == v1.id
    assert s3_store.read(unserved[0]).manifest["published_as"] == "current"
    with pytest.raises(StoreLockedError, match="held by pid"):  # the dead writer's lease, not expired yet
        with s3_store.lock():
            pass
    with s3_store.stage() as st:  # waits out the 2 s lease, takes it over, publishes
        fill(st.path, seed=1)
        v2 = st.publish(config={}, lock_timeout=30)
    assert v2.parent == v1.id and s3_store.current_id() == v2.id
    assert s3_store.cleanup(partial_ttl_s=0) == {"staging": 0, "partial_versions": 0, "unserved_versions": 1}
    assert [v.id for v in s3_store.list()] == [v1.id, v2.id]


def test_a_change_whose_writer_died_before_journaling_it_is_still_in_the_history(s3_store, fill, monkeypatch):
    """The journal entry rides in CURRENT's conditional write: a writer that dies right after its swap (before the
    copy to history/) loses nothing; the next writer copies the entry before its own."""
    with s3_store.stage() as st:
        fill(st.path, seed=0)
        v1 = st.publish(config={})
    with monkeypatch.context() as m:
        m.setattr(s3_store, "_journal", lambda entry: None)  # "dies" after the swap, before copying
        with s3_store.stage() as st:
            fill(st.path, seed=1)
            v2 = st.publish(config={})

    def journal():
        return sorted(o.key.rsplit("/", 1)[-1] for o in s3_store.client.list(s3_store.prefix + "history/"))

    assert journal() == [f"00000001-{v1.id}.json"]
    assert [(h["seq"], h["version"]) for h in s3_store.history()] == [(1, v1.id), (2, v2.id)]
    s3_store.rollback(v1.id)
    assert journal() == [f"00000001-{v1.id}.json", f"00000002-{v2.id}.json", f"00000003-{v1.id}.json"]


def test_the_lease_is_exclusive_reentrant_and_released(s3_store):
    with s3_store.lock(purpose="qarm retrain"):
        with s3_store.lock(purpose="publish"):  # re-entered by the holder (retrain's own publish)
            pass
        other = FeatureStore(s3_store.url, cache_dir=s3_store.cache_root.parent / "elsewhere")
        code = subprocess.run([sys.executable, "-c", (
            "import sys; from feature_store import FeatureStore, StoreLockedError\n"
            f"s = FeatureStore({s3_store.url!r}, cache_dir={str(other.cache_root)!r})\n"
            "try:\n    s.lock().__enter__()\nexcept StoreLockedError as e:\n    print(e); sys.exit(4)\n")],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert code.returncode == 4 and "for 'qarm retrain'" in code.stdout, code.stderr
    assert not any(k.endswith("/LOCK") for k in _bucket_keys(s3_store.url))
    with other.lock():
        pass


def test_store_commands_on_an_s3_store(s3_store, fill, capsys, monkeypatch, tmp_path):
    """`qarm store list / show / verify / rollback / history / cleanup / retain --store s3://...`; verify catches an
    object altered remotely even when an earlier read cached the version."""
    monkeypatch.setenv("QARM_STORE_CACHE", str(tmp_path / "cli-cache"))
    versions = []
    for seed in range(3):
        with s3_store.stage() as st:
            fill(st.path, seed=seed)
            versions.append(st.publish(config={"seed": seed}).id)
    url = s3_store.url
    assert main(["store", "list", "--store", url, "--json"]) == EXIT_OK
    listed = _last_json(capsys)
    assert listed["current"] == versions[-1] and [v["id"] for v in listed["versions"]] == versions
    assert listed["versions"][0]["path"] == f"{url}/versions/{versions[0]}"
    assert main(["store", "show", "--store", url, "--version", versions[0], "--json"]) == EXIT_OK
    assert _last_json(capsys)["manifest"]["config"] == {"seed": 0}
    assert main(["store", "rollback", "--store", url, "--version", versions[0], "--json"]) == EXIT_OK
    assert _last_json(capsys)["previous"] == versions[-1]
    assert main(["store", "history", "--store", url, "--json"]) == EXIT_OK
    assert [h["action"] for h in _last_json(capsys)["history"]] == ["publish"] * 3 + ["rollback"]
    assert main(["store", "verify", "--store", url, "--json"]) == EXIT_OK
    assert _last_json(capsys)["checked"] == 3

    bucket, key = url.split("/")[2], f"stores/main/versions/{versions[1]}/item_codes.parquet"
    body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client().put_object(Bucket=bucket, Key=key, Body=body[:-9] + b"corrupted")  # same size, other bytes
    assert main(["store", "verify", "--store", url, "--json"]) == EXIT_ERROR
    out = _last_json(capsys)
    assert list(out["corrupt"]) == [versions[1]]
    assert f"{url}/versions/{versions[1]}/item_codes.parquet: sha256" in out["corrupt"][versions[1]]

    assert main(["store", "retain", "--store", url, "--keep", "1", "--json"]) == EXIT_OK
    assert _last_json(capsys)["removed"] == [versions[1]]  # CURRENT (versions[0]) and the newest are kept
    assert main(["store", "cleanup", "--store", url, "--json"]) == EXIT_OK
    assert _last_json(capsys)["removed"] == {"staging": 0, "partial_versions": 0, "unserved_versions": 0}
    codes = []
    with s3_store.lock():  # a writer busy elsewhere (another thread holds the lease): rollback says so with exit 4
        worker = threading.Thread(target=lambda: codes.append(
            main(["store", "rollback", "--store", url, "--version", versions[2], "--json"])))
        worker.start()
        worker.join()
    assert codes == [EXIT_LOCKED] and s3_store.current_id() == versions[0]


def test_a_server_that_ignores_preconditions_is_refused_before_anything_is_written(s3_url, tmp_path, fill):
    """Some S3-compatible servers accept If-None-Match / If-Match and ignore them: the store probes that once
    and refuses to publish there (nothing uploaded, CURRENT never written)."""
    from feature_store.objects import ObjectStorageError, S3Client
    from feature_store.remote import ObjectFeatureStore

    class IgnoresConditions(S3Client):
        def put(self, key, data, *, if_absent=False, if_token=None):
            return super().put(key, data)

    bucket = s3_url.split("/")[2]
    store = ObjectFeatureStore(s3_url, cache_dir=tmp_path / "cache", client=IgnoresConditions(bucket))
    with store.stage() as st:
        fill(st.path)
        with pytest.raises(ObjectStorageError, match=r"ignored a conditional write \(If-None-Match: \*\)"):
            st.publish(config={})
    assert _bucket_keys(s3_url) == []


def test_file_urls_are_the_posix_store(tmp_path, fill):
    store = FeatureStore(f"file://{tmp_path}/store")
    assert type(store) is FeatureStore and store.root == tmp_path / "store"
    with store.stage() as st:
        fill(st.path)
        version = st.publish(config={})
    assert FeatureStore(tmp_path / "store").current_id() == version.id


def test_a_url_folded_by_pathlib_is_refused_not_created_as_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="pass it as the string s3://bucket/prefix"):
        FeatureStore(Path("s3://bucket/prefix"))
    assert not (tmp_path / "s3:").exists()


def test_a_missing_client_library_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_boto3(name, *args, **kwargs):
        if name == "boto3" or name.startswith("boto3."):
            raise ImportError("No module named 'boto3'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_boto3)
    from feature_store.objects import ObjectStorageError

    with pytest.raises(ObjectStorageError, match=r"pip install 'qarm\[s3\]'"):
        FeatureStore("s3://bucket/prefix")
