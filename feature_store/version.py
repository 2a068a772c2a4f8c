"""A published version: its manifest, its verification, and typed readers for its tables.

A version folder holds ``manifest.json`` and the files it lists (sub-folders allowed). The manifest records the
sha256 and size of every file; the version id ``v000001-1a2b3c4d`` ends with a hash over that list, the config
hash and the parent, so an edited manifest is caught as surely as an edited file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from feature_store import tables
from feature_store.io import canonical_json, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "qarm.feature_store/1"
VERSION_RE = re.compile(r"^v(\d{6,})-([0-9a-f]{8})$")


class CorruptVersionError(RuntimeError):
    """A version fails verification (missing / extra / altered file, bad manifest). Names the file."""


class VersionNotFoundError(FileNotFoundError):
    """No version with that id in the store."""


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
    expected = content_hash(files, manifest["config_sha256"], manifest.get("parent"))
    if expected != manifest["content_sha256"] or not path.name.endswith(expected[:8]):
        raise CorruptVersionError(f"{path / MANIFEST}: manifest content hash does not match the version id "
                                  "(the manifest was altered)")
    if sha256_bytes(canonical_json(manifest.get("config", {})).encode("utf-8")) != manifest["config_sha256"]:
        raise CorruptVersionError(f"{path / MANIFEST}: config does not match config_sha256 (the manifest was altered)")
    present = {rel for rel, _ in walk_files(path) if rel != MANIFEST}
    total_mb = sum(info.get("bytes", 0) for info in files.values()) / 1e6
    t0 = time.perf_counter()
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
    # Big versions take a while to hash: say so at INFO, small ones at DEBUG.
    log.log(logging.INFO if total_mb > 256 else logging.DEBUG, "verified %s: %d file(s), %.1f MB in %.2fs",
            path.name, len(files), total_mb, time.perf_counter() - t0)


def load_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptVersionError(f"{mpath}: manifest missing (partial version)") from None
    return parse_manifest(text, mpath)


def parse_manifest(text: str, where) -> dict:
    """The manifest JSON object; CorruptVersionError naming ``where`` when it is not one."""
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CorruptVersionError(f"{where}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CorruptVersionError(f"{where}: manifest is not a JSON object")
    return manifest


def content_hash(files: dict, config_sha: str, parent: str | None) -> str:
    payload = {"files": {rel: files[rel]["sha256"] for rel in sorted(files)}, "config_sha256": config_sha,
               "parent": parent}
    return sha256_bytes(canonical_json(payload).encode("utf-8"))


def walk_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # os.walk does not descend into symlinked folders; list them so publish / verify see them
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = Path(dirpath) / name
            out.append((full.relative_to(root).as_posix(), full))
    return out


def walk_dirs(root: Path) -> list[Path]:
    dirs = [Path(dirpath) for dirpath, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)  # children before parents


def check_id(version_id: str) -> None:
    if not isinstance(version_id, str) or not VERSION_RE.match(version_id):
        raise ValueError(f"not a version id: {version_id!r} (expected like v000001-1a2b3c4d)")
