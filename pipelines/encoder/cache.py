"""On-disk cache of frozen-backbone hidden states for side-network training (IISAN: run the backbones once).

Layout::

    cache_dir/manifest.json              format, fingerprint, layout, encoder config, keys, shard list, stats
    cache_dir/shard-00000.safetensors    item_ids (n,) + every state key for those n items

The build streams: a shard is written as soon as ``shard_size`` items are encoded, so building holds one shard
(plus one batch) in memory, never the catalog. Shards are written atomically and the manifest last, so a
half-built cache has no manifest and is rebuilt. The fingerprint covers the encoder config, the state layout
(kept layers, widths) and the item set: a cache built for other backbones, another image size or other items is
never reused by mistake.

Memory when reading: ``StateCache.states`` loads every shard (training needs random access to any item of a
pair: bytes_per_item x n_items, see side_mllm.cache_bytes_per_item); ``StateCache.iter_shards`` holds one shard
at a time (embedding the catalog).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from feature_store.io import atomic_path, atomic_write_json
from feature_store.progress import Progress
from pipelines.encoder.items import ItemCatalog, ModalityStats
from pipelines.encoder.side import SideEncoder, States

log = logging.getLogger(__name__)
CACHE_FORMAT = "qarm-side-cache/2"


def cache_fingerprint(encoder: SideEncoder, item_ids: np.ndarray) -> str:
    payload = {"encoder": encoder.config.fingerprint(), "layout": encoder.extractor.layout(),
               "items": hashlib.sha256(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class StateCache:
    """Hidden states of N items, row-aligned with ``item_ids``; in memory, or read lazily from ``cache_dir``.

    Args:
        item_ids: (N,) int64.
        states: key -> (N, ...) tensor (see side_mllm.MLLMStateExtractor / side.StateExtractor), or None to read
            the shards of ``cache_dir`` on first use.
        stats: modality counts of the build (n_items, both, text_only, image_only, neither, image_errors).
        layout: the extractor's layout (kind "mllm" | "towers", kept layers, widths).
        encoder_config: the EncoderConfig dict the states came from.
        cache_dir: the folder holding the shards (None: memory only).
    """

    def __init__(self, item_ids: np.ndarray, states: Optional[States], stats: Optional[dict] = None,
                 fingerprint: str = "", built: bool = False, layout: Optional[dict] = None,
                 encoder_config: Optional[dict] = None, cache_dir: Optional[Path] = None,
                 shards: Optional[list] = None):
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self._states = states
        self.stats = stats or {}
        self.fingerprint = fingerprint
        self.built = built  # False when loaded from disk
        self.layout = layout or {}
        self.encoder_config = encoder_config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.shards = shards or []
        self._row = {int(i): r for r, i in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def states(self) -> States:
        """Every item's states (loads all shards on first use: the documented in-memory bound)."""
        if self._states is None:
            parts: dict[str, list[torch.Tensor]] = {}
            for _, st in self.iter_shards():
                for k, v in st.items():
                    parts.setdefault(k, []).append(v)
            self._states = {k: torch.cat(v) for k, v in parts.items()}
        return self._states

    @states.setter
    def states(self, value: States) -> None:
        self._states = value

    def iter_shards(self) -> Iterator[tuple[np.ndarray, States]]:
        """(item_ids (n,), states key -> (n, ...)) one shard at a time, in item order."""
        if self._states is not None or self.cache_dir is None:
            step = max(1, self.shards[0]["n"]) if self.shards else max(1, len(self))
            for start in range(0, len(self), step):
                yield self.item_ids[start:start + step], {k: v[start:start + step] for k, v in self.states.items()}
            return
        for shard in self.shards:
            yield read_shard(self.cache_dir, shard)

    def rows(self, ids) -> torch.Tensor:
        try:
            return torch.tensor([self._row[int(i)] for i in ids], dtype=torch.long)
        except KeyError as exc:
            raise KeyError(f"item {exc.args[0]} is not in the hidden-state cache") from None

    def gather(self, ids) -> States:
        """States of the given items, key -> (len(ids), ...)."""
        idx = self.rows(ids)
        return {k: v.index_select(0, idx) for k, v in self.states.items()}

    def nbytes(self) -> int:
        if self._states is None:
            return sum(int(s.get("bytes", 0)) for s in self.shards)
        return sum(v.numel() * v.element_size() for v in self._states.values())

    def bytes_per_item(self) -> float:
        return self.nbytes() / max(1, len(self))

    def to(self, device) -> "StateCache":
        self._states = {k: v.to(device) for k, v in self.states.items()}
        return self


