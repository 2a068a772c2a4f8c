"""Command-line flags shared by `qarm distill`, `qarm retrieve` and `python -m ranker.retrieval.train`."""
from __future__ import annotations

import argparse

from dataclasses import dataclass

from feature_store.config_tree import add_section_arguments, knob
from feature_store.split import add_split_arguments
from ranker.args import VersionSection
from ranker.retrieval.config import LOSSES, RELIABILITY, DistillConfig, RetrievalConfig

_R, _D = RetrievalConfig(), DistillConfig()


@dataclass(frozen=True)
class RetrievalSection:
    """The retrieval models (RetrievalConfig's defaults)."""

    dim: int = knob(_R.dim, "embedding width")
    loss: str = knob(_R.loss, "sampled softmax or BPR", choices=LOSSES)
    negatives: int = knob(_R.negatives, "sampled-softmax negatives per batch")
    epochs: int = knob(_R.epochs, "most epochs (early stopping on valid)")
    batch_size: int = knob(_R.batch_size, "interactions per batch")
    lr: float = knob(_R.lr, "learning rate of the students")
    teacher_lr: float = knob(_R.teacher_lr, "learning rate of the multimodal teacher")
    teacher_graph: bool = knob(_R.teacher_graph, "teacher user modality vectors add the mean content of the user's "
                                                 "training positives")
    l2: float = knob(_R.l2, "L2 on the batch's embedding rows")
    tower_hidden: int = knob(_R.tower_hidden, "teacher projection tower width")
    modality_loss_weight: float = knob(_R.modality_loss_weight, "weight of the teacher's per-modality losses")
    eval_every: int = knob(_R.eval_every, "epochs between validation evaluations")
    patience: int = knob(_R.patience, "evaluations without improvement before stopping (0: off)")
    torch_threads: int = knob(1, "torch threads")


@dataclass(frozen=True)
class DistillSection:
    """PromptMM-style distillation (DistillConfig's defaults; which parts are on is the command's)."""

    temperature: float = knob(_D.temperature, "KD softmax temperature")
    kd_weight: float = knob(_D.kd_weight, "list-wise KD weight")
    modality_weight: float = knob(_D.modality_weight, "per-modality KD weight")
    kd_topk: int = knob(_D.topk, "teacher top-K in each candidate list")
    kd_samples: int = knob(_D.samples, "sampled items in each candidate list")
    reliability: str = knob(_D.reliability, "modality weights: agreement with the observed label, teacher "
                                            "confidence, or uniform", choices=RELIABILITY)
    prompt_lr: float = knob(_D.prompt_lr, "learning rate of the soft prompts")
    prompt_task_weight: float = knob(_D.prompt_task_weight, "weight of the prompts' task loss")


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the retrieval sections (store, split, models, distillation), generated, for commands without
    a config tree (`python -m ranker.retrieval.train`)."""
    add_section_arguments(parser, VersionSection, title="store")
    add_split_arguments(parser)  # must match the version's recorded protocol
    add_section_arguments(parser, RetrievalSection, title="retrieval models")
    add_section_arguments(parser, DistillSection, title="distillation")


def config_from_args(args, seed: int | None = None) -> RetrievalConfig:
    return RetrievalConfig(dim=args.dim, loss=args.loss, negatives=args.negatives, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, teacher_lr=args.teacher_lr,
                           teacher_graph=args.teacher_graph, l2=args.l2, tower_hidden=args.tower_hidden,
                           modality_loss_weight=args.modality_loss_weight, eval_every=args.eval_every,
                           patience=args.patience, seed=args.seed if seed is None else seed)


def distill_from_args(args, parts: str = "none") -> DistillConfig:
    """parts: none | listwise | modality | prompt | all (comma-separated combinations allowed)."""
    chosen = {p.strip() for p in parts.split(",") if p.strip()}
    bad = chosen - {"none", "listwise", "modality", "prompt", "all"}
    if bad:
        raise ValueError(f"--kd: unknown part(s) {sorted(bad)}; choose from none, listwise, modality, prompt, all")
    on = lambda p: p in chosen or "all" in chosen  # noqa: E731
    return DistillConfig(listwise=on("listwise"), modality=on("modality"), prompt=on("prompt"),
                         temperature=args.temperature, kd_weight=args.kd_weight, modality_weight=args.modality_weight,
                         topk=args.kd_topk, samples=args.kd_samples, reliability=args.reliability,
                         prompt_lr=args.prompt_lr, prompt_task_weight=args.prompt_task_weight)
