"""On-disk cache of frozen-backbone hidden states for side-network training (IISAN: run the backbones once).

Layout::

    cache_dir/manifest.json              fingerprint, keys, shard list, modality stats
    cache_dir/shard-00000.safetensors    item_ids (n,) + every state key for those n items

Shards are written atomically and the manifest last, so a half-built cache has no manifest and is rebuilt. The
fingerprint covers the encoder config, the kept layers and the item set: a cache built for other backbones,
another image size or other items is never reused by mistake.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from feature_store.io import atomic_path, atomic_write_json
from pipelines.mllm.items import ItemCatalog, ModalityStats
from pipelines.mllm.side import SideEncoder, States

log = logging.getLogger(__name__)
CACHE_FORMAT = "qarm-side-cache/1"


def cache_fingerprint(encoder: SideEncoder, item_ids: np.ndarray) -> str:
    ex = encoder.extractor
    payload = {"encoder": encoder.config.fingerprint(), "text_layers": ex.text_layers,
               "vision_layers": ex.vision_layers,
               "items": hashlib.sha256(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class StateCache:
    """Hidden states of N items held in memory, row-aligned with ``item_ids``.

    Args:
        item_ids: (N,) int64.
        states: key -> (N, ...) tensor (see side.StateExtractor).
    """

    def __init__(self, item_ids: np.ndarray, states: States, stats: Optional[dict] = None,
                 fingerprint: str = "", built: bool = False):
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.states = states
        self.stats = stats or {}
        self.fingerprint = fingerprint
        self.built = built  # False when loaded from disk
        self._row = {int(i): r for r, i in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

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
        return sum(v.numel() * v.element_size() for v in self.states.values())


def build_cache(encoder: SideEncoder, catalog: ItemCatalog, item_ids: np.ndarray, cache_dir: Optional[Path],
                batch_size: int = 64, shard_size: int = 4096, progress: bool = True) -> StateCache:
    """Run the frozen backbones once over ``item_ids`` (reusing a matching cache in ``cache_dir``).

    Args:
        cache_dir: where to store shards; None keeps the cache in memory only.
        shard_size: items per safetensors shard.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    fingerprint = cache_fingerprint(encoder, item_ids)
    if cache_dir is not None:
        existing = load_cache(cache_dir, expect_fingerprint=fingerprint)
        if existing is not None:
            log.info("side cache: reusing %s (%d items)", cache_dir, len(existing))
            return existing
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    encoder.eval()
    stats = ModalityStats()
    errors_before = catalog.image_errors.copy()
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(item_ids), batch_size), desc="side cache", unit="batch", disable=not progress):
        batch = encoder.collate(catalog.inputs(item_ids[start:start + batch_size]))
        for t, i in zip(batch.has_text.tolist(), batch.has_image.tolist()):
            stats.add(t, i)
        for k, v in encoder.extractor(batch.to(encoder.device())).items():
            chunks.setdefault(k, []).append(v.float().cpu())
    states = {k: torch.cat(v) for k, v in chunks.items()}
    stats.image_errors = catalog.image_errors - errors_before
    cache = StateCache(item_ids, states, stats.to_dict(), fingerprint, built=True)
    if cache_dir is not None:
        save_cache(cache, Path(cache_dir), shard_size)
    return cache


def save_cache(cache: StateCache, cache_dir: Path, shard_size: int = 4096) -> None:
    """Write shards then the manifest; an older cache in the folder is invalidated first and its leftovers removed."""
    manifest = cache_dir / "manifest.json"
    if manifest.exists():
        manifest.unlink()  # readers must never pair the old manifest with new shards
    shards = []
    for n, start in enumerate(range(0, len(cache), shard_size)):
        name = f"shard-{n:05d}.safetensors"
        part = {k: v[start:start + shard_size].contiguous() for k, v in cache.states.items()}
        part["item_ids"] = torch.from_numpy(cache.item_ids[start:start + shard_size].copy())
        with atomic_path(cache_dir / name) as tmp:
            save_file(part, str(tmp))
        shards.append({"file": name, "n": int(len(part["item_ids"]))})
    atomic_write_json(cache_dir / "manifest.json", {
        "format": CACHE_FORMAT, "fingerprint": cache.fingerprint, "n_items": len(cache),
        "keys": sorted(cache.states), "shards": shards, "stats": cache.stats,
        "bytes": cache.nbytes()})
    listed = {s["file"] for s in shards}
    for stale in cache_dir.glob("shard-*.safetensors"):
        if stale.name not in listed:
            stale.unlink()


def load_cache(cache_dir: Path, expect_fingerprint: Optional[str] = None) -> Optional[StateCache]:
    """The cache in ``cache_dir``, or None when absent, incomplete or built for something else."""
    manifest_path = Path(cache_dir) / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
    if expect_fingerprint is not None and manifest["fingerprint"] != expect_fingerprint:
        log.info("side cache %s was built for other backbones/items; rebuilding", cache_dir)
        return None
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in manifest["shards"]:
        path = Path(cache_dir) / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"side cache {cache_dir}: shard {shard['file']} listed in the manifest is missing")
        tensors = load_file(str(path))
        if len(tensors["item_ids"]) != shard["n"]:
            raise ValueError(f"side cache {path}: {len(tensors['item_ids'])} rows, manifest says {shard['n']}")
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
    item_ids = torch.cat(parts.pop("item_ids")).numpy()
    states = {k: torch.cat(v) for k, v in parts.items()}
    if sorted(states) != manifest["keys"]:
        raise ValueError(f"side cache {cache_dir}: keys {sorted(states)} differ from manifest {manifest['keys']}")
    return StateCache(item_ids, states, manifest.get("stats"), manifest["fingerprint"], built=False)
