"""The validation gate: a new version is published only when it is at least as usable as its parent."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateConfig:
    """Thresholds a candidate version must pass.

    Args:
        max_collision_rate: highest allowed share of items whose full RQ code is shared with another item.
        min_utilization: lowest allowed share of centroids used, per RQ level.
        max_recall_drop: the candidate's held-out pair recall@10 may be at most this much (absolute) below the
            parent's.
        max_churn: highest allowed share of carried-over items whose RQ code changed (None: not checked).
    """

    max_collision_rate: float = 0.5
    min_utilization: float = 0.05
    max_recall_drop: float = 0.05
    max_churn: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_collision_rate", "min_utilization", "max_recall_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {value}")
        if self.max_churn is not None and not 0.0 <= self.max_churn <= 1.0:
            raise ValueError(f"GateConfig.max_churn must be in [0, 1], got {self.max_churn}")


def check_gate(candidate: dict, parent: dict | None, cfg: GateConfig) -> list[str]:
    """Return the reasons the candidate fails the gate (empty list: it passes).

    Args:
        candidate: metrics of the new version: collision_rate, utilization (list per level),
            recall@10_aligned, optionally churn.
        parent: the parent's manifest metrics, or None for a first version.
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
        reasons.append(f"held-out recall@10 {recall:.4f} fell more than {cfg.max_recall_drop} below the "
                       f"parent's {parent_recall:.4f}")
    churn = candidate.get("churn")
    if cfg.max_churn is not None and churn is not None and churn > cfg.max_churn:
        reasons.append(f"code churn {churn:.4f} > max {cfg.max_churn}")
    return reasons
