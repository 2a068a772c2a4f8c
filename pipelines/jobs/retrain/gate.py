"""The validation gate: a new version is published only when it is at least as usable as its parent.

Every comparison with the parent is made on one held-out set: the retrain window's tail (events the candidate's
alignment and codebooks never saw). Ranking quality: the remapped reference ranker's AUC / GAUC on the tail right
after the switch against the parent ranker's on the same events; retrieval: next-item recall@10 on the tail's
positives of the parent's and the candidate's embeddings, both scored here on the same queries.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateConfig:
    """Thresholds a candidate version must pass.

    Args:
        max_collision_rate: highest allowed share of items whose full RQ code is shared with another item.
        min_utilization: lowest allowed share of centroids used, per RQ level.
        max_recall_drop: the candidate encoder's next-item recall@10 on the held-out tail may be at most this much
            (absolute) below the parent encoder's on the same queries.
        max_churn: highest allowed share of the parent's items whose full RQ code changed (None: not checked).
        max_auc_drop: the remapped ranker's held-out-tail AUC may be at most this much (absolute) below the parent
            ranker's on the same events (None: not checked).
        max_gauc_drop: the same for GAUC (None: not checked).
        ranking_rule: "point": refuse when the observed drop exceeds the tolerance; "ci": only when the whole
            paired (by user) 95% bootstrap interval of the difference lies below minus the tolerance (a small
            tail is noisy: "point" refuses by chance, "ci" only on evidence).
    """

    max_collision_rate: float = 0.5
    min_utilization: float = 0.05
    max_recall_drop: float = 0.05
    max_churn: float | None = None
    max_auc_drop: float | None = 0.005
    max_gauc_drop: float | None = 0.01
    ranking_rule: str = "point"

    def __post_init__(self) -> None:
        for name in ("max_collision_rate", "min_utilization", "max_recall_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {value}")
        if self.ranking_rule not in ("point", "ci"):
            raise ValueError(f"GateConfig.ranking_rule must be 'point' or 'ci', got {self.ranking_rule!r}")
        for name in ("max_churn", "max_auc_drop", "max_gauc_drop"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {value}")


def check_gate(candidate: dict, parent: dict | None, cfg: GateConfig) -> list[str]:
    """Return the reasons the candidate fails the gate (empty list: it passes).

    Args:
        candidate: metrics of the new version: collision_rate, utilization (list per level),
            recall@10_aligned, optionally churn, auc and gauc (the remapped ranker on the held-out tail) and
            auc_diff_ci / gauc_diff_ci ([lo, hi] of remapped - parent, for ``ranking_rule="ci"``).
        parent: the parent's metrics *on the same held-out set*: recall@10_aligned, auc, gauc (None: first
            version). A metric missing on either side is not compared.
    """
    reasons = []
    collision = candidate.get("collision_rate")
    if collision is not None and collision > cfg.max_collision_rate:
        reasons.append(f"collision_rate {collision:.4f} > max {cfg.max_collision_rate}")
    for level, used in enumerate(candidate.get("utilization") or []):
        if used < cfg.min_utilization:
            reasons.append(f"utilization of level {level} {used:.4f} < min {cfg.min_utilization}")
    recall, parent_recall = candidate.get("recall@10_aligned"), (parent or {}).get("recall@10_aligned")
    if recall is not None and parent_recall is not None and recall < parent_recall - cfg.max_recall_drop:
        reasons.append(f"held-out-tail next-item recall@10 {recall:.4f} fell more than {cfg.max_recall_drop} below the "
                       f"parent's {parent_recall:.4f}")
    for key, tol in (("auc", cfg.max_auc_drop), ("gauc", cfg.max_gauc_drop)):
        cand, par = candidate.get(key), (parent or {}).get(key)
        if tol is None or cand is None or par is None:
            continue
        if cfg.ranking_rule == "point" and cand < par - tol:
            reasons.append(f"held-out-tail {key.upper()} {cand:.4f} of the remapped ranker fell more than {tol} "
                           f"below the parent's {par:.4f} on the same events")
        ci = candidate.get(f"{key}_diff_ci")
        if cfg.ranking_rule == "ci" and ci is not None and ci[1] < -tol:
            reasons.append(f"held-out-tail {key.upper()} {cand:.4f} of the remapped ranker is below the parent's "
                           f"{par:.4f} on the same events beyond {tol}: paired 95% interval of the difference "
                           f"[{ci[0]:.4f}, {ci[1]:.4f}]")
    churn = candidate.get("churn")
    if cfg.max_churn is not None and churn is not None and churn > cfg.max_churn:
        reasons.append(f"code churn {churn:.4f} > max {cfg.max_churn}")
    return reasons
