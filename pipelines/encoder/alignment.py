"""Item alignment: contrastive training of the item encoder on behaviour-derived item pairs.

Four modes share one loop:
- ``full``: every weight of the MLLM trains;
- ``adapters`` (VIP5): frozen backbones, bottleneck adapters + layer norms + projector + head train;
- ``side`` (IISAN-Versa over the MLLM, the default): the frozen MLLM runs once over the catalog into a
  hidden-state cache (side_mllm.py); only the side network trains, on the cache;
- ``side-towers``: the earlier late-fusion side network over the towers run separately (side.py).

Each step takes a batch of pairs, encodes each distinct item once, and applies symmetric in-batch InfoNCE. False
negatives are masked against the whole known-positive graph of the training pairs (``mask="graph"``; ``"batch"``
masks only pairs inside the batch). The temperature is fixed or learned (``learn_temperature``). With validation
pairs (later in time than the training pairs, still before the protocol's train cut: ``split_valid_pairs``)
every epoch ends with a validation retrieval; training stops after ``patience`` epochs without improvement and
the best epoch's weights are restored. Checkpoints store their config and the optimizer state; a run restarted
with the same ``out_dir`` resumes where it stopped, and ``init_checkpoint`` warm-starts from a previous run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipelines.encoder.adapters import AdapterConfig, add_adapters
from pipelines.encoder.base_map import BASE_MAP_KINDS, BaseMap, GramStats, fit_base_map, pooled_top
from pipelines.encoder.cache import StateCache, build_cache
from pipelines.encoder.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from pipelines.encoder.config import EncoderConfig
from pipelines.encoder.distributed import Communicator, forward_module
from pipelines.encoder.encoder import EncoderBase, ItemEncoder, count_params
from pipelines.encoder.retrieval_eval import next_item_recall, pair_retrieval
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.losses import ContrastiveLoss, PositiveGraph, false_negative_mask
from pipelines.encoder.model_io import (MODES, SIDE_MODES, base_map_of, build_for_meta, build_for_mode, load_state,
                                     saved_state, set_base_map)
from pipelines.encoder.side import SideConfig, SideEncoder, SideHeadOnly, towers_side_network
from pipelines.encoder.side_mllm import MLLMStateExtractor, build_mllm_side_encoder, mllm_side_network
from ranker.loop import Evaluation, LoopConfig, LoopRun, LoopState, Selection, TrainTask, Updates, fit_loop

log = logging.getLogger(__name__)

DEFAULT_LR = {"full": 3e-4, "adapters": 1e-3, "side": 1e-3, "side-towers": 1e-3}
VALID_METRICS = ("recall@10", "mrr")


@dataclass(frozen=True)
class AlignConfig:
    """Alignment training options.

    Args:
        mode: full | adapters | side | side-towers.
        epochs: passes over the training pairs (an upper bound when validation pairs stop training early).
        batch_size: pairs per step (in-batch negatives come from the other pairs).
        lr: AdamW learning rate of new layers (projector, head, adapters, side network); None picks the mode's
            default (DEFAULT_LR).
        backbone_lr_scale: pretrained backbone weights (and their trainable norms) learn at lr * this.
        weight_decay: AdamW weight decay.
        temperature: InfoNCE temperature (the initial one with ``learn_temperature``).
        learn_temperature: learn the temperature (CLIP logit scale, clamped to [0.01, 1]).
        mask: "graph" masks every known positive of the training pairs, "batch" only pairs in the batch.
        seed: pair shuffling and dropout.
        max_steps: stop after this many optimizer steps in total (None: run all epochs).
        warmup_steps: linear learning-rate warm-up.
        grad_clip: max gradient norm (0 disables).
        use_pair_weights: weight each pair's loss by its ``weight`` column.
        sources: which pair sources to train on.
        patience: with a validation judge, stop after this many epochs without beating the best so far (step 0,
            the unaligned embedding, included) (None: never stop).
        restore_best: end with the weights of the best epoch that beats step 0 (False: the last epoch's when it
            beats step 0); step 0's when none does: the never-worse gate is not optional.
        valid_metric: "recall@10" or "mrr" of the judge: next-item retrieval on the protocol's validation window
            when ``valid_queries`` are given, else validation-pair retrieval.
        valid_max_items: full / adapters: validation ranks among the validation items plus a seeded sample of
            the catalog up to this many (side modes rank among the whole cached catalog).
        base_map: the unaligned embedding's map when the caller gives none and there is no init checkpoint
            (pipelines.encoder.base_map): "gaussian" (seeded by ``unaligned_seed``) or "pca" (fitted here on the
            items of the training pairs: a subset of the protocol's train portion).
        unaligned_seed: seed of the Gaussian base map.
        gate_z: an epoch beats step 0 only when its mean per-query gain in ``valid_metric`` minus ``gate_z``
            standard errors (paired over the same queries) is above 0; 0 accepts any gain (see ``_Selection``).
        log_every: log the running loss every this many steps.
        save_every: also checkpoint every this many steps (epoch ends always checkpoint); 0 disables.
        resume: continue from ``out_dir``'s latest checkpoint when one exists.
        keep_checkpoints: step folders kept.
        adapter / side: mode-specific architecture options.
        cache_batch_size: items per backbone pass when building the side cache.
        num_threads: torch threads (None leaves the default).
        device: "cpu" or "cuda".
        progress: tqdm bars on a terminal (else, and off a terminal, a log line at least every 30 s).
    """

    mode: str = "side"
    epochs: int = 1
    batch_size: int = 64
    lr: Optional[float] = None
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.1
    learn_temperature: bool = False
    mask: str = "graph"
    seed: int = 0
    max_steps: Optional[int] = None
    warmup_steps: int = 0
    grad_clip: float = 1.0
    use_pair_weights: bool = False
    sources: tuple = ("swing", "u2i")
    patience: Optional[int] = 2
    restore_best: bool = True
    valid_metric: str = "recall@10"
    valid_max_items: int = 4096
    base_map: str = "gaussian"
    unaligned_seed: int = 0
    gate_z: float = 1.645
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
        for name in ("epochs", "batch_size", "log_every", "keep_checkpoints", "cache_batch_size", "valid_max_items"):
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
        if self.mask not in ("graph", "batch"):
            raise ValueError(f"AlignConfig.mask must be graph|batch, got {self.mask!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"AlignConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"AlignConfig.patience must be >= 1 or None, got {self.patience}")
        if self.valid_metric not in VALID_METRICS:
            raise ValueError(f"AlignConfig.valid_metric must be one of {VALID_METRICS}, got {self.valid_metric!r}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("AlignConfig: warmup_steps, save_every, grad_clip, weight_decay must be >= 0")
        if not self.gate_z >= 0:
            raise ValueError(f"AlignConfig.gate_z must be >= 0, got {self.gate_z}")
        if self.base_map not in BASE_MAP_KINDS:
            raise ValueError(f"AlignConfig.base_map must be one of {BASE_MAP_KINDS}, got {self.base_map!r}")
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
    """What training produced.

    ``encoder``: the trained encoder (SideEncoder in side modes, or SideHeadOnly from ``train_side`` without
    backbones); ``cache``: the side-mode hidden-state cache (``embed_from_cache`` reads every embedding from it);
    ``valid``: per-epoch validation figures; ``best_epoch``: the epoch whose weights the encoder holds (None:
    step 0, the unaligned embedding, because no epoch beat it); ``alignment``: the gate's record (``_gate_record``:
    kept, judge, step 0 vs best figures).
    """

    encoder: nn.Module
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
    valid: list = field(default_factory=list)
    best_epoch: Optional[int] = None
    temperature: float = float("nan")
    stopped_early: bool = False
    alignment: dict = field(default_factory=dict)

    def summary(self) -> dict:
        first = float(np.mean(self.losses[: max(1, len(self.losses) // 10)])) if self.losses else float("nan")
        last = float(np.mean(self.losses[-max(1, len(self.losses) // 10):])) if self.losses else float("nan")
        return {"mode": self.mode, "steps": self.steps, "epochs": self.epochs_run, "loss_first": first,
                "loss_last": last, "seconds_per_epoch": self.seconds_per_epoch, "cache_seconds": self.cache_seconds,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "peak_memory_mb": self.peak_memory_mb, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "resumed_from_step": self.resumed_from_step, "valid": self.valid, "best_epoch": self.best_epoch,
                "temperature": self.temperature, "stopped_early": self.stopped_early, "alignment": self.alignment,
                **{f"pairs_{k}": v for k, v in self.pair_stats.items()}}


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


def split_valid_pairs(pairs: pd.DataFrame, valid_frac: float = 0.1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out the latest ``valid_frac`` of the training pairs by ``ts`` as the validation slice.

    Every pair mined from the protocol's train portion lies before its train cut, so the slice is later in time
    than what the model trains on and earlier than the test window. Pairs tied with the cut timestamp all go to
    validation (no timestamp is split); a validation pair that repeats a training pair (either order) is dropped,
    so validation measures unseen pairs.

    Returns:
        (train, valid) DataFrames with the input's columns.
    """
    if "ts" not in pairs.columns:
        raise ValueError(f"split_valid_pairs: pairs need a ts column; have {list(pairs.columns)}")
    if not 0.0 <= valid_frac < 1.0:
        raise ValueError(f"split_valid_pairs: valid_frac must be in [0, 1), got {valid_frac}")
    if valid_frac == 0 or len(pairs) < 2:
        return pairs.reset_index(drop=True), pairs.iloc[:0].reset_index(drop=True)
    ts = pairs["ts"].to_numpy(np.int64)
    cut = np.sort(ts)[int(math.floor((1 - valid_frac) * (len(ts) - 1)))]
    is_valid = ts >= cut
    if is_valid.all():  # every pair shares one timestamp: nothing is later than anything
        return pairs.reset_index(drop=True), pairs.iloc[:0].reset_index(drop=True)
    train, valid = pairs[~is_valid], pairs[is_valid]
    seen = set(zip(train["left"].to_numpy(), train["right"].to_numpy()))
    seen |= {(b, a) for a, b in seen}
    fresh = [(a, b) not in seen for a, b in zip(valid["left"].to_numpy(), valid["right"].to_numpy())]
    return train.reset_index(drop=True), valid[np.asarray(fresh, dtype=bool)].reset_index(drop=True)


