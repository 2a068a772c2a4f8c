"""Build the encoder a checkpoint describes, and move its weights in and out (full state or trainable delta)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipelines.mllm.adapters import AdapterConfig, add_adapters
from pipelines.mllm.config import EncoderConfig
from pipelines.mllm.encoder import EncoderBase, build_encoder
from pipelines.mllm.side import SideConfig, build_towers_side_encoder
from pipelines.mllm.side_mllm import build_mllm_side_encoder, build_unaligned_encoder
from pipelines.mllm.towers import build_text_tower, build_vision_tower

MODES = ("full", "adapters", "side", "side-towers")
SIDE_MODES = ("side", "side-towers")  # frozen backbones, trained on a hidden-state cache


def build_for_mode(mode: str, encoder_config: EncoderConfig, adapter: Optional[AdapterConfig] = None,
                   side: Optional[SideConfig] = None, unaligned_seed: int = 0) -> EncoderBase:
    """A fresh encoder set up for ``mode``, pretrained backbones loaded.

    full | adapters: the MLLM (vision -> projector -> LM); side: the frozen MLLM + a side network over its
    states (side_mllm); side-towers: the towers run separately + a late-fusion side network (side.py);
    unaligned: the frozen MLLM's pooled output through a fixed seeded map.
    """
    if mode == "full":
        return build_encoder(encoder_config)
    if mode == "adapters":
        encoder = build_encoder(encoder_config)
        add_adapters(encoder, adapter or AdapterConfig())
        return encoder
    if mode == "side":
        return build_mllm_side_encoder(encoder_config, side or SideConfig())
    if mode == "unaligned":
        return build_unaligned_encoder(encoder_config, seed=unaligned_seed)
    if mode == "side-towers":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(encoder_config.seed)
            vision, text = build_vision_tower(encoder_config), build_text_tower(encoder_config)
        return build_towers_side_encoder(encoder_config, side or SideConfig(), vision, text)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES + ('unaligned',)}")


def saved_state(encoder: EncoderBase, mode: str) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: everything for ``full``, the trainable delta for frozen-backbone modes."""
    if mode == "full":
        return dict(encoder.state_dict())
    if mode in SIDE_MODES or mode == "unaligned":
        return {f"head.{k}": v for k, v in encoder.head.state_dict().items()}
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    return {k: v for k, v in encoder.state_dict().items() if k in names}


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
        raise ValueError(f"checkpoint {source}: weights do not fit a {mode} encoder built from its config "
                         f"(unknown {unknown[:5]}, missing {missing[:5]})")
    encoder.load_state_dict(state, strict=(mode == "full"))
