"""Config trees of the retrieval commands: `qarm distill` (the PromptMM-style study) and `qarm retrieve` (top-K
candidates of a window). Their model sections live in `ranker.retrieval.args` (the torchrun entry generates its
flags from them too)."""
from __future__ import annotations

from dataclasses import dataclass, field

from feature_store.config_tree import knob
from pipelines.config.ranker import ReadsVersion
from ranker.retrieval.args import DistillSection, RetrievalSection
from ranker.retrieval.config import DEFAULT_ROWS


@dataclass(frozen=True)
class StudySection:
    """What `qarm distill` trains and reports."""

    seeds: int = knob(3, "model seeds per row (--seed, --seed+1, ...)")
    rows: str = knob(",".join(DEFAULT_ROWS), "comma-separated subset of rows")
    k: int = knob(20, "cut-off of Recall@K / NDCG@K and of the serving top-K")
    bootstrap: int = knob(2000, "bootstrap resamples of the paired intervals")


@dataclass(frozen=True)
class CandidatesSection:
    """What `qarm retrieve` writes."""

    k: int = knob(100, "candidates per user")
    window: str = knob("test", "whose users get candidates (users with a training positive and a positive here)",
                       choices=("train", "valid", "test"))
    model: str = knob("student", "the retrieval model serving the candidates", choices=("student", "teacher"))
    kd: str = knob("all", "student KD parts: none | listwise | modality | prompt | all, or a comma-separated mix")


@dataclass(frozen=True)
class RetrievalJobConfig(ReadsVersion):
    """The retrieval models and their distillation over a version."""

    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    distill: DistillSection = field(default_factory=DistillSection)


@dataclass(frozen=True)
class DistillStudyConfig(RetrievalJobConfig):
    """`qarm distill`."""

    study: StudySection = field(default_factory=StudySection)


@dataclass(frozen=True)
class RetrieveConfig(RetrievalJobConfig):
    """`qarm retrieve`."""

    candidates: CandidatesSection = field(default_factory=CandidatesSection)
