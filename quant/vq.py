"""VQ code (QARM): the ids of the K nearest other items by inner product in the aligned space."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from quant.base import Quantizer, check_codes, check_embeddings, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VQNeighborsConfig:
    """Settings of the nearest-neighbour VQ code.

    Args:
        k: neighbours per item (the code length).
        index: 'flat' (exact faiss IndexFlatIP) or 'ivf' (IndexIVFFlat, inner product) for large catalogs.
        nlist: IVF cells (None: about 4 * sqrt(N)).
        nprobe: IVF cells visited per query.
        seed: seeds IVF training.
        batch_rows: query rows per faiss search call (bounds memory).
        faiss_gpu: 'auto' (faiss GPU when present), True or False.
    """

    k: int = 25
    index: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    seed: int = 0
    batch_rows: int = 65536
    faiss_gpu: bool | str = "auto"

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if self.index not in ("flat", "ivf"):
            raise ValueError(f"index must be 'flat' or 'ivf', got {self.index!r}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be None or >= 1, got {self.nlist}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.faiss_gpu not in ("auto", True, False):
            raise ValueError(f"faiss_gpu must be 'auto', True or False, got {self.faiss_gpu!r}")


def drop_self(neighbors: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's excluded id from its (k+1) neighbour list, keeping order; (M, k+1) -> (M, k).

    A row whose excluded id is absent (a duplicate vector outranked it, or -1 for no exclusion) loses its last
    entry instead, so the result never contains the item itself.
    """
    keep = neighbors != exclude[:, None]  # (M, k+1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept columns first, in their original order
    return np.take_along_axis(neighbors, order, axis=1)


@register
class VQNeighbors(Quantizer):
    """Nearest-neighbour code: ``encode`` returns (N, K) int64 base-row indices of each item's K nearest others.

    ``fit(x)`` stores the base catalog and builds the faiss index. ``encode(x)`` with x the base excludes each
    item itself (even among duplicate vectors); ``encode(x_new, exclude_rows=None)`` codes new items against the
    fitted base. Callers map row indices to item ids. ``decode`` is the mean of the neighbours' vectors.
    """

    method = "vq"

    def __init__(self, k: int = 25, index: str = "flat", *, config: VQNeighborsConfig | None = None, **settings):
        super().__init__(config or VQNeighborsConfig(k=k, index=index, **settings))
        self.base: np.ndarray | None = None
        self._index = None

    @classmethod
    def config_class(cls):
        return VQNeighborsConfig

    @property
    def is_fitted(self) -> bool:
        return self.base is not None

    @property
    def n_base(self) -> int:
        self._require_fitted()
        return self.base.shape[0]

    def _use_gpu(self) -> bool:
        from quant.kmeans import resolve_faiss_gpu

        return resolve_faiss_gpu(self.config.faiss_gpu)

    def _build_index(self, x: np.ndarray):
        import faiss

        cfg = self.config
        d = x.shape[1]
        if cfg.index == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            nlist = cfg.nlist or max(1, int(4 * np.sqrt(x.shape[0])))
            nlist = min(nlist, x.shape[0])
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = cfg.seed
            index.train(x)
            index.nprobe = min(cfg.nprobe, nlist)
        index.add(x)
        return index

    def _searchable(self):
        if self._use_gpu():
            import faiss

            return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self._index)
        return self._index

    def fit(self, x) -> "VQNeighbors":
        """Store the base (N, d) and index it. Needs more than k items (each has k *other* neighbours)."""
        k = self.config.k
        x = check_embeddings(x, min_rows=k + 1, min_rows_reason=f" (k={k} neighbours other than the item)")
        t0 = time.perf_counter()
        self.base = x.copy()
        self._index = self._build_index(self.base)
        self.fit_stats = {"n_rows": int(x.shape[0]), "index": self.config.index,
                          "seconds": round(time.perf_counter() - t0, 4)}
        return self

    def encode(self, x=None, *, exclude_rows="self", progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Neighbour codes: (M, d) -> (M, k) int64 base-row indices, best first.

        Args:
            x: queries; None means the base itself.
            exclude_rows: 'self' (row i of x is base row i: x must be the base, shape (N, d)); None (no
                exclusion: new items); or an (M,) int array of the base row to exclude per query (-1: none).
            progress: ``progress(rows done, M)`` after each search batch of ``batch_rows`` queries.
        """
        self._require_fitted()
        cfg = self.config
        x = self.base if x is None else check_embeddings(x, dim=self.base.shape[1])
        m = x.shape[0]
        if isinstance(exclude_rows, str):
            if exclude_rows != "self":
                raise ValueError(f"exclude_rows must be 'self', None or an array, got {exclude_rows!r}")
            if m != self.n_base:
                raise ValueError(f"exclude_rows='self' needs the base itself ({self.n_base} rows), got {m} rows; "
                                 "pass exclude_rows=None to code new items against the base")
            exclude = np.arange(m, dtype=np.int64)
        elif exclude_rows is None:
            exclude = np.full(m, -1, dtype=np.int64)
        else:
            exclude = np.asarray(exclude_rows, dtype=np.int64)
            if exclude.shape != (m,):
                raise ValueError(f"exclude_rows has shape {exclude.shape}, expected ({m},)")
        search_k = cfg.k + 1 if (exclude >= 0).any() else cfg.k
        if search_k > self.n_base:
            raise ValueError(f"k={cfg.k} neighbours requested but the base has only {self.n_base} items")
        index = self._searchable()
        out = np.empty((m, cfg.k), dtype=np.int64)
        for start in range(0, m, cfg.batch_rows):
            stop = min(start + cfg.batch_rows, m)
            _, nbrs = index.search(x[start:stop], search_k)  # (rows, search_k)
            missing = np.flatnonzero((nbrs < 0).any(axis=1))
            if missing.size:
                raise ValueError(f"query row {start + int(missing[0])}: the {cfg.index} index returned fewer than "
                                 f"{search_k} neighbours ({missing.size} rows short); raise nprobe "
                                 f"(now {cfg.nprobe}) or use index='flat'")
            if search_k > cfg.k:
                nbrs = drop_self(nbrs, exclude[start:stop], cfg.k)
            out[start:stop] = nbrs
            if progress is not None:
                progress(stop, m)
        return out

    def decode(self, codes) -> np.ndarray:
        """Mean of the neighbours' base vectors: (M, k) -> (M, d) float32."""
        self._require_fitted()
        codes = check_codes(codes, levels=self.config.k, codebook_sizes=[self.n_base] * self.config.k)
        out = np.zeros((codes.shape[0], self.base.shape[1]), dtype=np.float32)
        for j in range(codes.shape[1]):
            out += self.base[codes[:, j]]
        return out / np.float32(codes.shape[1])

    def _arrays(self) -> dict[str, np.ndarray]:
        import faiss

        # The index travels as faiss's own byte serialisation (not pickle), so IVF cells survive a reload.
        return {"base": self.base, "index": faiss.serialize_index(self._index)}

    def _restore(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        import faiss

        self.base = np.ascontiguousarray(arrays["base"], dtype=np.float32)
        self._index = faiss.deserialize_index(np.ascontiguousarray(arrays["index"], dtype=np.uint8))
        if self._index.ntotal != self.base.shape[0] or self._index.d != self.base.shape[1]:
            raise ValueError(f"saved VQ index holds {self._index.ntotal} x {self._index.d} vectors but the base is "
                             f"{self.base.shape}")
