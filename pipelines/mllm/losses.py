"""Contrastive losses for item alignment."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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


def symmetric_info_nce(left: torch.Tensor, right: torch.Tensor, temperature: float,
                       mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP-style symmetric in-batch InfoNCE.

    Args:
        left, right: (B, D) L2-normalised embeddings; row i of each is a positive pair.
        temperature: logits = cos / temperature.
        mask: (B, B) bool, True = exclude that candidate (false negatives); see ``false_negative_mask``.
        weights: (B,) per-pair weights (mean-normalised), or None.
    Returns:
        scalar loss = (CE(left -> right) + CE(right -> left)) / 2.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = left @ right.T / temperature  # (B, B)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(len(left), device=left.device)
    l2r = F.cross_entropy(logits, target, reduction="none")
    r2l = F.cross_entropy(logits.T, target, reduction="none")
    per_pair = (l2r + r2l) / 2  # (B,)
    if weights is None:
        return per_pair.mean()
    weights = weights / weights.mean().clamp_min(1e-12)
    return (per_pair * weights).mean()
