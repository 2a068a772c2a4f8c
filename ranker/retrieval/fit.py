"""Training wrappers: the teacher, the (distilled) student, and full-ranking evaluation.

    teacher = fit_teacher(data, feats, RetrievalConfig(seed=0))
    student = fit_student(data, RetrievalConfig(seed=0), DistillConfig(listwise=True), teacher=teacher)
    evaluate(student.model, data, "test")    # Recall@20 / NDCG@20, full ranking, training positives excluded

Both models train on the train window's positives, evaluate on valid every `eval_every` epochs, and keep the
best-on-valid state (early stopping with `patience`): defaults and epochs are chosen on valid, never on test.
Under torchrun (WORLD_SIZE > 1, gloo) every rank draws the same batches and trains on its slice of each, and
gradients are averaged across ranks before each step, so all ranks hold the same model.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ranker.loop import Evaluation, LoopConfig, LoopState, Selection, Updates, fit_loop
from ranker.retrieval.config import DistillConfig, RetrievalConfig
from ranker.retrieval.data import ItemFeatures, RetrievalData
from ranker.retrieval.index import ItemIndex
from ranker.retrieval.losses import (listwise_kd_loss, modality_kd_loss, reliability_weights, bpr_loss,
                                     sampled_softmax_loss)
from ranker.retrieval.metrics import ndcg_at_k, recall_at_k
from ranker.retrieval.models import StudentArch, TeacherArch, count_parameters

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A trained model and its record. `valid` is the best validation evaluation (means only)."""

    model: torch.nn.Module
    kind: str
    config: dict
    valid: dict
    best_epoch: int
    history: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def params(self) -> int:
        return count_parameters(self.model)


def evaluate(model, data: RetrievalData, window: str = "test", k: int = 20) -> dict:
    """Full ranking: every catalog item is a candidate except the user's training positives.

    Returns:
        {"recall@k", "ndcg@k", "users": (E,) user rows, "per_user_recall", "per_user_ndcg" (E,), "n_users"}
    """
    users, targets = data.eval_users(window)
    if len(users) == 0:
        return {f"recall@{k}": None, f"ndcg@{k}": None, "users": users, "per_user_recall": np.zeros(0),
                "per_user_ndcg": np.zeros(0), "n_users": 0}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        uv, iv = model.serving_vectors(torch.as_tensor(users))
    model.train(was_training)
    train = data.positives("train")
    rows, _ = ItemIndex().fit(iv.numpy()).topk(uv.numpy(), k, exclude=[train[u] for u in users])
    rec, nd = recall_at_k(rows, targets, k), ndcg_at_k(rows, targets, k)
    return {f"recall@{k}": float(np.mean(rec)), f"ndcg@{k}": float(np.mean(nd)), "users": users,
            "per_user_recall": rec, "per_user_ndcg": nd, "n_users": int(len(users))}


def teacher_topk(teacher: TeacherArch, data: RetrievalData, k: int) -> np.ndarray:
    """(U, k) the teacher's top-k item rows per user, the user's training positives excluded."""
    users = torch.arange(data.n_users)
    with torch.no_grad():
        uv, iv = teacher.serving_vectors(users)
    rows, _ = ItemIndex().fit(iv.numpy()).topk(uv.numpy(), min(k, data.n_items), exclude=data.positives("train"))
    rows[rows < 0] = 0
    return rows


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _PairTask:
    """A retrieval model's part of the training loop (ranker.loop): the train window's positive pairs shuffled by a
    seeded generator each epoch (the same generator then draws the step's negatives), the model's loss on a batch
    (each rank takes its slice of every batch), valid Recall@eval_k every ``eval_every`` epochs and on the last."""

    def __init__(self, model, step_fn, data: RetrievalData, cfg: RetrievalConfig, kind: str, on_epoch=None,
                 progress: bool = False):
        self.model, self.step_fn, self.data, self.cfg, self.kind = model, step_fn, data, cfg, kind
        self.on_epoch, self.progress = on_epoch, progress
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.pairs = torch.as_tensor(data.pairs["train"])
        if len(self.pairs) == 0:
            raise ValueError("no training positives in the train window: nothing to learn from")
        self.rank, self.world = _dist()
        self.key = f"recall@{cfg.eval_k}"

    def batches(self, epoch: int) -> list:
        if self.on_epoch is not None:
            self.on_epoch(epoch)
        perm = torch.randperm(len(self.pairs), generator=self.gen)
        size = self.cfg.batch_size
        batches = [self.pairs[perm[start:start + size]] for start in range(0, len(perm), size)]
        return [b[self.rank::self.world] for b in batches] if self.world > 1 else batches

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.step_fn(batch[:, 0], batch[:, 1], self.gen)

    def evaluate(self, epoch: int, state: LoopState, complete: bool) -> Evaluation:
        cfg, key = self.cfg, self.key
        row = {"epoch": epoch, "loss": float(np.mean(state.epoch_losses))}
        if (epoch + 1) % cfg.eval_every and epoch != cfg.epochs - 1:
            return Evaluation(None, row)
        v = evaluate(self.model, self.data, "valid", cfg.eval_k)
        row[f"valid_{key}"] = v[key]
        if self.progress or epoch % 10 == 0:
            log.info("%s epoch %d loss %.4f valid %s %s", self.kind, epoch, row["loss"], key, v[key])
        return Evaluation(v[key] if v[key] is not None else -row["loss"], row,
                          detail={key: v[key], f"ndcg@{cfg.eval_k}": v[f"ndcg@{cfg.eval_k}"]})

    def snapshot(self) -> dict:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, snapshot: dict) -> None:
        self.model.load_state_dict(snapshot)


