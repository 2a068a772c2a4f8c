"""Build the encoder a checkpoint describes, and move its weights in and out (full state or trainable delta)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipelines.encoder.adapters import AdapterConfig, add_adapters
from pipelines.encoder.base_map import BaseMap
from pipelines.encoder.config import EncoderConfig
from pipelines.encoder.encoder import EncoderBase, build_encoder
from pipelines.encoder.side import SideConfig, build_towers_side_encoder
from pipelines.encoder.side_mllm import build_mllm_side_encoder, build_unaligned_encoder
from pipelines.encoder.towers import build_text_tower, build_vision_tower

MODES = ("full", "adapters", "side", "side-towers")
SIDE_MODES = ("side", "side-towers")  # frozen backbones, trained on a hidden-state cache


def build_for_mode(mode: str, encoder_config: EncoderConfig, adapter: Optional[AdapterConfig] = None,
                   side: Optional[SideConfig] = None, unaligned_seed: int = 0,
                   base: Optional[BaseMap] = None) -> EncoderBase:
    """A fresh encoder set up for ``mode``, pretrained backbones loaded.

    full | adapters: the MLLM (vision -> projector -> LM); side: the frozen MLLM + a side network over its
    states (side_mllm); side-towers: the towers run separately + a late-fusion side network (side.py);
    unaligned: the frozen MLLM's pooled output through the base map. Every aligned mode is the unaligned
    embedding plus a residual that starts at zero: over the same ``base`` (default: the Gaussian map of
    ``unaligned_seed``) a fresh encoder of any mode embeds exactly like ``unaligned``.
    """
    if mode not in MODES + ("unaligned",):
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES + ('unaligned',)}")
    if mode == "unaligned":
        return build_unaligned_encoder(encoder_config, seed=unaligned_seed, base=base)
    if mode in ("full", "adapters"):
        encoder = build_encoder(encoder_config)
    elif mode == "side":
        encoder = build_mllm_side_encoder(encoder_config, side or SideConfig())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(encoder_config.seed)
            vision, text = build_vision_tower(encoder_config), build_text_tower(encoder_config)
        encoder = build_towers_side_encoder(encoder_config, side or SideConfig(), vision, text)
    if base is not None or unaligned_seed:  # the default base is the Gaussian map of seed 0
        width = base_map_of(encoder).projection.shape[0]
        set_base_map(encoder, base if base is not None else
                     BaseMap.gaussian(width, encoder_config.embed_dim, unaligned_seed))
    if mode == "adapters":
        add_adapters(encoder, adapter or AdapterConfig())
    return encoder


def set_base_map(encoder: nn.Module, base: BaseMap) -> None:
    """Give an encoder of any mode (ItemEncoder, SideEncoder, SideHeadOnly) the unaligned embedding's map
    ``base``: the residual's starting point. The shapes must agree (H, D)."""
    target = encoder.base if isinstance(getattr(encoder, "base", None), BaseMap) else encoder.head.base
    if target.projection.shape != base.projection.shape:
        raise ValueError(f"base map of shape {tuple(base.projection.shape)} does not fit the encoder's "
                         f"{tuple(target.projection.shape)} (state width x embed_dim)")
    target.mean.copy_(base.mean)
    target.projection.copy_(base.projection)


def base_map_of(encoder: nn.Module) -> BaseMap:
    """The encoder's base map (see ``set_base_map``)."""
    return encoder.base if isinstance(getattr(encoder, "base", None), BaseMap) else encoder.head.base


def saved_state(encoder: EncoderBase, mode: str) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: everything for ``full``, the trainable delta for frozen-backbone modes."""
    if mode == "full":
        return dict(encoder.state_dict())
    if mode in SIDE_MODES or mode == "unaligned":
        return {f"head.{k}": v for k, v in encoder.head.state_dict().items()}
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    # the base map is a buffer, not trained, but the residual means nothing without it
    return {k: v for k, v in encoder.state_dict().items() if k in names or k.startswith("base.")}


def build_for_meta(meta: dict) -> EncoderBase:
    mode = meta["mode"]
    adapter = AdapterConfig(**meta["adapter"]) if meta.get("adapter") else None
    side = SideConfig(**meta["side"]) if meta.get("side") else None
    return build_for_mode(mode, EncoderConfig.from_dict(meta["encoder"]), adapter, side,
                          unaligned_seed=int(meta.get("unaligned_seed", 0)))


def load_state(encoder: EncoderBase, state: dict[str, torch.Tensor], meta: dict, source: Path | str = "") -> None:
    """Load a saved state; a delta must cover exactly the trainable tensors (no unknown, none missing)."""
    mode = meta["mode"]
    expected = set(saved_state(encoder, mode))
    unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unknown or missing:
        legacy = any(k.endswith(("base.mean", "base.projection")) for k in missing)
        raise ValueError(f"checkpoint {source}: weights do not fit a {mode} encoder built from its config "
                         f"(unknown {unknown[:5]}, missing {missing[:5]})" +
                         ("; it predates the residual alignment over the unaligned embedding (issue 18): "
                          "retrain it" if legacy else ""))
    encoder.load_state_dict(state, strict=(mode == "full"))


def unaligned_encoder(encoder_config: EncoderConfig, seed: int = 0, checkpoint: Optional[str] = None) -> EncoderBase:
    """The unaligned encoder a job embeds with when it has no side cache: the Gaussian base map of ``seed``, or
    the base map of ``checkpoint`` (a warm start / reused encoder: its step 0 is over that map). Picklable with
    functools.partial (RunInference's encoder factory)."""
    from pipelines.encoder.base_map import base_map_from_checkpoint

    base = base_map_from_checkpoint(Path(checkpoint)) if checkpoint else None
    return build_for_mode("unaligned", encoder_config, unaligned_seed=seed, base=base)
