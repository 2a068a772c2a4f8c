"""The MLLM as a user encoder: it reads a user's multimodal personalized prompt (pipelines.encoder.user_prompts) and
pools one user vector in the aligned item space (VIP5's first idea; its second, adapters, is reused here).

    prompt -> [CLS] text tokens | user id token | per event: item id token, image tokens, title tokens | [SEP]
           -> frozen LM (+ VIP5 bottleneck adapters, zero-initialised) -> pooled (H,) -> head (zero-init) -> + base
    user vector = normalize(base + head(pooled)),  base = normalize(mean of the prompt's items' aligned embeddings)

- Image tokens come from the item encoder's own frozen vision tower + projector, computed once per item
  (``item_image_tokens``: the item segments' cache) and gathered into every prompt that names the item, so
  training runs only the LM.
- Id tokens: the word "user" / "item" embedded by the LM plus a learned id embedding, hashed into a fixed table
  (``user_buckets`` / ``item_buckets``), as VIP5 adds whole-word embeddings to id tokens.
- Never worse than its start: the head's last Linear starts at zero, so step 0 is the history-pooled aligned
  embedding exactly; validation (next item of the protocol's validation window) judges step 0 and every epoch
  with the item alignment's gate (pipelines.encoder.alignment._Selection) and step 0 ships unless an epoch beats
  it by ``gate_z`` paired standard errors.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.encoder.adapters import Bottleneck, _wrap_attention
from pipelines.encoder.encoder import ItemEncoder, residual_head, residual_output
from pipelines.encoder.user_prompts import TEMPLATES, UserPrompt

log = logging.getLogger(__name__)
HASH_MULT = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive ids over the table


@dataclass(frozen=True)
class UserEncoderConfig:
    """Args:
        template: a name in user_prompts.TEMPLATES.
        max_events / token_budget: prompt truncation (the budget is also capped by the LM's positions).
        image_tokens: image tokens per item (the projected grid average-pooled to this many; VIP5 uses few).
        title_tokens: word pieces of each title kept.
        user_buckets / item_buckets: rows of the hashed id embedding tables.
        adapters / adapter_reduction: VIP5 bottleneck adapters in the frozen LM (zero-initialised up-projection).
        train_cuts: training prompts per user: cut at each of its last N train-portion positives (the target).
        max_train_prompts: cap (seeded sample) for CPU-sized runs.
        asof_cuts: point-in-time vectors per user besides the train-portion end (user_embeddings_asof.parquet):
            N prompt cuts spread evenly over its train-positive times (user_prompts.asof_cuts), encoded
            by the same trained encoder, so the ranker's training examples read no event at or after their time.
        negatives: catalog items sampled (uniformly, per batch) as extra negatives besides the batch's other
            targets: the item table is fixed, so they cost one (B, n) product; 0 = in-batch only.
        epochs, batch_size, lr, temperature, patience, gate_z: training and the never-worse gate.
        seed, device, num_threads.
    """

    template: str = "sequential"
    max_events: int = 10
    token_budget: int = 96
    image_tokens: int = 1
    title_tokens: int = 4
    user_buckets: int = 4096
    item_buckets: int = 8192
    adapters: bool = True
    adapter_reduction: int = 8
    train_cuts: int = 2
    max_train_prompts: Optional[int] = None
    asof_cuts: int = 4
    epochs: int = 3
    batch_size: int = 32
    negatives: int = 1024
    lr: float = 1e-3
    temperature: float = 0.1
    patience: int = 1
    gate_z: float = 1.645
    seed: int = 0
    device: str = "cpu"
    num_threads: Optional[int] = None

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"UserEncoderConfig.template must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        for name in ("max_events", "token_budget", "image_tokens", "title_tokens", "user_buckets", "item_buckets",
                     "adapter_reduction", "train_cuts", "asof_cuts", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"UserEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.negatives < 0:
            raise ValueError(f"UserEncoderConfig.negatives must be >= 0, got {self.negatives}")
        if self.max_train_prompts is not None and self.max_train_prompts < 1:
            raise ValueError(f"UserEncoderConfig.max_train_prompts must be >= 1 or None, got {self.max_train_prompts}")
        if not (self.lr > 0 and self.temperature > 0 and self.gate_z >= 0 and self.patience >= 0):
            raise ValueError("UserEncoderConfig: lr, temperature must be > 0; gate_z, patience >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def hash_bucket(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Stable id -> row in [0, buckets) (multiplicative hashing of the int64 id; the same in every process)."""
    ids = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return ((ids * np.uint64(HASH_MULT)) >> np.uint64(20)).astype(np.int64) % int(buckets)


def _raw_ids(tokenizer, text: str) -> list:
    """Token ids of ``text`` without special tokens (HashTokenizer or the HF adapter)."""
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "tok"):
        return list(tokenizer.encode(text))
    return list(tokenizer.tok(text, add_special_tokens=False)["input_ids"])


