"""Item alignment: contrastive training of the item encoder on behaviour-derived item pairs.

Three modes share one loop:
- ``full``: every weight of the MLLM trains;
- ``adapters`` (VIP5): frozen backbones, bottleneck adapters + layer norms + projector + head train;
- ``side`` (IISAN): frozen backbones run once over the catalog into a hidden-state cache; only the side network
  trains, on the cache, so an epoch costs a few small matrix products per batch.

Each step takes a batch of pairs, encodes each distinct item once, and applies symmetric in-batch InfoNCE with
in-batch false negatives masked (an item repeated in the batch is never its own negative). Checkpoints store
their config and the optimizer state; a run restarted with the same ``out_dir`` resumes where it stopped, and
``init_checkpoint`` warm-starts from a previous run (continual retraining on new pairs).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipelines.mllm.adapters import AdapterConfig, add_adapters
from pipelines.mllm.cache import StateCache, build_cache
from pipelines.mllm.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from pipelines.mllm.config import EncoderConfig
from pipelines.mllm.encoder import EncoderBase, ItemEncoder, count_params
from pipelines.mllm.items import ItemCatalog
from pipelines.mllm.losses import false_negative_mask, symmetric_info_nce
from pipelines.mllm.model_io import MODES, build_for_meta, build_for_mode, load_state, saved_state
from pipelines.mllm.side import SideConfig, SideEncoder, build_side_encoder

log = logging.getLogger(__name__)

DEFAULT_LR = {"full": 3e-4, "adapters": 1e-3, "side": 1e-3}


@dataclass(frozen=True)
class AlignConfig:
    """Alignment training options.

    Args:
        mode: full | adapters | side.
        epochs: passes over the training pairs.
        batch_size: pairs per step (in-batch negatives come from the other pairs).
        lr: AdamW learning rate of new layers (projector, head, adapters, side network); None picks the mode's
            default (DEFAULT_LR).
        backbone_lr_scale: pretrained backbone weights (and their trainable norms) learn at lr * this: new layers
            start random and need a larger step than weights that are already good.
        weight_decay: AdamW weight decay.
        temperature: InfoNCE temperature.
        seed: pair shuffling and dropout.
        max_steps: stop after this many optimizer steps in total (None: run all epochs).
        warmup_steps: linear learning-rate warm-up.
        grad_clip: max gradient norm (0 disables).
        use_pair_weights: weight each pair's loss by its ``weight`` column.
        sources: which pair sources to train on.
        log_every: log the running loss every this many steps.
        save_every: also checkpoint every this many steps (epoch ends always checkpoint); 0 disables.
        resume: continue from ``out_dir``'s latest checkpoint when one exists.
        keep_checkpoints: step folders kept.
        adapter / side: mode-specific architecture options.
        cache_batch_size: items per backbone pass when building the side cache.
        num_threads: torch threads (None leaves the default).
        device: "cpu" or "cuda".
        progress: tqdm bars.
    """

    mode: str = "side"
    epochs: int = 1
    batch_size: int = 64
    lr: Optional[float] = None
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.1
    seed: int = 0
    max_steps: Optional[int] = None
    warmup_steps: int = 0
    grad_clip: float = 1.0
    use_pair_weights: bool = False
    sources: tuple = ("swing", "u2i")
    log_every: int = 20
    save_every: int = 0
    resume: bool = True
    keep_checkpoints: int = 2
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    side: SideConfig = field(default_factory=SideConfig)
    cache_batch_size: int = 64
    num_threads: Optional[int] = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"AlignConfig.mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "sources", tuple(self.sources))
        if isinstance(self.adapter, dict):
            object.__setattr__(self, "adapter", AdapterConfig(**self.adapter))
        if isinstance(self.side, dict):
            object.__setattr__(self, "side", SideConfig(**self.side))
        for name in ("epochs", "batch_size", "log_every", "keep_checkpoints", "cache_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AlignConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("AlignConfig.batch_size must be >= 2 (in-batch negatives)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"AlignConfig.lr must be > 0, got {self.lr}")
        if not self.backbone_lr_scale > 0:
            raise ValueError(f"AlignConfig.backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")
        if not self.temperature > 0:
            raise ValueError(f"AlignConfig.temperature must be > 0, got {self.temperature}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"AlignConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("AlignConfig: warmup_steps, save_every, grad_clip, weight_decay must be >= 0")
        if not self.sources or any(s not in ("swing", "u2i") for s in self.sources):
            raise ValueError(f"AlignConfig.sources must be a non-empty subset of (swing, u2i), got {self.sources}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AlignConfig":
        return cls(**d)


@dataclass
class AlignResult:
    """What training produced. ``cache`` is the side-mode hidden-state cache (reuse it to embed the catalog)."""

    encoder: EncoderBase
    mode: str
    steps: int
    epochs_run: int
    losses: list
    seconds_per_epoch: float
    cache_seconds: float
    trainable_params: int
    total_params: int
    peak_memory_mb: float
    checkpoint: Optional[Path]
    pair_stats: dict
    cache: Optional[StateCache] = None
    resumed_from_step: int = 0

    def summary(self) -> dict:
        first = float(np.mean(self.losses[: max(1, len(self.losses) // 10)])) if self.losses else float("nan")
        last = float(np.mean(self.losses[-max(1, len(self.losses) // 10):])) if self.losses else float("nan")
        return {"mode": self.mode, "steps": self.steps, "epochs": self.epochs_run, "loss_first": first,
                "loss_last": last, "seconds_per_epoch": self.seconds_per_epoch, "cache_seconds": self.cache_seconds,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "peak_memory_mb": self.peak_memory_mb, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "resumed_from_step": self.resumed_from_step, **{f"pairs_{k}": v for k, v in self.pair_stats.items()}}


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak CUDA allocation, in MiB."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare_pairs(pairs: pd.DataFrame, known_items: set, sources: tuple) -> tuple[pd.DataFrame, dict]:
    """Keep usable training pairs; count what was dropped and why (nothing vanishes silently)."""
    missing = [c for c in ("left", "right") if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs: missing column(s) {missing}; have {list(pairs.columns)}")
    n = len(pairs)
    source = pairs["source"] if "source" in pairs.columns else pd.Series("swing", index=pairs.index)
    keep_source = source.isin(sources)
    self_pair = pairs["left"] == pairs["right"]
    unknown = ~(pairs["left"].isin(known_items) & pairs["right"].isin(known_items))
    kept = pairs[keep_source & ~self_pair & ~unknown].reset_index(drop=True)
    stats = {"given": int(n), "used": int(len(kept)), "dropped_source": int((~keep_source).sum()),
             "dropped_self_pair": int((keep_source & self_pair).sum()),
             "dropped_unknown_item": int((keep_source & ~self_pair & unknown).sum())}
    if "source" in kept.columns:
        stats.update({f"used_{s}": int((kept["source"] == s).sum()) for s in sources})
    return kept, stats


def _prepare_encoder(encoder: Union[EncoderConfig, EncoderBase], cfg: AlignConfig) -> EncoderBase:
    if isinstance(encoder, EncoderConfig):
        return build_for_mode(cfg.mode, encoder, cfg.adapter, cfg.side)
    if cfg.mode == "side":
        if isinstance(encoder, SideEncoder):
            return encoder
        return build_side_encoder(encoder.config, cfg.side, encoder.vision, encoder.text)
    if not isinstance(encoder, ItemEncoder):
        raise ValueError(f"mode {cfg.mode} needs an ItemEncoder, got {type(encoder).__name__}")
    if cfg.mode == "adapters" and not any("adapter" in n for n, _ in encoder.named_modules()):
        add_adapters(encoder, cfg.adapter)
    return encoder


def _meta(encoder: EncoderBase, cfg: AlignConfig, init_checkpoint: Optional[Path]) -> dict:
    return {"mode": cfg.mode, "encoder": encoder.config.to_dict(),
            "adapter": cfg.adapter.to_dict() if cfg.mode == "adapters" else None,
            "side": cfg.side.to_dict() if cfg.mode == "side" else None,
            "align": cfg.to_dict(), "init_checkpoint": str(init_checkpoint) if init_checkpoint else None}


def _lr_at(step: int, cfg: AlignConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate


def _param_groups(model: EncoderBase, cfg: AlignConfig) -> list[dict]:
    """Backbone weights at lr * backbone_lr_scale, new layers (and adapters inside backbones) at lr."""
    backbone, new = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = name.startswith(("text.", "vision.", "extractor.")) and ".adapter." not in name
        (backbone if in_backbone else new).append(p)
    groups = [{"params": new, "lr_scale": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_scale": cfg.backbone_lr_scale})
    return [g for g in groups if g["params"]]


def train_alignment(encoder: Union[EncoderConfig, EncoderBase], dataset, pairs: pd.DataFrame, cfg: AlignConfig,
                    out_dir: Optional[Path] = None, init_checkpoint: Optional[Path] = None,
                    catalog: Optional[ItemCatalog] = None) -> AlignResult:
    """Train the encoder on item pairs.

    Args:
        encoder: an EncoderConfig (built for ``cfg.mode``) or an encoder (an ItemEncoder is adapted / wrapped in
            a side network as the mode needs). Ignored when ``init_checkpoint`` is given.
        dataset: pipelines.data Dataset (``.items``, ``.image_root``).
        pairs: DataFrame with left, right (item ids), source, weight (PairSet.train).
        cfg: AlignConfig.
        out_dir: checkpoints (and the side cache under ``out_dir/side_cache``); None trains without saving.
        init_checkpoint: warm start from this checkpoint's weights (its mode must equal ``cfg.mode``).
        catalog: reuse an ItemCatalog (decoded images) across calls.
    Returns:
        AlignResult (the encoder is left in eval mode).
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(out_dir) if out_dir is not None else None
    if init_checkpoint is not None:
        meta, state, _, _ = read_checkpoint(Path(init_checkpoint))
        if meta["mode"] != cfg.mode:
            raise ValueError(f"init checkpoint {init_checkpoint} was trained in mode {meta['mode']!r}, "
                             f"not {cfg.mode!r}")
        # The architecture comes from the checkpoint, so record its adapter / side settings, not the defaults.
        cfg = dataclasses.replace(cfg, adapter=AdapterConfig(**meta["adapter"]) if meta.get("adapter") else cfg.adapter,
                                  side=SideConfig(**meta["side"]) if meta.get("side") else cfg.side)
        model = build_for_meta(meta)
        load_state(model, state, meta, source=init_checkpoint)
        log.info("warm start from %s (trained %s steps)", init_checkpoint, meta.get("step"))
    else:
        model = _prepare_encoder(encoder, cfg)
    device = torch.device(cfg.device)
    model.to(device)
    catalog = catalog or ItemCatalog.from_dataset(dataset, model.config)
    train_pairs, pair_stats = prepare_pairs(pairs, set(catalog.item_ids.tolist()), cfg.sources)
    if len(train_pairs) < 2:
        raise ValueError(f"alignment needs at least 2 usable training pairs, have {len(train_pairs)} ({pair_stats})")
    log.info("align %s: %d training pairs (%s)", cfg.mode, len(train_pairs), pair_stats)

    cache, cache_seconds = None, 0.0
    if cfg.mode == "side":
        t0 = time.perf_counter()
        cache = build_cache(model, catalog, catalog.item_ids, out_dir / "side_cache" if out_dir else None,
                            batch_size=cfg.cache_batch_size, progress=cfg.progress)
        cache_seconds = time.perf_counter() - t0
        cache.states = {k: v.to(device) for k, v in cache.states.items()}
        log.info("side cache: %d items, %.1f MB, %.1fs", len(cache), cache.nbytes() / 2 ** 20, cache_seconds)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    meta = _meta(model, cfg, init_checkpoint)
    step, start_epoch, skip_batches, losses, epoch_seconds = 0, 0, 0, [], []
    resumed_from = 0
    ckpt = latest_checkpoint(out_dir) if (out_dir is not None and cfg.resume) else None
    if ckpt is not None:
        old_meta, state, opt_state, trainer = read_checkpoint(ckpt)
        if old_meta["mode"] != cfg.mode or old_meta["encoder"] != meta["encoder"]:
            raise ValueError(f"{ckpt}: checkpoint is for mode {old_meta['mode']} / another encoder; use a new "
                             "--out or resume=False")
        load_state(model, state, old_meta, source=ckpt)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        step, start_epoch = int(trainer["step"]), int(trainer["epoch"])
        skip_batches, losses = int(trainer["batch_in_epoch"]), list(trainer.get("losses", []))
        epoch_seconds = list(trainer.get("epoch_seconds", []))
        resumed_from = step
        log.info("resuming from %s at step %d (epoch %d, batch %d)", ckpt, step, start_epoch, skip_batches)

    n_batches = math.ceil(len(train_pairs) / cfg.batch_size)
    total_steps = cfg.epochs * n_batches if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * n_batches)
    left_all = torch.tensor(train_pairs["left"].to_numpy(np.int64))
    right_all = torch.tensor(train_pairs["right"].to_numpy(np.int64))
    weight_all = torch.from_numpy(train_pairs["weight"].to_numpy(np.float32)) \
        if cfg.use_pair_weights and "weight" in train_pairs.columns else None
    last_ckpt = ckpt
    epochs_run = start_epoch
    bar = tqdm(total=total_steps, initial=step, desc=f"align[{cfg.mode}]", unit="step", disable=not cfg.progress)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        order = torch.from_numpy(np.random.default_rng(cfg.seed + epoch).permutation(len(train_pairs)))
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout
        t0 = time.perf_counter()
        next_batch = skip_batches  # the first batch of this epoch not yet trained on
        for batch_idx in range(skip_batches, n_batches):
            if step >= total_steps:
                break
            sel = order[batch_idx * cfg.batch_size:(batch_idx + 1) * cfg.batch_size]
            next_batch = batch_idx + 1
            if len(sel) < 2:
                continue
            left, right = left_all[sel], right_all[sel]
            loss = _step(model, catalog, cache, left, right,
                         weight_all[sel] if weight_all is not None else None, cfg, device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg) * group["lr_scale"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % cfg.log_every == 0:
                log.info("align[%s] epoch %d step %d/%d loss %.4f (mean of last %d: %.4f)", cfg.mode, epoch, step,
                         total_steps, losses[-1], cfg.log_every, float(np.mean(losses[-cfg.log_every:])))
            if out_dir is not None and cfg.save_every and step % cfg.save_every == 0 and next_batch < n_batches:
                last_ckpt = _save(out_dir, model, optimizer, meta, cfg, step, epoch, next_batch, losses,
                                  epoch_seconds)
        epoch_seconds.append(time.perf_counter() - t0)
        skip_batches = 0
        epochs_run = epoch + 1
        if out_dir is not None:
            position = (epoch + 1, 0) if next_batch >= n_batches else (epoch, next_batch)
            last_ckpt = _save(out_dir, model, optimizer, meta, cfg, step, *position, losses, epoch_seconds)
    bar.close()
    model.eval()
    trainable, total = count_params(model)
    # A partial epoch (max_steps) is scaled to a full one so modes compare per epoch.
    per_epoch = _seconds_per_epoch(epoch_seconds, step - resumed_from, n_batches)
    return AlignResult(encoder=model, mode=cfg.mode, steps=step, epochs_run=epochs_run, losses=losses,
                       seconds_per_epoch=per_epoch, cache_seconds=cache_seconds, trainable_params=trainable,
                       total_params=total, peak_memory_mb=peak_memory_mb(cfg.device), checkpoint=last_ckpt,
                       pair_stats=pair_stats, cache=cache, resumed_from_step=resumed_from)


def _seconds_per_epoch(epoch_seconds: list, steps_this_run: int, n_batches: int) -> float:
    if not epoch_seconds or steps_this_run <= 0:
        return float("nan")
    run_seconds = sum(epoch_seconds)
    return run_seconds / steps_this_run * n_batches


def _step(model: EncoderBase, catalog: ItemCatalog, cache: Optional[StateCache], left: torch.Tensor,
          right: torch.Tensor, weights: Optional[torch.Tensor], cfg: AlignConfig, device) -> torch.Tensor:
    # Encode each distinct item of the batch once; pairs index into the unique embeddings.
    unique, inverse = torch.unique(torch.cat([left, right]), return_inverse=True)
    if cache is not None:
        emb = model.forward_states(cache.gather(unique.tolist()))  # (U, D)
    else:
        batch = model.collate(catalog.inputs(unique.tolist())).to(device)
        emb = model(batch)  # (U, D)
    n = len(left)
    left_emb, right_emb = emb[inverse[:n]], emb[inverse[n:]]  # (B, D) each
    mask = false_negative_mask(left.to(device), right.to(device))
    return symmetric_info_nce(left_emb, right_emb, cfg.temperature, mask,
                              weights.to(device) if weights is not None else None)


def _save(out_dir: Path, model, optimizer, meta, cfg: AlignConfig, step, epoch, batch_in_epoch, losses,
          epoch_seconds) -> Path:
    trainer = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "losses": losses,
               "epoch_seconds": epoch_seconds}
    return save_checkpoint(out_dir, step, {**meta, "step": step}, saved_state(model, cfg.mode),
                           optimizer.state_dict(), trainer, keep=cfg.keep_checkpoints)


@torch.no_grad()
def embed_with_cache(encoder: SideEncoder, cache: StateCache, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Embed every cached item through the side head without running the backbones again."""
    encoder.eval()
    out = []
    for start in range(0, len(cache), batch_size):
        ids = cache.item_ids[start:start + batch_size]
        out.append(encoder.forward_states(cache.gather(ids)).float().cpu())
    return cache.item_ids, torch.cat(out).numpy()
