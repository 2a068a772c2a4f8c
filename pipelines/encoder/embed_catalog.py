"""Embed a whole item catalog with a plain batched torch loop (the Beam job uses handler.py instead)."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from feature_store.progress import Progress
from pipelines.encoder.encoder import EncoderBase
from pipelines.encoder.items import ItemCatalog, ModalityStats

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_items(encoder: EncoderBase, catalog: ItemCatalog, item_ids: Optional[np.ndarray] = None,
                batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray, ModalityStats]:
    """Embed ``item_ids`` (default: the whole catalog) in batches.

    Returns:
        item_ids (N,) int64, embeddings (N, D) float32 L2-normalised, ModalityStats.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = catalog.item_ids if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    was_training = encoder.training
    encoder.eval()
    device = encoder.device()
    stats = ModalityStats()
    errors_before = catalog.image_errors.copy()
    out = np.zeros((len(ids), encoder.embed_dim), dtype=np.float32)
    with Progress("embed", len(ids), bar=None if progress else False, logger=log, final_line=progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch = encoder.collate(catalog.inputs(ids[start:start + batch_size]))
            for t, i in zip(batch.has_text.tolist(), batch.has_image.tolist()):
                stats.add(t, i)
            out[start:start + len(batch)] = encoder(batch.to(device)).float().cpu().numpy()
            bar.update(len(batch))
    encoder.train(was_training)
    stats.image_errors = catalog.image_errors - errors_before
    if stats.image_errors:
        log.warning("embedded %d items; unusable images encoded text-only: %s", len(ids), dict(stats.image_errors))
    return ids, out, stats


def embed_catalog(encoder: EncoderBase, dataset, batch_size: int = 64, progress: bool = True,
                  catalog: Optional[ItemCatalog] = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embed every item of ``dataset`` (a pipelines.data Dataset: ``.items``, ``.image_root``).

    Args:
        encoder: any encoder from build_encoder / load_encoder.
        dataset: the items to embed.
        batch_size: items per forward pass.
        catalog: reuse an ItemCatalog (its decoded-image cache) instead of building one from ``dataset``.
    Returns:
        item_ids (N,) int64, embeddings (N, D) float32, stats dict (n_items, both, text_only, image_only,
        neither, image_errors {reason: count}).
    """
    catalog = catalog or ItemCatalog.from_dataset(dataset, encoder.config, cache_images=False)
    ids, emb, stats = embed_items(encoder, catalog, batch_size=batch_size, progress=progress)
    return ids, emb, stats.to_dict()
