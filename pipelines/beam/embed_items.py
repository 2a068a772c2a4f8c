"""Embedding the catalog in the job: items -> encoder inputs -> RunInference (the encoder's PyTorch ModelHandler,
model loaded once per worker) -> finite-checked embeddings; a non-finite embedding is a dead letter.

The model path arrives as a side input (`model_metadata_pcoll`), because the aligned checkpoint is produced by the
job's own align stage: RunInference then loads the model at run time, after that stage has finished.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelMetadata, RunInference

from pipelines.beam.model_handler import ItemEncoderModelHandler
from pipelines.beam.common import counter, count, reject, stage_timer, worker_progress

log = logging.getLogger(__name__)
DEAD = "dead_letter"


class _ToItemInput(beam.DoFn):
    """Item dict -> ItemInput with the image decoded and preprocessed for the encoder."""

    def __init__(self, stage: str, image_root: Optional[str], image_size: int, mean: tuple, std: tuple,
                 load_images: bool):
        self.stage, self.image_root = stage, image_root
        self.image_size, self.mean, self.std, self.load_images = image_size, mean, std, load_images

    def process(self, item):
        with stage_timer(self.stage, "decode"):  # collect first: a yield runs the fused downstream steps
            out = list(self._convert(item))
        yield from out

    def _convert(self, item):
        from pipelines.data.images import ImageError, load_image
        from pipelines.encoder.items import ItemInput, preprocess_image

        def clean(v):
            return None if v is None or (isinstance(v, float) and np.isnan(v)) or not str(v).strip() else str(v)

        image, uri = None, clean(item.get("image_uri"))
        if uri is not None and self.load_images:
            try:
                img = load_image(uri, Path(self.image_root) if self.image_root else None)
                image = preprocess_image(img, self.image_size, self.mean, self.std)
            except (ImageError, OSError) as exc:
                # validation saw a readable file; it changed or decodes badly: embed text-only, record it
                yield beam.pvalue.TaggedOutput(DEAD, reject(
                    self.stage, "items", getattr(exc, "reason", "corrupt_image"), row=item.get("_row"),
                    item_id=item.get("_raw_item_id", item["item_id"]), item_dense_id=item["item_id"], detail=str(exc),
                    action="kept_text_only"))
        yield ItemInput(item_id=int(item["item_id"]), title=clean(item.get("title")) or "",
                        text=clean(item.get("text")), image=image)


class _CheckFinite(beam.DoFn):
    def __init__(self, stage: str):
        self.stage = stage

    def setup(self):
        self._rejected = counter(self.stage, "rejected")

    def process(self, keyed):
        item_id, result = keyed
        inference = getattr(result, "inference", result)
        vec = np.asarray(inference.detach().cpu().numpy() if hasattr(inference, "detach") else inference,
                         dtype=np.float32).reshape(-1)
        if not np.isfinite(vec).all():
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD, reject(
                self.stage, "items", "nan_embedding", item_id=item_id, item_dense_id=item_id,
                detail=f"{int((~np.isfinite(vec)).sum())} of {vec.size} values are NaN/inf"))
            return
        yield int(item_id), vec


class PathUpdatingHandler(ItemEncoderModelHandler):
    """`pipelines.beam.model_handler.ItemEncoderModelHandler` that takes its checkpoint path from the
    `model_metadata_pcoll` side input (RunInference calls `update_model_path` before loading the model)."""

    stage = "embed"

    def update_model_path(self, model_path: Optional[str] = None):
        if model_path:
            self._checkpoint, self._factory = str(model_path), None

    def load_model(self):
        with stage_timer(self.stage, "load_model"):
            return super().load_model()

    def run_inference(self, batch, model, inference_args=None):
        if getattr(self, "_progress", None) is None:
            self._progress = worker_progress(self.stage)
        with stage_timer(self.stage, "model"):
            out = list(super().run_inference(batch, model, inference_args))
        self._progress.update(len(out))
        return out


def encoder_handler(checkpoint: Optional[str] = None, encoder_factory: Optional[Callable] = None,
                    batch_size: int = 64, num_threads: Optional[int] = None, stage: str = "embed"):
    """The encoder's RunInference handler, able to take its checkpoint path from a side input.

    Args:
        checkpoint / encoder_factory: where the model comes from (see ItemEncoderModelHandler).
        batch_size: most items per forward pass.
        num_threads: torch threads per worker.
        stage: counter prefix its load / inference time is added to.
    """
    handler = PathUpdatingHandler(checkpoint=checkpoint, encoder_factory=encoder_factory,
                                  min_batch_size=min(8, batch_size), max_batch_size=batch_size,
                                  num_threads=num_threads)
    handler.stage = stage
    return handler


def model_metadata(path_pcoll, name: str):
    """A PCollection of one checkpoint path -> the ModelMetadata side input RunInference reloads from."""
    return path_pcoll | f"{name}Metadata" >> beam.Map(lambda p: ModelMetadata(model_id=str(p), model_name=name))


class EmbedItems(beam.PTransform):
    """items (dicts) -> {"embeddings": (item_id, float32 (d,)), "dead_letter": rejects}.

    Args:
        handler: a Beam ModelHandler whose examples are `pipelines.encoder.items.ItemInput` and whose results are
            (item_id, (d,) embedding) (see `encoder_handler`).
        encoder_config: the EncoderConfig (image preprocessing: size, mean, std; whether it has vision).
        image_root: folder relative image uris resolve against.
        stage: counter prefix ("embed" / "embed_unaligned").
        model_path: optional PCollection of one checkpoint path; RunInference loads it at run time.
    """

    def __init__(self, handler, encoder_config, image_root: Optional[str], stage: str = "embed",
                 model_path=None, label: str | None = None):
        super().__init__(label)
        self.handler, self.cfg, self.image_root = handler, encoder_config, image_root
        self.stage, self.model_path = stage, model_path

    def expand(self, items):
        cfg, stage = self.cfg, self.stage
        items = items | "CountIn" >> count(stage, "in")
        inputs = items | "ToItemInput" >> beam.ParDo(_ToItemInput(
            stage, self.image_root, cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std),
            bool(getattr(cfg, "has_vision", True)))).with_outputs(DEAD, main="ok")
        metadata = model_metadata(self.model_path, stage.title().replace("_", "")) if self.model_path else None
        results = inputs.ok | "RunInference" >> RunInference(self.handler, model_metadata_pcoll=metadata)
        checked = results | "CheckFinite" >> beam.ParDo(_CheckFinite(stage)).with_outputs(DEAD, main="ok")
        dead = (inputs[DEAD], checked[DEAD]) | "FlattenRejects" >> beam.Flatten()
        emb = checked.ok | "CountOut" >> count(stage, "out")
        return {"embeddings": emb, DEAD: dead}
