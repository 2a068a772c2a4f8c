"""Apache Beam ``ModelHandler`` for ``RunInference``: item rows in, ``(item_id, embedding)`` out.

The model is loaded in ``load_model`` (once per worker process, shared across threads by Beam), never in
``__init__``: the handler itself is pickled to workers and must stay small. Elements are ``ItemInput`` objects or
item-table rows (dicts / Beam Rows / NamedTuples with item_id, title, text, image_uri); images of rows are read
relative to ``image_root``. Unusable images fall back to text-only and are counted in Beam metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from pipelines.encoder.encoder import EncoderBase
from pipelines.encoder.items import ItemCatalog, ItemInput

log = logging.getLogger(__name__)
NAMESPACE = "qarm.mllm"


def _row_dict(element: Any) -> dict:
    if isinstance(element, dict):
        return element
    if hasattr(element, "_asdict"):
        return element._asdict()
    if hasattr(element, "as_dict"):
        return element.as_dict()
    return {k: getattr(element, k) for k in ("item_id", "title", "text", "image_uri") if hasattr(element, k)}


class ItemEncoderModelHandler(ModelHandler[Any, tuple[int, np.ndarray], EncoderBase]):
    """RunInference handler for the item encoder.

    Args:
        checkpoint: encoder checkpoint folder (``load_encoder``) — or None with ``encoder_factory``.
        image_root: folder item image_uris are relative to.
        min_batch_size / max_batch_size: Beam's batching bounds.
        device: "cpu" or "cuda".
        encoder_factory: zero-argument callable returning an encoder (for the unaligned baseline or tests);
            must be picklable (a module-level function or functools.partial).
        num_threads: torch intra-op threads per worker (None leaves torch's default).
    """

    def __init__(self, checkpoint: Optional[str] = None, image_root: Optional[str] = None,
                 min_batch_size: int = 8, max_batch_size: int = 64, device: str = "cpu",
                 encoder_factory=None, num_threads: Optional[int] = None):
        if checkpoint is None and encoder_factory is None:
            raise ValueError("ItemEncoderModelHandler: give a checkpoint or an encoder_factory")
        self._checkpoint = str(checkpoint) if checkpoint is not None else None
        self._image_root = str(image_root) if image_root is not None else None
        self._batching = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}
        self._device = device
        self._factory = encoder_factory
        self._num_threads = num_threads
        self._counters = {}

    def load_model(self) -> EncoderBase:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        if self._factory is not None:
            encoder = self._factory()
        else:
            from pipelines.encoder.checkpoint import load_encoder
            encoder = load_encoder(Path(self._checkpoint))
        return encoder.to(self._device).eval()

    def batch_elements_kwargs(self):
        return dict(self._batching)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def _count(self, name: str, n: int) -> None:
        if n:
            Metrics.counter(NAMESPACE, name).inc(n)

    def _inputs(self, batch: Sequence[Any], encoder: EncoderBase) -> tuple[list[ItemInput], ItemCatalog | None]:
        if all(isinstance(e, ItemInput) for e in batch):
            return list(batch), None
        rows = pd.DataFrame([_row_dict(e) for e in batch])
        for column in ("text", "image_uri"):
            if column not in rows.columns:
                rows[column] = None
        rows["item_id"] = rows["item_id"].astype(np.int64)
        catalog = ItemCatalog(rows, Path(self._image_root) if self._image_root else None,
                              encoder.config.image_size, encoder.config.image_mean, encoder.config.image_std,
                              load_images=encoder.config.has_vision, cache_images=False)
        return catalog.inputs(rows["item_id"].tolist()), catalog

    def run_inference(self, batch: Sequence[Any], model: EncoderBase,
                      inference_args: Optional[dict] = None) -> Iterable[tuple[int, np.ndarray]]:
        """Embed one batch. Returns ``[(item_id, (D,) float32), ...]`` in input order."""
        inputs, catalog = self._inputs(batch, model)
        collated = model.collate(inputs)
        with torch.no_grad():
            emb = model(collated.to(self._device)).float().cpu().numpy()
        has_text, has_image = collated.has_text.numpy(), collated.has_image.numpy()
        self._count("items", len(inputs))
        self._count("text_only", int((has_text & ~has_image).sum()))
        self._count("image_only", int((~has_text & has_image).sum()))
        self._count("neither", int((~has_text & ~has_image).sum()))
        if catalog is not None:
            for reason, n in catalog.image_errors.items():
                self._count(f"image_error_{reason}", n)
        return [(int(i), emb[k]) for k, i in enumerate(collated.item_ids.tolist())]

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return len(batch) * 1024  # rough: a row of text plus an image path
