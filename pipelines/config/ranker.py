"""Config trees of the ranker commands: `qarm train-ranker` (one ranker on a version) and `qarm eval` (the
ablation: the cascade's sections, the ranker's, and the ablation plan). The ranker's sections live in
`ranker.args` (the torchrun entry generates its flags from them too)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from feature_store.config_tree import knob
from feature_store.split import SplitSection
from pipelines.config.cascade import CascadeConfig, DataSection
from ranker.args import NegativesSection, RankerRunSection, RankerSection, ReadSection, VersionSection
from ranker.config import ABLATION_ROWS
from ranker.stats import BootstrapConfig


@dataclass(frozen=True)
class ReadsVersion:
    """The sections of a command that reads a published version: the data, the split (it must match the
    version's protocol) and the version."""

    data: DataSection = field(default_factory=DataSection)
    split: SplitSection = field(default_factory=SplitSection)
    source: VersionSection = field(default_factory=VersionSection)


@dataclass(frozen=True)
class TrainRankerConfig(ReadsVersion):
    """`qarm train-ranker`: + the ranker, its feature set and threads, its negatives."""

    run: RankerRunSection = field(default_factory=RankerRunSection)
    ranker: RankerSection = field(default_factory=RankerSection)
    negatives: NegativesSection = field(default_factory=NegativesSection)


@dataclass(frozen=True)
class AblationSection:
    """What `qarm eval` trains and how it reports."""

    seeds: int = knob(3, "model seeds per row and cascade")
    cascade_seeds: int = knob(0, "re-run pair mining, alignment and quantization with seeds 0..N-1 into private "
                                 "stores under --out (0: evaluate --store's version)")
    rows: str = knob(",".join(ABLATION_ROWS), "comma-separated subset of rows")
    bootstrap: int = knob(BootstrapConfig.replicates, "bootstrap replicates of the paired intervals")
    rerank_candidates: Optional[str] = knob(None, "a `qarm retrieve` Parquet of the test window: report the cascade "
                                                  "(retrieval + each row re-ranking) next to retrieval alone")
    rerank_k: int = knob(20, "length of the re-ranked list (Recall@K / NDCG@K)")


@dataclass(frozen=True)
class EvalConfig(CascadeConfig):
    """`qarm eval`: the cascade's sections (--store: the version evaluated, or where --cascade-seeds publish),
    the ranker's, and the ablation's."""

    source: ReadSection = field(default_factory=ReadSection)
    ranker: RankerSection = field(default_factory=RankerSection)
    negatives: NegativesSection = field(default_factory=NegativesSection)
    ablation: AblationSection = field(default_factory=AblationSection)
