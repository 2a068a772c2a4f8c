"""Contrastive losses for item alignment, and the false-negative masks they use.

Two masks exist: ``false_negative_mask`` knows only the pairs inside the batch; ``PositiveGraph.masks`` knows every
known-positive edge of the training pairs, so an item's partner that happens to sit in the batch through another
pair is not pushed away as a negative (on MovieLens each item has ~22 partners; with batch 128 the in-batch mask
left about one such false negative per row).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def false_negative_mask(left_ids: torch.Tensor, right_ids: torch.Tensor) -> torch.Tensor:
    """Off-diagonal in-batch candidates that are not true negatives, (B,) x (B,) -> (B, B) bool.

    For pair i (query left_i, positive right_i), candidate j is masked when right_j is the same item as right_i,
    when pair j shares the query (so right_j is another positive of left_i), or when right_j is the query item
    itself. The same mask serves the right->left direction (column-wise): the conditions are symmetric in
    that sense. The diagonal (the positive) is never masked.
    """
    same_right = right_ids[:, None] == right_ids[None, :]
    same_left = left_ids[:, None] == left_ids[None, :]
    cross = left_ids[:, None] == right_ids[None, :]  # right_j is left_i
    mask = same_right | same_left | cross
    return mask & ~torch.eye(len(left_ids), dtype=torch.bool, device=left_ids.device)


class PositiveGraph:
    """The undirected known-positive graph of a pair table, for masking false negatives.

    Args:
        left, right: (P,) int64 item ids of the training pairs (each pair is an undirected edge).
    Memory: two int64 arrays of 2P edge keys (16 bytes per edge direction); MovieLens posters: ~50k pairs, 1.6 MB.
    """

    def __init__(self, left: np.ndarray, right: np.ndarray):
        left, right = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
        if left.shape != right.shape:
            raise ValueError(f"PositiveGraph: left {left.shape} and right {right.shape} differ in length")
        self.items = np.unique(np.concatenate([left, right]))  # sorted node ids
        self.n = max(1, len(self.items))
        a, b = np.searchsorted(self.items, left), np.searchsorted(self.items, right)
        keys = np.unique(np.concatenate([a * self.n + b, b * self.n + a]))
        self.keys = torch.from_numpy(keys)  # sorted (E,) int64
        self._items_t = torch.from_numpy(self.items)

    @classmethod
    def from_pairs(cls, pairs) -> "PositiveGraph":
        return cls(pairs["left"].to_numpy(np.int64), pairs["right"].to_numpy(np.int64))

    def __len__(self) -> int:
        return len(self.keys)  # directed edges (2 per undirected pair)

    def _node(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self._items_t, ids.cpu().contiguous()).clamp_max(len(self._items_t) - 1)
        return pos, self._items_t[pos] == ids.cpu()

    def connected(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(Q,) x (C,) item ids -> (Q, C) bool: is a_q -- b_c a known positive edge."""
        na, ka = self._node(a)
        nb, kb = self._node(b)
        keys = na[:, None] * self.n + nb[None, :]  # (Q, C)
        idx = torch.searchsorted(self.keys, keys.reshape(-1)).clamp_max(max(0, len(self.keys) - 1))
        hit = (self.keys[idx] == keys.reshape(-1)).view(keys.shape) if len(self.keys) else torch.zeros_like(keys,
                                                                                                        dtype=torch.bool)
        return hit & ka[:, None] & kb[None, :]

    def masks(self, left_ids: torch.Tensor, right_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for both directions of ``symmetric_info_nce``, each (B, B) bool, diagonal never masked.

        l2r[i, j] (query left_i, candidate right_j): right_j is a known partner of left_i, is left_i itself, or is
        the same item as right_i. r2l[i, j] (query right_i, candidate left_j): the mirror image. The in-batch mask
        is a subset: a pair in the batch is an edge of the graph.
        """
        eye = torch.eye(len(left_ids), dtype=torch.bool)
        l2r = (self.connected(left_ids, right_ids) | (right_ids.cpu()[None, :] == left_ids.cpu()[:, None])
               | (right_ids.cpu()[None, :] == right_ids.cpu()[:, None]))
        r2l = (self.connected(right_ids, left_ids) | (left_ids.cpu()[None, :] == right_ids.cpu()[:, None])
               | (left_ids.cpu()[None, :] == left_ids.cpu()[:, None]))
        device = left_ids.device
        return (l2r & ~eye).to(device), (r2l & ~eye).to(device)


def symmetric_info_nce(left: torch.Tensor, right: torch.Tensor, temperature,
                       mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                       mask_r2l: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP-style symmetric in-batch InfoNCE.

    Args:
        left, right: (B, D) L2-normalised embeddings; row i of each is a positive pair.
        temperature: logits = cos / temperature (a float or a 0-dim tensor, e.g. a learned one).
        mask: (B, B) bool, True = exclude that candidate (false negatives) in the left->right direction (rows:
            left_i, columns: right_j); also used for right->left (transposed) unless ``mask_r2l`` is given.
        weights: (B,) per-pair weights (mean-normalised), or None.
        mask_r2l: (B, B) bool for the right->left direction (rows: right_i, columns: left_j), see
            ``PositiveGraph.masks``.
    Returns:
        scalar loss = (CE(left -> right) + CE(right -> left)) / 2.
    """
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = left @ right.T / temperature  # (B, B)
    logits_t = logits.T
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
        logits_t = logits_t.masked_fill(mask_r2l if mask_r2l is not None else mask.T, float("-inf"))
    target = torch.arange(len(left), device=left.device)
    l2r = F.cross_entropy(logits, target, reduction="none")
    r2l = F.cross_entropy(logits_t, target, reduction="none")
    per_pair = (l2r + r2l) / 2  # (B,)
    if weights is None:
        return per_pair.mean()
    weights = weights / weights.mean().clamp_min(1e-12)
    return (per_pair * weights).mean()


class ContrastiveLoss(nn.Module):
    """Owns the alignment loss: symmetric InfoNCE at a fixed or learned temperature (CLIP's logit scale).

    Args:
        temperature: initial (or fixed) temperature.
        learnable: learn log(1 / temperature); clamped so the temperature stays in [min_temperature, 1].
    """

    def __init__(self, temperature: float, learnable: bool = False, min_temperature: float = 0.01):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.learnable, self.min_temperature = learnable, min_temperature
        scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    @property
    def temperature(self) -> torch.Tensor:
        """0-dim tensor (differentiable when learned)."""
        return 1.0 / self.log_scale.clamp(0.0, math.log(1.0 / self.min_temperature)).exp()

    def current(self) -> float:
        return float(self.temperature.detach())

    def forward(self, left: torch.Tensor, right: torch.Tensor, masks: Optional[tuple] = None,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """left, right (B, D); masks (l2r, r2l) from PositiveGraph.masks or None. Returns the scalar loss."""
        m, m_r2l = masks if masks is not None else (None, None)
        return symmetric_info_nce(left, right, self.temperature, m, weights, m_r2l)
