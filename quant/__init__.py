"""quant: semantic-ID quantizers (RQ-Kmeans, VQ neighbours, Res-KmeansFSQ, RQ-VAE), collision handling and
codebook metrics. A pure library: importing it loads numpy only; faiss and torch load on first use.

    from quant import RQKMeans, VQNeighbors, ResKMeansFSQ, RQVAE, load_quantizer, resolve_collisions
"""
from __future__ import annotations

from quant.base import NotFittedError, Quantizer, check_embeddings, load_quantizer
from quant.collisions import CollisionOverflowError, resolve_collisions
from quant.fsq import ResKMeansFSQ, ResKMeansFSQConfig
from quant.rq_kmeans import RQKMeans, RQKMeansConfig
from quant.vq import VQNeighbors, VQNeighborsConfig

__all__ = [
    "CollisionOverflowError", "NotFittedError", "Quantizer", "RQKMeans", "RQKMeansConfig", "RQVAE", "RQVAEConfig",
    "ResKMeansFSQ", "ResKMeansFSQConfig", "VQNeighbors", "VQNeighborsConfig", "check_embeddings",
    "load_quantizer", "resolve_collisions",
]


def __getattr__(name):  # RQ-VAE needs torch.nn; import it only when asked for
    if name in ("RQVAE", "RQVAEConfig"):
        from quant import rqvae

        return getattr(rqvae, name)
    raise AttributeError(f"module 'quant' has no attribute {name!r}")
