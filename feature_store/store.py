"""A versioned, immutable, crash-safe feature store on a local (or POSIX-mounted) directory.

Layout under ``root``::

    versions/<id>/            one complete, immutable version: manifest.json + its files (sub-folders allowed)
    CURRENT                   the id of the serving version (one line), replaced by atomic rename
    LOCK                      flock'd by the single writer; holds the holder's pid / host for error messages
    history.jsonl             append-only journal of CURRENT changes (publish / rollback)
    .staging/<uuid>/          private folders of writers still producing a version (never listed)
    .staging/<uuid>.lock      flock'd by the live stager; free means the stager died and the folder is garbage
    .trash/                   versions being deleted by retain() (renamed out of versions/ first)

Crash safety: a version becomes visible only by renaming its complete, fsynced staging folder into
``versions/`` (one atomic rename), and CURRENT only ever changes by renaming a complete temp file over it.
A writer killed at any moment therefore leaves either the old state or the new one, plus garbage in
``.staging`` / ``.trash`` that is never listed and is swept by later writers.

Integrity: the manifest lists the sha256 and size of every file; the version id ends with a hash of that list
(and the config hash), so an edited manifest is detected too. ``read`` verifies all of it.

On object storage (``FeatureStore("s3://...")`` / ``"gs://..."``) the same API runs on conditional writes instead
of rename + flock: see feature_store/remote.py.

Version ids are ``v000001-1a2b3c4d``: a zero-padded sequence (so ids sort by publication order) and the short
content hash.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from feature_store.io import atomic_write_json, atomic_write_text, fsync_dir, is_temp_name, sha256_bytes
from feature_store.lock import LOCK_FILE, StoreLockedError, store_lock
from feature_store.objects import is_object_url, local_path
from feature_store.staging import (RESUME_PREFIX, RESUME_TTL_S, Staging, _Sealed, claim_staging_token,
                                   newest_mtime, try_claim)
from feature_store.version import (FORMAT, MANIFEST, VERSION_RE, CorruptVersionError, StoreVersion, VersionInfo,
                                   VersionNotFoundError, check_id, content_hash, load_manifest, verify_version,
                                   walk_dirs, walk_files)

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.jsonl"
VERSIONS_DIR = "versions"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"

_FROM_CURRENT = object()  # sentinel: stage()'s parent defaults to CURRENT at staging time


class StoreConflictError(RuntimeError):
    """The compare-and-swap of CURRENT failed: another writer moved CURRENT after this one started from
    ``expected``; ``current`` is the version that won."""

    def __init__(self, message: str, current: str | None = None, expected: str | None = None):
        super().__init__(message)
        self.current, self.expected = current, expected


class FeatureStore:
    """A versioned store rooted at ``root`` (created on first write).

    Args:
        root: directory of the store (a path or ``file:///path``), or an object-storage URL (``s3://bucket/prefix``,
            ``gs://bucket/prefix``): then the instance is a :class:`feature_store.remote.ObjectFeatureStore`, with
            the same methods (CURRENT flips by a conditional write; see that module for what each backend
            guarantees).
        cache_dir: object stores only: where versions are downloaded for reading and stagings are written
            (default ``$QARM_STORE_CACHE`` or ``~/.cache/qarm/stores``).
    """

    def __new__(cls, root=None, *args, **kwargs):
        if cls is FeatureStore and is_object_url(root):
            from feature_store.remote import ObjectFeatureStore

            return super().__new__(ObjectFeatureStore)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.root = local_path(root)

    @property
    def url(self) -> str:
        """The store's location for reports: the absolute path here, the URL of an object store."""
        return str(self.root.resolve())

    def exists(self) -> bool:
        return self.root.is_dir()

    @property
    def staging_root(self) -> Path:
        """The local folder of private stagings (``.staging`` inside the store here)."""
        return self.root / STAGING_DIR

    def scratch_dir(self, name: str) -> Path:
        """A local folder for a job's checkpoints beside the store (``<root>/<name>``; object stores: in the
        cache), e.g. retrain's ``.retrain``."""
        return self.root / name

    # ------------------------------------------------------------------------------------------- paths
    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    def version_path(self, version_id: str) -> Path:
        check_id(version_id)
        return self.versions_dir / version_id

    # ------------------------------------------------------------------------------------------- lock
    def lock(self, timeout: float = 0.0, purpose: str = ""):
        """Context manager holding the exclusive writer lock (re-entrant in the holding thread).

        A long job (retraining) holds it for its whole run; ``publish`` / ``rollback`` / ``retain`` inside the
        ``with`` re-enter it. Raises :class:`StoreLockedError` naming the holder when another process has it.
        """
        self._ensure_layout()
        return store_lock(self.lock_path, timeout=timeout, purpose=purpose)

    # ------------------------------------------------------------------------------------------- write
    @contextmanager
    def stage(self, parent: Any = _FROM_CURRENT, *, require_parent_current: bool = False,
              resume_key: str | None = None) -> Iterator[Staging]:
        """A private staging folder for a new version.

        One writer per store: CURRENT changes only by a compare-and-swap under the store lock (``_swap_current``;
        on object storage, a conditional write), so a manifest's ``parent`` always equals the history's previous
        version. A job that publishes records CURRENT when it starts (``require_parent_current=True``) and is
        refused at publish (StoreConflictError naming the version that won) if another writer moved it meanwhile.

        Args:
            parent: the version this one derives from. Default: CURRENT, read at staging time with
                ``require_parent_current``, else at publish (the version it is published over). An explicit
                parent published as CURRENT must still be CURRENT then (StoreConflictError otherwise). None: a
                root version.
            require_parent_current: refuse to publish (StoreConflictError) if CURRENT is no longer ``parent``
                by then, so a job never overwrites a version it did not see.
            resume_key: make the staging resumable: the folder is named after the key (letters, digits, ``._-``),
                survives a crash or an exception, and a rerun with the same key gets it back with the files
                already written (``staging.resumed``), so a job can skip the stages it has checkpointed. Use a
                key that names the inputs (e.g. ``f"retrain-{parent}-{watermark}"``). One live holder per key
                (StoreLockedError otherwise); unclaimed ones are swept after ``RESUME_TTL_S``.
        Yields:
            :class:`Staging` with ``.path`` to write into and ``.publish(...)``.
        """
        self._ensure_layout()
        self._sweep_staging()
        pinned = parent is not _FROM_CURRENT or require_parent_current
        if parent is _FROM_CURRENT:
            parent = self.current_id() if require_parent_current else None  # else resolved at publish
        elif parent is not None:
            check_id(parent)
            if not self._has_version(parent):
                raise VersionNotFoundError(f"parent version {parent} not found in {self.versions_dir}")
        token, fd, lock_path = claim_staging_token(self.staging_root, resume_key)
        path = self.staging_root / token
        resumed = path.is_dir() and any(path.iterdir())
        path.mkdir(exist_ok=resume_key is not None)
        if resumed:
            log.info("resuming staging %s (key %r) with the files of an earlier run", path, resume_key)
        staging = Staging(self, path, parent, require_parent_current, fd, lock_path, resume_key, resumed,
                          parent_pinned=pinned)
        try:
            yield staging
        except BaseException:
            if resume_key is None:
                staging.abort()
            elif not staging._closed:
                staging._close()  # keep the files for the rerun
            raise
        if not staging._closed:
            if resume_key is None:
                log.warning("staging %s left without publish(); discarding it", path)
                staging.abort()
            else:
                staging._close()

    def _publish_sealed(self, staging: Staging, sealed: "_Sealed", *, set_current: bool,
                        lock_timeout: float) -> StoreVersion:
        """Publish a sealed staging (Staging.publish): under the store lock here, so the rename into versions/
        and the compare-and-swap of CURRENT see the same CURRENT."""
        with self.lock(timeout=lock_timeout, purpose="publish"):
            return self._publish_locked(staging, sealed, set_current=set_current)

    def _publish_locked(self, staging: Staging, sealed: "_Sealed", *, set_current: bool) -> StoreVersion:
        self._sweep_locked()
        current = self._current_or_none()
        if not staging.parent_pinned:
            staging.parent = current  # "derive from CURRENT", read now that the lock is held
        if staging.require_parent_current or (set_current and staging.parent_pinned):
            self._check_current(staging.parent, current)  # refuse before anything becomes visible
        src = staging.path
        manifest = build_manifest(sealed, staging.parent, self._next_seq())
        version_id = manifest["version"]
        atomic_write_json(src / MANIFEST, manifest)
        for _, full in walk_files(src):
            os.chmod(full, 0o444)  # versions are immutable: make accidental in-place edits fail loudly
        for directory in walk_dirs(src):
            fsync_dir(directory)
        dest = self.versions_dir / version_id
        os.rename(src, dest)  # the single step that makes the version visible
        fsync_dir(self.versions_dir)
        fsync_dir(src.parent)
        if set_current:
            self._swap_current(current, version_id, action="publish")
        log.info("published %s (parent %s)%s", version_id, staging.parent, " as CURRENT" if set_current else "")
        return StoreVersion(dest, manifest)

    def rollback(self, version_id: str, *, lock_timeout: float = 0.0) -> dict:
        """Point CURRENT at an earlier version after verifying it completely.

        Returns:
            ``{"current": version_id, "previous": old_current}``.
        Raises:
            VersionNotFoundError, CorruptVersionError, StoreLockedError.
        """
        with self.lock(timeout=lock_timeout, purpose=f"rollback to {version_id}"):
            self.read(version_id, verify=True)
            previous = self._current_or_none()
            if previous != version_id:
                self._swap_current(previous, version_id, action="rollback")
        return {"current": version_id, "previous": previous}

    def retain(self, keep: int, *, lock_timeout: float = 0.0) -> list[str]:
        """Delete all but the newest ``keep`` versions; CURRENT and versions pinned by a reader are kept.

        Returns:
            the ids removed, oldest first.
        """
        if keep < 1:
            raise ValueError(f"retain: keep must be >= 1, got {keep}")
        with self.lock(timeout=lock_timeout, purpose=f"retain {keep}"):
            self._sweep_locked()
            ids = self._version_ids()
            current = self.current_id()
            trash = self.root / TRASH_DIR
            trash.mkdir(exist_ok=True)
            removed, pinned = [], []
            for version_id in (v for v in ids[:-keep] if v != current):
                fd = os.open(self.versions_dir / version_id, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:  # a reader holds it through pinned(): delete on a later run
                        pinned.append(version_id)
                        continue
                    # Rename out of versions/ first so a half-deleted folder is never listed.
                    os.rename(self.versions_dir / version_id, trash / f"{version_id}-{uuid.uuid4().hex[:8]}")
                    removed.append(version_id)
                finally:
                    os.close(fd)
            if removed:
                fsync_dir(self.versions_dir)
            self._empty_trash()
        if removed:
            log.info("retain %d: removed %s", keep, removed)
        if pinned:
            log.info("retain %d: kept %s, pinned by a reader", keep, pinned)
        return removed

    @contextmanager
    def pinned(self, version_id: str | None = None, *, verify: bool = True) -> Iterator[StoreVersion]:
        """Read a version (CURRENT by default) and keep ``retain`` from deleting it until the block ends.

        For long readers (a ranker training run): the pin is a shared flock on the version folder, dropped by the
        kernel if the reader dies. Rollbacks still work; only deletion waits.
        """
        for _ in range(10):
            target = version_id or self.current_id()
            if target is None:
                raise FileNotFoundError(f"feature store {self.root} has no CURRENT version; publish one first")
            path = self.version_path(target)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                if version_id is not None:
                    raise VersionNotFoundError(f"version {version_id} not found in {self.versions_dir}") from None
                continue  # CURRENT moved and the old one was retained away meanwhile: resolve again
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # renamed into the trash between our open and our flock
                    if version_id is not None:
                        raise VersionNotFoundError(f"version {version_id} was removed by retain")
                    continue
                yield self.read(target, verify=verify)
                return
            finally:
                os.close(fd)
        raise RuntimeError(f"feature store {self.root}: CURRENT kept changing while pinning a version")

    def cleanup(self, resume_ttl_s: float | None = None) -> dict:
        """Sweep what crashed writers left behind: abandoned staging folders, trash, temp files.

        Args:
            resume_ttl_s: also remove unclaimed resumable stagings unused for this long (default RESUME_TTL_S).
        Returns:
            counts of what was removed. Skips the locked parts (trash, temp files) when a writer is active.
        """
        removed = {"staging": self._sweep_staging(resume_ttl_s), "trash": 0, "temp_files": 0}
        try:
            with self.lock(purpose="cleanup"):
                removed.update(self._sweep_locked())
        except StoreLockedError:
            pass
        return removed

    # ------------------------------------------------------------------------------------------- read
    def current_id(self) -> str | None:
        """Id of the serving version, or None for an empty store."""
        path = self.root / CURRENT_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_current(raw, path)[0]

    def _current_or_none(self) -> str | None:
        """CURRENT, or None when it is unreadable: list / rollback / publish must still work to repair it."""
        try:
            return self.current_id()
        except CorruptVersionError as exc:
            log.error("%s; treating the store as having no CURRENT until a rollback or publish", exc)
            return None

    def list(self, verify: bool = False) -> list[VersionInfo]:
        """All published versions, oldest first. Staging folders and trash are never listed.

        Args:
            verify: also check every checksum (slow for big stores); failures show in ``VersionInfo.error``.
        """
        current = self._current_or_none()
        out = []
        for version_id in self._version_ids():
            path = self.versions_dir / version_id
            error, manifest = None, {}
            try:
                manifest = self.read(version_id, verify=True).manifest if verify else self._manifest(version_id)
            except (CorruptVersionError, FileNotFoundError) as exc:
                error = str(exc)
            out.append(VersionInfo(id=version_id, path=path, parent=manifest.get("parent"),
                                   created_at=manifest.get("created_at"), current=version_id == current,
                                   rows=manifest.get("rows", {}), metrics=manifest.get("metrics", {}),
                                   error=error))
        return out

    def read(self, version_id: str | None = None, *, verify: bool = True) -> StoreVersion:
        """Open a version (CURRENT by default), verifying its manifest and every file's sha256.

        Reading CURRENT retries when CURRENT moves mid-read (a rollback, then a retain removed the version being
        read), so a concurrent writer never makes a reader fail; use :meth:`pinned` for long reads.

        Raises:
            FileNotFoundError: empty store (no CURRENT). VersionNotFoundError: unknown id.
            CorruptVersionError: naming the missing, unexpected or altered file.
        """
        if version_id is not None:
            check_id(version_id)
            if not self._has_version(version_id):
                known = self._version_ids()
                raise VersionNotFoundError(f"version {version_id} not found in {self.versions_dir}; "
                                           f"known: {known[-10:]}")
            return self._open_version(version_id, verify)
        for attempt in range(5):
            current = self.current_id()
            if current is None:
                raise FileNotFoundError(f"feature store {self.root} has no CURRENT version; publish one first")
            try:
                if not self._has_version(current):
                    raise CorruptVersionError(f"{self.root / CURRENT_FILE} names {current} but "
                                              f"{self.versions_dir / current} does not exist")
                return self._open_version(current, verify)
            except (CorruptVersionError, FileNotFoundError):
                if attempt == 4 or self.current_id() == current:
                    raise  # CURRENT did not move: the damage is real
                log.info("CURRENT moved from %s while reading it; reading the new CURRENT", current)
        raise AssertionError("unreachable")

    def _manifest(self, version_id: str) -> dict:
        """A version's manifest as written (not verified)."""
        return load_manifest(self.versions_dir / version_id)

    def _has_version(self, version_id: str) -> bool:
        return (self.versions_dir / version_id).is_dir()

    def _open_version(self, version_id: str, verify: bool) -> StoreVersion:
        return self._open(self.versions_dir / version_id, verify)

    @staticmethod
    def _open(path: Path, verify: bool) -> StoreVersion:
        manifest = load_manifest(path)
        if verify:
            verify_version(path, manifest)
        return StoreVersion(path, manifest)

    def history(self) -> list[dict]:
        """The journal of CURRENT changes, oldest first (a torn last line from a crash is skipped)."""
        try:
            lines = (self.root / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # ------------------------------------------------------------------------------------------- internals
    def _ensure_layout(self) -> None:
        for sub in (self.root, self.versions_dir, self.root / STAGING_DIR):
            sub.mkdir(parents=True, exist_ok=True)

    def _version_ids(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        ids = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(ids, key=lambda v: (int(VERSION_RE.match(v).group(1)), v))

    def _next_seq(self) -> int:
        seqs = [int(VERSION_RE.match(v).group(1)) for v in self._version_ids()]
        for entry in self.history():  # never reuse a number, even after retain removed the newest ones
            m = VERSION_RE.match(str(entry.get("version", "")))
            if m:
                seqs.append(int(m.group(1)))
        return max(seqs, default=0) + 1

    def _check_current(self, expected: str | None, current: str | None) -> None:
        """StoreConflictError naming the version that won when CURRENT is not ``expected``."""
        if current == expected:
            return
        raise StoreConflictError(
            f"{self.root / CURRENT_FILE}: another writer changed CURRENT to {current or 'nothing'}"
            f"{self._who_set(current)} after this job started from {expected or 'an empty store'}; refusing to "
            f"publish over a version this job did not see (one writer per store; nothing was published: rerun to "
            f"build on {current or 'the current state'})", current, expected)

    def _who_set(self, version_id: str | None) -> str:
        """' (published by pid P on host H at T)' from the history, or '' when unknown."""
        for entry in reversed(self.history()):
            if entry.get("version") == version_id:
                return (f" ({entry.get('action', 'set')} by pid {entry.get('pid', '?')} on host "
                        f"{entry.get('host', '?')} at {entry.get('at', '?')})")
        return ""

    def _swap_current(self, expected: str | None, version_id: str, *, action: str) -> None:
        """Compare-and-swap CURRENT from ``expected`` to ``version_id`` and journal it; called with the lock held.

        Here the lock makes the read-compare-write atomic; an object-storage backend does the same with one
        conditional write of CURRENT (if it still has the generation / ETag read as ``expected``).
        """
        self._check_current(expected, self._current_or_none())
        self._set_current(version_id, action=action, previous=expected)

    def _set_current(self, version_id: str, *, action: str, previous: str | None) -> None:
        atomic_write_text(self.root / CURRENT_FILE, version_id + "\n")
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "action": action,
                 "version": version_id, "previous": previous, "pid": os.getpid(), "host": socket.gethostname()}
        line = json.dumps(entry) + "\n"
        fd = os.open(self.root / HISTORY_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # a writer died mid-line: keep its torn line separate from ours
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sweep_staging(self, resume_ttl_s: float | None = None) -> int:
        """Remove staging folders whose writer is gone (its flock is free). Safe without the store lock.

        Resumable folders (``r-<key>``) are kept for their rerun until unused for ``resume_ttl_s``.
        """
        staging_root = self.staging_root
        if not staging_root.is_dir():
            return 0
        ttl = RESUME_TTL_S if resume_ttl_s is None else resume_ttl_s
        removed = 0
        for entry in list(staging_root.iterdir()):
            if entry.suffix == ".lock":
                token_dir = entry.with_suffix("")
                if token_dir.exists():
                    continue  # handled with its folder below
                target = None
            elif entry.is_dir():
                if entry.name.startswith(RESUME_PREFIX) and time.time() - newest_mtime(entry) < ttl:
                    continue
                target, entry = entry, entry.with_name(entry.name + ".lock")
            else:
                continue
            if try_claim(entry):
                if target is not None:
                    shutil.rmtree(target, ignore_errors=True)
                    removed += 1
                    log.info("removed abandoned staging folder %s", target)
        return removed

    def _sweep_locked(self) -> dict:
        """Trash and temp files; only called with the store lock held (a live writer may own temp files)."""
        trash = self._empty_trash()
        temps = 0
        for folder in (self.root, self.versions_dir):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if entry.is_file() and is_temp_name(entry.name):
                        entry.unlink(missing_ok=True)
                        temps += 1
        return {"trash": trash, "temp_files": temps}

    def _empty_trash(self) -> int:
        trash = self.root / TRASH_DIR
        if not trash.is_dir():
            return 0
        entries = list(trash.iterdir())
        for entry in entries:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        return len(entries)


def build_manifest(sealed: "_Sealed", parent: str | None, seq: int, **fields) -> dict:
    """The manifest of a new version (its id ``v<seq>-<content hash>`` inside), from what seal() learned.

    Args:
        sealed: the staging's files, tables, tensors, config, metrics and extra.
        parent: the parent version recorded (None for a root version).
        seq: the version's sequence number (FeatureStore._next_seq).
        **fields: further top-level entries (not part of the content hash), e.g. an object store's
            ``published_as``.
    """
    config, files = sealed.config, sealed.files
    config_sha = sha256_bytes(sealed.config_text.encode("utf-8"))
    content_sha = content_hash(files, config_sha, parent)
    now = time.time()
    return {
        "format": FORMAT,
        "version": f"v{seq:06d}-{content_sha[:8]}",
        "parent": parent,
        "created_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "created_unix": now,
        "created_by": {"pid": os.getpid(), "host": socket.gethostname()},
        "content_sha256": content_sha,
        "config_sha256": config_sha,
        "encoder": config.get("encoder"),
        "quantizer": config.get("quantizer", config.get("quantizers")),
        # the split its behaviour-learned parts were fitted under (feature_store.split.protocol_record)
        "protocol": sealed.extra.get("protocol"),
        "rows": {rel: info["rows"] for rel, info in sealed.tables.items()},
        "tables": sealed.tables,
        "tensors": sealed.tensors,
        "files": files,
        "metrics": sealed.metrics,
        "extra": sealed.extra,
        "config": config,
        **fields,
    }


def parse_current(raw: bytes, where) -> tuple[str, dict | None]:
    """(version id, journal entry or None) of CURRENT's bytes: the id on the first line; an object store's CURRENT
    also carries the journal entry of the change that wrote it on the second (feature_store.remote).

    Raises:
        CorruptVersionError: naming ``where`` when the first line is not a version id.
    """
    try:
        lines = raw.decode("ascii").strip().split("\n", 1)
    except UnicodeDecodeError:  # binary garbage: say so with the file's name, never a bare codec error
        lines = None
    if not lines or not VERSION_RE.match(lines[0].strip()):
        raise CorruptVersionError(f"{where}: not a version id ({raw[:40]!r}); repair it with `qarm store "
                                  "rollback --store ... --version V` (`qarm store list` shows the versions)")
    entry = None
    if len(lines) > 1:
        try:
            entry = json.loads(lines[1])
        except ValueError:
            entry = None
    return lines[0].strip(), entry if isinstance(entry, dict) else None