def _specials(tokenizer) -> tuple:
    """(start ids, end ids): [CLS] / [SEP] for encoder tokenizers, nothing for decoder ones."""
    tok = getattr(tokenizer, "tok", tokenizer)
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    if not hasattr(tokenizer, "tok"):
        cls, sep = tokenizer.cls_id, tokenizer.sep_id
    return ([cls] if cls is not None else []), ([sep] if sep is not None else [])


class PromptVocabulary:
    """How the LM tokenises prompts: template text, titles (first ``title_tokens`` pieces), the id words; and the
    exact token cost the prompt builder truncates by."""

    def __init__(self, tokenizer, titles: dict, has_image: set, cfg: UserEncoderConfig, max_positions: int):
        self.tokenizer, self.titles, self.has_image, self.cfg = tokenizer, titles, has_image, cfg
        self.start, self.end = _specials(tokenizer)
        self.budget = min(cfg.token_budget, max_positions) - len(self.start) - len(self.end)
        if self.budget < 4:
            raise ValueError(f"token budget {cfg.token_budget} leaves {self.budget} prompt tokens within the LM's "
                             f"{max_positions} positions")
        self._text: dict = {}
        self._title: dict = {}
        self.user_word = (_raw_ids(tokenizer, "user") or self.start or [0])[0]
        self.item_word = (_raw_ids(tokenizer, "item") or self.start or [0])[0]

    def text_ids(self, text: str) -> list:
        if text not in self._text:
            self._text[text] = _raw_ids(self.tokenizer, text)
        return self._text[text]

    def title_ids(self, item_id: int) -> list:
        if item_id not in self._title:
            title = self.titles.get(int(item_id)) or ""
            self._title[item_id] = _raw_ids(self.tokenizer, title)[: self.cfg.title_tokens] if title else []
        return self._title[item_id]

    def cost(self, kind: str, value) -> int:
        if kind == "text":
            return len(self.text_ids(value))
        if kind in ("user", "item"):
            return 1
        if kind == "image":
            return self.cfg.image_tokens if int(value) in self.has_image else 0
        return len(self.title_ids(int(value)))


@dataclass
class PromptBatch:
    """Collated prompts (B prompts, T positions, E history slots).

    tokens (B, T) LM vocabulary ids (0 where an image token sits); image_rows (B, T) row of the image-token table
    or -1; user_bucket (B,) and user_slot (B, T) bool; item_bucket (B, T) hashed item row or -1; mask (B, T) 1 =
    attend; history (B, E) rows of the aligned item table (-1 = padding): the base's items.
    """

    tokens: torch.Tensor
    image_rows: torch.Tensor
    user_bucket: torch.Tensor
    user_slot: torch.Tensor
    item_bucket: torch.Tensor
    mask: torch.Tensor
    history: torch.Tensor

    def to(self, device) -> "PromptBatch":
        return PromptBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _positions(p: UserPrompt, vocab: PromptVocabulary, image_row_of: dict, cfg: UserEncoderConfig) -> tuple:
    """One prompt's LM positions: (token ids, image-table rows or -1, hashed item rows or -1, user slot indices)."""
    toks, imgs, items, user = [], [], [], []

    def put(ids, img_rows=None, item_row=-1):
        toks.extend(ids)
        imgs.extend(img_rows if img_rows is not None else [-1] * len(ids))
        items.extend([item_row] * len(ids))

    put(vocab.start)
    for kind, value in p.segments:
        if kind == "text":
            put(vocab.text_ids(value))
        elif kind == "title":
            put(vocab.title_ids(int(value)))
        elif kind == "user":
            user.append(len(toks))
            put([vocab.user_word])
        elif kind == "item":
            put([vocab.item_word], item_row=int(hash_bucket(np.array([value]), cfg.item_buckets)[0]))
        elif int(value) in image_row_of:  # image
            first = image_row_of[int(value)] * cfg.image_tokens
            put([0] * cfg.image_tokens, img_rows=list(range(first, first + cfg.image_tokens)))
    put(vocab.end)
    return toks, imgs, items, user


