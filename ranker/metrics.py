"""Ranking metrics as small pure functions over numpy arrays.

Example:
    >>> auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
"""
from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of `scores`, ties sharing their average rank. Shape (N,) -> (N,) float64."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Boundaries of runs of equal scores in sorted order.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half).

    Args:
        labels: (N,) 0/1 (anything > 0.5 is positive).
        scores: (N,) real scores, higher = more likely positive.
    Returns:
        AUC in [0, 1]; NaN when only one class is present.
    """
    labels = np.asarray(labels, dtype=np.float64) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"auc: labels {labels.shape} and scores {scores.shape} differ in shape")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray, weight: str = "samples") -> float:
    """Group AUC: per-user AUC averaged over users that have both classes.

    Args:
        users: (N,) user ids.
        labels: (N,) 0/1.
        scores: (N,) scores.
        weight: "samples" weights each user by its number of samples (the usual GAUC of the CTR
            literature); "uniform" gives every user weight 1.
    Returns:
        GAUC; NaN when no user has both a positive and a negative.
    """
    if weight not in ("samples", "uniform"):
        raise ValueError(f"gauc: weight must be 'samples' or 'uniform', got {weight!r}")
    users = np.asarray(users)
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="mergesort")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(users)) + 1, len(users)]
    total, weights = 0.0, 0.0
    for start, end in zip(bounds[:-1], bounds[1:]):
        user_auc = auc(labels[start:end], scores[start:end])
        if np.isnan(user_auc):
            continue
        w = float(end - start) if weight == "samples" else 1.0
        total += w * user_auc
        weights += w
    return float(total / weights) if weights > 0 else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps]).

    Args:
        labels: (N,) 0/1.
        probs: (N,) predicted probabilities of label 1.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    if len(labels) == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log(1.0 - probs)))


def undefined_reasons(users: np.ndarray, labels: np.ndarray) -> dict:
    """Why AUC / GAUC / logloss cannot be computed on these events ({} when all three can).

    Undefinedness depends on the events only (users and labels), never on the scores, so every ranker scored on
    the same events shares it. Args: users (N,), labels (N,) 0/1.
    """
    labels = np.asarray(labels, dtype=np.float64) > 0.5
    n, n_pos = len(labels), int(labels.sum())
    if n == 0:
        return {m: "no events" for m in ("auc", "gauc", "logloss")}
    out = {}
    if n_pos in (0, n):
        out["auc"] = f"only one class among the {n} events ({n_pos} positive)"
    users = np.asarray(users)
    _, index = np.unique(users, return_inverse=True)
    pos = np.bincount(index, weights=labels)
    count = np.bincount(index)
    if not ((pos > 0) & (pos < count)).any():
        out["gauc"] = (f"no user has both a positive and a negative ({len(count)} users, {n} events; e.g. a per-user "
                       f"last-n split of an explicit-label log)")
    return out


def ranking_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict:
    """AUC, GAUC and logloss of logits in one dict (the ranker's evaluation record).

    A metric the events cannot define is None (never NaN) and "undefined" says why, e.g.
    {"gauc": None, "undefined": {"gauc": "no user has both a positive and a negative ..."}}.
    """
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    undefined = undefined_reasons(users, labels)
    out = {
        "auc": None if "auc" in undefined else auc(labels, logits),
        "gauc": None if "gauc" in undefined else gauc(users, labels, logits),
        "logloss": None if "logloss" in undefined else logloss(labels, probs),
        "n": int(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else None,
    }
    if undefined:
        out["undefined"] = undefined
    return out


def format_metric(value, spec: str = ".4f") -> str:
    """A metric for logs and tables: "n/a" for an undefined (None / NaN) one."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return format(value, spec)
