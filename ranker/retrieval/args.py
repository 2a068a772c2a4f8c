"""Command-line flags shared by `qarm distill`, `qarm retrieve` and `python -m ranker.retrieval.train`."""
from __future__ import annotations

import argparse

from feature_store.split import add_split_arguments
from ranker.retrieval.config import LOSSES, RELIABILITY, DistillConfig, RetrievalConfig

_R, _D = RetrievalConfig(), DistillConfig()


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    """--store --version --split ... --allow-protocol-mismatch, model / training flags, distillation flags."""
    st = parser.add_argument_group("store")
    st.add_argument("--store", required=True, help="feature-store root: a folder, file://, s3:// or gs:// URL")
    st.add_argument("--version", default=None, help="version id (default: CURRENT)")
    add_split_arguments(parser)  # must match the version's recorded protocol
    st.add_argument("--allow-protocol-mismatch", action="store_true",
                    help="use a version built under another split protocol anyway (its upstream stages saw "
                         "interactions this split treats as valid / test: leakage)")
    g = parser.add_argument_group("retrieval models")
    g.add_argument("--dim", type=int, default=_R.dim, help="embedding width")
    g.add_argument("--loss", choices=LOSSES, default=_R.loss, help="sampled softmax or BPR")
    g.add_argument("--negatives", type=int, default=_R.negatives, help="sampled-softmax negatives per batch")
    g.add_argument("--epochs", type=int, default=_R.epochs, help="most epochs (early stopping on valid)")
    g.add_argument("--batch-size", type=int, default=_R.batch_size)
    g.add_argument("--lr", type=float, default=_R.lr)
    g.add_argument("--teacher-lr", type=float, default=_R.teacher_lr)
    g.add_argument("--teacher-graph", action="store_true",
                   help="teacher user modality vectors add the mean content of the user's training positives")
    g.add_argument("--l2", type=float, default=_R.l2, help="L2 on the batch's embedding rows")
    g.add_argument("--tower-hidden", type=int, default=_R.tower_hidden, help="teacher projection tower width")
    g.add_argument("--modality-loss-weight", type=float, default=_R.modality_loss_weight)
    g.add_argument("--eval-every", type=int, default=_R.eval_every)
    g.add_argument("--patience", type=int, default=_R.patience, help="evaluations without improvement (0 = off)")
    g.add_argument("--torch-threads", type=int, default=1, help="torch threads")
    d = parser.add_argument_group("distillation")
    d.add_argument("--temperature", type=float, default=_D.temperature)
    d.add_argument("--kd-weight", type=float, default=_D.kd_weight, help="list-wise KD weight")
    d.add_argument("--modality-weight", type=float, default=_D.modality_weight, help="per-modality KD weight")
    d.add_argument("--kd-topk", type=int, default=_D.topk, help="teacher top-K in each candidate list")
    d.add_argument("--kd-samples", type=int, default=_D.samples, help="sampled items in each candidate list")
    d.add_argument("--reliability", choices=RELIABILITY, default=_D.reliability,
                   help="modality weights: agreement with the observed label, teacher confidence, or uniform")
    d.add_argument("--prompt-lr", type=float, default=_D.prompt_lr)
    d.add_argument("--prompt-task-weight", type=float, default=_D.prompt_task_weight)



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