def collate_prompts(prompts: Sequence[UserPrompt], vocab: PromptVocabulary, image_row_of: dict, item_row_of: dict,
                    cfg: UserEncoderConfig) -> PromptBatch:
    """Lay each prompt's segments out as LM positions (see PromptBatch)."""
    rows = [_positions(p, vocab, image_row_of, cfg) for p in prompts]
    B, T = len(rows), max(len(r[0]) for r in rows)
    E = max(1, max(len(p.item_ids) for p in prompts))
    out = PromptBatch(torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1, dtype=torch.long),
                      torch.as_tensor(hash_bucket(np.array([p.user_id for p in prompts]), cfg.user_buckets)),
                      torch.zeros(B, T, dtype=torch.bool), torch.full((B, T), -1, dtype=torch.long),
                      torch.zeros(B, T, dtype=torch.long), torch.full((B, E), -1, dtype=torch.long))
    for b, ((toks, imgs, items, user), p) in enumerate(zip(rows, prompts)):
        n = len(toks)
        out.tokens[b, :n], out.image_rows[b, :n] = torch.tensor(toks), torch.tensor(imgs)
        out.item_bucket[b, :n], out.mask[b, :n] = torch.tensor(items), 1
        out.user_slot[b, user] = True
        hist = [item_row_of[i] for i in p.item_ids if i in item_row_of]
        out.history[b, : len(hist)] = torch.tensor(hist, dtype=torch.long)
    return out


class UserPromptEncoder(nn.Module):
    """Frozen MLLM (its LM, + optional adapters) over prompts -> user vectors in the aligned item space.

    Args:
        mllm: the item encoder's backbone (an ItemEncoder built from the version's encoder config); frozen here.
        item_vectors: (N, D) aligned item embeddings (the table the base pools and targets come from), a buffer.
        image_tokens: (M * k, H) projected image tokens of the items that have one (``item_image_tokens``).
        cfg: UserEncoderConfig.
    """

    def __init__(self, mllm: ItemEncoder, item_vectors: torch.Tensor, image_tokens: torch.Tensor,
                 cfg: UserEncoderConfig):
        super().__init__()
        self.cfg, self.mllm = cfg, mllm
        for p in mllm.parameters():
            p.requires_grad_(False)
        H = mllm.text.hidden_size
        with torch.random.fork_rng(devices=[]):  # every new weight from cfg.seed, whatever ran before in the process
            torch.manual_seed(cfg.seed)
            self.n_adapters = _wrap_attention(mllm.text.lm, H, cfg.adapter_reduction) if cfg.adapters else 0
            for m in mllm.text.lm.modules():
                if isinstance(m, Bottleneck):
                    m.requires_grad_(True)
            self.user_tokens = nn.Embedding(cfg.user_buckets, H)
            self.item_tokens = nn.Embedding(cfg.item_buckets, H)
            for table in (self.user_tokens, self.item_tokens):
                nn.init.normal_(table.weight, std=0.02)
            self.head = residual_head(H, item_vectors.shape[1])
        self.register_buffer("item_vectors", item_vectors.float(), persistent=False)
        self.register_buffer("image_table", image_tokens.float(), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.mllm.eval()  # frozen backbone: no dropout, fixed statistics (adapters have neither)
        return self

    def base(self, history: torch.Tensor) -> torch.Tensor:
        """(B, E) item rows (-1 pad) -> (B, D): normalize(mean aligned embedding); zeros for an empty history."""
        valid = (history >= 0).unsqueeze(-1).float()
        vecs = self.item_vectors[history.clamp_min(0)] * valid
        return F.normalize(vecs.sum(1), dim=-1)

    def embeds(self, batch: PromptBatch) -> torch.Tensor:
        """(B, T, H): LM token embeddings, image tokens in their slots, id embeddings added on id slots."""
        x = self.mllm.text.embed_tokens(batch.tokens)
        is_img = batch.image_rows >= 0
        if len(self.image_table):
            x = torch.where(is_img.unsqueeze(-1), self.image_table[batch.image_rows.clamp_min(0)].to(x.dtype), x)
        is_item = (batch.item_bucket >= 0).unsqueeze(-1)
        x = x + is_item * self.item_tokens(batch.item_bucket.clamp_min(0))
        return x + batch.user_slot.unsqueeze(-1) * self.user_tokens(batch.user_bucket).unsqueeze(1)

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        """Args: batch (B prompts). Returns: (B, D) unit-norm user vectors."""
        hidden, _ = self.mllm.text(self.embeds(batch), batch.mask)
        pooled = self.mllm.text.pool(hidden, batch.mask)  # (B, H)
        return residual_output(self.base(batch.history), self.head(pooled))

    def trainable_state(self) -> dict:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def item_image_tokens(mllm: ItemEncoder, catalog, item_ids: Sequence[int], k: int, batch_size: int = 32,
                      device: str = "cpu") -> tuple[dict, torch.Tensor, float]:
    """The item segments' cache: every item's image read once by the frozen vision tower + projector.

    Returns:
        ({item_id: row}, (M * k, H) float32 tokens (item row r at r*k .. r*k+k-1), seconds).
    """
    t0 = time.perf_counter()
    if mllm.vision is None:
        return {}, torch.zeros(0, mllm.text.hidden_size), 0.0
    rows, chunks = {}, []
    ids = [int(i) for i in item_ids]
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            part = [(i, catalog.pixels(i)) for i in ids[start:start + batch_size]]
            part = [(i, px) for i, px in part if px is not None]
            if not part:
                continue
            pixels = torch.stack([px for _, px in part]).to(device)
            tokens, _ = mllm.vision(pixels, mllm.config.image_grid)          # (b, G, C)
            proj = mllm.projector(tokens)                                       # (b, G, H)
            pooled = F.adaptive_avg_pool1d(proj.transpose(1, 2), k).transpose(1, 2)   # (b, k, H)
            for i, _ in part:
                rows[i] = len(rows)
            chunks.append(pooled.reshape(-1, pooled.shape[-1]).float().cpu())
    table = torch.cat(chunks) if chunks else torch.zeros(0, mllm.text.hidden_size)
    log.info("user prompts: image tokens of %d items in %.1fs", len(rows), time.perf_counter() - t0)
    return rows, table, time.perf_counter() - t0


def max_positions(mllm: ItemEncoder) -> int:
    c = mllm.text.lm.config
    return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 512)


