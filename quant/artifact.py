"""Saved quantizers: safetensors arrays + a JSON description naming their sha256 (no pickle anywhere).

Writes go through feature_store.io (write aside, fsync, rename), the one atomic-write implementation.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from feature_store.io import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
CONFIG_NAME = "quantizer.json"
ARRAYS_NAME = "arrays.safetensors"


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
