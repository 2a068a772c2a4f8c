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

Version ids are ``v000001-1a2b3c4d``: a zero-padded sequence (so ids sort by publication order) and the short
content hash.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from feature_store import tables
from feature_store.io import (atomic_write_json, atomic_write_text, canonical_json, fsync_dir, fsync_file,
                              is_temp_name, sha256_bytes, sha256_file)
from feature_store.lock import LOCK_FILE, StoreLockedError, describe_holder, read_holder, store_lock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.jsonl"
VERSIONS_DIR = "versions"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
FORMAT = "qarm.feature_store/1"
VERSION_RE = re.compile(r"^v(\d{6,})-([0-9a-f]{8})$")

RESUME_PREFIX = "r-"
RESUME_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
RESUME_TTL_S = 7 * 24 * 3600.0  # unclaimed resumable stagings older than this are garbage

_FROM_CURRENT = object()  # sentinel: stage()'s parent defaults to CURRENT at staging time


class CorruptVersionError(RuntimeError):
    """A version fails verification (missing / extra / altered file, bad manifest). Names the file."""


class VersionNotFoundError(FileNotFoundError):
    """No version with that id in the store."""


class StoreConflictError(RuntimeError):
    """CURRENT moved away from the staged parent while ``require_parent_current`` was set."""


@dataclass(frozen=True)
class VersionInfo:
    """One line of ``FeatureStore.list()`` (read from the manifest, not checksum-verified unless asked)."""

    id: str
    path: Path
    parent: str | None
    created_at: str | None
    current: bool
    rows: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # set when the manifest is unreadable or (with verify=True) verification failed

    def to_dict(self) -> dict:
        return {"id": self.id, "current": self.current, "parent": self.parent, "created_at": self.created_at,
                "rows": self.rows, "metrics": self.metrics, "path": str(self.path),
                **({"error": self.error} if self.error else {})}