def extract_states(encoder: SideEncoder, catalog: ItemCatalog, item_ids: np.ndarray, batch_size: int = 64,
                   on_batch=None) -> tuple[States, ModalityStats]:
    """The frozen backbones over ``item_ids`` (one pass, ``batch_size`` items at a time).

    Returns:
        (key -> (n, ...) float32 CPU tensors row-aligned with item_ids, the modality counts of these items).
    """
    encoder.eval()
    stats = ModalityStats()
    errors_before = catalog.image_errors.copy()
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(item_ids), batch_size):
            chunk = item_ids[start:start + batch_size]
            batch = encoder.collate(catalog.inputs(chunk))
            for t, i in zip(batch.has_text.tolist(), batch.has_image.tolist()):
                stats.add(t, i)
            for k, v in encoder.extractor(batch.to(encoder.device())).items():
                parts.setdefault(k, []).append(v.float().cpu())
            if on_batch is not None:
                on_batch(len(chunk))
    stats.image_errors = catalog.image_errors - errors_before
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}, stats


def write_shard(cache_dir: Path, name: str, item_ids: np.ndarray, states: States,
                metadata: Optional[dict] = None) -> dict:
    """One safetensors shard (atomic); returns its manifest entry (file, n, bytes, keys).

    Args:
        metadata: small JSON-able facts stored in the safetensors header (e.g. the shard's modality counts).
    """
    nbytes = sum(v.numel() * v.element_size() for v in states.values())
    tensors = {**states, "item_ids": torch.from_numpy(np.array(item_ids, dtype=np.int64))}
    header = {"qarm": json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(Path(cache_dir) / name) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return {"file": name, "n": int(len(item_ids)), "bytes": int(nbytes), "keys": sorted(states)}


def write_manifest(cache_dir: Path, shards: list[dict], fingerprint: str, layout: dict, encoder_config: dict,
                   stats: dict) -> dict:
    """The manifest, written last (atomic): a cache without one is incomplete. Shard files it does not list are
    removed (a cache folder holds one catalog's states)."""
    keys = sorted(shards[0]["keys"]) if shards else []
    manifest = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "n_items": int(sum(s["n"] for s in shards)),
                "keys": keys, "layout": layout, "encoder": encoder_config,
                "shards": [{k: s[k] for k in ("file", "n", "bytes", "keys")} for s in shards], "stats": stats,
                "bytes": int(sum(s.get("bytes", 0) for s in shards))}
    atomic_write_json(Path(cache_dir) / "manifest.json", manifest)
    listed = {s["file"] for s in shards}
    for stale in Path(cache_dir).glob("shard-*.safetensors"):
        if stale.name not in listed:
            stale.unlink()
    return manifest


