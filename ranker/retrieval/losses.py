"""Losses of the retrieval models and of the distillation, as pure functions of score tensors.

Shapes: B rows (one per training pair), C candidates per row. Every KD loss is a mean over rows of a KL
divergence between softmax distributions at temperature τ, scaled by τ² (Hinton et al.) so its gradient size
does not depend on τ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: -mean log σ(pos - neg). pos, neg: (B,) -> scalar."""
    return -F.logsigmoid(pos - neg).mean()


def sampled_softmax_loss(pos: torch.Tensor, neg: torch.Tensor, hit_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the positive against sampled negatives.

    Args:
        pos: (B,) positive scores.
        neg: (B, S) negative scores (uniform samples need no logQ correction).
        hit_mask: (B, S) bool, True where a "negative" is in fact the row's positive (masked out).
    Returns:
        scalar: mean over rows of -log softmax([pos, neg])[0].
    """
    if hit_mask is not None:
        neg = neg.masked_fill(hit_mask, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], 1)                  # (B, 1+S)
    return (torch.logsumexp(logits, 1) - pos).mean()


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row τ² · KL(softmax(t/τ) || softmax(s/τ)).

    Args:
        teacher_logits, student_logits: (B, C).
        mask: (B, C) bool, False for padded / duplicate candidates (dropped from both distributions).
    Returns:
        (B,) tensor.
    """
    t, s = teacher_logits / temperature, student_logits / temperature
    if mask is not None:
        t = t.masked_fill(~mask, float("-inf"))
        s = s.masked_fill(~mask, float("-inf"))
    log_pt = F.log_softmax(t, 1)
    log_ps = F.log_softmax(s, 1)
    pt = log_pt.exp()
    terms = pt * (log_pt - log_ps)
    terms = torch.where(pt > 0, terms, torch.zeros_like(terms))     # 0 · log 0 = 0 (masked entries)
    return terms.sum(1) * temperature ** 2


def listwise_kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """(a) List-wise KD: mean over rows of kl_rows. (B, C), (B, C) -> scalar."""
    return kl_rows(teacher_logits, student_logits, temperature, mask).mean()


def reliability_weights(modality_logits: torch.Tensor, mode: str = "label", positive_col: int = 0,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair reliability of each teacher modality, normalised over modalities to mean 1 (no gradient).

    Args:
        modality_logits: (M, B, C) each modality's teacher scores over the row's candidates.
        mode: "label": r_m = p_m(observed positive), the modality's softmax probability of the candidate at
            `positive_col` (the pair's observed positive) — agreement with the observed label;
            "confidence": r_m = exp(-H(p_m)), a peaked (confident) modality weighs more; "uniform": 1.
        mask: (B, C) valid candidates.
    Returns:
        (B, M) weights w = M · r / Σ_m r.
    """
    m, b, _ = modality_logits.shape
    if mode == "uniform":
        return torch.ones(b, m, dtype=modality_logits.dtype, device=modality_logits.device)
    x = modality_logits.detach()
    if mask is not None:
        x = x.masked_fill(~mask.unsqueeze(0), float("-inf"))
    logp = F.log_softmax(x, 2)                                         # (M, B, C)
    if mode == "label":
        r = logp[:, :, positive_col].exp()
    elif mode == "confidence":
        p = logp.exp()
        ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(2)
        r = torch.exp(-ent)
    else:
        raise ValueError(f"reliability mode {mode!r}: expected label, confidence or uniform")
    r = r.T                                                            # (B, M)
    return m * r / r.sum(1, keepdim=True).clamp_min(1e-12)


def modality_kd_loss(modality_logits: torch.Tensor, student_logits: torch.Tensor, weights: torch.Tensor,
                     temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(b) Per-modality KD: mean over rows of (1/M) Σ_m w[b, m] · kl_rows(teacher modality m, student).

    Args:
        modality_logits: (M, B, C); student_logits: (B, C); weights: (B, M) (reliability_weights).
    Returns:
        scalar.
    """
    per = torch.stack([kl_rows(modality_logits[j], student_logits, temperature, mask)
                       for j in range(modality_logits.shape[0])], 1)  # (B, M)
    return (weights * per).mean(1).mean()