class StoreVersion:
    """A verified, read-only version: its manifest, its folder and typed readers for its tables."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    @property
    def id(self) -> str:
        return self.manifest["version"]

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra", {})

    def files(self) -> list[str]:
        """Relative paths (posix) of every data file of the version."""
        return sorted(self.manifest["files"])

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def file(self, name: str) -> Path:
        """Path of a file of the version, by relative path or by stem (``item_codes`` finds ``item_codes.parquet``).

        Raises:
            FileNotFoundError: listing the files the version does have.
        """
        rel = self._resolve(name)
        if rel is None:
            raise FileNotFoundError(f"version {self.id} ({self.path}) has no file {name!r}; "
                                    f"it has {self.files()}")
        return self.path / rel

    def embeddings(self, name: str = tables.EMBEDDINGS_NAME):
        """(item_ids int64 (N,), emb float32 (N, d)), sorted by item_id."""
        return tables.read_embeddings(self.file(name))

    def codes(self, name: str = tables.CODES_NAME) -> tables.CodeTable:
        """CodeTable(item_ids (N,), rq int32 (N, L), vq int64 (N, K)), sorted by item_id."""
        return tables.read_codes(self.file(name))

    def codebooks(self, name: str = tables.CODEBOOKS_NAME, *, as_numpy: bool = False) -> dict:
        """``{tensor name: torch.Tensor}`` (numpy arrays with ``as_numpy``), e.g. ``rq.level0`` (K, d)."""
        return tables.read_codebooks(self.file(name), as_numpy=as_numpy)

    def _resolve(self, name: str) -> str | None:
        files = self.manifest["files"]
        if name in files:
            return name
        for suffix in (tables.PARQUET_SUFFIX, tables.CODEBOOKS_SUFFIX, ".json"):
            if name + suffix in files:
                return name + suffix
        return None

    def __repr__(self) -> str:
        return f"StoreVersion({self.id!r}, path={str(self.path)!r})"


class Staging:
    """A private folder where one writer assembles a version; ``publish`` makes it visible atomically.

    Write files under :attr:`path` (sub-folders allowed), then call :meth:`publish`. Leaving the ``with`` block
    without publishing (or with an exception) discards the folder, except for a resumable staging
    (``stage(resume_key=...)``), which is kept for the rerun until it is published or :meth:`abort` is called.

    Attributes:
        path: the folder to write into.
        parent: the parent version recorded at publish.
        resume_key: the key of a resumable staging, else None.
        resumed: True when a resumable staging was found with files from an earlier (crashed) run.
    """

    def __init__(self, store: "FeatureStore", path: Path, parent: str | None, require_parent_current: bool,
                 lock_fd: int, lock_path: Path, resume_key: str | None = None, resumed: bool = False):
        self.store = store
        self.path = path
        self.parent = parent
        self.require_parent_current = require_parent_current
        self.resume_key = resume_key
        self.resumed = resumed
        self.published: StoreVersion | None = None
        self._lock_fd = lock_fd
        self._lock_path = lock_path
        self._closed = False

    def publish(self, config: dict | None = None, metrics: dict | None = None, extra: dict | None = None, *,
                set_current: bool = True, validate: bool = True, lock_timeout: float = 10.0) -> StoreVersion:
        """Seal the staged files into a new immutable version and (by default) make it CURRENT.

        Steps: hash + fsync every file and validate the contract tables (the folder is private, so this needs no
        lock); then under the store lock: write manifest.json, fsync folders, rename the folder into
        ``versions/<id>``, replace CURRENT atomically, journal the change. Re-enters the lock when the caller
        already holds ``store.lock()``.

        Args:
            config: the settings that produced the version (stored with its sha256; ``encoder`` / ``quantizer``
                entries are also surfaced at the top of the manifest).
            metrics: JSON-able figures (codebook metrics, recall, ...).
            extra: anything else, e.g. ``{"watermark": max_ts}`` for the retraining job.
            set_current: False publishes the version without serving it (a candidate for later rollback to).
            validate: read the contract tables (item_embeddings / item_codes*) back and check them.
            lock_timeout: seconds to wait if another writer holds the lock (a short admin operation such as
                retain should not fail an hours-long job); 0 refuses at once.
        Returns:
            the published :class:`StoreVersion`.
        Raises:
            StoreLockedError, StoreConflictError, tables.TableError, RuntimeError (already published).
        """
        if self._closed:
            raise RuntimeError(f"staging {self.path} is already {'published' if self.published else 'closed'}")
        sealed = _seal(self.path, config or {}, metrics or {}, extra or {}, validate=validate)
        with self.store.lock(timeout=lock_timeout, purpose="publish"):
            version = self.store._publish_locked(self, sealed, set_current=set_current)
        self.published = version
        self._close()
        return version

    def abort(self) -> None:
        """Discard the staged files."""
        if not self._closed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._close()

    def _close(self) -> None:
        self._closed = True
        try:
            self._lock_path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)


class FeatureStore:
    """A versioned store rooted at ``root`` (created on first write).

    Args:
        root: directory of the store.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------------------------------- paths
    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    def version_path(self, version_id: str) -> Path:
        _check_id(version_id)
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

        Args:
            parent: the version this one derives from; defaults to CURRENT at staging time; None for a root.
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
        if parent is _FROM_CURRENT:
            parent = self.current_id()
        elif parent is not None:
            _check_id(parent)
            if not self.version_path(parent).is_dir():
                raise VersionNotFoundError(f"parent version {parent} not found in {self.versions_dir}")
        token, fd, lock_path = _claim_staging_token(self.root / STAGING_DIR, resume_key)
        path = self.root / STAGING_DIR / token
        resumed = path.is_dir() and any(path.iterdir())
        path.mkdir(exist_ok=resume_key is not None)
        if resumed:
            log.info("resuming staging %s (key %r) with the files of an earlier run", path, resume_key)
        staging = Staging(self, path, parent, require_parent_current, fd, lock_path, resume_key, resumed)
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

    def _publish_locked(self, staging: Staging, sealed: "_Sealed", *, set_current: bool) -> StoreVersion:
        self._sweep_locked()
        current = self.current_id()
        if staging.require_parent_current and current != staging.parent:
            raise StoreConflictError(f"CURRENT of {self.root} is {current} but this version was staged on "
                                     f"{staging.parent}; refusing to publish over a version this job did not see")
        src = staging.path
        config, files = sealed.config, sealed.files
        config_sha = sha256_bytes(sealed.config_text.encode("utf-8"))
        content_sha = _content_hash(files, config_sha, staging.parent)
        seq = self._next_seq()
        version_id = f"v{seq:06d}-{content_sha[:8]}"
        now = time.time()
        manifest = {
            "format": FORMAT,
            "version": version_id,
            "parent": staging.parent,
            "created_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "created_unix": now,
            "created_by": {"pid": os.getpid(), "host": socket.gethostname()},
            "content_sha256": content_sha,
            "config_sha256": config_sha,
            "encoder": config.get("encoder"),
            "quantizer": config.get("quantizer", config.get("quantizers")),
            "rows": {rel: info["rows"] for rel, info in sealed.tables.items()},
            "tables": sealed.tables,
            "tensors": sealed.tensors,
            "files": files,
            "metrics": sealed.metrics,
            "extra": sealed.extra,
            "config": config,
        }
        atomic_write_json(src / MANIFEST, manifest)
        for directory in _walk_dirs(src):
            fsync_dir(directory)
        dest = self.versions_dir / version_id
        os.rename(src, dest)  # the single step that makes the version visible
        fsync_dir(self.versions_dir)
        fsync_dir(src.parent)
        if set_current:
            self._set_current(version_id, action="publish", previous=current)
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
            previous = self.current_id()
            if previous != version_id:
                self._set_current(version_id, action="rollback", previous=previous)
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
        try:
            text = (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not VERSION_RE.match(text):
            raise CorruptVersionError(f"{self.root / CURRENT_FILE}: not a version id: {text[:80]!r}")
        return text

    def list(self, verify: bool = False) -> list[VersionInfo]:
        """All published versions, oldest first. Staging folders and trash are never listed.

        Args:
            verify: also check every checksum (slow for big stores); failures show in ``VersionInfo.error``.
        """
        current = self.current_id() if (self.root / CURRENT_FILE).exists() else None
        out = []
        for version_id in self._version_ids():
            path = self.versions_dir / version_id
            error, manifest = None, {}
            try:
                manifest = self.read(version_id, verify=True).manifest if verify else _load_manifest(path)
            except (CorruptVersionError, FileNotFoundError) as exc:
                error = str(exc)
            out.append(VersionInfo(id=version_id, path=path, parent=manifest.get("parent"),
                                   created_at=manifest.get("created_at"), current=version_id == current,
                                   rows=manifest.get("rows", {}), metrics=manifest.get("metrics", {}),
                                   error=error))
        return out

    def read(self, version_id: str | None = None, *, verify: bool = True) -> StoreVersion:
        """Open a version (CURRENT by default), verifying its manifest and every file's sha256.

        Raises:
            FileNotFoundError: empty store (no CURRENT). VersionNotFoundError: unknown id.
            CorruptVersionError: naming the missing, unexpected or altered file.
        """
        if version_id is None:
            version_id = self.current_id()
            if version_id is None:
                raise FileNotFoundError(f"feature store {self.root} has no CURRENT version; publish one first")
            path = self.versions_dir / version_id
            if not path.is_dir():
                raise CorruptVersionError(f"{self.root / CURRENT_FILE} names {version_id} but {path} does not exist")
        else:
            _check_id(version_id)
            path = self.versions_dir / version_id
            if not path.is_dir():
                known = self._version_ids()
                raise VersionNotFoundError(f"version {version_id} not found in {self.versions_dir}; "
                                           f"known: {known[-10:]}")
        manifest = _load_manifest(path)
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
        staging_root = self.root / STAGING_DIR
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
                if entry.name.startswith(RESUME_PREFIX) and time.time() - _newest_mtime(entry) < ttl:
                    continue
                target, entry = entry, entry.with_name(entry.name + ".lock")
            else:
                continue
            if _try_claim(entry):
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


# ----------------------------------------------------------------------------------------------- helpers


@dataclass
class _Sealed:
    """What publish learned about a staging folder before taking the lock."""

    config: dict
    config_text: str
    metrics: dict
    extra: dict
    files: dict
    tables: dict
    tensors: dict


def _seal(src: Path, config: dict, metrics: dict, extra: dict, *, validate: bool) -> _Sealed:
    """fsync + sha256 every staged file, summarise tables and tensors, validate the contract tables."""
    if (src / MANIFEST).exists():
        raise ValueError(f"{src / MANIFEST}: '{MANIFEST}' is reserved for the store; do not write it")
    try:
        # Normalise through JSON first (numpy -> python, int keys -> str), so the hash computed now equals the
        # one recomputed from the manifest on disk.
        config, metrics, extra = (json.loads(canonical_json(obj)) for obj in (config, metrics, extra))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"publish: config / metrics / extra must be JSON-serialisable ({exc})") from None
    config_text = canonical_json(config)
    files, table_info, tensor_info = {}, {}, {}
    for rel, full in _walk_files(src):
        if full.is_symlink():
            raise ValueError(f"{full}: symbolic links cannot be published (a version must own its bytes); "
                             "copy the file into the staging folder instead")
        if is_temp_name(full.name):  # leftovers of a failed atomic write inside the staging folder
            full.unlink()
            continue
        fsync_file(full)
        files[rel] = {"sha256": sha256_file(full), "bytes": full.stat().st_size}
        if rel.endswith(tables.PARQUET_SUFFIX):
            try:
                table_info[rel] = tables.table_summary(full)
            except Exception as exc:
                raise tables.TableError(f"{full}: not a readable Parquet file ({exc})") from exc
            if validate:
                _validate_contract_table(rel, full)
        elif rel.endswith(tables.CODEBOOKS_SUFFIX):
            tensor_info[rel] = _safetensors_shapes(full)
    if not files:
        raise ValueError(f"staging folder {src} is empty; nothing to publish")
    return _Sealed(config, config_text, metrics, extra, files, table_info, tensor_info)


