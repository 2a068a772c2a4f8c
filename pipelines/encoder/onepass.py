"""One backbone pass per job: the API the Beam job calls for ``side`` mode.

    cache = build_mllm_cache(enc_cfg, catalog, side_cfg, cache_dir)            # the only MLLM pass
    result = train_side(cache, train_pairs, valid_pairs, align_cfg, out_dir)    # side network, no backbone
    out = embed_from_cache(result.encoder, cache)                               # no backbone either
    out["aligned"], out["unaligned"], out["text"], out["image"]                 # each (item_ids (N,), emb (N, D))
    write_embedding_tables(out, folder)                                         # item_embeddings*.parquet

Memory: the build streams shards (one shard of ``shard_size`` items in memory); ``train_side`` holds the cache
(``cache.bytes_per_item()`` x items: 19.5 KB/item pooled for minilm-effnet, 80 MB for 4,116 items);
``embed_from_cache`` holds one shard plus the (N, D) float32 outputs (4 x 256 bytes per item at D = 64).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from feature_store.progress import Progress
from pipelines.encoder.alignment import AlignResult, train_side  # noqa: F401  (re-exported: part of this API)
from pipelines.encoder.base_map import BaseMap
from pipelines.encoder.cache import StateCache, build_cache
from pipelines.encoder.config import EncoderConfig
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.side import SideConfig, SideEncoder
from pipelines.encoder.side_mllm import MLLMStateExtractor, ModalityHead, UnalignedHead, build_mllm_side_encoder

log = logging.getLogger(__name__)

KINDS = ("aligned", "unaligned", "text", "image")
TABLE_NAMES = {"aligned": "item_embeddings.parquet", "unaligned": "item_embeddings_unaligned.parquet",
               "text": "item_embeddings_text.parquet", "image": "item_embeddings_image.parquet"}


def build_mllm_cache(encoder: Union[EncoderConfig, SideEncoder], catalog: ItemCatalog,
                     side: Optional[SideConfig] = None, cache_dir: Optional[Path] = None,
                     item_ids: Optional[np.ndarray] = None, batch_size: int = 64, shard_size: int = 4096,
                     progress: bool = True) -> StateCache:
    """Run the frozen MLLM once over the catalog into a sharded hidden-state cache.

    Args:
        encoder: an EncoderConfig (the MLLM is built from it, pretrained weights loaded) or a ``side``
            SideEncoder (``build_for_mode("side", ...)``).
        catalog: the items (pipelines.encoder.items.ItemCatalog; images decoded on the fly).
        side: layer stride and token_states (ignored when ``encoder`` is a SideEncoder).
        cache_dir: where shards + manifest go (reused when the fingerprint matches); None keeps it in memory.
        item_ids: a subset of the catalog (default: every item).
        shard_size: items per shard: the build's memory bound.
    Returns:
        StateCache (``.layout``, ``.encoder_config``, ``.stats`` with modality counts and build ``seconds``).
    """
    if isinstance(encoder, EncoderConfig):
        encoder = build_mllm_side_encoder(encoder, side or SideConfig())
    if not (isinstance(encoder, SideEncoder) and isinstance(encoder.extractor, MLLMStateExtractor)):
        raise ValueError(f"build_mllm_cache: expected an EncoderConfig or a side-mode SideEncoder, got "
                         f"{type(encoder).__name__}")
    ids = catalog.item_ids if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    return build_cache(encoder, catalog, ids, Path(cache_dir) if cache_dir is not None else None,
                       batch_size=batch_size, shard_size=shard_size, progress=progress)


@torch.no_grad()
def embed_from_cache(side_model, cache: StateCache, unaligned_seed: int = 0, batch_size: int = 4096,
                     progress: bool = True, base: Optional[BaseMap] = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every embedding the job needs, from the cache alone (no backbone pass).

    Args:
        side_model: the trained side network (``AlignResult.encoder``: SideEncoder or SideHeadOnly), or None to
            skip the aligned embedding.
        cache: an ``mllm`` StateCache (``build_mllm_cache``).
        unaligned_seed: seed of the fixed maps of the text / image embeddings, and of the unaligned one's
            Gaussian base map when neither ``side_model`` nor ``base`` gives the base map.
        base: the unaligned embedding's base map (default: ``side_model``'s own, the one its residual starts
            from; else the Gaussian of ``unaligned_seed``, which equals ``build_for_mode("unaligned", enc_cfg,
            unaligned_seed=...)`` run on the items).
    Returns:
        {"aligned": (ids, emb), "unaligned": ..., "text": ..., "image": ...}: ids (N,) int64 in cache order,
        emb (N, D) float32. aligned / unaligned are unit-norm; text / image are unit-norm, or all-zero rows for
        items without that modality. "image" is absent for text-only encoders, "aligned" without a side_model.
    """
    layout = cache.layout
    if layout.get("kind") != "mllm":
        raise ValueError(f"embed_from_cache: needs a side (mllm) cache, got layout kind {layout.get('kind')!r}")
    config = EncoderConfig.from_dict(cache.encoder_config)
    heads = cache_heads(side_model, layout, config, unaligned_seed, base)
    device = next(side_model.parameters()).device if side_model is not None else torch.device("cpu")
    ids_parts, out = [], {k: [] for k in heads}
    with Progress("embed from cache", len(cache), bar=None if progress else False, logger=log) as st:
        for ids, states in cache.iter_shards():
            for name, emb in embed_states(heads, states, batch_size, device).items():
                out[name].append(emb)
            st.update(len(ids))
            ids_parts.append(ids)
        st.extra = {"embeddings": ",".join(heads)}
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    return {name: (ids, np.concatenate(parts) if parts else np.zeros((0, config.embed_dim), np.float32))
            for name, parts in out.items()}