def _train_loop(model, groups, step_fn, data: RetrievalData, cfg: RetrievalConfig, kind: str, on_epoch=None,
                progress: bool = False) -> FitResult:
    """Adam on ``groups`` in ranker.loop.fit_loop, early stopping on valid Recall@eval_k (the best-on-valid state is
    restored); under torchrun gradients are averaged over the ranks before each step."""
    task = _PairTask(model, step_fn, data, cfg, kind, on_epoch, progress)
    opt = torch.optim.Adam(groups)
    params = [p for g in groups for p in g["params"]]
    n_batches = -(-len(task.pairs) // cfg.batch_size)
    loop = LoopConfig(epochs=cfg.epochs, desc=f"retrieval[{kind}]", total_steps=cfg.epochs * n_batches,
                      progress=progress, is_main=task.rank == 0)
    t0 = time.perf_counter()
    run = fit_loop(task, loop, Updates([opt], params, average_gradients=True), Selection(cfg.patience, best_epoch=-1))
    best = run.selection.best
    valid = best.detail if best is not None else {task.key: None, f"ndcg@{cfg.eval_k}": None}
    return FitResult(model=model, kind=kind, config=cfg.to_dict(), valid=valid, best_epoch=run.selection.best_epoch,
                     history=run.state.history, seconds=time.perf_counter() - t0)


def _l2(*tensors) -> torch.Tensor:
    return sum(t.pow(2).sum(-1).mean() for t in tensors)


def build_teacher(data: RetrievalData, feats: ItemFeatures, cfg: RetrievalConfig) -> TeacherArch:
    torch.manual_seed(cfg.seed)
    t = TeacherArch(data.n_users, data.n_items, feats.modalities, dim=cfg.dim, hidden=cfg.tower_hidden,
                    init_std=cfg.init_std, use_prompts=True)
    if cfg.teacher_graph:
        t.set_graph(data.pairs["train"][:, 0], data.pairs["train"][:, 1])
    return t


def fit_teacher(data: RetrievalData, feats: ItemFeatures, cfg: RetrievalConfig = RetrievalConfig(),
                progress: bool = False) -> FitResult:
    """Train the multimodal teacher: sampled softmax (or BPR) on the total score, plus modality_loss_weight ×
    the mean of the same loss on each modality score alone. The soft prompts stay zero (not trained here)."""
    model = build_teacher(data, feats, cfg)
    params = [p for n, p in model.named_parameters() if not n.startswith("prompt.")]
    n_items = data.n_items
    w_m = cfg.modality_loss_weight

    def step(users, pos, gen):
        neg = _negatives(cfg, len(users), n_items, gen)                    # (S,) or (B,)
        if cfg.teacher_graph:                                              # profiles need every item's h_m
            it = model.item_tables()
            pos_i, neg_i = pos, neg
        else:                                                              # towers on the batch's items only
            rows, inv = torch.unique(torch.cat([pos, neg]), return_inverse=True)
            it = model.item_parts(rows)
            pos_i, neg_i = inv[: len(pos)], inv[len(pos):]
        ut = model.user_tables(users, it)
        parts = {p: _pos_neg(ut[p], it[p], pos_i, neg_i, cfg) for p in ut}
        total = _task_loss(sum(v[0] for v in parts.values()), sum(v[1] for v in parts.values()), pos, neg, cfg)
        mod = [_task_loss(parts[m][0], parts[m][1], pos, neg, cfg) for m in model.names]
        loss = total + (w_m * sum(mod) / len(mod) if mod and w_m else 0.0)
        return loss + cfg.l2 * _l2(*ut.values(), it["id"][pos_i])

    return _train_loop(model, [{"params": params, "lr": cfg.teacher_lr}], step, data, cfg, "teacher", progress=progress)


def _negatives(cfg: RetrievalConfig, batch: int, n_items: int, gen) -> torch.Tensor:
    n = batch if cfg.loss == "bpr" else cfg.negatives
    return torch.randint(0, n_items, (n,), generator=gen)


def _pos_neg(u, it, pos_i, neg_i, cfg):
    """Scores of positives (B,) and negatives: (B, S) shared (softmax) or (B,) paired (bpr)."""
    pos = (u * it[pos_i]).sum(-1)
    neg = (u * it[neg_i]).sum(-1) if cfg.loss == "bpr" else u @ it[neg_i].T
    return pos, neg


def _task_loss(pos_s, neg_s, pos, neg, cfg):
    if cfg.loss == "bpr":
        return bpr_loss(pos_s, neg_s)
    return sampled_softmax_loss(pos_s, neg_s, hit_mask=neg.unsqueeze(0) == pos.unsqueeze(1))


def build_student(data: RetrievalData, cfg: RetrievalConfig, feats: ItemFeatures | None = None) -> StudentArch:
    torch.manual_seed(cfg.seed)
    if cfg.use_codes and (feats is None or feats.codes is None):
        raise ValueError("use_codes: the store version has no item_codes table")
    return StudentArch(data.n_users, data.n_items, cfg.dim, cfg.init_std,
                       codes=feats.codes if cfg.use_codes else None,
                       codebook_size=feats.codebook_size if cfg.use_codes else 0)


def fit_student(data: RetrievalData, cfg: RetrievalConfig = RetrievalConfig(),
                distill: DistillConfig = DistillConfig(), teacher: TeacherArch | FitResult | None = None,
                feats: ItemFeatures | None = None, progress: bool = False) -> FitResult:
    """Train the id student with its own loss plus the chosen KD parts (:class:`_Distiller`).

    Args:
        teacher: a trained TeacherArch (or its FitResult); required when distill.any. It is copied: prompt
            tuning changes only the copy's prompts, every other teacher weight is frozen (requires_grad False).
        feats: needed for use_codes.
    Returns:
        FitResult whose `.model` is the student; with prompts, `.teacher` holds the prompt-tuned teacher copy.
    """
    model = build_student(data, cfg, feats)
    n_items = data.n_items
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    kd = None
    if distill.any:
        if teacher is None:
            raise ValueError("distillation needs a trained teacher")
        kd = _Distiller(teacher.model if isinstance(teacher, FitResult) else teacher, data, cfg, distill)
        groups += kd.param_groups()

    def step(users, pos, gen):
        neg = _negatives(cfg, len(users), n_items, gen)
        u = model.user_vectors(users)                                      # (B, d)
        e_pos = model.item_embed(pos)                                      # (B, d)
        e_neg = model.item_embed(neg)
        s_pos = (u * e_pos).sum(-1)
        s_neg = (u * e_neg).sum(-1) if cfg.loss == "bpr" else u @ e_neg.T
        loss = _task_loss(s_pos, s_neg, pos, neg, cfg) + cfg.l2 * _l2(u, e_pos)
        return loss if kd is None else kd.add_to(loss, model, users, pos, neg, u)

    result = _train_loop(model, groups, step, data, cfg, "student", on_epoch=kd.on_epoch if kd else None,
                         progress=progress)
    result.config = {**result.config, "distill": distill.to_dict()}
    result.teacher = kd.teacher if kd else None
    return result


class _Distiller:
    """The KD terms of the student's loss (PromptMM): list-wise KD on the teacher's scores of candidate lists
    (the positive, the teacher's top-K, random items), modality KD re-weighted by each modality's reliability,
    and with prompts the teacher's own task loss so its soft prompts tune.

    Holds a frozen copy of the teacher (only its prompts train, with prompts) and its top-K lists, recomputed at
    the start of every ``refresh_every``-th epoch when prompts move the teacher; without prompts its tables are
    computed once."""

    def __init__(self, teacher: TeacherArch, data: RetrievalData, cfg: RetrievalConfig, distill: DistillConfig):
        self.data, self.cfg, self.distill = data, cfg, distill
        self.teacher = t = copy.deepcopy(teacher)
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
        if distill.prompt:
            for p in t.prompt.parameters():
                p.requires_grad_(True)
        self.topk = self.tables = self.users = None
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919)  # KD row subsets and random candidates

    def param_groups(self) -> list:
        """The teacher prompts' optimizer group (none without prompt tuning)."""
        if not self.distill.prompt:
            return []
        return [{"params": list(self.teacher.prompt.parameters()), "lr": self.distill.prompt_lr}]

    def on_epoch(self, epoch: int) -> None:
        t, distill, data = self.teacher, self.distill, self.data
        if self.topk is None or (distill.prompt and epoch % distill.refresh_every == 0):
            self.topk = torch.as_tensor(teacher_topk(t, data, distill.topk))
        if not distill.prompt and self.tables is None:
            with torch.no_grad():
                self.tables = t.item_tables()
                self.users = t.user_tables(torch.arange(data.n_users), self.tables)

    def add_to(self, loss: torch.Tensor, student, users, pos, neg, u) -> torch.Tensor:
        """``loss`` plus the KD terms for a batch: users, pos (B,) rows; neg (B,) bpr or (S,) shared negatives;
        u (B, d) the student's user vectors."""
        t, distill, cfg = self.teacher, self.distill, self.cfg
        if len(users) > distill.kd_rows:                                   # KD on a random subset of rows
            sub = torch.randperm(len(users), generator=self.gen)[: distill.kd_rows]
            users, pos, u = users[sub], pos[sub], u[sub]
            neg = neg[sub] if cfg.loss == "bpr" else neg                   # bpr: one negative per row
        rand = torch.randint(0, self.data.n_items, (len(users), distill.samples), generator=self.gen)
        cand = torch.cat([pos.unsqueeze(1), self.topk[users], rand], 1)     # (B, C)
        s_cand = torch.einsum("bd,bcd->bc", u, student.item_embed(cand))    # (B, C)
        if distill.prompt:                                                 # teacher forward with prompt grads
            it = t.item_tables()
            ut = t.user_tables(users, it)
        else:
            it = self.tables
            ut = {p: v[users] for p, v in self.users.items()}
        parts = {p: torch.einsum("bd,bcd->bc", ut[p], it[p][cand]) for p in ut}   # (B, C) each
        tau = distill.temperature
        if distill.effective_listwise:
            loss = loss + distill.kd_weight * listwise_kd_loss(sum(parts.values()), s_cand, tau)
        if distill.modality:
            mods = torch.stack([parts[m] for m in t.names])                  # (M, B, C)
            w = reliability_weights(mods, distill.reliability, positive_col=0)
            loss = loss + distill.modality_weight * modality_kd_loss(mods, s_cand, w, tau)
        if distill.prompt and distill.prompt_task_weight:
            tp = {p: _pos_neg(ut[p], it[p], cand[:, 0], neg, cfg) for p in ut}
            loss = loss + distill.prompt_task_weight * _task_loss(sum(v[0] for v in tp.values()),
                                                                  sum(v[1] for v in tp.values()), pos, neg, cfg)
        return loss


def student_item_vectors(student, item_ids: np.ndarray | None = None, normalize: bool = True):
    """The student's item vectors as a collaborative item similarity (e.g. for QARM's trigger pairs).

    Args:
        student: a StudentArch or a FitResult of fit_student.
        item_ids: (N,) the catalog ids of its rows (RetrievalData.item_ids).
        normalize: L2-normalise, so an inner product is a cosine similarity.
    Returns:
        (item_ids (N,) int64, vectors (N, d) float32).
    """
    model = student.model if isinstance(student, FitResult) else student
    with torch.no_grad():
        v = model.item_vectors().numpy().astype(np.float32)
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    ids = np.arange(len(v), dtype=np.int64) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    if len(ids) != len(v):
        raise ValueError(f"student_item_vectors: {len(ids)} item ids for {len(v)} item rows")
    return ids, v