def verify_version(path: Path, manifest: dict) -> None:
    """Check a version folder against its manifest. Raises CorruptVersionError naming the first bad file."""
    path = Path(path)
    for key in ("format", "version", "files", "content_sha256", "config_sha256"):
        if key not in manifest:
            raise CorruptVersionError(f"{path / MANIFEST}: missing key {key!r}")
    if manifest["format"] != FORMAT:
        raise CorruptVersionError(f"{path / MANIFEST}: unknown format {manifest['format']!r} (expected {FORMAT})")
    if manifest["version"] != path.name:
        raise CorruptVersionError(f"{path / MANIFEST}: names version {manifest['version']} but lives in {path.name}")
    files = manifest["files"]
    expected = _content_hash(files, manifest["config_sha256"], manifest.get("parent"))
    if expected != manifest["content_sha256"] or not path.name.endswith(expected[:8]):
        raise CorruptVersionError(f"{path / MANIFEST}: manifest content hash does not match the version id "
                                  "(the manifest was altered)")
    if sha256_bytes(canonical_json(manifest.get("config", {})).encode("utf-8")) != manifest["config_sha256"]:
        raise CorruptVersionError(f"{path / MANIFEST}: config does not match config_sha256 (the manifest was altered)")
    present = {rel for rel, _ in _walk_files(path) if rel != MANIFEST}
    for rel in sorted(files):
        full = path / rel
        if rel not in present:
            raise CorruptVersionError(f"{full}: listed in the manifest of {path.name} but missing")
        info = files[rel]
        size = full.stat().st_size
        if size != info["bytes"]:
            raise CorruptVersionError(f"{full}: size {size} bytes, manifest says {info['bytes']} (truncated or altered)")
        digest = sha256_file(full)
        if digest != info["sha256"]:
            raise CorruptVersionError(f"{full}: sha256 {digest[:12]}... does not match the manifest "
                                      f"({info['sha256'][:12]}...); the file is corrupt")
    unexpected = sorted(present - set(files))
    if unexpected:
        raise CorruptVersionError(f"{path / unexpected[0]}: not in the manifest of {path.name} "
                                  f"({len(unexpected)} unexpected file(s)); versions are immutable")


