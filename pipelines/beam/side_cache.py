"""The side mode's one backbone pass, on the workers: the frozen MLLM's hidden-state cache built shard by shard,
and every embedding of the version read back from it shard by shard.

    items -> BuildSideCache -> cache folder (safetensors shards + manifest)  -> Align (the trainer reads the cache)
    cache folder + aligned checkpoint -> EmbedFromCache -> aligned / unaligned / text / image (item_id, (D,)) rows

Shards: items go to ``ceil(N / shard_size)`` buckets by a seeded hash of the item id (the same buckets on any
runner); each bucket is one GroupByKey value (``shard_size`` item records), encoded by one worker whose DoFn built
the frozen MLLM once in ``setup``. A shard file is named by the fingerprint of the encoder, the state layout, its
item ids and their title / text / image uri (not the image bytes), so a rerun over the same catalog and encoder (another cascade seed, a retry after a crash) reuses
every shard it finds instead of running the backbones again. The manifest is written last, by one worker, from the
shards' small records; it is the only whole-catalog object (one entry per shard).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import apache_beam as beam
import numpy as np

from pipelines.beam.common import counter, count, reject, stage_timer

log = logging.getLogger(__name__)
DEAD = "dead_letter"
KINDS = ("aligned", "unaligned", "text", "image")
CONTENT_COLUMNS = ("title", "text", "image_uri")  # what the frozen MLLM reads of an item
STAGE_OF = {"aligned": "embed", "unaligned": "embed_unaligned", "text": "embed_text", "image": "embed_image"}


def shard_of(item_id: int, n_shards: int) -> int:
    """Bucket of an item: a hash, not id ranges, so sparse raw ids still fill the buckets evenly."""
    digest = hashlib.blake2b(int(item_id).to_bytes(8, "little", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "little") % max(1, n_shards)


def _key_by_shard(item: dict, n_items: int, shard_size: int):
    n_shards = -(-int(n_items) // shard_size)
    return shard_of(int(item["item_id"]), n_shards), item


class _ExtractShard(beam.DoFn):
    """(bucket, item dicts) -> the shard's manifest record, after writing (or finding) its safetensors file."""

    def __init__(self, encoder: dict, layer_stride: int, image_root: Optional[str], cache_dir: str,
                 batch_size: int, threads: int):
        self.encoder_dict, self.layer_stride, self.image_root = encoder, layer_stride, image_root
        self.cache_dir, self.batch_size, self.threads = cache_dir, batch_size, threads
        self._encoder = None

    def setup(self):
        import torch

        from pipelines.encoder.config import EncoderConfig
        from pipelines.encoder.side import SideConfig
        from pipelines.encoder.side_mllm import build_mllm_side_encoder

        torch.set_num_threads(self.threads)
        self._config = EncoderConfig.from_dict(self.encoder_dict)
        self._encoder = build_mllm_side_encoder(self._config, SideConfig(layer_stride=self.layer_stride)).eval()
        Path(self.cache_dir).mkdir(parents=True, exist_ok=True)

    def process(self, keyed):
        import pandas as pd

        from feature_store.progress import Progress
        from pipelines.encoder.cache import cache_fingerprint, extract_states, shard_header, write_shard
        from pipelines.encoder.items import ItemCatalog

        shard, items = keyed
        frame = pd.DataFrame(list(items))
        where = {int(r["item_id"]): (r.get("_raw_item_id", r["item_id"]), r.get("_row")) for r in
                 frame.to_dict("records")}  # what a dead letter names
        frame = frame.drop(columns=["_row"], errors="ignore").sort_values("item_id").reset_index(drop=True)
        ids = frame["item_id"].to_numpy(np.int64)
        # the encoder, the layout, the ids and what the backbones read of each item: edited text is a new shard
        content = [frame[c].astype(str).tolist() if c in frame.columns else [] for c in CONTENT_COLUMNS]
        fingerprint = hashlib.sha256(json.dumps([cache_fingerprint(self._encoder, ids), content]).encode()
                                     ).hexdigest()[:20]
        name = f"shard-{fingerprint}.safetensors"
        path = Path(self.cache_dir) / name
        found = shard_header(path) if path.is_file() else None
        if found is not None and np.array_equal(found[0], ids):
            counter("side_cache", "reused").inc(len(ids))
            _, keys, meta = found
            yield {"file": name, "n": int(len(ids)), "bytes": int(meta.get("bytes", 0)), "keys": keys,
                   **{k: meta[k] for k in ("stats", "layout", "encoder")}}
            return
        with stage_timer("side_cache"):
            catalog = ItemCatalog(frame, Path(self.image_root) if self.image_root else None, self._config.image_size,
                                  self._config.image_mean, self._config.image_std,
                                  load_images=self._config.has_vision, cache_images=False)
            # this worker's shard: a line at least every 30 s (the backbones take minutes per shard on a CPU)
            with Progress(f"side cache shard {shard}", len(ids), bar=False, logger=log) as bar:
                states, stats = extract_states(self._encoder, catalog, ids, self.batch_size, on_batch=bar.update)
            # items whose image failed to load here (validation passed it): encoded text-only, reported by
            # CacheImageRejects from the shard header, so a reused shard reports them again
            failures = [[int(i), _plain(where[i][0]), _plain(where[i][1]), reason, detail]
                        for i, (reason, detail) in sorted(catalog.image_failures.items())]
            meta = {"stats": stats.to_dict(), "layout": self._encoder.extractor.layout(),
                    "encoder": self._config.to_dict(), "image_failures": failures}
            record = write_shard(Path(self.cache_dir), name, ids, states, metadata=meta)
            meta["bytes"] = record["bytes"]
        counter("side_cache", "out").inc(len(ids))
        yield {**record, **meta}


