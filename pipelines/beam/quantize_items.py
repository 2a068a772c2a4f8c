"""Quantization in the job: fit RQ codebooks on a deterministic sample (one worker), encode every item in parallel
with the codebooks as a side input, and VQ codes (ids of the K nearest items) by faiss k-NN in parallel batches.

Elements are ``(item_id, embedding float32 (d,))``. Outputs ``(item_id, rq int32 (L,))`` and
``(item_id, vq int64 (K,))``. The same inputs and seed give the same codes on any runner: the fit sample is
chosen by a seeded hash of the item id (not by arrival order) and sorted by id before k-means.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from pipelines.beam.common import count, stage_timer, worker_progress
from pipelines.config.cascade import QuantSection as _Q

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    """Codes the job computes.

    The job's knobs default to the config tree's (`pipelines.config.cascade.QuantSection`, their one home).

    Args:
        rq_levels: residual levels L.
        rq_codebook_size: centroids per level; 0 = auto (a power of two near sqrt(sample), 8..4096).
        fit_sample: items the codebooks are fitted on (the rest are only encoded); 0 = all.
        rq_niter: faiss k-means iterations per level.
        vq_k: neighbours in the VQ code (QARM: 25).
        vq_index: "flat" (exact) or "ivf": the faiss index every worker builds over the gathered base.
        vq_gather_max: largest catalog whose base is gathered into each worker (N x d float32: 200k x 64 is
            51 MB); larger catalogs use the distributed IVF search (`pipelines.beam.vq_search.DistributedKNN`).
        vq_nlist, vq_nprobe: cells (0: about 4 sqrt(N)) and cells probed per query of the distributed search.
        seed: k-means and sample seed.
        batch_size: items per encode / search batch.
    """

    rq_levels: int = _Q.rq_levels
    rq_codebook_size: int = _Q.rq_codebook_size
    fit_sample: int = _Q.fit_sample
    rq_niter: int = 20
    vq_k: int = _Q.vq_k
    vq_index: str = _Q.vq_index
    vq_gather_max: int = _Q.vq_gather_max
    vq_nlist: int = _Q.vq_nlist
    vq_nprobe: int = _Q.vq_nprobe
    seed: int = 0
    batch_size: int = 1024

    def __post_init__(self):
        for name in ("rq_levels", "vq_k", "rq_niter", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QuantConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.vq_gather_max < 0 or self.vq_nlist < 0 or self.vq_nprobe < 1:
            raise ValueError("QuantConfig.vq_gather_max and vq_nlist must be >= 0, vq_nprobe >= 1")
        if self.rq_codebook_size < 0 or self.fit_sample < 0:
            raise ValueError("QuantConfig.rq_codebook_size and fit_sample must be >= 0")
        if self.vq_index not in ("flat", "ivf"):
            raise ValueError(f"QuantConfig.vq_index must be flat|ivf, got {self.vq_index!r}")

    def codebook_size_for(self, n_fit: int) -> int:
        if self.rq_codebook_size:
            return self.rq_codebook_size
        k = 2 ** int(round(np.log2(max(np.sqrt(max(n_fit, 1)), 1.0))))
        return int(min(4096, max(8, k)))

    def to_dict(self) -> dict:
        return asdict(self)


def sample_key(item_id: int, seed: int) -> int:
    """A seeded, runner-independent hash of an item id (the fit sample keeps the smallest keys)."""
    digest = hashlib.blake2b(f"{seed}:{int(item_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _stack(pairs):
    pairs = sorted(pairs, key=lambda kv: kv[0])
    ids = np.asarray([k for k, _ in pairs], dtype=np.int64)
    x = np.stack([np.asarray(v, dtype=np.float32) for _, v in pairs]) if pairs else np.zeros((0, 0), np.float32)
    return ids, x


def fit_rq(sample, cfg: QuantConfig, stage: str, save_dir: Optional[str] = None, codebooks_file: Optional[str] = None,
           init_dir: Optional[str] = None):
    """Fit RQ-KMeans on the sample (a list of (item_id, emb)); single worker. Returns the codebooks (list of arrays).

    Args:
        sample: the fit sample.
        cfg: quantization config.
        stage: counter prefix.
        save_dir: where to save the fitted quantizer (`quant` artifact folder), e.g. ``<version>/quantizer``.
        codebooks_file: where to write ``codebooks*.safetensors`` (tensors ``rq.level<l>``).
        init_dir: a saved quantizer to warm-start from (the retraining job keeps codes stable this way).
    """
    from feature_store.progress import Progress
    from feature_store.tables import write_codebooks
    from quant import RQKMeans, load_quantizer

    with stage_timer(stage, "fit"):
        ids, x = _stack(sample)
        if init_dir:
            q = load_quantizer(init_dir).warm_start(niter=cfg.rq_niter)
        else:
            q = RQKMeans(levels=cfg.rq_levels, codebook_size=cfg.codebook_size_for(len(ids)), seed=cfg.seed,
                         niter=cfg.rq_niter)
        with Progress(f"{stage}: rq-kmeans levels", cfg.rq_levels, unit="level", bar=False, logger=log,
                      final_line=False) as bar:
            q.fit(x, progress=bar.callback())
        if save_dir:
            q.save(save_dir)
        if codebooks_file:
            write_codebooks(codebooks_file, {f"rq.level{lvl}": c for lvl, c in enumerate(q.codebooks)})
        log.info("%s: fitted RQ %s on %d items", stage, [c.shape[0] for c in q.codebooks], len(ids))
        return [np.asarray(c, dtype=np.float32) for c in q.codebooks]


class _EncodeRQ(beam.DoFn):
    def __init__(self, stage: str):
        self.stage = stage
        self._progress = None

    def process(self, batch, codebooks):
        from quant.rq_kmeans import residual_encode

        self._progress = self._progress or worker_progress(f"{self.stage}: rq encode")
        with stage_timer(self.stage, "rq"):
            ids = [k for k, _ in batch]
            x = np.stack([np.asarray(v, dtype=np.float32) for _, v in batch])
            codes = residual_encode(x, codebooks)
        self._progress.update(len(ids))
        for item_id, code in zip(ids, codes):
            yield item_id, np.asarray(code, dtype=np.int32)


class _VQIndex:
    """Holds the base catalog and its faiss index, shared by the DoFn instances of one worker."""

    def __init__(self, ids, x, index: str, k: int, seed: int):
        from quant import VQNeighbors

        self.ids = ids
        self.vq = VQNeighbors(k=k, index=index, seed=seed, faiss_gpu=False).fit(x)


class _EncodeVQ(beam.DoFn):
    def __init__(self, stage: str, cfg: QuantConfig, shared_handle):
        self.stage, self.cfg, self._shared = stage, cfg, shared_handle
        self._progress = None

    def process(self, batch, base):
        ids_base, x_base = base
        self._progress = self._progress or worker_progress(f"{self.stage}: vq search", len(ids_base))
        with stage_timer(self.stage, "vq"):
            index = self._shared.acquire(lambda: _VQIndex(ids_base, x_base, self.cfg.vq_index, self.cfg.vq_k,
                                                          self.cfg.seed))
            ids = np.asarray([k for k, _ in batch], dtype=np.int64)
            x = np.stack([np.asarray(v, dtype=np.float32) for _, v in batch])
            rows = np.searchsorted(index.ids, ids)
            nbr_rows = index.vq.encode(x, exclude_rows=rows)
            nbr_ids = index.ids[nbr_rows]
        self._progress.update(len(ids))
        for item_id, code in zip(ids.tolist(), nbr_ids):
            yield item_id, np.asarray(code, dtype=np.int64)


class QuantizeItems(beam.PTransform):
    """(item_id, emb) -> {"rq": (item_id, rq), "vq": (item_id, vq), "codebooks": singleton list of arrays}.

    Args:
        cfg: QuantConfig.
        stage: name prefix for counters (e.g. "quantize" / "quantize_unaligned").
        save_dir / codebooks_file / init_dir: see `fit_rq`.
    """

    def __init__(self, cfg: QuantConfig, stage: str = "quantize", save_dir: Optional[str] = None,
                 codebooks_file: Optional[str] = None, init_dir: Optional[str] = None,
                 ivf_file: Optional[str] = None, label: str | None = None):
        super().__init__(label)
        self.cfg, self.stage = cfg, stage
        self.save_dir, self.codebooks_file, self.init_dir, self.ivf_file = save_dir, codebooks_file, init_dir, ivf_file

    def expand(self, emb):
        cfg, stage = self.cfg, self.stage
        emb = emb | "CountIn" >> count(stage, "in")
        n_sample = cfg.fit_sample or 2 ** 62
        sample = (emb | "FitSample" >> beam.combiners.Top.Of(n_sample, key=lambda kv: -sample_key(kv[0], cfg.seed)))
        codebooks = (sample | "FitRQ" >> beam.Map(fit_rq, cfg, stage, self.save_dir, self.codebooks_file,
                                                   self.init_dir))
        batches = emb | "Batch" >> beam.BatchElements(min_batch_size=min(64, cfg.batch_size),
                                                      max_batch_size=cfg.batch_size)
        rq = (batches | "EncodeRQ" >> beam.ParDo(_EncodeRQ(stage), beam.pvalue.AsSingleton(codebooks))
              | "CountRQ" >> count(stage, "out"))
        # VQ: gather the base into each worker up to vq_gather_max items (exact faiss search), else the
        # distributed IVF search; decided in the pipeline from the item count, so the driver needs no count
        from pipelines.beam.vq_search import DistributedKNN

        n_items = emb | "CountItems" >> beam.combiners.Count.Globally()
        n_side = beam.pvalue.AsSingleton(n_items)
        small = emb | "IfGathered" >> beam.Filter(lambda _, n, m: n <= m, n_side, cfg.vq_gather_max)
        large = emb | "IfDistributed" >> beam.Filter(lambda _, n, m: n > m, n_side, cfg.vq_gather_max)
        base = small | "CollectBase" >> beam.combiners.ToList() | "StackBase" >> beam.Map(_stack)
        vq_small = (small | "BatchGathered" >> beam.BatchElements(min_batch_size=min(64, cfg.batch_size),
                                                                    max_batch_size=cfg.batch_size)
                    | "EncodeVQ" >> beam.ParDo(_EncodeVQ(stage, cfg, shared.Shared()), beam.pvalue.AsSingleton(base)))
        active = n_items | "UseDistributed" >> beam.Map(lambda n, m: n > m, cfg.vq_gather_max)
        vq_large = large | "DistributedVQ" >> DistributedKNN(
            cfg.vq_k, sample, n_items, nlist=cfg.vq_nlist, nprobe=cfg.vq_nprobe, seed=cfg.seed, stage=stage,
            active=active, centroids_file=self.ivf_file)
        vq = (vq_small, vq_large) | "VQCodes" >> beam.Flatten()
        return {"rq": rq, "vq": vq, "codebooks": codebooks}
