"""Code tables that start from the content they encode (``RankerConfig.code_init = "content"``).

A trainable code row that starts at random knows less than the frozen vector it was made from, and on a sparse log
few rows are trained often enough to learn it. So every code table starts from content, through one fixed map of
the content space (the version's item vectors, width d) to the table width D:

    M(x) = (x - center) @ P * scale        P (d, D): random orthonormal columns (seeded), fixed
    center: mean content vector of the catalog; scale: the mapped vectors get per-coordinate std `content_std`

- RQ level 0, row k = M(c_0k); level l > 0, row k = c_lk @ P * scale (a residual has no centre). The sum of an
  item's RQ rows is therefore M of its RQ reconstruction: the levels add up in the space of the VQ rows.
- VQ, row r (item r) = M(v_r), v_r the item's vector (the frozen embedding; its RQ reconstruction where it has
  none). The VQ bag of an item, the mean of its neighbours' rows, is then M of its neighbourhood's mean vector.
- Reserved unknown rows (RQ row K, VQ row 0) and items with no vector keep the table's random init.
- The frozen row's trainable projection (ranker.model.ItemVectorArch.frozen_proj) starts as M too, so the frozen
  vector and the codes made from it start equally informed, and a comparison of the two rows is one of
  trainable codes vs a frozen vector, not of initialisations.

Where the codebooks live in another space than the item vectors (e.g. an RQ-VAE latent), the RQ rows get their own
map fitted on the reconstructions.

Example:
    >>> cmap = ContentMap.fit(items.frozen[items.has_frozen], dim=16, std=0.5, seed=0)
    >>> rows = cmap(items.frozen[[3, 5]])          # (2, 16): the VQ rows of items 3 and 5
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ranker.features import UNKNOWN_ROW, ItemFeatures
from ranker.model import RankerModel, embedding_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContentMap:
    """The fixed affine map from the content space (d) to a table width (D).

    Attributes:
        proj: (d, D) float32 with orthonormal columns (rows when d < D).
        center: (d,) float32.
        scale: float.
    """

    proj: np.ndarray
    center: np.ndarray
    scale: float

    def __call__(self, x: np.ndarray, centered: bool = True) -> np.ndarray:
        """(n, d) -> (n, D). centered=False maps a residual (no centre subtracted)."""
        x = np.asarray(x, np.float32)
        return ((x - self.center) if centered else x) @ self.proj * np.float32(self.scale)

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int, std: float, seed: int) -> "ContentMap":
        """Centre and scale from `vectors` (n, d), projection from `seed`.

        Args:
            vectors: (n, d) the catalog's content vectors.
            dim: D.
            std: per-coordinate std of the mapped vectors.
            seed: projection seed.
        """
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"ContentMap.fit needs (n > 0, d) vectors, got shape {vectors.shape}")
        d = vectors.shape[1]
        q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((max(d, dim), max(d, dim))))
        proj = q[:d, :dim].astype(np.float32)
        center = vectors.mean(0)
        spread = float(((vectors - center) @ proj).std())
        return cls(proj=proj, center=center, scale=std / max(spread, 1e-12))


def content_vectors(items: ItemFeatures) -> tuple[np.ndarray | None, np.ndarray]:
    """Each item row's content vector and whether it has one: the frozen embedding, else the RQ reconstruction.

    Returns:
        ((n_rows, d) float32 or None when no item has either, (n_rows,) bool).
    """
    recon = rq_reconstruction(items)
    if items.frozen is not None:
        vec, has = items.frozen.copy(), items.has_frozen.copy()
        if recon is not None and recon[0].shape[1] == vec.shape[1]:
            fill = ~has & recon[1]
            vec[fill], has = recon[0][fill], has | fill
        return vec, has
    return recon if recon is not None else (None, np.zeros(items.n_rows, bool))


def rq_reconstruction(items: ItemFeatures) -> tuple[np.ndarray, np.ndarray] | None:
    """(n_rows, d_code) sum of each coded item's centroids, and the coded mask; None without codebooks."""
    if not items.codebooks or not items.rq_sizes:
        return None
    coded = items.has_codes.copy()
    recon = np.zeros((items.n_rows, items.codebooks[0].shape[1]), np.float32)
    for level, book in enumerate(items.codebooks):
        recon[coded] += np.asarray(book, np.float32)[items.rq[coded, level]]
    return recon, coded


