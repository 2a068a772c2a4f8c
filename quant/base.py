"""Shared quantizer plumbing: input validation, the common API, and the save/load registry."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from quant import artifact

_REGISTRY: dict[str, type["Quantizer"]] = {}


class NotFittedError(RuntimeError):
    """A quantizer was used before ``fit`` (or ``load``)."""


def register(cls: type["Quantizer"]) -> type["Quantizer"]:
    _REGISTRY[cls.method] = cls
    return cls


def check_embeddings(x, *, name: str = "x", dim: int | None = None, min_rows: int = 1,
                     min_rows_reason: str = "") -> np.ndarray:
    """Validate an embedding matrix and return it as C-contiguous float32.

    Args:
        x: array-like of shape (N, d).
        name: how errors refer to the input (a file name, for instance).
        dim: the expected d, or None.
        min_rows: fewest rows accepted.
        min_rows_reason: appended to the error when there are too few rows.

    Raises:
        ValueError naming the first non-finite row, a wrong dimension, or too few rows.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, d) embedding matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: empty input (0 rows)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: embeddings have dimension 0")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: embeddings must be numeric, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: embedding dimension {arr.shape[1]} does not match the fitted dimension {dim}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: {arr.shape[0]} rows, need at least {min_rows}{min_rows_reason}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # e.g. a zero-copy view of an Arrow buffer
        arr = arr.copy()
    finite = np.isfinite(arr).all(axis=1)  # (N,)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        col = int(np.flatnonzero(~np.isfinite(arr[bad[0]]))[0])
        raise ValueError(f"{name}: row {int(bad[0])} has a non-finite value ({arr[bad[0], col]!r} at column {col}); "
                         f"{bad.size} bad row(s) in all")
    return arr


def check_codes(codes, *, levels: int, codebook_sizes: list[int], name: str = "codes") -> np.ndarray:
    """Validate an (N, L) code matrix against per-level codebook sizes; returns int64."""
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[1] != levels:
        raise ValueError(f"{name}: expected shape (N, {levels}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: codes must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    for level, size in enumerate(codebook_sizes):
        col = arr[:, level]
        bad = np.flatnonzero((col < 0) | (col >= size))
        if bad.size:
            raise ValueError(f"{name}: row {int(bad[0])} level {level} has code {int(col[bad[0]])} outside "
                             f"[0, {size})")
    return arr


class Quantizer:
    """The API every quantizer follows (faiss style).

    ``fit(x)`` trains on (N, d) float embeddings and returns self; ``encode(x)`` gives (N, L) integer codes;
    ``decode(codes)`` gives (N, d) float32 reconstructions; ``save(dir)`` writes safetensors + JSON config;
    ``quant.load_quantizer(dir)`` reads any of them back.
    """

    method: ClassVar[str] = ""

    def __init__(self, config):
        self.config = config
        self.fit_stats: dict = {}

    # -- to implement -------------------------------------------------------------------------------------------
    def fit(self, x) -> "Quantizer":  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restore(self, arrays: dict[str, np.ndarray], extra: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(x) or load_quantizer(dir) first")

    def _extra(self) -> dict:
        return {"fit_stats": self.fit_stats}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``arrays.safetensors`` and ``quantizer.json`` (method, config, checksum) into ``directory``."""
        self._require_fitted()
        return artifact.save_artifact(directory, self.method, dataclasses.asdict(self.config), self._arrays(),
                                 self._extra())

    @classmethod
    def _from_saved(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "Quantizer":
        config_cls = cls.config_class()
        fields = {f.name for f in dataclasses.fields(config_cls)}
        cfg = {k: v for k, v in meta["config"].items() if k in fields}
        for key, value in cfg.items():  # JSON turns tuples into lists; configs hold tuples
            if isinstance(value, list):
                cfg[key] = tuple(value)
        obj = cls.__new__(cls)
        Quantizer.__init__(obj, config_cls(**cfg))
        obj._restore(arrays, meta.get("extra", {}))
        obj.fit_stats = meta.get("extra", {}).get("fit_stats", {})
        return obj

    @classmethod
    def config_class(cls):  # pragma: no cover - abstract
        raise NotImplementedError


def load_quantizer(directory: str | os.PathLike) -> Quantizer:
    """Load any saved quantizer, dispatching on the ``method`` in its ``quantizer.json``."""
    import quant  # noqa: F401  (registers every quantizer class, including the lazily imported RQ-VAE)
    try:
        from quant import fsq, rqvae  # noqa: F401
    except ImportError:  # pragma: no cover - still being built
        pass

    meta, arrays = artifact.read_artifact(directory)
    method = meta["method"]
    if method not in _REGISTRY:
        raise ValueError(f"{Path(directory) / artifact.CONFIG_NAME}: unknown quantizer method {method!r}; "
                         f"known: {sorted(_REGISTRY)}")
    return _REGISTRY[method]._from_saved(meta, arrays)
