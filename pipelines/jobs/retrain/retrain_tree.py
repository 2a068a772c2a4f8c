"""`qarm retrain`'s config tree: the data source of the new log, the run (window, warm start, refresh), code
stability and ranker carry-over, the publication gate. Defaults are RetrainConfig's, StabilityConfig's and
GateConfig's. Flags the tree does not know (Beam's --runner ..., or cascade knobs) go to the candidate's cascade
run over its parent's resolved config (pipelines.jobs.retrain.job.candidate_config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from feature_store.config_tree import knob
from feature_store.remap import METHODS as REMAP_METHODS
from pipelines.config.cascade import DataSection
from pipelines.jobs.retrain.gate import GateConfig
from pipelines.jobs.retrain.job import RetrainConfig
from pipelines.jobs.retrain.stability import StabilityConfig

_G, _S = GateConfig(), StabilityConfig()


@dataclass(frozen=True)
class RetrainSection:
    """One scheduled run: which events, how the candidate starts, where its stages are checkpointed."""

    store: Optional[str] = knob(None, "feature store whose CURRENT version is the parent (a directory, file://, "
                                      "s3:// or gs://)", required=True)
    since: Optional[int] = knob(None, "take interactions after this unix ts (none: the parent's watermark)")
    until: Optional[int] = knob(None, "... up to this unix ts (none: the newest, capped by the clock)")
    window_days: float = knob(RetrainConfig.window_days, "pair-mining window (days) before the held-out tail")
    tail_frac: float = knob(RetrainConfig.tail_frac, "last share of the new events kept out of alignment and "
                                                     "fitting: the held-out tail the gate compares candidate and "
                                                     "parent on")
    cold: bool = knob(not RetrainConfig.warm_start, "no warm start: fresh encoder fine-tune and codebooks")
    refresh_encoder_every: int = knob(RetrainConfig.refresh_encoder_every,
                                      "fine-tune the encoder on every N-th version (counted in the store's history; "
                                      "1: every run, 0: never); other runs reuse the parent's encoder frozen")
    align_epochs: int = knob(RetrainConfig.align_epochs, "the candidate's alignment epochs (on a refresh)")
    align_lr: Optional[float] = knob(RetrainConfig.align_lr, "fine-tuning learning rate (none: the mode's)")
    skip_unaligned: bool = knob(RetrainConfig.skip_unaligned, "skip the unaligned encoder's tables")
    work_dir: Optional[str] = knob(None, "stage checkpoints (none: <store>/.retrain)")
    lock_timeout: float = knob(0.0, "seconds to wait for the store lock")


@dataclass(frozen=True)
class StabilitySection:
    """Which items keep their codes, when codebooks are refit, how the reference ranker carries over."""

    move_threshold: float = knob(_S.move_threshold, "relative L2 embedding move below which an item keeps its "
                                                    "parent code")
    refit_drift: float = knob(_S.refit_drift, "relative quantization-error increase above which the refit "
                                              "codebooks are published (negative: never refit)")
    remap_method: str = knob(RetrainConfig.remap_method, "how the reference ranker's learned code rows move onto "
                                                         "the new codes", choices=REMAP_METHODS)
    no_ranker_gate: bool = knob(not RetrainConfig.ranker_gate, "skip the reference rankers (no tail AUC check)")


@dataclass(frozen=True)
class GateSection:
    """Publication thresholds (GateConfig's)."""

    max_collision_rate: float = knob(_G.max_collision_rate, "highest share of items sharing a full code")
    min_utilization: float = knob(_G.min_utilization, "lowest share of codebook entries in use")
    max_recall_drop: float = knob(_G.max_recall_drop, "allowed absolute drop of next-item recall@10 on the "
                                                      "held-out tail (both encoders on the same queries)")
    max_churn: Optional[float] = knob(_G.max_churn, "highest allowed full-code churn of the parent's items")
    max_auc_drop: Optional[float] = knob(_G.max_auc_drop, "allowed AUC drop of the remapped ranker vs the "
                                                          "parent's on the held-out tail")
    max_gauc_drop: Optional[float] = knob(_G.max_gauc_drop, "allowed GAUC drop of the remapped ranker vs the "
                                                            "parent's on the held-out tail")
    ranking_rule: str = knob(_G.ranking_rule, "point: refuse an observed drop beyond the tolerance; ci: only when "
                                              "the paired 95% interval lies wholly below it", choices=("point", "ci"))


@dataclass(frozen=True)
class RetrainTree:
    """`qarm retrain` (and the replay driver)."""

    data: DataSection = field(default_factory=DataSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    gate: GateSection = field(default_factory=GateSection)
