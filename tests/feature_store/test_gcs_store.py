"""gs:// stores through feature_store.objects.GCSClient on a stub of google-cloud-storage's Client / Bucket / Blob.

NOT run against a real GCS API: no offline GCS server implements generation preconditions (gcp-storage-emulator,
the Python one on PyPI, ignores ifGenerationMatch; fake-gcs-server is a Go binary). The stub below needs no Google
library (with google-auth installed, other tests' Beam Dataflow options look for credentials on the GCE metadata
server) and implements the documented semantics the store relies on (ifGenerationMatch=0: create only; =N:
replace generation N only; 412 PreconditionFailed otherwise; every write a new generation), so these tests check
that the GCS adapter maps the store's conditional writes onto them and that the store's compare-and-swap holds on
that contract.
"""
from __future__ import annotations

import itertools
import threading
from datetime import datetime, timezone

import pytest

from feature_store import FeatureStore, StoreConflictError, StoreLockedError
from feature_store.objects import GCSClient, PreconditionFailed
from feature_store.remote import ObjectFeatureStore


class NotFound(Exception):
    """Stands for google.api_core.exceptions.NotFound (404)."""


class Precondition(Exception):
    """Stands for google.api_core.exceptions.PreconditionFailed (412)."""


ERRORS = (NotFound, Precondition)


class _Objects:
    """The bucket's state: key -> (data, generation, updated); one lock makes each request atomic, as in GCS."""

    def __init__(self):
        self.data: dict[str, tuple[bytes, int, datetime]] = {}
        self.lock = threading.Lock()
        self.generations = itertools.count(1_700_000_000_000_000)


class _Blob:
    def __init__(self, objects: _Objects, name: str):
        self._objects, self.name = objects, name
        self.generation = self.size = self.updated = None

    def _load(self, entry):
        data, self.generation, self.updated = entry
        self.size = len(data)
        return self

    def download_as_bytes(self, if_generation_match=None):
        with self._objects.lock:
            entry = self._objects.data.get(self.name)
            if entry is None:
                raise NotFound(self.name)
            if if_generation_match is not None and entry[1] != if_generation_match:
                raise Precondition(self.name)
            return entry[0]

    def upload_from_string(self, data, if_generation_match=None):
        with self._objects.lock:
            entry = self._objects.data.get(self.name)
            if if_generation_match is not None and (entry[1] if entry else 0) != if_generation_match:
                raise Precondition(f"{self.name}: generation does not match")
            new = (bytes(data), next(self._objects.generations), datetime.now(timezone.utc))
            self._objects.data[self.name] = new
        self._load(new)

    def upload_from_filename(self, path):
        with open(path, "rb") as fh:
            self.upload_from_string(fh.read())

    def download_to_filename(self, path):
        with open(path, "wb") as fh:
            fh.write(self.download_as_bytes())

    def delete(self):
        with self._objects.lock:
            if self._objects.data.pop(self.name, None) is None:
                raise NotFound(self.name)


class _Bucket:
    def __init__(self, objects):
        self._objects = objects

    def blob(self, name):
        return _Blob(self._objects, name)

    def get_blob(self, name):
        with self._objects.lock:
            entry = self._objects.data.get(name)
        return None if entry is None else _Blob(self._objects, name)._load(entry)


class StubStorageClient:
    def __init__(self):
        self.objects = _Objects()

    def bucket(self, name):
        return _Bucket(self.objects)

    def list_blobs(self, bucket, prefix=""):
        with self.objects.lock:
            entries = sorted((k, v) for k, v in self.objects.data.items() if k.startswith(prefix))
        return iter([_Blob(self.objects, key)._load(entry) for key, entry in entries])


@pytest.fixture
def gcs():
    return StubStorageClient()


@pytest.fixture
def gs_store(gcs, tmp_path):
    return ObjectFeatureStore("gs://bucket/features", cache_dir=tmp_path / "cache",
                              client=GCSClient("bucket", client=gcs, errors=ERRORS))


def test_generation_preconditions_map_onto_conditional_writes(gcs):
    client = GCSClient("bucket", client=gcs, errors=ERRORS)
    first = client.put("k", b"1", if_absent=True)
    with pytest.raises(PreconditionFailed):
        client.put("k", b"2", if_absent=True)
    second = client.put("k", b"3", if_token=first)
    with pytest.raises(PreconditionFailed):
        client.put("k", b"4", if_token=first)  # a writer that read generation `first` lost
    assert client.get("k") == (b"3", second) and client.get("missing") is None
    assert [o.key for o in client.list("")] == ["k"]


def test_publish_conflict_history_and_lease_on_a_gs_store(gs_store, fill, tmp_path, gcs):
    with gs_store.stage() as st:
        fill(st.path, seed=0)
        v1 = st.publish(config={})
    with gs_store.stage(parent=v1.id, require_parent_current=True) as late:
        fill(late.path, seed=1)
        with gs_store.stage() as st:
            fill(st.path, seed=2)
            v2 = st.publish(config={})
        with pytest.raises(StoreConflictError, match=f"changed CURRENT to {v2.id}"):
            late.publish(config={})
    assert [v.id for v in gs_store.list()] == [v1.id, v2.id] and gs_store.current_id() == v2.id
    assert not any(k.startswith("features/versions/") and v1.id not in k and v2.id not in k for k in gcs.objects.data)
    assert gs_store.rollback(v1.id) == {"current": v1.id, "previous": v2.id}
    assert [(h["action"], h["version"]) for h in gs_store.history()] == [("publish", v1.id), ("publish", v2.id),
                                                                        ("rollback", v1.id)]
    fresh = ObjectFeatureStore("gs://bucket/features", cache_dir=tmp_path / "fresh",
                               client=GCSClient("bucket", gcs, ERRORS))
    assert fresh.read().id == v1.id and fresh.read(v2.id).codes().levels == 2

    with gs_store.lock(purpose="qarm retrain"):
        errors = []
        thread = threading.Thread(target=lambda: _try_lock(fresh, errors))
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], StoreLockedError) and "qarm retrain" in str(errors[0])
    assert "features/LOCK" not in gcs.objects.data  # released


def _try_lock(store, errors):
    try:
        with store.lock():
            pass
    except StoreLockedError as exc:
        errors.append(exc)


def test_gs_urls_build_an_object_store_with_a_clear_error_without_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gcs(name, *args, **kwargs):
        if name.startswith("google.cloud"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gcs)
    from feature_store.objects import ObjectStorageError

    with pytest.raises(ObjectStorageError, match=r"pip install 'qarm\[gcs\]'"):
        FeatureStore("gs://bucket/prefix")