def build_cache(encoder: SideEncoder, catalog: ItemCatalog, item_ids: np.ndarray, cache_dir: Optional[Path],
                batch_size: int = 64, shard_size: int = 4096, progress: bool = True) -> StateCache:
    """Run the frozen backbones once over ``item_ids`` (reusing a matching cache in ``cache_dir``).

    Args:
        encoder: a SideEncoder; ``encoder.extractor(batch)`` is the one backbone pass per batch.
        cache_dir: where to stream shards; None keeps the cache in memory only.
        shard_size: items per safetensors shard (the build's memory bound with cache_dir set).
    Returns:
        a StateCache (lazy over the shards when written to disk; ``built`` says whether the backbones ran).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"build_cache: batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    item_ids = np.asarray(item_ids, dtype=np.int64)
    fingerprint = cache_fingerprint(encoder, item_ids)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        existing = load_cache(cache_dir, expect_fingerprint=fingerprint)
        if existing is not None:
            log.info("side cache: reusing %s (%d items)", cache_dir, len(existing))
            return existing
        cache_dir.mkdir(parents=True, exist_ok=True)
        manifest = cache_dir / "manifest.json"
        if manifest.exists():
            manifest.unlink()  # readers must never pair the old manifest with new shards
    total = ModalityStats()
    kept: dict[str, list[torch.Tensor]] = {}  # memory-only cache
    shards: list[dict] = []
    n_shards = -(-len(item_ids) // shard_size)
    with Progress("side cache", len(item_ids), bar=None if progress else False, logger=log) as st:
        for start in range(0, len(item_ids), shard_size):  # one shard in memory at a time
            ids = item_ids[start:start + shard_size]
            st.postfix["shard"] = f"{len(shards) + 1}/{n_shards}"
            states, counts = extract_states(encoder, catalog, ids, batch_size, on_batch=st.update)
            total.merge(counts)
            if cache_dir is None:
                for k, v in states.items():
                    kept.setdefault(k, []).append(v)
                shards.append({"file": None, "n": int(len(ids))})
            else:
                shards.append(write_shard(cache_dir, f"shard-{len(shards):05d}.safetensors", ids, states))
        seconds = st.seconds
        total_bytes = sum(s.get("bytes", 0) for s in shards) if cache_dir is not None else \
            sum(v.numel() * v.element_size() for vs in kept.values() for v in vs)
        st.extra = {"MB": round(total_bytes / 2 ** 20, 1), "bytes_per_item": int(total_bytes / max(1, len(item_ids)))}
    layout = encoder.extractor.layout()
    config = encoder.config.to_dict()
    stats = {**total.to_dict(), "seconds": round(seconds, 3)}
    if cache_dir is None:
        states = {k: torch.cat(v) for k, v in kept.items()}
        return StateCache(item_ids, states, stats, fingerprint, built=True, layout=layout,
                          encoder_config=config, shards=shards)
    write_manifest(cache_dir, shards, fingerprint, layout, config, stats)
    return StateCache(item_ids, None, stats, fingerprint, built=True, layout=layout,
                      encoder_config=config, cache_dir=cache_dir, shards=shards)


def shard_header(path: Path) -> Optional[tuple[np.ndarray, list[str], dict]]:
    """(item_ids, state keys, metadata) of a shard file, or None when it is absent or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("qarm", "{}"))
            return f.get_tensor("item_ids").numpy(), sorted(k for k in f.keys() if k != "item_ids"), meta
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError):
        return None


def read_shard(cache_dir: Path, shard: dict) -> tuple[np.ndarray, States]:
    """(item_ids (n,), states) of one manifest entry."""
    path = Path(cache_dir) / shard["file"]
    if not path.is_file():
        raise FileNotFoundError(f"side cache {cache_dir}: shard {shard['file']} listed in the manifest is missing")
    tensors = load_file(str(path))
    ids = tensors.pop("item_ids").numpy()
    if len(ids) != shard["n"]:
        raise ValueError(f"side cache {path}: {len(ids)} rows, manifest says {shard['n']}")
    return ids, tensors


def load_cache(cache_dir: Path, expect_fingerprint: Optional[str] = None) -> Optional[StateCache]:
    """The cache in ``cache_dir`` (lazy: shards are read on use), or None when absent, incomplete or built for
    something else. Missing shards raise FileNotFoundError naming the shard."""
    manifest_path = Path(cache_dir) / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        log.info("side cache %s has format %r, expected %r; rebuilding", cache_dir, manifest.get("format"),
                 CACHE_FORMAT)
        return None if expect_fingerprint is not None else _bad_format(manifest_path, manifest)
    if expect_fingerprint is not None and manifest["fingerprint"] != expect_fingerprint:
        log.info("side cache %s was built for other backbones/items; rebuilding", cache_dir)
        return None
    ids = []
    for shard in manifest["shards"]:
        path = Path(cache_dir) / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"side cache {cache_dir}: shard {shard['file']} listed in the manifest is missing")
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            if sorted(k for k in f.keys() if k != "item_ids") != manifest["keys"]:
                raise ValueError(f"side cache {path}: keys differ from the manifest {manifest['keys']}")
            ids.append(f.get_tensor("item_ids").numpy())
    item_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    return StateCache(item_ids, None, manifest.get("stats"), manifest["fingerprint"], built=False,
                      layout=manifest.get("layout"), encoder_config=manifest.get("encoder"),
                      cache_dir=Path(cache_dir), shards=manifest["shards"])


def _bad_format(path: Path, manifest: dict):
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
