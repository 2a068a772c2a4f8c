"""The cascade's retrieval side: top-K candidate tables, and re-ranking them with the ranker.

    cands = retrieve_candidates(student.model, data, window="test", k=100)   # DataFrame user_id, item_id, rank, score
    report = rerank_candidates(cands, score_fn, relevant_from_data(data, "test"), k=20)
    report["retrieval"]["recall@20"], report["cascade"]["recall@20"]

`score_fn(user_ids (M,) int64, item_ids (M,) int64) -> (M,) scores` is the ranker's (raw ids, higher = better);
`qarm eval` wires the trained ranker in (the lead's side). Both figures are full-catalog metrics of the final
top-k list: the cascade can only reorder what retrieval returned, so `candidate_recall` (share of targets inside
the K candidates) bounds its recall.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from ranker.retrieval.data import RetrievalData
from ranker.retrieval.index import ItemIndex
from ranker.retrieval.metrics import ndcg_at_k, recall_at_k

CANDIDATE_COLUMNS = ("user_id", "item_id", "rank", "score")


def window_users(data: RetrievalData, window: str) -> np.ndarray:
    """Rows of the users to serve for a window: users with a training positive and any positive in the window
    (train: every user with a training positive)."""
    train = np.unique(data.pairs["train"][:, 0])
    if window == "train":
        return train
    return np.intersect1d(train, np.unique(data.pairs[window][:, 0]))


def retrieve_candidates(model, data: RetrievalData, window: str = "test", k: int = 100,
                        users: np.ndarray | None = None, exclude_train: bool = True) -> pd.DataFrame:
    """Top-k items per user from a trained retrieval model (student or teacher) under full ranking.

    Args:
        users: user rows (default window_users(data, window)).
        exclude_train: skip each user's training positives.
    Returns:
        DataFrame user_id int64, item_id int64, rank int32 (1 = best), score float32; raw ids.
    """
    users = window_users(data, window) if users is None else np.asarray(users, dtype=np.int64)
    model.eval()
    with torch.no_grad():
        uv, iv = model.serving_vectors(torch.as_tensor(users))
    train = data.positives("train")
    rows, scores = ItemIndex().fit(iv.numpy()).topk(uv.numpy(), k, [train[u] for u in users] if exclude_train else None)
    ok = rows >= 0
    u_rep = np.repeat(users, rows.shape[1]).reshape(rows.shape)
    ranks = np.tile(np.arange(1, rows.shape[1] + 1, dtype=np.int32), (len(users), 1))
    return pd.DataFrame({"user_id": data.user_ids[u_rep[ok]], "item_id": data.item_ids[rows[ok]],
                         "rank": ranks[ok], "score": scores[ok].astype(np.float32)})


def relevant_from_data(data: RetrievalData, window: str) -> dict:
    """{raw user_id: set of raw item_ids} — each evaluated user's window positives (training positives removed)."""
    users, targets = data.eval_users(window)
    return {int(data.user_ids[u]): {int(data.item_ids[i]) for i in t} for u, t in zip(users, targets)}


def relevant_from_interactions(interactions: pd.DataFrame) -> dict:
    """{user_id: set of item_ids} of the positives (label > 0.5) in an interactions frame (one window)."""
    pos = interactions[interactions["label"] > 0.5]
    return {int(u): set(g.astype(np.int64).tolist()) for u, g in pos.groupby("user_id")["item_id"]}


def rerank_candidates(candidates: pd.DataFrame, score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                      relevant: dict, k: int = 20) -> dict:
    """Re-rank retrieved candidates with a ranker and compare the cascade with retrieval alone.

    Args:
        candidates: DataFrame user_id, item_id, rank, score (retrieve_candidates / `qarm retrieve` output).
        score_fn: the ranker: (user_ids (M,), item_ids (M,)) -> (M,) scores, higher first. Called once with every
            candidate pair (batch inside it if needed).
        relevant: {user_id: set(item_id)} targets of the window (relevant_from_data / relevant_from_interactions);
            only users present in both `relevant` and `candidates` are scored.
        k: cut-off of the final list (must be <= candidates per user for a fair comparison).
    Returns:
        {"retrieval": {f"recall@{k}", f"ndcg@{k}"}, "cascade": {...}, "candidate_recall" (recall of all K
         candidates: the cascade's ceiling), "users", "candidates_per_user", "per_user": DataFrame user_id,
         retrieval_recall, cascade_recall, retrieval_ndcg, cascade_ndcg}
    """
    missing = [c for c in CANDIDATE_COLUMNS[:3] if c not in candidates.columns]
    if missing:
        raise ValueError(f"candidates: missing columns {missing} (have {list(candidates.columns)})")
    c = candidates[candidates["user_id"].isin(list(relevant))].copy()
    if c.empty:
        raise ValueError("rerank_candidates: no candidate user has targets in `relevant`")
    scores = np.asarray(score_fn(c["user_id"].to_numpy(np.int64), c["item_id"].to_numpy(np.int64)), dtype=np.float64)
    if scores.shape != (len(c),):
        raise ValueError(f"score_fn returned shape {scores.shape}, expected ({len(c)},)")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score_fn returned a non-finite score at candidate row {bad} "
                         f"(user_id {c['user_id'].iloc[bad]}, item_id {c['item_id'].iloc[bad]})")
    c["rerank_score"] = scores
    users, by_ret, by_rank, rel = [], [], [], []
    n_cand = int(c.groupby("user_id").size().max())
    for u, g in c.groupby("user_id", sort=True):
        users.append(int(u))
        by_ret.append(_pad(g.sort_values("rank")["item_id"].to_numpy(np.int64), n_cand))
        by_rank.append(_pad(g.sort_values(["rerank_score", "rank"], ascending=[False, True])["item_id"]
                            .to_numpy(np.int64), n_cand))
        rel.append(relevant[int(u)])
    by_ret, by_rank = np.stack(by_ret), np.stack(by_rank)
    r_ret, r_cas = recall_at_k(by_ret, rel, k), recall_at_k(by_rank, rel, k)
    n_ret, n_cas = ndcg_at_k(by_ret, rel, k), ndcg_at_k(by_rank, rel, k)
    ceiling = recall_at_k(by_ret, rel, n_cand)
    return {"retrieval": {f"recall@{k}": float(np.mean(r_ret)), f"ndcg@{k}": float(np.mean(n_ret))},
            "cascade": {f"recall@{k}": float(np.mean(r_cas)), f"ndcg@{k}": float(np.mean(n_cas))},
            "candidate_recall": float(np.mean(ceiling)), "users": len(users), "candidates_per_user": n_cand,
            "per_user": pd.DataFrame({"user_id": users, "retrieval_recall": r_ret, "cascade_recall": r_cas,
                                      "retrieval_ndcg": n_ret, "cascade_ndcg": n_cas})}


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return np.r_[x, np.full(n - len(x), -1, dtype=np.int64)] if len(x) < n else x