@dataclass
class UserEncoderResult:
    model: UserPromptEncoder
    alignment: dict
    history: list = field(default_factory=list)
    seconds_per_epoch: list = field(default_factory=list)
    steps: int = 0
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    trainable_params: int = 0
    total_params: int = 0


def encode_prompts(model: UserPromptEncoder, prompts: Sequence[UserPrompt], collate, batch_size: int = 64,
                   device: str = "cpu") -> np.ndarray:
    """(P, D) float32 user vectors, no gradient. ``collate(prompts) -> PromptBatch``."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            out.append(model(collate(prompts[s:s + batch_size]).to(device)).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, model.item_vectors.shape[1]), np.float32)


def next_item_ranks(user_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray,
                    exclude: Sequence) -> np.ndarray:
    """(U,) 1-based rank of each user's target among all items by inner product, ``exclude[u]`` (item rows,
    e.g. the user's training positives; the target itself never) left out. Ties count against the target."""
    scores = user_vectors @ item_vectors.T                                     # (U, N)
    ranks = np.empty(len(targets), dtype=np.int64)
    for u, (t, ex) in enumerate(zip(targets, exclude)):
        s = scores[u].copy()
        ex = [e for e in ex if e != t]
        if ex:
            s[ex] = -np.inf
        ranks[u] = 1 + int((s > s[t]).sum() + (s[np.arange(len(s)) != t] == s[t]).sum())
    return ranks


def _figures(ranks: np.ndarray, epoch: int) -> dict:
    return {"epoch": epoch, "judge": "valid_next_item", "recall@10": float(np.mean(ranks <= 10)),
            "mrr": float(np.mean(1.0 / ranks)), "n_queries": int(len(ranks))}


def _validate(model, valid, collate, cfg, epoch: int):
    """Next-item ranks of the validation prompts and their figures."""
    prompts, targets, exclude = valid
    uv = encode_prompts(model, prompts, collate, cfg.batch_size * 2, cfg.device)
    ranks = next_item_ranks(uv, model.item_vectors.cpu().numpy(), np.asarray(targets), exclude)
    return _figures(ranks, epoch), ranks


