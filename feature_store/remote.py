"""The feature store on object storage (``s3://bucket/prefix``, ``gs://bucket/prefix``).

``FeatureStore("s3://...")`` returns an :class:`ObjectFeatureStore`: the same methods as the POSIX store, built on
the conditional writes of feature_store.objects instead of rename + flock. Layout under the prefix::

    versions/<id>/...            a version's files, uploaded first (immutable once its manifest exists)
    versions/<id>/manifest.json  uploaded last, create-only: a version exists iff its manifest does
    CURRENT                      line 1: the serving version's id; line 2: the journal entry of that change.
                                 Replaced only by a compare-and-swap (S3 If-Match on the ETag read, GCS
                                 ifGenerationMatch on the generation read; create-only when absent)
    history/<seq>-<id>.json      the journal: one create-only object per CURRENT change (seq = previous + 1)
    LOCK                         the lease of a whole-run job or admin command (feature_store.lease)

What a reader and a crashed writer see:
* Readers read CURRENT, then the version it names, whose objects never change: a publish in flight is invisible
  to them (S3 and GCS are strongly consistent for reads after writes and for listings).
* A publisher killed while uploading leaves ``versions/<id>/`` without a manifest: never listed, never CURRENT
  (the compare-and-swap happens only after the manifest), swept by ``cleanup`` once older than ``PARTIAL_TTL_S``.
  Killed between its manifest and the swap, it leaves a complete version that never became CURRENT (manifest
  ``published_as: current``, absent from the history): listed, never served, swept by ``cleanup`` likewise. A
  publisher that loses the swap deletes its version itself and raises StoreConflictError.
* The journal cannot be appended to, so each change's entry travels inside CURRENT (written by the swap itself)
  and is copied to ``history/`` right after; the next writer copies it first if its writer died in between,
  so no change is ever missing from ``history()``.

Reading downloads a version's objects into a local cache (``$QARM_STORE_CACHE``, default ``~/.cache/qarm/stores``)
and verifies manifest and checksums there as the POSIX store does; objects whose ETag / generation did not change
since the last read are not downloaded again. ``StoreVersion.path`` is that local copy, so every reader of the
POSIX store works unchanged. Stagings are local folders under the cache (or ``cache_dir``); publish uploads them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from feature_store.io import atomic_write_json, temp_path_for
from feature_store.lease import LEASE_TTL_S, lease_lock
from feature_store.lock import LOCK_FILE, StoreLockedError
from feature_store.objects import ObjectClient, ObjectStorageError, PreconditionFailed, client_for, split_url
from feature_store.store import (CURRENT_FILE, VERSIONS_DIR, FeatureStore, StoreConflictError, build_manifest,
                                 parse_current)
from feature_store.version import (MANIFEST, VERSION_RE, CorruptVersionError, StoreVersion, parse_manifest,
                                   walk_files)

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
PARTIAL_TTL_S = 3600.0  # a manifest-less (or never-served) version older than this is a dead publisher's
UPLOAD_THREADS = 8
_CONDITIONAL_OK: set[str] = set()  # buckets whose server was seen refusing a failed precondition
PUBLISH_ATTEMPTS = 3  # a staging that derives from "CURRENT at publish" is rebuilt over a CURRENT that moved


class ObjectUrl:
    """An object-storage location that joins like a Path (``url / "CURRENT"``) for messages and listings."""

    def __init__(self, url: str):
        self._url = url.rstrip("/")

    def __truediv__(self, part) -> "ObjectUrl":
        return ObjectUrl(f"{self._url}/{part}")

    @property
    def name(self) -> str:
        return self._url.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"ObjectUrl({self._url!r})"

    def __eq__(self, other) -> bool:
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(self._url)


def default_cache_root() -> Path:
    return Path(os.environ.get("QARM_STORE_CACHE") or Path.home() / ".cache" / "qarm" / "stores")


def lease_ttl() -> float:
    return float(os.environ.get("QARM_STORE_LEASE_TTL", LEASE_TTL_S))


class ObjectFeatureStore(FeatureStore):
    """A FeatureStore whose root is an object-storage URL (built by ``FeatureStore(url)``).

    Args:
        root: ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
        cache_dir: local folder for downloaded versions and stagings (default: :func:`default_cache_root`); the
            store's own sub-folder is ``<cache_dir>/<scheme>/<bucket>/<prefix>``.
        client: an ObjectClient to use instead of the one the URL names (tests).
    """

    def __init__(self, root: str, cache_dir: str | os.PathLike | None = None, client: ObjectClient | None = None):
        scheme, bucket, prefix = split_url(root)
        self.root = ObjectUrl(root)
        if client is None:
            client, self.prefix = client_for(root)
        else:
            self.prefix = prefix + "/" if prefix else ""
        self.client = client
        self.cache_root = Path(cache_dir or default_cache_root()) / scheme / bucket / _safe(prefix or "_root")

    # ------------------------------------------------------------------------------------------- places
    @property
    def url(self) -> str:
        return str(self.root)

    def exists(self) -> bool:
        return next(iter(self.client.list(self.prefix)), None) is not None

    @property
    def staging_root(self) -> Path:
        return self.cache_root / "staging"

    def scratch_dir(self, name: str) -> Path:
        return self.cache_root / name.lstrip(".")

    @property
    def versions_dir(self) -> ObjectUrl:
        return self.root / VERSIONS_DIR

    @property
    def lock_path(self) -> ObjectUrl:
        return self.root / LOCK_FILE

    def version_path(self, version_id: str) -> ObjectUrl:
        return self.versions_dir / version_id

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _ensure_layout(self) -> None:
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def _check_conditional_writes(self) -> None:
        """Refuse a server that ignores the preconditions (some S3-compatible servers do): the one-writer rule
        would silently not hold there. Probed once per process and bucket before the first write."""
        if self.client.url() in _CONDITIONAL_OK:
            return
        key = self._key(f".qarm-probe-{uuid.uuid4().hex}")
        try:
            first = self.client.put(key, b"1", if_absent=True)
            self.client.put(key, b"2", if_token=first)  # the current token: must pass
            for condition in ({"if_absent": True}, {"if_token": first}):  # both stale now: must be refused
                try:
                    self.client.put(key, b"3", **condition)
                except PreconditionFailed:
                    continue
                raise ObjectStorageError(
                    f"{self.client.url()}: the server ignored a conditional write "
                    f"({'If-None-Match: *' if 'if_absent' in condition else 'If-Match'}); publishing there would "
                    "not keep one writer per store. Use a server that implements conditional PutObject (AWS S3, "
                    "moto >= 5.1) or generation preconditions (GCS)")
        finally:
            self.client.delete(key)
        _CONDITIONAL_OK.add(self.client.url())

    def lock(self, timeout: float = 0.0, purpose: str = ""):
        """The store's lease (feature_store.lease): re-entrant in the holding thread; advisory, since every
        change of CURRENT is a compare-and-swap anyway."""
        self._ensure_layout()
        self._check_conditional_writes()
        return lease_lock(self.client, self._key(LOCK_FILE), timeout=timeout, purpose=purpose, ttl_s=lease_ttl())

    # ------------------------------------------------------------------------------------------- read
    def current_id(self) -> str | None:
        got = self.client.get(self._key(CURRENT_FILE))
        return None if got is None else parse_current(got[0], self.root / CURRENT_FILE)[0]

    def _version_ids(self) -> list[str]:
        """Ids of complete versions (those with a manifest), in publication order."""
        return self._sorted(self._version_objects(complete_only=True))

    @staticmethod
    def _sorted(ids) -> list[str]:
        return sorted((v for v in ids if VERSION_RE.match(v)), key=lambda v: (int(VERSION_RE.match(v).group(1)), v))

    def _version_objects(self, complete_only: bool) -> dict:
        """{version id: [ObjectInfo, ...]} from one listing of versions/."""
        base = self._key(VERSIONS_DIR) + "/"
        out: dict[str, list] = {}
        for obj in self.client.list(base):
            version_id, _, _ = obj.key[len(base):].partition("/")
            out.setdefault(version_id, []).append(obj)
        if complete_only:
            out = {v: objs for v, objs in out.items()
                   if any(o.key == f"{base}{v}/{MANIFEST}" for o in objs)}
        return out

    def _next_seq(self) -> int:
        """Past every version ever listed or journalled (the journal's keys name their version: one listing)."""
        seqs = [int(VERSION_RE.match(v).group(1)) for v in self._sorted(self._version_objects(False))]
        for obj in self.client.list(self._key(HISTORY_DIR) + "/"):
            m = VERSION_RE.match(obj.key.rsplit("/", 1)[-1].split("-", 1)[-1].removesuffix(".json"))
            if m:
                seqs.append(int(m.group(1)))
        return max(seqs, default=0) + 1

    def _has_version(self, version_id: str) -> bool:
        return self.client.head(self._key(VERSIONS_DIR, version_id, MANIFEST)) is not None

    def _manifest(self, version_id: str) -> dict:
        got = self.client.get(self._key(VERSIONS_DIR, version_id, MANIFEST))
        where = self.version_path(version_id) / MANIFEST
        if got is None:
            raise CorruptVersionError(f"{where}: manifest missing (partial version)")
        return parse_manifest(got[0].decode("utf-8", "replace"), where)

    def _open_version(self, version_id: str, verify: bool) -> StoreVersion:
        """Download (what changed of) the version into the local cache and open it there; a failed check is
        retried once on a fresh download before it is reported, naming the remote object."""
        local = self._sync(version_id)
        try:
            return self._open(local, verify)
        except CorruptVersionError:
            shutil.rmtree(local, ignore_errors=True)
            self._record_path(version_id).unlink(missing_ok=True)
        local = self._sync(version_id)
        try:
            return self._open(local, verify)
        except CorruptVersionError as exc:
            raise CorruptVersionError(str(exc).replace(str(local), str(self.version_path(version_id)))) from None

    def _record_path(self, version_id: str) -> Path:
        return self.cache_root / VERSIONS_DIR / f".{version_id}.objects.json"

    def _sync(self, version_id: str) -> Path:
        """Make ``<cache>/versions/<id>`` hold exactly the version's objects; returns that folder."""
        base = self._key(VERSIONS_DIR, version_id) + "/"
        remote = {obj.key[len(base):]: obj for obj in self.client.list(base)}
        local = self.cache_root / VERSIONS_DIR / version_id
        local.mkdir(parents=True, exist_ok=True)
        record_path = self._record_path(version_id)
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        for rel, full in walk_files(local):
            if rel not in remote:  # deleted or renamed remotely: the local copy must not hide it
                full.unlink()
        todo = [(rel, obj) for rel, obj in remote.items()
                if record.get(rel) != [obj.size, obj.token] or not (local / rel).is_file()
                or (local / rel).stat().st_size != obj.size]
        downloads = self.cache_root / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)

        def fetch(item):
            rel, obj = item
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path_for(downloads / f"{version_id}-{rel.replace('/', '_')}")
            self.client.download(obj.key, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(fetch, todo))
        atomic_write_json(record_path, {rel: [obj.size, obj.token] for rel, obj in remote.items()})
        return local

    @contextmanager
    def pinned(self, version_id: str | None = None, *, verify: bool = True) -> Iterator[StoreVersion]:
        """The version's local copy: object stores cannot pin against ``retain``, but a read holds its own copy
        once it returns (retain deleting the objects mid-download fails that read, never a later use)."""
        yield self.read(version_id, verify=verify)

    def history(self) -> list[dict]:
        entries = {}
        for obj in self.client.list(self._key(HISTORY_DIR) + "/"):
            got = self.client.get(obj.key)
            try:
                entry = json.loads(got[0]) if got else None
            except ValueError:
                entry = None
            if isinstance(entry, dict) and isinstance(entry.get("seq"), int):
                entries[entry["seq"]] = entry
        got = self.client.get(self._key(CURRENT_FILE))
        if got is not None:
            try:
                entry = parse_current(got[0], self.root / CURRENT_FILE)[1]
            except CorruptVersionError:
                entry = None
            if entry and isinstance(entry.get("seq"), int):
                entries.setdefault(entry["seq"], entry)  # its writer died before copying it to history/
        return [entries[k] for k in sorted(entries)]

    # ------------------------------------------------------------------------------------------- write
    def _publish_sealed(self, staging, sealed, *, set_current: bool, lock_timeout: float) -> StoreVersion:
        """Upload every file, then the manifest (create-only), then compare-and-swap CURRENT (under the lease,
        which only waits for a live whole-run holder: the swap is what keeps writers apart)."""
        self._check_conditional_writes()
        for attempt in range(PUBLISH_ATTEMPTS):
            current = self._current_or_none()
            if not staging.parent_pinned:
                staging.parent = current
            if staging.require_parent_current or (set_current and staging.parent_pinned):
                self._check_current(staging.parent, current)  # refuse before uploading anything
            manifest = build_manifest(sealed, staging.parent, self._next_seq(),
                                      published_as="current" if set_current else "candidate")
            version_id = manifest["version"]
            atomic_write_json(staging.path / MANIFEST, manifest)
            created = self._upload_version(staging.path, version_id)
            if not set_current:
                break
            try:
                with self.lock(timeout=lock_timeout, purpose="publish"):
                    self._swap_current(current, version_id, action="publish")
                break
            except (StoreConflictError, StoreLockedError) as exc:
                if created:
                    self._delete_version(version_id)
                if isinstance(exc, StoreLockedError) or staging.parent_pinned or attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                log.info("CURRENT moved during the upload of %s; publishing again over %s", version_id,
                         exc.current)
                (staging.path / MANIFEST).unlink()
        local = self._adopt(staging.path, version_id)
        log.info("published %s (parent %s)%s", version_id, staging.parent, " as CURRENT" if set_current else "")
        return StoreVersion(local, manifest)

    def _upload_version(self, src: Path, version_id: str) -> bool:
        """Every file, then the manifest create-only. False when the version already existed (the same files,
        config and parent were published before): it is then someone else's to keep."""
        base = self._key(VERSIONS_DIR, version_id) + "/"
        if self.client.head(base + MANIFEST) is not None:
            return False
        files = [(rel, full) for rel, full in walk_files(src) if rel != MANIFEST]
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda item: self.client.upload(base + item[0], item[1]), files))
        try:
            self.client.put(base + MANIFEST, (src / MANIFEST).read_bytes(), if_absent=True)
        except PreconditionFailed:
            return False
        return True

    def _adopt(self, src: Path, version_id: str) -> Path:
        """Move the published staging into the local cache (it is the version's local copy)."""
        local = self.cache_root / VERSIONS_DIR / version_id
        local.parent.mkdir(parents=True, exist_ok=True)
        for _, full in walk_files(src):
            os.chmod(full, 0o444)
        if local.exists():
            shutil.rmtree(src, ignore_errors=True)
            return local
        os.rename(src, local)
        base = self._key(VERSIONS_DIR, version_id) + "/"
        atomic_write_json(self._record_path(version_id),
                          {obj.key[len(base):]: [obj.size, obj.token] for obj in self.client.list(base)})
        return local

    def _delete_version(self, version_id: str) -> None:
        """Manifest first (the version stops existing), then its files."""
        base = self._key(VERSIONS_DIR, version_id) + "/"
        self.client.delete(base + MANIFEST)
        for obj in list(self.client.list(base)):
            self.client.delete(obj.key)

    def _swap_current(self, expected: str | None, version_id: str, *, action: str) -> None:
        """Compare-and-swap CURRENT from ``expected`` to ``version_id`` with one conditional write, carrying the
        change's journal entry; then copy the entry to history/."""
        key = self._key(CURRENT_FILE)
        got = self.client.get(key)
        current, previous_entry = None, None
        if got is not None:
            try:
                current, previous_entry = parse_current(got[0], self.root / CURRENT_FILE)
            except CorruptVersionError as exc:
                log.error("%s; replacing it", exc)
        self._check_current(expected, current)
        if previous_entry and isinstance(previous_entry.get("seq"), int):
            self._journal(previous_entry)  # its writer may have died before copying it
            seq = previous_entry["seq"] + 1
        else:
            seq = max((e["seq"] for e in self.history() if isinstance(e.get("seq"), int)), default=0) + 1
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "action": action,
                 "version": version_id, "previous": expected, "pid": os.getpid(), "host": socket.gethostname(),
                 "seq": seq}
        body = f"{version_id}\n{json.dumps(entry)}\n".encode("ascii")
        try:
            if got is None:
                self.client.put(key, body, if_absent=True)
            else:
                self.client.put(key, body, if_token=got[1])
        except PreconditionFailed:
            now = self._current_or_none()
            self._check_current(expected, now)  # names the winner
            raise StoreConflictError(f"{self.root / CURRENT_FILE}: changed by another writer during the swap "
                                     f"(now {now} again); nothing was published: rerun", now, expected) from None
        self._journal(entry)

    def _journal(self, entry: dict) -> None:
        try:
            self.client.put(self._key(HISTORY_DIR, f"{entry['seq']:08d}-{entry['version']}.json"),
                            json.dumps(entry).encode(), if_absent=True)
        except PreconditionFailed:
            pass  # already there

    def retain(self, keep: int, *, lock_timeout: float = 0.0) -> list[str]:
        """Delete all but the newest ``keep`` versions (CURRENT always kept), under the lease. Object stores
        cannot see readers: one still downloading a removed version fails (and retries if it read CURRENT)."""
        if keep < 1:
            raise ValueError(f"retain: keep must be >= 1, got {keep}")
        with self.lock(timeout=lock_timeout, purpose=f"retain {keep}"):
            current = self.current_id()
            removed = [v for v in self._version_ids()[:-keep] if v != current]
            for version_id in removed:
                self._delete_version(version_id)
        if removed:
            log.info("retain %d: removed %s", keep, removed)
        return removed

    def cleanup(self, resume_ttl_s: float | None = None, partial_ttl_s: float | None = None) -> dict:
        """Sweep local stagings of dead writers, and remotely (under the lease; skipped while it is held) the
        versions of publishers that died: without a manifest, or complete but never made CURRENT although
        published to be, once older than ``partial_ttl_s`` (default PARTIAL_TTL_S)."""
        removed = {"staging": self._sweep_staging(resume_ttl_s), "partial_versions": 0, "unserved_versions": 0}
        ttl = PARTIAL_TTL_S if partial_ttl_s is None else partial_ttl_s
        try:
            with self.lock(purpose="cleanup"):
                removed.update(self._sweep_dead_publishes(ttl))
        except StoreLockedError:
            pass
        return removed

    def _sweep_dead_publishes(self, ttl: float) -> dict:
        cutoff = time.time() - ttl
        served = {e.get("version") for e in self.history()} | {self._current_or_none()}
        partial = unserved = 0
        for version_id, objects in self._version_objects(complete_only=False).items():
            if max(o.mtime for o in objects) > cutoff or version_id in served:
                continue
            if not any(o.key == self._key(VERSIONS_DIR, version_id, MANIFEST) for o in objects):
                partial += 1
            else:
                try:
                    if self._manifest(version_id).get("published_as") != "current":
                        continue  # a candidate published without being served: kept
                except CorruptVersionError:
                    continue
                unserved += 1
            log.info("removing %s: a dead publisher's version", self.version_path(version_id))
            self._delete_version(version_id)
        return {"partial_versions": partial, "unserved_versions": unserved}

    def _sweep_locked(self) -> dict:
        return {}


def _safe(prefix: str) -> str:
    """A bucket prefix as a relative local path (no '..', no absolute parts)."""
    parts = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) for p in prefix.split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_root"