def _plain(value):
    """A JSON-able id / row (numpy scalars and NaN out)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


def _image_rejects(cache_dir: str):
    """Dead letters of the items whose image failed while the cache was built (one per item, kept text-only)."""
    from pipelines.encoder.cache import shard_header

    for shard in _shard_records(cache_dir):
        found = shard_header(Path(cache_dir) / shard["file"])
        for item_id, raw, row, reason, detail in (found[2].get("image_failures", []) if found else []):
            yield reject("side_cache", "items", reason, row=row, item_id=raw, item_dense_id=item_id,
                         detail=f"{detail}; validation passed it, the encoder could not load it: encoded text-only",
                         action="kept_text_only")


class CacheImageRejects(beam.PTransform):
    """The cache folder (BuildSideCache's output) -> dead letters of items that lost their image in the backbone
    pass (the image changed or broke after validation), so every item encoded without its image is counted."""

    def __init__(self, cache_dir: str):
        super().__init__()
        self.cache_dir = cache_dir

    def expand(self, cache_done):
        return cache_done | "ReadImageFailures" >> beam.FlatMap(lambda _, d=self.cache_dir: _image_rejects(d))


def _write_manifest(shards: list, cache_dir: str) -> str:
    """All shard records -> manifest.json (kept as it is when it already lists exactly these shards)."""
    from pipelines.encoder.cache import write_manifest
    from pipelines.encoder.items import ModalityStats

    shards = sorted(shards, key=lambda s: s["file"])
    fingerprint = hashlib.sha256(",".join(s["file"] for s in shards).encode()).hexdigest()[:20]
    manifest_path = Path(cache_dir) / "manifest.json"
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
                return cache_dir
        except json.JSONDecodeError:
            pass
    total = ModalityStats()
    for s in shards:
        total.merge(ModalityStats.from_dict(s["stats"]))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    write_manifest(Path(cache_dir), shards, fingerprint, shards[0]["layout"] if shards else {},
                   shards[0]["encoder"] if shards else {}, total.to_dict())
    return cache_dir


class BuildSideCache(beam.PTransform):
    """Validated item dicts -> a one-element PCollection: the cache folder, once every shard and the manifest are
    written (a side input for the Align step and EmbedFromCache).

    Args:
        encoder: the EncoderConfig dict of the frozen MLLM.
        layer_stride: kept backbone layers (SideConfig.layer_stride).
        image_root: the items' image folder.
        cache_dir: a folder every worker can write (the work dir's ``side_cache`` or ``--side-cache-dir``).
        shard_size: items per shard: one worker's unit of work and the memory bound of a shard.
    """

    def __init__(self, encoder: dict, layer_stride: int, image_root: Optional[str], cache_dir: str,
                 shard_size: int = 4096, batch_size: int = 64, threads: int = 1):
        super().__init__()
        if shard_size < 1:
            raise ValueError(f"BuildSideCache: shard_size must be >= 1, got {shard_size}")
        self.encoder, self.layer_stride, self.image_root = encoder, layer_stride, image_root
        self.cache_dir, self.shard_size, self.batch_size, self.threads = cache_dir, shard_size, batch_size, threads

    def expand(self, items):
        n_items = items | "CountItems" >> beam.combiners.Count.Globally()
        shards = (items | "KeyByShard" >> beam.Map(_key_by_shard, beam.pvalue.AsSingleton(n_items), self.shard_size)
                  | "GroupShards" >> beam.GroupByKey()
                  | "ExtractShards" >> beam.ParDo(_ExtractShard(self.encoder, self.layer_stride, self.image_root,
                                                                self.cache_dir, self.batch_size, self.threads)))
        return (shards | "ListShards" >> beam.combiners.ToList()
                | "WriteManifest" >> beam.Map(_write_manifest, self.cache_dir))


class _EmbedShard(beam.DoFn):
    """A manifest shard record -> (item_id, emb) per kind (tagged outputs), non-finite aligned / unaligned rows
    to the dead letter. The trained side head is loaded once per worker and checkpoint."""

    def __init__(self, cache_dir: str, unaligned_seed: int, kinds: tuple, threads: int):
        self.cache_dir, self.unaligned_seed, self.kinds, self.threads = cache_dir, unaligned_seed, kinds, threads
        self._loaded = None

    def _heads(self, checkpoint: Optional[str], base_map: Optional[str]):
        import torch

        from pipelines.encoder.alignment import load_side_head
        from pipelines.encoder.base_map import load_base_map
        from pipelines.encoder.cache import load_cache
        from pipelines.encoder.checkpoint import resolve_checkpoint
        from pipelines.encoder.config import EncoderConfig
        from pipelines.encoder.onepass import cache_heads

        if self._loaded is None or self._loaded[0] != (checkpoint, base_map):
            torch.set_num_threads(self.threads)
            cache = load_cache(Path(self.cache_dir))
            head = load_side_head(cache, resolve_checkpoint(Path(checkpoint)))[1] if checkpoint else None
            base = load_base_map(Path(base_map))[0] if base_map else None
            heads = cache_heads(head, cache.layout, EncoderConfig.from_dict(cache.encoder_config),
                                self.unaligned_seed, base)
            self._loaded = ((checkpoint, base_map), {k: v for k, v in heads.items() if k in self.kinds})
        return self._loaded[1]

    def process(self, shard: dict, checkpoint: Optional[str] = None, base_map: Optional[str] = None):
        from pipelines.encoder.cache import read_shard
        from pipelines.encoder.onepass import embed_states

        heads = self._heads(checkpoint, base_map)
        with stage_timer("embed"):
            ids, states = read_shard(Path(self.cache_dir), shard)
            out = embed_states(heads, states)
        if "aligned" in out:  # once per job (the aligned pass): items the encoder reads nothing of
            yield from _no_content_rejects(ids, states)
        for kind, emb in out.items():
            ok = np.isfinite(emb).all(axis=1)
            for item_id, vec, good in zip(ids.tolist(), emb, ok.tolist()):
                if good:
                    yield beam.pvalue.TaggedOutput(kind, (int(item_id), vec))
                elif kind in ("aligned", "unaligned"):
                    yield beam.pvalue.TaggedOutput(DEAD, reject(
                        STAGE_OF[kind], "items", "nan_embedding", item_id=item_id, item_dense_id=item_id,
                        detail=f"non-finite {kind} embedding"))
                else:
                    counter(STAGE_OF[kind], "nonfinite").inc(1)


def _no_content_rejects(ids: np.ndarray, states: dict):
    """Items with neither text nor an image the encoder reads (no title and no text, and no image or a text-only
    encoder: an image-only item under ``--encoder minilm``) embed to one and the same vector, so they all share
    one code. They stay in the version; each is recorded (reason ``no_readable_content``) so the count shows."""
    seen = states["text_present"] > 0
    if "vision_present" in states:
        seen = seen | (states["vision_present"] > 0)
    blind = np.flatnonzero(~seen.cpu().numpy())
    if len(blind):
        counter("embed", "no_readable_content").inc(len(blind))
    for i in blind.tolist():
        yield beam.pvalue.TaggedOutput(DEAD, reject(
            "embed", "items", "no_readable_content", item_id=int(ids[i]), item_dense_id=int(ids[i]),
            detail="neither text nor an image this encoder reads: every such item gets the same embedding and code",
            action="kept_shared_embedding"))


def _shard_records(cache_dir: str):
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    yield from manifest["shards"]


class EmbedFromCache(beam.PTransform):
    """The cache folder (BuildSideCache's output) -> {kind: (item_id, (D,) float32) rows, "dead_letter": rejects}.

    Each shard is embedded by one worker after Align finished (the checkpoint path is a side input); no worker
    holds more than one shard of states.

    Args:
        checkpoint: the Align step's output (a one-element PCollection: the aligned checkpoint folder), or None
            for the frozen MLLM's behaviour-free kinds only (unaligned / text / image: available before pair mining,
            so the unaligned vectors can be the trigger fallback).
        kinds: which embeddings (aligned needs ``checkpoint``; image only with a vision tower).
        unaligned_seed: seed of the fixed maps of the text / image embeddings (and of the unaligned one's when
            neither ``base_map`` nor a checkpoint gives its base map).
        base_map: a one-element PCollection: the base map file of the unaligned embedding (``FitBaseMap``).
    """

    def __init__(self, cache_dir: str, checkpoint, kinds: tuple = KINDS, unaligned_seed: int = 0, threads: int = 1,
                 base_map=None):
        super().__init__()
        if "aligned" in kinds and checkpoint is None:
            raise ValueError("EmbedFromCache: the aligned embedding needs the Align step's checkpoint")
        self.cache_dir, self.checkpoint, self.kinds = cache_dir, checkpoint, tuple(kinds)
        self.unaligned_seed, self.threads, self.base_map = unaligned_seed, threads, base_map

    def expand(self, cache_done):
        shards = (cache_done | "ListShards" >> beam.FlatMap(_shard_records)
                  | "SpreadShards" >> beam.Reshuffle())
        fn = _EmbedShard(self.cache_dir, self.unaligned_seed, self.kinds, self.threads)
        side = {name: beam.pvalue.AsSingleton(pcoll) for name, pcoll in (("checkpoint", self.checkpoint),
                                                                         ("base_map", self.base_map))
                if pcoll is not None}
        embed = beam.ParDo(fn, **side)
        rows = shards | "EmbedShards" >> embed.with_outputs(*self.kinds, DEAD)
        out = {kind: rows[kind] | f"Count{kind.title()}" >> count(STAGE_OF[kind], "out") for kind in self.kinds}
        out[DEAD] = rows[DEAD]
        return out


class _ShardGram(beam.DoFn):
    """A manifest shard record -> the GramStats of the pooled top-layer states of its sampled items (or nothing)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir

    def process(self, shard: dict, sample: list):
        from pipelines.encoder.base_map import GramStats, pooled_top
        from pipelines.encoder.cache import read_shard

        ids, states = read_shard(Path(self.cache_dir), shard)
        keep = np.isin(ids, np.asarray(sample, dtype=np.int64))
        if keep.any():
            yield GramStats.of(pooled_top(states)[np.flatnonzero(keep)])


def _merge_grams(parts) -> Optional[object]:
    from functools import reduce

    parts = [p for p in parts if p is not None]
    return reduce(lambda a, b: a.merge(b), parts) if parts else None


def _write_base_map(stats, path: str, kind: str, seed: int, embed_dim: int, cache_dir: str,
                    checkpoint: Optional[str], sampled: int) -> str:
    from pipelines.encoder.base_map import base_map_from_checkpoint, fit_base_map, save_base_map
    from pipelines.encoder.cache import load_cache

    if checkpoint:  # a warm start / reused encoder: its residual was learned over its own base map
        base = base_map_from_checkpoint(Path(checkpoint))
        info = {"kind": "checkpoint", "checkpoint": str(checkpoint)}
    else:
        width = int(load_cache(Path(cache_dir)).layout["lm_width"])
        base = fit_base_map(kind, width, embed_dim, seed, stats)
        info = {"kind": kind, **({"seed": int(seed)} if kind == "gaussian" else
                                 {"fitted_on": "train-portion items", "items": int(stats.n) if stats else 0,
                                  "items_sampled_of": int(sampled)})}
    save_base_map(Path(path), base, info)
    return path


class FitBaseMap(beam.PTransform):
    """The unaligned embedding's base map, written to ``path`` (a one-element PCollection of the path).

    ``pca``: each worker accumulates the Gram statistics of its shard's sampled train-portion items
    (``train_items``: item ids, sampled deterministically to at most ``sample`` by a hash), merged once and solved
    once (an H x H eigenproblem); ``gaussian``: the seeded draw; with ``checkpoint`` (a warm start or a reused
    encoder) the checkpoint's own base map, so the residual it learned keeps its meaning.

    Args:
        cache_dir: the side cache (BuildSideCache's output is the ``cache_done`` input).
        path: where the map goes (the staging version's ``base_map.safetensors``).
        kind: pca | gaussian; seed: the Gaussian map's seed; embed_dim: D.
        train_items: PCollection of the protocol's train-portion item ids (duplicates allowed).
    """

    def __init__(self, cache_dir: str, path: str, kind: str, seed: int, embed_dim: int, train_items,
                 checkpoint: Optional[str] = None, sample: int = 100_000):
        super().__init__()
        self.cache_dir, self.path, self.kind, self.seed, self.embed_dim = cache_dir, path, kind, seed, embed_dim
        self.train_items, self.checkpoint, self.sample = train_items, checkpoint, int(sample)

    def expand(self, cache_done):
        fit = self.kind == "pca" and not self.checkpoint
        if fit:
            distinct = self.train_items | "DistinctTrainItems" >> beam.Distinct()
            n_items = distinct | "CountTrainItems" >> beam.combiners.Count.Globally()
            sample = (distinct | "SampleTrainItems" >> beam.combiners.Top.Of(
                self.sample, key=lambda i: -shard_of(i, 1 << 62)))
            stats = (cache_done | "ListShards" >> beam.FlatMap(_shard_records)
                     | "SpreadShards" >> beam.Reshuffle()
                     | "ShardGram" >> beam.ParDo(_ShardGram(self.cache_dir), beam.pvalue.AsSingleton(sample))
                     | "MergeGram" >> beam.CombineGlobally(_merge_grams))
            sampled = beam.pvalue.AsSingleton(n_items)
        else:
            stats = cache_done | "NoStats" >> beam.Map(lambda _: None)
            sampled = 0
        return stats | "WriteBaseMap" >> beam.Map(_write_base_map, self.path, self.kind, self.seed, self.embed_dim,
                                                  self.cache_dir, self.checkpoint, sampled)