def _prepare_encoder(encoder: Union[EncoderConfig, EncoderBase], cfg: AlignConfig) -> EncoderBase:
    if isinstance(encoder, EncoderConfig):
        return build_for_mode(cfg.mode, encoder, cfg.adapter, cfg.side)
    if cfg.mode == "side":
        if isinstance(encoder, SideEncoder) and isinstance(encoder.extractor, MLLMStateExtractor):
            return encoder
        if not isinstance(encoder, ItemEncoder):
            raise ValueError(f"mode side needs an ItemEncoder (the MLLM) or its SideEncoder, got "
                             f"{type(encoder).__name__}")
        return build_mllm_side_encoder(encoder.config, cfg.side, mllm=encoder)
    if cfg.mode == "side-towers":
        if isinstance(encoder, SideEncoder) and not isinstance(encoder.extractor, MLLMStateExtractor):
            return encoder
        from pipelines.encoder.side import build_towers_side_encoder
        return build_towers_side_encoder(encoder.config, cfg.side, encoder.vision, encoder.text)
    if not isinstance(encoder, ItemEncoder):
        raise ValueError(f"mode {cfg.mode} needs an ItemEncoder, got {type(encoder).__name__}")
    if cfg.mode == "adapters" and not any("adapter" in n for n, _ in encoder.named_modules()):
        add_adapters(encoder, cfg.adapter)
    return encoder


def _meta(config: EncoderConfig, cfg: AlignConfig, init_checkpoint: Optional[Path]) -> dict:
    return {"mode": cfg.mode, "encoder": config.to_dict(),
            "adapter": cfg.adapter.to_dict() if cfg.mode == "adapters" else None,
            "side": cfg.side.to_dict() if cfg.mode in SIDE_MODES else None,
            "align": cfg.to_dict(), "init_checkpoint": str(init_checkpoint) if init_checkpoint else None}