def init_from_content(model: RankerModel, items: ItemFeatures, std: float, seed: int) -> dict:
    """Start an unsharded model's RQ and VQ tables and frozen projection from content (see the module docstring).

    Args:
        model: RankerModel, before training.
        items: the row's ItemFeatures (codes, codebooks, item vectors).
        std: per-coordinate std of the mapped content vectors.
        seed: projection seed.
    Returns:
        {"content": {table name: rows set ("frozen_proj": 1)}, "random": {table name: why it kept its random init}}
        (a version without codebooks, or without vectors for the VQ rows, trains those tables from random rows,
        logged as a warning and recorded in the fit result).
    Raises:
        ValueError when a codebook disagrees with its table.
    """
    tables = embedding_tables(model)
    proj = model.item_arch.frozen_proj
    rq_names = [f"rq_l{l}" for l in range(len(items.rq_sizes)) if f"rq_l{l}" in tables]
    report = {"content": {}, "random": {}}
    if not rq_names and "vq" not in tables and proj is None:
        return report
    vectors, has = content_vectors(items)
    cmap = (ContentMap.fit(vectors[has], model.embedding_dim, std, seed)
            if vectors is not None and has.any() else None)
    _init_code_tables(tables, rq_names, items, cmap, vectors, has, std, seed, report)
    if proj is not None:  # the frozen vector's map: x -> x @ W.T + b = (x - center) @ P * scale
        if cmap is None or cmap.proj.shape[0] != proj.in_features:
            raise ValueError("code_init='content' needs the item vectors the frozen projection reads")
        with torch.no_grad():
            proj.weight.copy_(torch.from_numpy((cmap.proj * cmap.scale).T))
            proj.bias.copy_(torch.from_numpy(cmap(np.zeros((1, len(cmap.center)), np.float32))[0]))  # -center @ P * s
        report["content"]["frozen_proj"] = 1
    for table, why in report["random"].items():
        log.warning("code_init='content': table %s keeps its random init: %s", table, why)
    return report


def _init_code_tables(tables: dict, rq_names: list, items: ItemFeatures, cmap: ContentMap | None,
                      vectors: np.ndarray | None, has: np.ndarray, std: float, seed: int, report: dict) -> None:
    """The RQ and VQ part of :func:`init_from_content` (fills `report`)."""
    dim = next(iter(tables.values())).shape[1]
    done = report["content"]
    if rq_names and not items.codebooks:
        report["random"].update({name: "the version has no codebooks for these codes" for name in rq_names})
    elif rq_names:
        rq_map = cmap
        if rq_map is None or items.codebooks[0].shape[1] != rq_map.proj.shape[0]:
            recon, coded = rq_reconstruction(items)
            rq_map = ContentMap.fit(recon[coded], dim, std, seed)
        for level, name in enumerate(rq_names):
            book = np.asarray(items.codebooks[level], np.float32)
            if len(book) + 1 != tables[name].shape[0]:
                raise ValueError(f"codebook level {level} has {len(book)} centroids but table {name} has "
                                 f"{tables[name].shape[0] - 1} codes")
            with torch.no_grad():
                tables[name][: len(book)] = torch.from_numpy(rq_map(book, centered=level == 0))
            done[name] = len(book)
    if "vq" in tables and cmap is None:
        report["random"]["vq"] = "the version has neither item vectors nor codebooks for these codes"
    elif "vq" in tables:
        rows = np.flatnonzero(has)
        rows = rows[rows != UNKNOWN_ROW]
        with torch.no_grad():
            tables["vq"][torch.from_numpy(rows)] = torch.from_numpy(cmap(vectors[rows]))
        done["vq"] = int(len(rows))
