"""Frozen, validated configs of the retrieval models and of the distillation (each KD part is an option).

Defaults were chosen on the validation window of the synthetic default (see docs/ARCHITECTURE.md,
"ranker.retrieval"); reported figures come from the test window.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LOSSES = ("softmax", "bpr")
RELIABILITY = ("label", "confidence", "uniform")


@dataclass(frozen=True)
class RetrievalConfig:
    """How the student and the teacher are trained.

    Args:
        dim: embedding width d of user / item vectors (and of each teacher modality tower's output).
        loss: "softmax" (sampled softmax over `negatives` uniformly sampled items shared by the batch, accidental
            hits masked) or "bpr" (one uniform negative per positive).
        negatives: sampled-softmax negatives per batch.
        epochs: most epochs; training stops early when valid Recall@20 has not improved for `patience`
            evaluations (every `eval_every` epochs); the best-on-valid state is kept.
        batch_size, lr: Adam on all parameters (lr: the student's).
        teacher_lr: the teacher's Adam learning rate.
        l2: L2 penalty on the embedding rows used in a batch (per row, mean over the batch).
        init_std: normal init of id embeddings.
        use_codes: the student adds the item's RQ code embeddings (one table per level) to its id embedding.
        tower_hidden: hidden width of each teacher projection tower (in_dim -> hidden -> dim).
        teacher_graph: the teacher's per-modality user vector adds the user's content profile, the mean of h_m over
            its training positives (one-hop graph aggregation); off = free per-modality user embeddings only.
        modality_loss_weight: the teacher also trains each modality score alone with this weight, so every
            per-modality score is a recommender in its own right (needed by the per-modality KD).
        eval_k: K of the early-stopping metric (Recall@K on valid).
        seed: init and sampling.
    """

    dim: int = 64
    loss: str = "softmax"
    negatives: int = 256
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 0.01
    teacher_lr: float = 0.002
    l2: float = 1e-4
    init_std: float = 0.05
    use_codes: bool = False
    tower_hidden: int = 128
    teacher_graph: bool = False
    modality_loss_weight: float = 0.5
    eval_every: int = 1
    patience: int = 5
    eval_k: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"RetrievalConfig.loss: {self.loss!r} is not one of {LOSSES}")
        for name in ("dim", "negatives", "epochs", "batch_size", "tower_hidden", "eval_every", "eval_k"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"RetrievalConfig.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("lr", "teacher_lr", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RetrievalConfig.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("l2", "modality_loss_weight", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetrievalConfig.{name}: must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "RetrievalConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class DistillConfig:
    """Which PromptMM parts the student trains with; all off = the plain student.

    Args:
        listwise: (a) list-wise KD: KL(teacher softmax || student softmax) over each training user's candidate
            list = [the observed positive, the teacher's top `topk` items (the user's training positives
            excluded), `samples` uniformly sampled items], at `temperature`, weight `kd_weight`.
        modality: (b) per-modality KD: the same KL with each teacher modality score as a teacher, each weighted
            per pair by its reliability (`reliability`), weight `modality_weight`.
        prompt: (c) soft prompts: a learnable vector per modality added to the teacher's modality inputs, tuned
            (lr `prompt_lr`) by the student's KD loss plus `prompt_task_weight` × the teacher's own training loss
            on the student's batch; every other teacher weight stays frozen. The prompt reaches the student only
            through a KD part: with prompt on and neither KD part on, list-wise KD is switched on (row
            `student+prompt` = list-wise KD from a prompt-tuned teacher; compare it with `student+listwise`).
        reliability: "label" — a modality's weight for a pair is its softmax probability of the observed
            positive among the candidates, normalised over modalities to mean 1 (a modality that disagrees with
            the observed label teaches less); "confidence" — the same with exp(-entropy) of the modality's
            candidate distribution (no label needed); "uniform" — all 1.
        refresh_every: with prompts, the teacher's top-K candidate lists are recomputed every this many epochs.
        kd_rows: the KD terms use at most this many (random) rows of each training batch (cost bound: a KD step
            touches kd_rows × (1 + topk + samples) candidates per teacher part).
    """

    listwise: bool = False
    modality: bool = False
    prompt: bool = False
    temperature: float = 2.0
    kd_weight: float = 1.0
    modality_weight: float = 3.0
    topk: int = 50
    samples: int = 50
    reliability: str = "label"
    prompt_lr: float = 0.01
    prompt_task_weight: float = 1.0
    refresh_every: int = 5
    kd_rows: int = 256

    def __post_init__(self):
        if self.reliability not in RELIABILITY:
            raise ValueError(f"DistillConfig.reliability: {self.reliability!r} is not one of {RELIABILITY}")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig.temperature: must be > 0, got {self.temperature}")
        for name in ("kd_weight", "modality_weight", "prompt_task_weight", "samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("topk", "refresh_every", "kd_rows"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DistillConfig.{name}: must be > 0, got {getattr(self, name)}")
        if not self.prompt_lr > 0:
            raise ValueError(f"DistillConfig.prompt_lr: must be > 0, got {self.prompt_lr}")

    @property
    def any(self) -> bool:
        return self.listwise or self.modality or self.prompt

    @property
    def effective_listwise(self) -> bool:
        return self.listwise or (self.prompt and not self.modality)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "DistillConfig":
        return dataclasses.replace(self, **kw)


# The rows of `qarm distill`: (student config overrides, distillation parts).
ROWS = {
    "student": ({}, {}),
    "student+codes": ({"use_codes": True}, {}),
    "student+listwise": ({}, {"listwise": True}),
    "student+modality": ({}, {"modality": True}),
    "student+prompt": ({}, {"prompt": True}),
    "student+all": ({}, {"listwise": True, "modality": True, "prompt": True}),
    "teacher": None,
}
DEFAULT_ROWS = ("student", "student+codes", "student+listwise", "student+modality", "student+prompt",
                "student+all", "teacher")
