"""Atomic file writes and safetensors helpers for saved quantizers (no pickle anywhere).

quant/ is a pure library that must not import feature_store, so it carries its own small atomic writers:
write to a temporary file in the destination folder, fsync it, rename over the target, fsync the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
CONFIG_NAME = "quantizer.json"
ARRAYS_NAME = "arrays.safetensors"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_write_parquet(path: str | os.PathLike, table) -> None:
    """Write a pyarrow Table as Parquet atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_artifact(directory: str | os.PathLike, method: str, config: dict, arrays: dict[str, np.ndarray],
                  extra: dict | None = None) -> Path:
    """Save a quantizer: ``arrays.safetensors`` first, then ``quantizer.json`` naming its sha256.

    The JSON is written last, so a reader that finds it also finds the arrays it describes; the checksum catches
    a concurrent overwrite of the arrays.
    """
    from safetensors.numpy import save as st_save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    atomic_write_bytes(directory / ARRAYS_NAME, blob)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "config": config,
        "arrays": {"file": ARRAYS_NAME, "sha256": hashlib.sha256(blob).hexdigest(), "names": sorted(arrays)},
        "extra": extra or {},
    }
    atomic_write_json(directory / CONFIG_NAME, meta)
    return directory


def read_artifact(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a saved quantizer; returns (meta, arrays)."""
    from safetensors.numpy import load as st_load

    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no saved quantizer here (missing {CONFIG_NAME})")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from exc
    for key in ("format_version", "method", "config", "arrays"):
        if key not in meta:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta['format_version']} is newer than this library "
                         f"({FORMAT_VERSION})")
    arr_path = directory / meta["arrays"]["file"]
    if not arr_path.is_file():
        raise FileNotFoundError(f"{arr_path}: arrays file named by {cfg_path} is missing")
    blob = arr_path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta["arrays"]["sha256"]:
        raise ValueError(f"{arr_path}: sha256 {digest[:12]}… does not match {cfg_path} "
                         f"({meta['arrays']['sha256'][:12]}…); the quantizer was partially overwritten")
    return meta, dict(st_load(blob))