def _contrastive_loss(users: torch.Tensor, item_vectors: torch.Tensor, target_rows: torch.Tensor,
                      negative_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of (B, D) users against their next items (B,) rows, with the batch's other targets and the
    sampled (S,) rows as negatives; a negative that is the row's own target (a repeat) is masked."""
    cand = torch.cat([target_rows, negative_rows])                            # (B + S,)
    logits = users @ item_vectors[cand].T / temperature                       # (B, B + S)
    own = target_rows.unsqueeze(1) == cand.unsqueeze(0)
    own[:, : len(users)] &= ~torch.eye(len(users), dtype=torch.bool, device=users.device)
    return F.cross_entropy(logits.masked_fill(own, -1e9), torch.arange(len(users), device=users.device))


def _checkpoint(out_dir, step, model, opt, cfg, epoch, history, selection, losses):
    from pipelines.encoder.checkpoint import save_checkpoint
    state = {f"current.{k}": v.detach() for k, v in model.trainable_state().items()}
    if selection.kept_state is not None:
        state.update({f"kept.{k}": v for k, v in selection.kept_state.items()})
    save_checkpoint(out_dir, step, {"mode": "user-prompts", "user_encoder": cfg.to_dict()}, state,
                    optimizer_state=opt.state_dict(),
                    trainer_state={"epoch": epoch, "step": step, "history": history, "losses": losses,
                                   "kept_epoch": selection.kept_epoch, "kept_score": selection.kept_score,
                                   "best_score": selection.best_score, "since_best": selection.since_best})


def _resume(out_dir, model, opt, selection):
    """Restore the latest checkpoint under out_dir; returns (epoch done, step, history, losses) or None."""
    from pipelines.encoder.checkpoint import latest_checkpoint, read_checkpoint
    if out_dir is None or latest_checkpoint(out_dir) is None:
        return None
    meta, state, optim, trainer = read_checkpoint(out_dir)
    if meta.get("mode") != "user-prompts":
        raise ValueError(f"{out_dir}: checkpoint of mode {meta.get('mode')!r}, not a user-prompts encoder")
    params = model.trainable_state()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[f"current.{k}"])
    if optim is not None:
        opt.load_state_dict(optim)
    if trainer.get("kept_epoch") is not None:
        selection.kept_state = {k: state[f"kept.{k}"].clone() for k in params}
    selection.kept_epoch, selection.kept_score = trainer.get("kept_epoch"), trainer.get("kept_score", -math.inf)
    selection.best_score, selection.since_best = trainer["best_score"], trainer["since_best"]
    return trainer["epoch"], trainer["step"], trainer["history"], trainer.get("losses", [])