def cache_heads(side_model, layout: dict, config: EncoderConfig, unaligned_seed: int = 0,
                base: Optional[BaseMap] = None) -> dict:
    """kind -> module mapping cached states to that embedding (see ``embed_from_cache``)."""
    from pipelines.encoder.model_io import base_map_of

    heads: dict[str, torch.nn.Module] = {}
    if side_model is not None:
        side_model.eval()
        heads["aligned"] = side_model.forward_states
        base = base if base is not None else copy.deepcopy(base_map_of(side_model))
    base = base if base is not None else BaseMap.gaussian(layout["lm_width"], config.embed_dim, unaligned_seed)
    heads["unaligned"] = UnalignedHead(base)
    heads["text"] = ModalityHead("text", layout, config.embed_dim, unaligned_seed)
    if layout["vision_widths"]:
        heads["image"] = ModalityHead("image", layout, config.embed_dim, unaligned_seed)
    device = next(side_model.parameters()).device if side_model is not None else torch.device("cpu")
    for head in heads.values():
        if isinstance(head, torch.nn.Module):
            head.to(device)
    return heads


@torch.no_grad()
def embed_states(heads: dict, states: dict, batch_size: int = 4096, device="cpu") -> dict[str, np.ndarray]:
    """One shard's states (key -> (n, ...)) -> kind -> (n, D) float32 embeddings (heads from ``cache_heads``, on
    ``device``)."""
    n = len(next(iter(states.values()))) if states else 0
    out = {k: [] for k in heads}
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size].to(device) for k, v in states.items()}
        for name, head in heads.items():
            out[name].append(head(part).float().cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros((0, 0), np.float32) for k, v in out.items()}


def write_embedding_tables(embeddings: dict, folder: Path) -> dict[str, Path]:
    """Write each embedding as a feature_store table (atomic). Returns {kind: path} (see TABLE_NAMES)."""
    from feature_store.tables import write_embeddings

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, (ids, emb) in embeddings.items():
        paths[kind] = folder / TABLE_NAMES[kind]
        write_embeddings(paths[kind], ids, emb)
    return paths
