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


def _average_gradients(params):
    rank, world = _dist()
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _train_loop(model, groups, step_fn, data: RetrievalData, cfg: RetrievalConfig, kind: str, on_epoch=None,
                progress: bool = False) -> FitResult:
    """Shared loop: shuffled positive pairs in batches, Adam, early stopping on valid Recall@eval_k."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(groups)
    params = [p for g in groups for p in g["params"]]
    pairs = torch.as_tensor(data.pairs["train"])
    if len(pairs) == 0:
        raise ValueError("no training positives in the train window: nothing to learn from")
    rank, world = _dist()
    key = f"recall@{cfg.eval_k}"
    best, best_state, best_epoch, bad, history = -float("inf"), None, -1, 0, []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        perm = torch.randperm(len(pairs), generator=gen)
        losses = []
        for start in range(0, len(perm), cfg.batch_size):
            batch = pairs[perm[start:start + cfg.batch_size]]
            batch = batch[rank::world] if world > 1 else batch
            loss = step_fn(batch[:, 0], batch[:, 1], gen)
            opt.zero_grad()
            loss.backward()
            _average_gradients(params)
            opt.step()
            losses.append(float(loss.detach()))
        rec = {"epoch": epoch, "loss": float(np.mean(losses))}
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
            v = evaluate(model, data, "valid", cfg.eval_k)
            rec[f"valid_{key}"] = v[key]
            score = v[key] if v[key] is not None else -rec["loss"]
            if score > best:
                best, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                best_valid = {key: v[key], f"ndcg@{cfg.eval_k}": v[f"ndcg@{cfg.eval_k}"]}
            else:
                bad += 1
            if progress or epoch % 10 == 0:
                log.info("%s epoch %d loss %.4f valid %s %s", kind, epoch, rec["loss"], key, v[key])
            if cfg.patience and bad >= cfg.patience:
                history.append(rec)
                break
        history.append(rec)
    model.load_state_dict(best_state)
    return FitResult(model=model, kind=kind, config=cfg.to_dict(), valid=best_valid, best_epoch=best_epoch,
                     history=history, seconds=time.perf_counter() - t0)


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
    """Train the id student with its own loss plus the chosen KD parts.

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
    t = None
    if distill.any:
        if teacher is None:
            raise ValueError("distillation needs a trained teacher")
        t = copy.deepcopy(teacher.model if isinstance(teacher, FitResult) else teacher)
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
        if distill.prompt:
            for p in t.prompt.parameters():
                p.requires_grad_(True)
            groups.append({"params": list(t.prompt.parameters()), "lr": distill.prompt_lr})
    state = {"topk": None, "tables": None, "users": None}
    listwise, modality = distill.effective_listwise, distill.modality
    gen_kd = torch.Generator().manual_seed(cfg.seed + 7919)

    def on_epoch(epoch):
        if t is None:
            return
        if state["topk"] is None or (distill.prompt and epoch % distill.refresh_every == 0):
            state["topk"] = torch.as_tensor(teacher_topk(t, data, distill.topk))
        if not distill.prompt and state["tables"] is None:
            with torch.no_grad():
                state["tables"] = t.item_tables()
                state["users"] = t.user_tables(torch.arange(data.n_users), state["tables"])

    def step(users, pos, gen):
        neg = _negatives(cfg, len(users), n_items, gen)
        u = model.user_vectors(users)                                      # (B, d)
        e_pos = model.item_embed(pos)                                      # (B, d)
        e_neg = model.item_embed(neg)
        s_pos = (u * e_pos).sum(-1)
        s_neg = (u * e_neg).sum(-1) if cfg.loss == "bpr" else u @ e_neg.T
        loss = _task_loss(s_pos, s_neg, pos, neg, cfg) + cfg.l2 * _l2(u, e_pos)
        if t is None:
            return loss
        if len(users) > distill.kd_rows:                                   # KD on a random subset of rows
            sub = torch.randperm(len(users), generator=gen_kd)[: distill.kd_rows]
            users, pos, u = users[sub], pos[sub], u[sub]
            neg = neg[sub] if cfg.loss == "bpr" else neg                   # bpr: one negative per row
        rand = torch.randint(0, n_items, (len(users), distill.samples), generator=gen_kd)
        cand = torch.cat([pos.unsqueeze(1), state["topk"][users], rand], 1)   # (B, C)
        s_cand = torch.einsum("bd,bcd->bc", u, model.item_embed(cand))      # (B, C)
        if distill.prompt:                                                 # teacher forward with prompt grads
            it = t.item_tables()
            ut = t.user_tables(users, it)
        else:
            it = state["tables"]
            ut = {p: v[users] for p, v in state["users"].items()}
        cand_i, neg_i = cand, neg
        parts = {p: torch.einsum("bd,bcd->bc", ut[p], it[p][cand_i]) for p in ut}   # (B, C) each
        t_total = sum(parts.values())
        tau = distill.temperature
        if listwise:
            loss = loss + distill.kd_weight * listwise_kd_loss(t_total, s_cand, tau)
        if modality:
            mods = torch.stack([parts[m] for m in t.names])                  # (M, B, C)
            w = reliability_weights(mods, distill.reliability, positive_col=0)
            loss = loss + distill.modality_weight * modality_kd_loss(mods, s_cand, w, tau)
        if distill.prompt and distill.prompt_task_weight:
            tp = {p: _pos_neg(ut[p], it[p], cand_i[:, 0], neg_i, cfg) for p in ut}
            loss = loss + distill.prompt_task_weight * _task_loss(sum(v[0] for v in tp.values()),
                                                                  sum(v[1] for v in tp.values()), pos, neg, cfg)
        return loss

    result = _train_loop(model, groups, step, data, cfg, "student", on_epoch=on_epoch, progress=progress)
    result.config = {**result.config, "distill": distill.to_dict()}
    result.teacher = t
    return result


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
