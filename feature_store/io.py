"""Crash-safe file writes and checksums.

Every file another process may read is written aside (a hidden temp file in the *same* directory, so the final
rename never crosses a filesystem), fsynced, renamed over the target with ``os.replace`` (atomic on POSIX), and
then the directory is fsynced so the rename itself survives a power loss. A reader therefore sees either the old
file or the complete new one, never a torn write. A writer killed half-way leaves only a ``.<name>.tmp-*`` file,
which no reader looks at.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_CHUNK = 1 << 20
TMP_MARKER = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames / creations inside it are durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file written by someone else (e.g. a library that does not fsync)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike) -> Path:
    """A unique hidden sibling of ``path`` used as the write-aside file."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")


def is_temp_name(name: str) -> bool:
    """True for write-aside files left behind by a killed writer."""
    return name.startswith(".") and TMP_MARKER in name


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write to; on success fsync it and rename it over ``path``.

    For writers that insist on a file name (pyarrow, safetensors). On error the temp file is removed and the
    target is untouched.

    Args:
        path: final destination. Its parent directory must exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {path}: the writer produced no file at {tmp}")
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (write aside, fsync, rename, fsync dir). Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


def strict_json(obj: Any, default=None) -> Any:
    """``obj`` as plain JSON values with NaN / inf replaced by None (strict parsers such as jq reject NaN).

    Args:
        obj: dicts, lists, tuples, scalars, numpy values, paths, dataclasses.
        default: fallback converter for other types (default: :func:`json_default`, which raises TypeError).
    """
    default = default or json_default
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: strict_json(v, default)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, default) for v in obj]
    return strict_json(default(obj), default)


def dumps_strict(obj: Any, *, indent: int | None = None, default=None, **kwargs) -> str:
    """``json.dumps`` of :func:`strict_json` (null, never NaN)."""
    return json.dumps(strict_json(obj, default), indent=indent, ensure_ascii=False, allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON atomically (NaN / inf become null). numpy scalars / arrays are converted;
    keys keep insertion order."""
    return atomic_write_text(path, dumps_strict(obj, indent=indent) + "\n")


def atomic_write_parquet(path: str | os.PathLike, table, **write_options) -> Path:
    """Write a ``pyarrow.Table`` as Parquet atomically.

    Args:
        path: destination file.
        table: pyarrow.Table.
        **write_options: passed to ``pyarrow.parquet.write_table`` (e.g. ``compression="zstd"``).
    """
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **write_options)
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable: {obj!r}")