def _lr_at(step: int, cfg: AlignConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate


def _param_groups(model: nn.Module, loss: ContrastiveLoss, cfg: AlignConfig) -> list[dict]:
    """Backbone weights at lr * backbone_lr_scale, new layers (and adapters inside backbones) at lr; a learned
    temperature at lr without weight decay (decay would pull it towards 1)."""
    backbone, new = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = name.startswith(("text.", "vision.", "extractor.")) and ".adapter." not in name
        (backbone if in_backbone else new).append(p)
    groups = [{"params": new, "lr_scale": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_scale": cfg.backbone_lr_scale})
    if cfg.learn_temperature:
        groups.append({"params": [loss.log_scale], "lr_scale": 1.0, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _warm_start(cfg: AlignConfig, init_checkpoint: Path):
    meta, state, _, _ = read_checkpoint(Path(init_checkpoint))
    if meta["mode"] != cfg.mode:
        raise ValueError(f"init checkpoint {init_checkpoint} was trained in mode {meta['mode']!r}, not {cfg.mode!r}")
    # The architecture comes from the checkpoint, so record its adapter / side settings, not the defaults.
    cfg = dataclasses.replace(cfg, adapter=AdapterConfig(**meta["adapter"]) if meta.get("adapter") else cfg.adapter,
                              side=SideConfig(**meta["side"]) if meta.get("side") else cfg.side)
    log.info("warm start from %s (trained %s steps)", init_checkpoint, meta.get("step"))
    return cfg, meta, state


def train_alignment(encoder: Union[EncoderConfig, EncoderBase], dataset, pairs: pd.DataFrame, cfg: AlignConfig,
                    out_dir: Optional[Path] = None, init_checkpoint: Optional[Path] = None,
                    catalog: Optional[ItemCatalog] = None, valid_pairs: Optional[pd.DataFrame] = None,
                    comm: Optional[Communicator] = None, valid_queries: Optional[pd.DataFrame] = None,
                    base: Optional[BaseMap] = None) -> AlignResult:
    """Train the encoder on item pairs, starting at the unaligned embedding and never ending below it.

    Args:
        encoder: an EncoderConfig (built for ``cfg.mode``) or an encoder (an ItemEncoder is adapted / wrapped in
            a side network as the mode needs). Ignored when ``init_checkpoint`` is given.
        dataset: pipelines.data Dataset (``.items``, ``.image_root``).
        pairs: DataFrame with left, right (item ids), source, weight (PairSet.train).
        cfg: AlignConfig.
        out_dir: checkpoints (and the side cache under ``out_dir/side_cache``); None trains without saving.
        init_checkpoint: warm start from this checkpoint's weights (its mode must equal ``cfg.mode``); it is
            step 0, and its base map is kept (the residual was learned over it).
        catalog: reuse an ItemCatalog (decoded images) across calls.
        valid_pairs: validation pairs (``split_valid_pairs``): the judge when there are no ``valid_queries``,
            else a diagnostic.
        comm: data-parallel training (pipelines.encoder.distributed; None: one process). ``cfg.batch_size`` is the
            global batch; every rank encodes its slice.
        valid_queries: DataFrame query, target (``evaluate.next_item_queries`` of the protocol's validation
            window): the judge of early stopping and of the never-worse gate.
        base: the unaligned embedding's map (default: ``cfg.base_map``; see ``AlignConfig``).
    Returns:
        AlignResult (the encoder is left in eval mode). Side modes run the backbones exactly once per item (the
        cache build) and return the cache in ``result.cache``.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(out_dir) if out_dir is not None else None
    if init_checkpoint is not None:
        cfg, meta, init_state = _warm_start(cfg, init_checkpoint)
        model = build_for_meta(meta)
        load_state(model, init_state, meta, source=init_checkpoint)
    else:
        model = _prepare_encoder(encoder, cfg)
    device = torch.device(cfg.device)
    model.to(device)
    catalog = catalog or ItemCatalog.from_dataset(dataset, model.config)
    if cfg.mode in SIDE_MODES:
        cache = build_cache(model, catalog, catalog.item_ids, out_dir / "side_cache" if out_dir else None,
                            batch_size=cfg.cache_batch_size, progress=cfg.progress)
        return train_side(cache, pairs, valid_pairs, cfg, out_dir, init_checkpoint=init_checkpoint, model=model,
                          comm=comm, valid_queries=valid_queries, base=base)

    known = set(catalog.item_ids.tolist())
    if init_checkpoint is None:
        _set_base(model, cfg, base, lambda ids: _frozen_pooled(model, catalog, ids, device), pairs, known)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return model(model.collate(catalog.inputs(ids.tolist())).to(device))

    def candidates(required: np.ndarray) -> np.ndarray:
        rest = np.setdiff1d(catalog.item_ids, required)
        n_more = max(0, min(len(rest), cfg.valid_max_items - len(required)))
        extra = np.random.default_rng(cfg.seed).choice(rest, size=n_more, replace=False) if n_more else rest[:0]
        return np.sort(np.concatenate([required, extra]))

    def initial_state() -> dict:  # step 0 again, for a run resumed after its in-memory copy was lost
        if init_checkpoint is not None:
            return read_checkpoint(Path(init_checkpoint))[1]
        fresh = _prepare_encoder(model.config, cfg)
        set_base_map(fresh, base_map_of(model))
        return saved_state(fresh, cfg.mode)

    return _fit(model, model.config, embed, candidates, known, pairs, valid_pairs, cfg, out_dir, init_checkpoint,
                cache=None, cache_seconds=0.0, comm=comm, valid_queries=valid_queries, initial_state=initial_state)


def train_side(cache: StateCache, train_pairs: pd.DataFrame, valid_pairs: Optional[pd.DataFrame],
               cfg: AlignConfig, out_dir: Optional[Path] = None, init_checkpoint: Optional[Path] = None,
               model: Optional[nn.Module] = None, comm: Optional[Communicator] = None,
               valid_queries: Optional[pd.DataFrame] = None, base: Optional[BaseMap] = None) -> AlignResult:
    """Train a side network straight from a hidden-state cache (no backbone is built or run).

    Args:
        cache: from ``build_mllm_cache`` / ``build_cache`` (its manifest's layout and encoder config decide the
            side network's shape); held in memory while training (bytes_per_item x items).
        train_pairs / valid_pairs: DataFrames with left, right (item ids) [, source, ts, weight]; valid may be
            None or empty.
        cfg: AlignConfig with mode side (an ``mllm`` cache) or side-towers (a ``towers`` cache).
        out_dir: checkpoints (``load_encoder(out_dir)`` then rebuilds the backbones from the encoder config).
        init_checkpoint: warm start from a checkpoint of the same mode (step 0; its base map is kept).
        model: train this SideEncoder's head instead of a fresh SideHeadOnly (``train_alignment`` passes its own).
        comm: data-parallel training (``pipelines.encoder.distributed``); every rank holds the cache.
        valid_queries / base: as in ``train_alignment``.
    Returns:
        AlignResult; ``encoder`` is a SideEncoder when ``model`` was given, else a SideHeadOnly (forward_states).
    """
    if cfg.mode not in SIDE_MODES:
        raise ValueError(f"train_side: mode must be one of {SIDE_MODES}, got {cfg.mode!r}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    kind = cache.layout.get("kind")
    if (cfg.mode == "side") != (kind == "mllm"):
        raise ValueError(f"train_side: a {kind!r} cache cannot train mode {cfg.mode!r} (side needs an mllm cache, "
                         "side-towers a towers cache)")
    if cache.encoder_config is None:
        raise ValueError("train_side: the cache carries no encoder config (build it with build_mllm_cache)")
    encoder_config = EncoderConfig.from_dict(cache.encoder_config)
    if model is None:
        if init_checkpoint is not None:
            cfg, model = load_side_head(cache, init_checkpoint, cfg)
        else:
            model = _side_head(cache, encoder_config, cfg)
    elif init_checkpoint is not None:
        cfg = _warm_start(cfg, init_checkpoint)[0]
    device = torch.device(cfg.device)
    model.to(device)
    if cache.built:
        log.info("side cache: %d items, %.1f MB (%.0f bytes/item)", len(cache), cache.nbytes() / 2 ** 20,
                 cache.bytes_per_item())
    cache.to(device)
    known = set(cache.item_ids.tolist())
    if init_checkpoint is None:
        _set_base(model, cfg, base, lambda ids: pooled_top(cache.gather(ids.tolist())), train_pairs, known)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return model.forward_states(cache.gather(ids.tolist()))

    def initial_state() -> dict:  # step 0 again, for a run resumed after its in-memory copy was lost
        if init_checkpoint is not None:
            return read_checkpoint(Path(init_checkpoint))[1]
        fresh = _side_head(cache, encoder_config, cfg)
        set_base_map(fresh, base_map_of(model))
        return saved_state(fresh, "side")

    return _fit(model, encoder_config, embed, lambda _required: cache.item_ids, known,
                train_pairs, valid_pairs, cfg, out_dir, init_checkpoint, cache=cache,
                cache_seconds=_cache_seconds(cache), comm=comm, valid_queries=valid_queries,
                initial_state=initial_state)


def _side_head(cache: StateCache, encoder_config: EncoderConfig, cfg: AlignConfig) -> SideHeadOnly:
    build = mllm_side_network if cfg.mode == "side" else towers_side_network
    return SideHeadOnly(encoder_config, build(cache.layout, encoder_config, cfg.side))


def _set_base(model: nn.Module, cfg: AlignConfig, base: Optional[BaseMap], pooled_of: Callable,
              pairs: pd.DataFrame, known: set, chunk: int = 4096) -> None:
    """Give a fresh model its base map: ``base`` when given, else ``cfg.base_map`` (a PCA is fitted on the
    frozen pooled states ``pooled_of(ids (n,)) -> (n, H)`` of the training pairs' items, chunk by chunk)."""
    if base is None:
        width = base_map_of(model).projection.shape[0]
        dim = base_map_of(model).projection.shape[1]
        stats = None
        if cfg.base_map == "pca":
            ids = np.unique(np.concatenate([pairs["left"].to_numpy(np.int64), pairs["right"].to_numpy(np.int64)]))
            ids = ids[np.isin(ids, np.fromiter(known, np.int64, len(known)))]
            stats = GramStats.empty(width)
            for start in range(0, len(ids), chunk):
                stats = stats.merge(GramStats.of(pooled_of(ids[start:start + chunk]).float().cpu()))
        base = fit_base_map(cfg.base_map, width, dim, cfg.unaligned_seed, stats)
    set_base_map(model, base.to(next(iter(base_map_of(model).buffers())).device))


@torch.no_grad()
def _frozen_pooled(model: ItemEncoder, catalog: ItemCatalog, ids: np.ndarray, device, batch: int = 64
                   ) -> torch.Tensor:
    """The pooled LM output of the (still untrained) MLLM for ``ids``: (n, H). Adapters start as the identity,
    so this is the frozen MLLM's pooled state in adapters mode too."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(ids), batch):
        items = model.collate(catalog.inputs(ids[start:start + batch].tolist())).to(device)
        embeds, mask, _ = model.fused_inputs(items)
        out.append(model.text.pool(model.text(embeds, mask)[0], mask).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def load_side_head(cache: StateCache, checkpoint: Path, cfg: Optional[AlignConfig] = None
                   ) -> tuple[AlignConfig, SideHeadOnly]:
    """The side network of a side-mode checkpoint over ``cache`` (no backbone built): for warm starts and for
    embedding from the cache after a trainer run in another process.

    Returns:
        (cfg with the checkpoint's side settings, the SideHeadOnly with its weights, in eval mode).
    """
    meta = read_checkpoint(Path(checkpoint))[0]
    cfg = cfg or AlignConfig(mode=meta["mode"], progress=False)
    cfg, meta, state = _warm_start(cfg, checkpoint)
    model = _side_head(cache, EncoderConfig.from_dict(cache.encoder_config), cfg)
    load_state(model, state, meta, source=checkpoint)
    return cfg, model.eval()


def _cache_seconds(cache: StateCache) -> float:
    return float(cache.stats.get("seconds", 0.0)) if cache.built else 0.0


def _known_queries(queries: Optional[pd.DataFrame], known: set) -> Optional[pd.DataFrame]:
    """The validation-window queries whose query and target items the model embeds (None when there are none)."""
    if queries is None or not len(queries):
        return None
    missing = {"query", "target"} - set(queries.columns)
    if missing:
        raise ValueError(f"valid_queries: missing column(s) {sorted(missing)}; have {list(queries.columns)}")
    ok = queries["query"].isin(known) & queries["target"].isin(known)
    return queries[ok].reset_index(drop=True) if ok.any() else None


@torch.no_grad()
def _validate(model: nn.Module, embed: Callable, item_ids: np.ndarray, valid: Optional[pd.DataFrame],
              queries: Optional[pd.DataFrame], batch: int = 256) -> tuple[dict, np.ndarray]:
    """The judge's figures for the model as it is: next-item retrieval of the validation-window ``queries``
    when given (validation pairs then a diagnostic), else validation-pair retrieval, over ``item_ids``.

    Returns:
        (figures {"judge", "recall@10", "mrr", "n_queries"[, "pairs_recall@10", "pairs_mrr"]}, the judge's
        per-query ranks (n_queries,): the paired comparison with step 0 needs them).
    """
    was_training = model.training
    model.eval()
    emb = torch.cat([embed(torch.tensor(item_ids[s:s + batch])).float().cpu()
                     for s in range(0, len(item_ids), batch)]).numpy()
    model.train(was_training)
    # a diverged model must not look good: non-finite rows rank last for every query (NaN scores compare False)
    emb = np.where(np.isfinite(emb).all(axis=1, keepdims=True), emb, 0.0).astype(np.float32)
    pairs = pair_retrieval(item_ids, emb, valid, ks=(10,), return_ranks=True) if valid is not None else None
    if queries is None:
        return {"judge": "valid_pairs", "recall@10": pairs["recall@10"], "mrr": pairs["mrr"],
                "n_queries": pairs["n_queries"]}, pairs["ranks"]
    nxt = next_item_recall(item_ids, emb, queries, k=(10,), return_ranks=True)
    out = {"judge": "valid_next_item", "recall@10": nxt["recall@10"], "mrr": nxt["mrr"],
           "n_queries": nxt["n_queries"]}
    if pairs is not None:
        out.update({"pairs_recall@10": pairs["recall@10"], "pairs_mrr": pairs["mrr"]})
    return out, nxt["ranks"]


def _per_query(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Each query's share of the metric: a hit in the top 10 (recall@10) or its reciprocal rank (mrr)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return (ranks <= 10).astype(np.float64) if metric == "recall@10" else 1.0 / ranks


class _Selection(Selection):
    """Early stopping and the final choice (the never-worse gate), as ranker.loop's Selection.

    Every judged epoch is compared with step 0 (the unaligned embedding, or the warm start) on the same queries:
    ``vs_step0`` = the mean per-query difference of the metric, its standard error and the lower bound
    ``diff - gate_z * se``. An epoch *beats* step 0 only when that lower bound is above 0; the weights that
    ship are those of the beating epoch with the highest score, or step 0's when none beats it. Early stopping
    counts epochs without a higher score than the best so far (step 0's included: ``Selection.count``).

    Args:
        step0 / step0_ranks: step 0's figures and per-query ranks.
        history: the epochs a resumed run already judged (replayed; their weights are gone).
        step0_state: step 0's weights (None after a resume: ``initial_state()`` rebuilds them).
    """

    def __init__(self, cfg: AlignConfig, step0: dict, step0_ranks: np.ndarray, history: list,
                 step0_state: Optional[dict] = None, initial_state: Optional[Callable] = None):
        super().__init__(cfg.patience, best_score=step0[cfg.valid_metric])
        self.cfg, self.metric, self.z, self.restore_best = cfg, cfg.valid_metric, cfg.gate_z, cfg.restore_best
        self.step0, self.base = step0, _per_query(step0_ranks, cfg.valid_metric)
        self.step0_state, self.initial_state = step0_state, initial_state
        self.kept_epoch: Optional[int] = None  # None: step 0 ships
        self.kept_score, self.kept_state, self.last_epoch = -math.inf, None, None
        for figures in history:  # a resumed run replays the epochs it already judged (their weights are gone)
            self._judge(figures, None)

    def compare(self, figures: dict, ranks: np.ndarray) -> dict:
        """The paired comparison of one epoch with step 0 (added to its figures as ``vs_step0``)."""
        diff = _per_query(ranks, self.metric) - self.base
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
        mean = float(diff.mean()) if len(diff) else 0.0
        figures["vs_step0"] = {"diff": mean, "se": se, "lower": mean - self.z * se, "z": self.z}
        return figures

    def offer(self, epoch: int, evaluation: Evaluation, snapshot: Callable) -> bool:
        """Judge one epoch (``evaluation.detail``: its per-query ranks; ``snapshot()``: its weights); returns True
        when patience ran out."""
        stop = self._judge(self.compare(evaluation.row, evaluation.detail), snapshot)
        mode = self.cfg.mode
        log.info("align[%s] epoch %d validation %s", mode, epoch, evaluation.row)
        if stop:
            log.info("align[%s] early stop after epoch %d: best %s %.4f; shipping %s", mode, epoch, self.metric,
                     self.best_score, _epoch_name(self.kept_epoch))
        return stop

    def _judge(self, figures: dict, snapshot: Optional[Callable]) -> bool:
        score, self.last_epoch = figures[self.metric], figures["epoch"]
        beats = figures["vs_step0"]["lower"] > 0
        if beats and (score > self.kept_score or not self.restore_best):  # restore_best off: the last one
            self.kept_epoch, self.kept_score = figures["epoch"], score
            self.kept_state = snapshot() if snapshot else None
        elif not self.restore_best:  # the last epoch does not beat step 0: step 0 ships
            self.kept_epoch, self.kept_score, self.kept_state = None, -math.inf, None
        return self.count(figures["epoch"], score)

    def restore(self, task: TrainTask, state: LoopState) -> bool:
        """Load the weights that ship unless the model holds them already (no step since the last judged epoch, and
        that epoch is the one kept); returns whether it loaded any. Weights no judge saw (steps after the last
        judged epoch, e.g. ``max_steps`` ending mid-epoch) never ship."""
        mode, metric = self.cfg.mode, self.metric
        holds_last_judged = bool(state.history) and state.history[-1].get("step") == state.step
        if self.kept_epoch is not None and holds_last_judged and self.kept_epoch == self.last_epoch:
            return False
        if self.kept_epoch is not None and self.kept_state is not None:
            task.restore(self.kept_state)
            log.info("align[%s] restored the weights of epoch %d (validation %s %.4f)", mode, self.kept_epoch,
                     metric, self.kept_score)
            return True
        if self.kept_epoch is not None:  # it ran before a resume: its weights are gone, step 0 is safe
            log.warning("align[%s] epoch %d beat step 0 before the resume, its weights are gone: shipping step 0",
                        mode, self.kept_epoch)
            self.kept_epoch = None
        task.restore(self.step0_state if self.step0_state is not None else self.initial_state())
        log.warning("align[%s] no epoch beat step 0 on %s %s (step 0 %.4f): keeping step 0's weights", mode,
                    self.step0["judge"], metric, self.step0[metric])
        return True


def _gate_record(selection: Optional[_Selection], history: list, cfg: AlignConfig) -> dict:
    """``manifest.metrics.alignment``: whether the trained weights were kept, and the judge's figures of step 0
    and of the weights that ship (``vs_step0``: their paired difference from step 0)."""
    if selection is None:
        return {"kept": None, "judge": None, "reason": "no validation queries or pairs: nothing to compare with "
                                                       "step 0, the trained weights ship unjudged"}
    chosen = next((h for h in history if h["epoch"] == selection.kept_epoch), None)
    keys = ("recall@10", "mrr", "n_queries")
    judge = selection.step0["judge"]
    best = max(history, key=lambda h: h[cfg.valid_metric], default=None)
    return {"kept": selection.kept_epoch is not None, "judge": judge, "metric": cfg.valid_metric,
            "gate_z": cfg.gate_z, "best_epoch": selection.kept_epoch, "epochs_judged": len(history),
            judge: {"step0": {k: selection.step0[k] for k in keys},
                    "best": {k: (chosen or selection.step0)[k] for k in keys}},
            "vs_step0": (chosen or best or {}).get("vs_step0"),
            "best_trained_epoch": best["epoch"] if best else None}


@dataclass
class _Judge:
    """What validation ranks: the validation pairs and / or the validation window's next-item queries (the judge
    when given) among ``items``; None when there is nothing to judge with."""

    valid: Optional[pd.DataFrame]
    queries: Optional[pd.DataFrame]
    items: np.ndarray

    def __call__(self, model: nn.Module, embed: Callable) -> tuple[dict, np.ndarray]:
        return _validate(model, embed, self.items, self.valid, self.queries)


def _judge_for(valid_pairs: Optional[pd.DataFrame], valid_queries: Optional[pd.DataFrame], known: set,
               candidates: Callable, cfg: AlignConfig, pair_stats: dict) -> Optional[_Judge]:
    """The validation judge of a run (its pair counts added to ``pair_stats``), or None without validation data."""
    valid = None
    if valid_pairs is not None and len(valid_pairs):
        valid, vstats = prepare_pairs(valid_pairs, known, cfg.sources)
        pair_stats.update({f"valid_{k}": v for k, v in vstats.items()})
        valid = valid if len(valid) else None
    queries = _known_queries(valid_queries, known)
    pair_stats["valid_queries"] = int(len(queries)) if queries is not None else 0
    if valid is None and queries is None:
        return None
    required = [valid["left"].to_numpy(np.int64), valid["right"].to_numpy(np.int64)] if valid is not None else []
    if queries is not None:
        required += [queries["query"].to_numpy(np.int64), queries["target"].to_numpy(np.int64)]
    return _Judge(valid, queries, candidates(np.unique(np.concatenate(required))))


class _PairBatches:
    """Alignment's part of the training loop (ranker.loop): seeded batches of training pairs, the in-batch
    contrastive loss of one (data parallel: each rank encodes its slice, the slices are gathered), and the judge
    after every whole epoch."""

    def __init__(self, model: nn.Module, step_embed: nn.Module, embed: Callable, train_pairs: pd.DataFrame,
                 loss_fn: ContrastiveLoss, judge: Optional[_Judge], cfg: AlignConfig, comm: Communicator):
        self.model, self.step_embed, self.embed, self.loss_fn, self.judge = model, step_embed, embed, loss_fn, judge
        self.cfg, self.comm, self.device = cfg, comm, torch.device(cfg.device)
        self.n_pairs = len(train_pairs)
        self.n_batches = math.ceil(self.n_pairs / cfg.batch_size)
        self.left = torch.tensor(train_pairs["left"].to_numpy(np.int64))
        self.right = torch.tensor(train_pairs["right"].to_numpy(np.int64))
        self.weight = torch.from_numpy(train_pairs["weight"].to_numpy(np.float32)) \
            if cfg.use_pair_weights and "weight" in train_pairs.columns else None
        self.graph = PositiveGraph.from_pairs(train_pairs) if cfg.mask == "graph" else None

    def batches(self, epoch: int) -> list:
        """Row indices of each global batch (None for a batch too small to give every rank a row); the order is
        seeded by the epoch, and so are the dropout masks (each rank its own)."""
        cfg, comm = self.cfg, self.comm
        order = torch.from_numpy(np.random.default_rng(cfg.seed + epoch).permutation(self.n_pairs))
        torch.manual_seed(cfg.seed * 1000 + epoch + 7919 * comm.rank)
        sels = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(self.n_batches)]
        return [sel if len(sel) >= max(2, comm.world_size) else None for sel in sels]

    def loss(self, sel: torch.Tensor) -> torch.Tensor:
        comm, device = self.comm, self.device
        left, right = self.left[sel], self.right[sel]  # (n,) the global batch
        n = len(left)
        mine = comm.local_slice(n)
        # Encode each distinct item of this rank's slice once; pairs index into the unique embeddings.
        unique, inverse = torch.unique(torch.cat([left[mine], right[mine]]), return_inverse=True)
        emb = self.step_embed(unique)  # (U, D)
        m = mine.stop - mine.start
        emb_left, emb_right = comm.gather(emb[inverse[:m]], n), comm.gather(emb[inverse[m:]], n)  # (n, D)
        masks = self.graph.masks(left, right) if self.graph is not None else (false_negative_mask(left, right), None)
        masks = tuple(mk.to(device) if mk is not None else None for mk in masks)
        return self.loss_fn(emb_left, emb_right, masks, self.weight[sel].to(device) if self.weight is not None
                            else None)

    def evaluate(self, epoch: int, state: LoopState, complete: bool) -> Optional[Evaluation]:
        """The judge's figures of a whole epoch (an epoch ``max_steps`` cut short is not judged)."""
        if self.judge is None or not complete:
            return None
        judged, ranks = self.judge(self.model, self.embed)
        figures = {"epoch": epoch, "step": state.step, **judged,
                   "loss": float(np.mean(state.losses[-self.n_batches:])), "temperature": self.loss_fn.current()}
        return Evaluation(figures[self.cfg.valid_metric], figures, detail=ranks)

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.state_of().items()}

    def restore(self, snapshot: dict) -> None:
        self.model.load_state_dict(snapshot, strict=False)

    def state_of(self) -> dict:
        """The tensors a checkpoint holds (a side head's, or the mode's trainable delta)."""
        return saved_state(self.model, "side" if isinstance(self.model, SideHeadOnly) else self.cfg.mode)


class _AlignCheckpoints:
    """Rank 0 writes step folders (pipelines.encoder.checkpoint): the weights that ``state_of`` gives, the
    optimizer, and the loop's position with the judge's history and step 0's figures (``trainer_state.json``)."""

    def __init__(self, out_dir: Path, task: _PairBatches, optimizer, meta: dict, step0: Optional[dict]):
        self.out_dir, self.task, self.optimizer, self.meta, self.step0 = out_dir, task, optimizer, meta, step0

    def save(self, state: LoopState, selection: Optional[_Selection], event: str) -> Optional[Path]:
        if not self.task.comm.is_main:
            return None
        meta, position, stopped = self.meta, (state.epoch, state.batch), state.stopped
        if event == "final":  # the restored weights: training is over
            meta, position, stopped = {**meta, "best_epoch": selection.kept_epoch}, (state.epochs_run, 0), True
        loss_fn = self.task.loss_fn
        trainer = {"step": state.step, "epoch": position[0], "batch_in_epoch": position[1], "losses": state.losses,
                   "epoch_seconds": state.epoch_seconds, "valid": state.history, "stopped": stopped,
                   "step0": self.step0, "log_scale": float(loss_fn.log_scale.detach()),
                   "temperature": loss_fn.current()}
        return save_checkpoint(self.out_dir, state.step, {**meta, "step": state.step}, self.task.state_of(),
                               self.optimizer.state_dict(), trainer, keep=self.task.cfg.keep_checkpoints)


def _resume(ckpt: Path, model: nn.Module, optimizer, loss_fn: ContrastiveLoss, meta: dict
            ) -> tuple[LoopState, Optional[dict]]:
    """Load a checkpoint of this run into the model, optimizer and temperature; (where the loop continues, step 0's
    figures as the checkpoint recorded them)."""
    old_meta, state, opt_state, trainer = read_checkpoint(ckpt)
    if old_meta["mode"] != meta["mode"] or old_meta["encoder"] != meta["encoder"]:
        raise ValueError(f"{ckpt}: checkpoint is for mode {old_meta['mode']} / another encoder; use a new "
                         "--out or resume=False")
    load_state(model, state, old_meta, source=ckpt)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if "log_scale" in trainer:
        loss_fn.log_scale.data.fill_(float(trainer["log_scale"]))
    loop = LoopState(epoch=int(trainer["epoch"]), batch=int(trainer["batch_in_epoch"]), step=int(trainer["step"]),
                     losses=list(trainer.get("losses", [])), epoch_seconds=list(trainer.get("epoch_seconds", [])),
                     history=list(trainer.get("valid", [])), stopped=bool(trainer.get("stopped", False)))
    log.info("resuming from %s at step %d (epoch %d, batch %d)", ckpt, loop.step, loop.epoch, loop.batch)
    return loop, trainer.get("step0")


def _fit(model: nn.Module, encoder_config: EncoderConfig, embed: Callable, candidates: Callable, known: set,
         pairs: pd.DataFrame, valid_pairs: Optional[pd.DataFrame], cfg: AlignConfig, out_dir: Optional[Path],
         init_checkpoint: Optional[Path], cache: Optional[StateCache], cache_seconds: float,
         comm: Optional[Communicator] = None, valid_queries: Optional[pd.DataFrame] = None,
         initial_state: Optional[Callable] = None) -> AlignResult:
    """The training of every mode, in ranker.loop.fit_loop. ``embed(ids (U,)) -> (U, D)`` encodes items with
    gradient; ``candidates(required ids) -> ids`` the items validation ranks among; ``initial_state() -> state
    dict`` rebuilds step 0's weights (a resumed run's fallback).

    Step 0 is judged before the first step (``_validate``), every epoch after it, and the weights that ship are
    the best of all of them (``_Selection``): step 0 when no epoch beat it. With a distributed ``comm`` every
    rank runs this loop on the same global batches, encodes its slice of each and gathers the rest
    (pipelines.encoder.distributed); validation runs on every rank (same result, so the early stop agrees without a
    broadcast) and only rank 0 writes checkpoints."""
    comm = comm or Communicator()
    train_pairs, pair_stats = prepare_pairs(pairs, known, cfg.sources)
    if len(train_pairs) < 2:
        raise ValueError(f"alignment needs at least 2 usable training pairs, have {len(train_pairs)} ({pair_stats})")
    judge = _judge_for(valid_pairs, valid_queries, known, candidates, cfg, pair_stats)
    log.info("align %s: %d training pairs, %s validation pairs, %d validation-window queries (%s)", cfg.mode,
             len(train_pairs), len(judge.valid) if judge and judge.valid is not None else 0,
             pair_stats["valid_queries"], pair_stats)
    loss_fn = ContrastiveLoss(cfg.temperature, cfg.learn_temperature).to(torch.device(cfg.device))
    params = [p for p in model.parameters() if p.requires_grad] + \
        ([loss_fn.log_scale] if cfg.learn_temperature else [])
    optimizer = torch.optim.AdamW(_param_groups(model, loss_fn, cfg), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    task = _PairBatches(model, forward_module(model, embed, comm), embed, train_pairs, loss_fn, judge, cfg, comm)
    meta = _meta(encoder_config, cfg, init_checkpoint)
    ckpt = latest_checkpoint(out_dir) if (out_dir is not None and cfg.resume) else None
    state, step0 = _resume(ckpt, model, optimizer, loss_fn, meta) if ckpt is not None else (LoopState(), None)
    selection = None
    if judge is not None:  # step 0: the unaligned embedding (or the warm start), judged like any epoch
        step0_state, step0, step0_ranks = _judge_step0(model, task.state_of, initial_state, resumed=ckpt is not None,
                                                       judge=lambda: judge(model, embed))
        log.info("align[%s] step 0 (%s) validation %s", cfg.mode,
                 "warm start" if init_checkpoint else "unaligned", step0)
        selection = _Selection(cfg, step0, step0_ranks, state.history, step0_state, initial_state)
    total_steps = min(cfg.max_steps or cfg.epochs * task.n_batches, cfg.epochs * task.n_batches)
    loop = LoopConfig(epochs=cfg.epochs, max_steps=total_steps, save_every=cfg.save_every,
                      desc=f"align[{cfg.mode}]", total_steps=total_steps, progress=cfg.progress,
                      is_main=comm.is_main, log_every=cfg.log_every)
    writer = _AlignCheckpoints(out_dir, task, optimizer, meta, step0) if out_dir is not None else None
    model.train()
    run = fit_loop(task, loop, Updates([optimizer], params, cfg.grad_clip, lr_at=lambda step: _lr_at(step, cfg)),
                   selection, writer, state, checkpoint=ckpt)
    alignment = _gate_record(selection, state.history, cfg)
    log.info("align[%s] %s", cfg.mode, gate_line(alignment))
    return _align_result(model, cfg, run, task, selection, alignment, pair_stats, cache, cache_seconds)


def _align_result(model: nn.Module, cfg: AlignConfig, run: LoopRun, task: _PairBatches,
                  selection: Optional[_Selection], alignment: dict, pair_stats: dict, cache: Optional[StateCache],
                  cache_seconds: float) -> AlignResult:
    """The AlignResult of a finished run (the encoder is put in eval mode)."""
    state = run.state
    model.eval()
    trainable, total = count_params(model)
    if cache is not None and isinstance(model, SideEncoder):
        total = sum(p.numel() for p in model.parameters())
    # A partial epoch (max_steps) is scaled to a full one so modes compare per epoch.
    per_epoch = _seconds_per_epoch(state.epoch_seconds, state.steps_this_run, task.n_batches)
    return AlignResult(encoder=model, mode=cfg.mode, steps=state.step, epochs_run=state.epochs_run,
                       losses=state.losses, seconds_per_epoch=per_epoch, cache_seconds=cache_seconds,
                       trainable_params=trainable, total_params=total, peak_memory_mb=peak_memory_mb(cfg.device),
                       checkpoint=run.checkpoint, pair_stats=pair_stats, cache=cache,
                       resumed_from_step=state.resumed_from, valid=state.history,
                       best_epoch=selection.kept_epoch if selection else None, temperature=task.loss_fn.current(),
                       stopped_early=state.stopped, alignment=alignment)


def _judge_step0(model: nn.Module, state_of: Callable, initial_state: Optional[Callable], resumed: bool,
                 judge: Callable) -> tuple[Optional[dict], dict, np.ndarray]:
    """Step 0's weights (a copy, or None after a resume: ``initial_state`` rebuilds them when needed), figures and
    per-query ranks. A resumed run judges step 0's rebuilt weights, then goes on with the checkpoint's."""
    current = {k: v.detach().clone() for k, v in state_of().items()}
    if resumed:
        model.load_state_dict(initial_state(), strict=False)
    figures, ranks = judge()
    if resumed:
        model.load_state_dict(current, strict=False)
    return (None if resumed else current), {"epoch": None, **figures}, ranks


def _epoch_name(epoch: Optional[int]) -> str:
    return "step 0" if epoch is None else f"epoch {epoch}"


def gate_line(alignment: dict) -> str:
    """One line for logs and the job summary: which weights ship, and the judge's figures behind it."""
    if alignment.get("kept") is None:
        return f"alignment unjudged: {alignment.get('reason', 'no gate record')}"
    metric = alignment["metric"]
    s0, best = alignment[alignment["judge"]]["step0"], alignment[alignment["judge"]]["best"]
    if alignment["kept"]:
        return (f"alignment kept (epoch {alignment['best_epoch']}): {alignment['judge']} {metric} "
                f"{best[metric]:.4f} vs step 0 {s0[metric]:.4f} ({s0['n_queries']} queries)")
    return (f"alignment NOT kept: no epoch beat step 0 on {alignment['judge']} {metric} (step 0 {s0[metric]:.4f}, "
            f"{alignment['epochs_judged']} epochs judged, {s0['n_queries']} queries); step 0's weights ship")


def _seconds_per_epoch(epoch_seconds: list, steps_this_run: int, n_batches: int) -> float:
    if not epoch_seconds or steps_this_run <= 0:
        return float("nan")
    run_seconds = sum(epoch_seconds)
    return run_seconds / steps_this_run * n_batches


@torch.no_grad()
def embed_with_cache(encoder, cache: StateCache, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Embed every cached item through a side head (SideEncoder / SideHeadOnly / any ``forward_states``)."""
    encoder.eval()
    ids_out, out = [], []
    for ids, states in cache.iter_shards():
        for start in range(0, len(ids), batch_size):
            part = {k: v[start:start + batch_size] for k, v in states.items()}
            out.append(encoder.forward_states(part).float().cpu())
        ids_out.append(ids)
    return np.concatenate(ids_out), torch.cat(out).numpy()
