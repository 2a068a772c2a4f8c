"""Staging: the private folder where one writer assembles a version before publish makes it visible.

Every staging folder ``.staging/<token>/`` has a sibling ``<token>.lock`` flock'd by its live writer. The kernel
drops that flock when the writer dies (even by SIGKILL), so a sweeper can tell a live writer's folder from a
crashed one's without pids or timeouts. Resumable stagings (``r-<key>``) outlive a crash on purpose and are only
swept once unused for ``RESUME_TTL_S``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from feature_store import tables
from feature_store.io import canonical_json, fsync_file, is_temp_name, sha256_file
from feature_store.lock import StoreLockedError, describe_holder, read_holder
from feature_store.version import MANIFEST, StoreVersion, walk_files

if TYPE_CHECKING:  # pragma: no cover
    from feature_store.store import FeatureStore

log = logging.getLogger(__name__)

RESUME_PREFIX = "r-"
RESUME_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
RESUME_TTL_S = 7 * 24 * 3600.0  # unclaimed resumable stagings older than this are garbage


class Staging:
    """A private folder where one writer assembles a version; ``publish`` makes it visible atomically.

    Write files under :attr:`path` (sub-folders allowed), then call :meth:`publish`. Leaving the ``with`` block
    without publishing (or with an exception) discards the folder, except for a resumable staging
    (``stage(resume_key=...)``), which is kept for the rerun until it is published or :meth:`abort` is called.

    Attributes:
        path: the folder to write into.
        parent: the parent version recorded at publish (None until then when it is "CURRENT at publish").
        resume_key: the key of a resumable staging, else None.
        resumed: True when a resumable staging was found with files from an earlier (crashed) run.
    """

    def __init__(self, store: "FeatureStore", path: Path, parent: str | None, require_parent_current: bool,
                 lock_fd: int, lock_path: Path, resume_key: str | None = None, resumed: bool = False,
                 parent_pinned: bool = True):
        self.store = store
        self.path = path
        self.parent = parent
        self.parent_pinned = parent_pinned  # False: the parent is CURRENT at publish (FeatureStore.stage)
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
            extra: anything else, e.g. ``{"watermark": max_ts}`` for the retraining job; ``extra["protocol"]``
                (feature_store.split.protocol_record) is also the manifest's top-level ``protocol``.
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
        sealed = seal(self.path, config or {}, metrics or {}, extra or {}, validate=validate)
        version = self.store._publish_sealed(self, sealed, set_current=set_current, lock_timeout=lock_timeout)
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


def seal(src: Path, config: dict, metrics: dict, extra: dict, *, validate: bool) -> _Sealed:
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
    t0 = time.perf_counter()
    for rel, full in walk_files(src):
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
                validate_contract_table(rel, full)
        elif rel.endswith(tables.CODEBOOKS_SUFFIX):
            tensor_info[rel] = safetensors_shapes(full)
    if not files:
        raise ValueError(f"staging folder {src} is empty; nothing to publish")
    log.info("sealed %d file(s), %.1f MB in %.2fs (sha256 + fsync%s)", len(files),
             sum(f["bytes"] for f in files.values()) / 1e6, time.perf_counter() - t0,
             " + table validation" if validate else "")
    return _Sealed(config, config_text, metrics, extra, files, table_info, tensor_info)


def claim_staging_token(staging_root: Path, resume_key: str | None = None) -> tuple[str, int, Path]:
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


def newest_mtime(folder: Path) -> float:
    """Newest modification time of a folder and everything under it (last sign of life of a staging)."""
    newest = folder.stat().st_mtime
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def try_claim(lock_path: Path) -> bool:
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


def validate_contract_table(rel: str, full: Path) -> None:
    name = Path(rel).name  # item_embeddings*.parquet / item_codes*.parquet, e.g. the *_unaligned ablation tables
    if name.startswith(tables.EMBEDDINGS_NAME) and name.endswith(tables.PARQUET_SUFFIX):
        tables.read_embeddings(full)
    elif name.startswith(tables.CODES_NAME) and name.endswith(tables.PARQUET_SUFFIX):
        tables.read_codes(full)


def safetensors_shapes(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as fh:
            return {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except Exception as exc:
        raise tables.TableError(f"{path}: not a readable safetensors file ({exc})") from exc