def _load_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptVersionError(f"{mpath}: manifest missing (partial version)") from None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CorruptVersionError(f"{mpath}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CorruptVersionError(f"{mpath}: manifest is not a JSON object")
    return manifest


def _content_hash(files: dict, config_sha: str, parent: str | None) -> str:
    payload = {"files": {rel: files[rel]["sha256"] for rel in sorted(files)}, "config_sha256": config_sha,
               "parent": parent}
    return sha256_bytes(canonical_json(payload).encode("utf-8"))


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # os.walk does not descend into symlinked folders; list them so publish / verify see them
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = Path(dirpath) / name
            out.append((full.relative_to(root).as_posix(), full))
    return out


def _walk_dirs(root: Path) -> list[Path]:
    dirs = [Path(dirpath) for dirpath, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)  # children before parents


def _claim_staging_token(staging_root: Path, resume_key: str | None = None) -> tuple[str, int, Path]:
    """Create and flock ``<token>.lock`` for a staging folder (a new uuid, or ``r-<key>`` when resumable).

    Lock first, folder second, so a sweeper only ever sees a folder whose lock is held. If a sweeper unlinked
    the lock file between our open and our flock (it looked orphaned), our lock is on a dead inode: retry.
    """
    if resume_key is not None and not RESUME_KEY_RE.match(resume_key):
        raise ValueError(f"resume_key must be 1-100 letters, digits, '.', '_' or '-', got {resume_key!r}")
    while True:
        token = uuid.uuid4().hex if resume_key is None else RESUME_PREFIX + resume_key
        lock_path = staging_root / f"{token}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if resume_key is not None else 0))
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(lock_path)
            raise StoreLockedError(f"resumable staging {resume_key!r} in {staging_root} is in use by "
                                   f"{describe_holder(holder)}", holder) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            return token, fd, lock_path
        os.close(fd)


def _newest_mtime(folder: Path) -> float:
    """Newest modification time of a folder and everything under it (last sign of life of a staging)."""
    newest = folder.stat().st_mtime
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _try_claim(lock_path: Path) -> bool:
    """Take (and unlink) a stager's lock file if its owner is gone. False when a live stager holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        lock_path.unlink(missing_ok=True)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return True


def _validate_contract_table(rel: str, full: Path) -> None:
    name = Path(rel).name  # item_embeddings*.parquet / item_codes*.parquet, e.g. the *_unaligned ablation tables
    if name.startswith(tables.EMBEDDINGS_NAME) and name.endswith(tables.PARQUET_SUFFIX):
        tables.read_embeddings(full)
    elif name.startswith(tables.CODES_NAME) and name.endswith(tables.PARQUET_SUFFIX):
        tables.read_codes(full)


def _safetensors_shapes(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as fh:
            return {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except Exception as exc:
        raise tables.TableError(f"{path}: not a readable safetensors file ({exc})") from exc


def _check_id(version_id: str) -> None:
    if not isinstance(version_id, str) or not VERSION_RE.match(version_id):
        raise ValueError(f"not a version id: {version_id!r} (expected like v000001-1a2b3c4d)")