def train_user_encoder(model: UserPromptEncoder, collate, train: tuple, valid: tuple, cfg: UserEncoderConfig,
                       out_dir: Optional[Path] = None, progress: bool = False) -> UserEncoderResult:
    """Train the user encoder; resume from ``out_dir``'s checkpoints; ship the gate's choice.

    Args:
        collate: prompts -> PromptBatch.
        train: (prompts, target item rows (P,)) — prompts cut before each target, train portion only.
        valid: (prompts, target rows, exclude rows per prompt) — the validation window's next items.
    """
    from pipelines.encoder.alignment import _Selection, _gate_record
    from ranker.loop import Evaluation
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model.to(cfg.device)
    initial = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    opt = torch.optim.AdamW(list(model.trainable_state().values()), lr=cfg.lr, weight_decay=0.0)
    gate_cfg = SimpleNamespace(mode="user-prompts", valid_metric="recall@10", patience=cfg.patience or None, gate_z=cfg.gate_z,
                               restore_best=True)
    step0, ranks0 = _validate(model, valid, collate, cfg, 0)
    log.info("user encoder step 0 (history pooling): valid recall@10 %.4f mrr %.4f over %d users",
             step0["recall@10"], step0["mrr"], step0["n_queries"])
    selection = _Selection(gate_cfg, step0, ranks0, [])
    resumed = _resume(out_dir, model, opt, selection)
    epoch0, step, history, losses = resumed if resumed else (0, 0, [], [])
    prompts, targets = train
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    seconds, stop = [], False
    for epoch in range(epoch0 + 1, cfg.epochs + 1):
        if stop or (history and selection.patience and selection.since_best >= selection.patience):
            break
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(prompts), generator=gen).tolist()
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            users = model(collate([prompts[i] for i in idx]).to(cfg.device))
            rows = targets[idx].to(cfg.device)
            negs = torch.randint(0, len(model.item_vectors), (cfg.negatives,), generator=gen).to(cfg.device)
            loss = _contrastive_loss(users, model.item_vectors, rows, negs, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % 20 == 0:
                log.info("user encoder epoch %d step %d: loss %.4f (mean of last 20: %.4f)", epoch, step,
                         losses[-1], float(np.mean(losses[-20:])))
        figures, ranks = _validate(model, valid, collate, cfg, epoch)
        stop = selection.offer(epoch, Evaluation(score=figures["recall@10"], row=figures, detail=ranks),
                               model.trainable_state)
        history.append(figures)
        seconds.append(time.perf_counter() - t0)
        log.info("user encoder epoch %d: loss %.4f valid recall@10 %.4f (step 0 %.4f)", epoch,
                 float(np.mean(losses[-50:])) if losses else float("nan"), figures["recall@10"], step0["recall@10"])
        if out_dir is not None:
            _checkpoint(out_dir, step, model, opt, cfg, epoch, history, selection, losses)
    ship = selection.kept_state if selection.kept_epoch is not None else initial
    with torch.no_grad():
        for k, p in model.trainable_state().items():
            p.copy_(ship[k])
    model.eval()
    trainable = sum(p.numel() for p in model.trainable_state().values())
    return UserEncoderResult(model, _gate_record(selection, history, gate_cfg), history, seconds, step,
                             losses[0] if losses else None, losses[-1] if losses else None, trainable,
                             sum(p.numel() for p in model.parameters()))


@dataclass
class UserPromptTask:
    """Everything training and serving need, built once: the model, its collate, the prompts.

    train: (prompts, target rows); valid: (prompts, target rows, excluded rows); serve: one prompt per user with
    a train-portion positive, reading that whole portion (the vectors user_embeddings.parquet holds).
    events: user -> [(item_id, ts)] of the train-portion positives; prompt_at(user, cut_ts) -> UserPrompt: the
    one prompt builder every prompt above came from (the as-of prompts too, ``encode_asof``).
    """

    model: UserPromptEncoder
    collate: object
    train: tuple
    valid: tuple
    serve: list
    image_seconds: float
    stats: dict
    events: Optional[dict] = None
    prompt_at: Optional[object] = None


def build_user_prompt_task(mllm: ItemEncoder, catalog, item_ids: np.ndarray, item_vectors: np.ndarray,
                           train_positives, valid_positives, cfg: UserEncoderConfig) -> UserPromptTask:
    """Prompts from the protocol's train portion only (valid prompts too: the validation window gives targets,
    never prompt events), the image-token cache of the items they name, and the model.

    Args:
        mllm: the item encoder's MLLM (same vision tower + projector + LM as the version's encoder).
        catalog: pipelines.encoder.items.ItemCatalog (titles, images).
        item_ids (N,), item_vectors (N, D): the version's aligned item embeddings.
        train_positives / valid_positives: DataFrames (user_id, item_id, ts) of positive events per window.
    """
    from pipelines.encoder.user_prompts import build_prompt, events_by_user, next_item_cuts, training_cuts
    template = TEMPLATES[cfg.template]
    row_of = {int(i): r for r, i in enumerate(item_ids)}
    titles = {int(i): str(t or "") for i, t in zip(catalog.items["item_id"], catalog.items["title"])}
    uri = catalog.items["image_uri"] if "image_uri" in catalog.items else [None] * len(catalog.items)
    may_have_image = {int(i) for i, u in zip(catalog.items["item_id"], uri) if isinstance(u, str) and u}
    events = events_by_user(train_positives)
    cuts = training_cuts(events, cfg.train_cuts)
    if cfg.max_train_prompts and len(cuts) > cfg.max_train_prompts:
        pick = np.random.default_rng(cfg.seed).choice(len(cuts), cfg.max_train_prompts, replace=False)
        cuts = [cuts[i] for i in sorted(pick)]
    cuts = [c for c in cuts if c[2] in row_of]
    end_ts = int(train_positives["ts"].max()) + 1 if len(train_positives) else 0
    valid_cuts = [c for c in next_item_cuts(valid_positives) if c[0] in events and c[2] in row_of]
    named = {i for evs in events.values() for i, _ in evs} & may_have_image if mllm.vision is not None else set()
    image_row_of, image_table, image_seconds = item_image_tokens(mllm, catalog, sorted(named), cfg.image_tokens)
    vocab = PromptVocabulary(mllm.text.tokenizer, titles, set(image_row_of), cfg, max_positions(mllm))

    def prompt(u, cut):
        return build_prompt(u, events.get(u, ()), cut, template, cfg.max_events, vocab.budget, cost=vocab.cost)

    def collate(prompts):
        return collate_prompts(prompts, vocab, image_row_of, row_of, cfg)

    train = ([prompt(u, t) for u, t, _ in cuts], [row_of[i] for _, _, i in cuts])
    train_sets = {u: {row_of[i] for i, _ in evs if i in row_of} for u, evs in events.items()}
    valid = ([prompt(u, end_ts) for u, _, _ in valid_cuts], [row_of[i] for _, _, i in valid_cuts],
             [sorted(train_sets[u]) for u, _, _ in valid_cuts])
    serve = [prompt(u, end_ts) for u in sorted(events)]
    model = UserPromptEncoder(mllm, torch.as_tensor(item_vectors), image_table, cfg)
    lengths = [sum(vocab.cost(k, v) for k, v in p.segments) for p in serve]
    stats = {"train_prompts": len(train[0]), "valid_prompts": len(valid[0]), "users": len(serve),
             "items_with_image_tokens": len(image_row_of), "prompt_tokens_mean": float(np.mean(lengths)) if lengths
             else None, "events_per_prompt_mean": float(np.mean([len(p.item_ids) for p in serve])) if serve else None,
             "token_budget": vocab.budget, "adapters": model.n_adapters}
    return UserPromptTask(model, collate, train, valid, serve, image_seconds, stats, events, prompt)


USER_TABLE = "user_embeddings.parquet"  # (user_id int64, embedding list<float32>): in a version, like the items'
# (user_id int64, cut_ts int64, embedding list<float32>): point-in-time vectors (``encode_asof``), for the ranker
ASOF_TABLE = "user_embeddings_asof.parquet"
POSITIVE_LABEL = 0.5  # events with label above it are the positives prompts read and validation targets


def positive_windows(interactions, split) -> tuple:
    """(train-portion positives, validation-window positives) of an interaction log under ``split`` (a
    feature_store.split.SplitConfig): the events the prompts read and the next items that judge them."""
    from feature_store.split import split_labels
    part = split_labels(interactions, split)
    pos = (interactions["label"] > POSITIVE_LABEL).to_numpy()
    return interactions[(part == 0) & pos], interactions[(part == 1) & pos]


def step0_vectors(task: UserPromptTask) -> np.ndarray:
    """The user encoder's starting point for every served user: normalize(history-pooled aligned embedding)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(task.serve), 256):
            b = task.collate(task.serve[s:s + 256])
            history = b.history.to(task.model.item_vectors.device)
            out.append(F.normalize(task.model.base(history), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, task.model.item_vectors.shape[1]), np.float32)


@dataclass
class UserVectors:
    """What one training of the user encoder produced.

    user_ids (U,) int64: every user with a train-portion positive (sorted); vectors (U, D) float32: the vectors
    that ship (the trained encoder's when the gate kept it, else step 0's, i.e. history pooling); step0 (U, D):
    history pooling; task / result: the prompts and the training record; encode_seconds: serving them all;
    asof: the point-in-time vectors (``encode_asof``, the same encoder; ``fit_user_vectors`` always makes them).
    """

    user_ids: np.ndarray
    vectors: np.ndarray
    step0: np.ndarray
    task: UserPromptTask
    result: UserEncoderResult
    encode_seconds: float
    asof: Optional["AsOfVectors"] = None

    @property
    def shipped(self) -> str:
        """The gate's choice: "trained" when it kept an epoch, "step0" (history pooling) otherwise."""
        return "trained" if self.result.alignment.get("kept") else "step0"

    def record(self) -> dict:
        """The gate and figures of this training (``manifest.metrics.user_prompts`` of the cascade stage; the
        same keys in `qarm align --target user-prompts`'s report)."""
        r = self.result
        return {"shipped": self.shipped, "alignment": r.alignment, "valid": r.history, "stats": self.task.stats,
                "steps": r.steps, "loss_first": r.loss_first, "loss_last": r.loss_last,
                "seconds_per_epoch": r.seconds_per_epoch, "image_token_seconds": self.task.image_seconds,
                "encode_seconds_per_1k_users": 1000.0 * self.encode_seconds / max(1, len(self.task.serve)),
                "trainable_params": r.trainable_params, "total_params": r.total_params,
                "users_written": int(len(self.user_ids)),
                "asof": None if self.asof is None else self.asof.record()}


def fit_user_vectors(mllm: ItemEncoder, catalog, item_ids: np.ndarray, item_vectors: np.ndarray, train_positives,
                     valid_positives, cfg: UserEncoderConfig, out_dir: Optional[Path] = None) -> UserVectors:
    """Build the prompts (``build_user_prompt_task``), train the user encoder behind its never-worse gate
    (``train_user_encoder``; resumes from ``out_dir``'s checkpoints when given) and encode every user with a
    train-portion positive. The one path `qarm align --target user-prompts` and the cascade's user-prompt stage
    (pipelines.beam.user_prompt_stage) share.

    Args: as ``build_user_prompt_task`` (``mllm`` is wrapped with the adapters in place: pass a fresh one).
    """
    task = build_user_prompt_task(mllm, catalog, item_ids, item_vectors, train_positives, valid_positives, cfg)
    result = train_user_encoder(task.model, task.collate, task.train, task.valid, cfg, out_dir=out_dir)
    t0 = time.perf_counter()
    vectors = encode_prompts(task.model, task.serve, task.collate, 64, cfg.device).astype(np.float32, copy=False)
    encode_seconds = time.perf_counter() - t0
    user_ids = np.array([p.user_id for p in task.serve], dtype=np.int64)
    asof = encode_asof(task, user_ids, vectors, cfg.asof_cuts, device=cfg.device)
    return UserVectors(user_ids, vectors, step0_vectors(task), task, result, encode_seconds, asof)


@dataclass
class AsOfVectors:
    """Point-in-time user vectors (user_embeddings_asof.parquet): row r is the vector of the prompt of user
    ``user_ids[r]`` that read only its train-portion positives with ts < ``cut_ts[r]``. Sorted by (user, cut).
    The last row of each user (cut = its last train positive's ts + 1) is its serving vector, the row of
    user_embeddings.parquet, exactly (the same array, not a re-encoding). ``prompts``: the prompt of each row
    (not written; the train-end rows' prompts read the same events as the serving prompts)."""

    user_ids: np.ndarray
    cut_ts: np.ndarray
    vectors: np.ndarray
    per_user: int
    encode_seconds: float
    prompts: list = field(default_factory=list)

    def record(self) -> dict:
        users = int(len(np.unique(self.user_ids)))
        return {"table": ASOF_TABLE, "rows": int(len(self.user_ids)), "users": users, "per_user": self.per_user,
                "cuts_per_user_mean": float(len(self.user_ids) / users) if users else None,
                "encode_seconds": self.encode_seconds}


def encode_asof(task: UserPromptTask, user_ids: np.ndarray, serve_vectors: np.ndarray, per_user: int,
                batch_size: int = 64, device: str = "cpu") -> AsOfVectors:
    """The as-of vectors of every served user with the task's (trained, shipped) encoder, no retraining.

    Cuts: ``user_prompts.asof_cuts(task.events, per_user)``; each prompt comes from ``task.prompt_at`` (the one
    builder: events with ts < cut only). The train-end cut takes the user's row of ``serve_vectors`` (the
    prompt over the whole train portion is the serving prompt: same events), the others are encoded here.

    Args:
        user_ids (U,), serve_vectors (U, D): the served users (``task.serve``'s order) and their vectors.
    """
    from pipelines.encoder.user_prompts import asof_cuts
    if task.events is None or task.prompt_at is None:
        raise ValueError("encode_asof: the task carries no events / prompt builder (build_user_prompt_task makes one)")
    row_of = {int(u): r for r, u in enumerate(user_ids)}
    cuts = [(u, c) for u, c in asof_cuts(task.events, per_user) if u in row_of]
    train_end = {u: max(t for _, t in task.events[u]) + 1 for u in row_of if task.events.get(u)}
    end = np.array([c == train_end.get(u) for u, c in cuts], dtype=bool)
    t0 = time.perf_counter()
    prompts = [task.prompt_at(u, c) for u, c in cuts]
    earlier = [p for p, e in zip(prompts, end) if not e]
    encoded = encode_prompts(task.model, earlier, task.collate, batch_size, device).astype(np.float32, copy=False)
    seconds = time.perf_counter() - t0
    log.info("user prompts: %d as-of vectors of %d users (%d encoded, the train-end ones are the serving vectors) "
             "in %.1fs", len(cuts), len(row_of), len(earlier), seconds)
    dim = serve_vectors.shape[1] if serve_vectors.ndim == 2 else task.model.item_vectors.shape[1]
    vectors = np.zeros((len(cuts), dim), np.float32)
    vectors[~end] = encoded
    vectors[end] = serve_vectors[[row_of[u] for (u, _), e in zip(cuts, end) if e]]
    return AsOfVectors(np.array([u for u, _ in cuts], np.int64), np.array([c for _, c in cuts], np.int64), vectors,
                       per_user, seconds, prompts)


def write_user_tables(folder, fit: UserVectors) -> list:
    """user_embeddings.parquet (the serving vectors) and, when the fit has them, user_embeddings_asof.parquet
    into ``folder``; returns the paths written. The job (--out) and the cascade stage (the staged version) both
    write through here."""
    from feature_store.tables import write_asof_embeddings, write_embeddings
    folder = Path(folder)
    paths = [write_embeddings(folder / USER_TABLE, fit.user_ids, fit.vectors, id_column="user_id")]
    if fit.asof is not None and len(fit.asof.user_ids):
        paths.append(write_asof_embeddings(folder / ASOF_TABLE, fit.asof.user_ids, fit.asof.cut_ts,
                                           fit.asof.vectors))
    return paths
