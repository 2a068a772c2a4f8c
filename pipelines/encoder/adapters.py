"""VIP5-style parameter-efficient tuning: frozen backbones, bottleneck adapters, trainable layer norms.

Adapters (down-projection by ``reduction``, GELU, up-projection, residual) sit after every attention block of the
language model and of a transformer vision tower. A CNN vision tower (efficientnet) has no attention blocks, so
it gets a 1x1-conv bottleneck adapter after each stage instead. The up-projection starts at zero: before any
training the adapted encoder computes exactly what the pretrained one does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipelines.encoder.encoder import ItemEncoder

ATTENTION_NAMES = ("attention", "self_attn", "attn")


@dataclass(frozen=True)
class AdapterConfig:
    """Args:
        reduction: bottleneck width = hidden // reduction (VIP5 uses 8).
        vision: also adapt the vision tower.
        train_norms: layer norms (LayerNorm / RMSNorm) of the frozen backbones stay trainable.
    """

    reduction: int = 8
    vision: bool = True
    train_norms: bool = True

    def __post_init__(self):
        if self.reduction < 1:
            raise ValueError(f"AdapterConfig.reduction must be >= 1, got {self.reduction}")

    def to_dict(self) -> dict:
        return asdict(self)


class Bottleneck(nn.Module):
    """x + up(gelu(down(x))) over the last dimension. (..., H) -> (..., H)."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(4, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class ConvBottleneck(nn.Module):
    """Channel bottleneck with 1x1 convs for CNN stages. (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.up = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class AdaptedAttention(nn.Module):
    """Runs an attention module, then an adapter on its main output (tuple outputs keep their extras)."""

    def __init__(self, inner: nn.Module, dim: int, reduction: int):
        super().__init__()
        self.inner = inner
        self.adapter = Bottleneck(dim, reduction)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + tuple(out[1:])
        return self.adapter(out)

    def __getattr__(self, name):
        # Callers sometimes read attributes of the attention module (e.g. MultiheadAttention.batch_first).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class AdaptedStage(nn.Module):
    """A CNN stage followed by a conv adapter."""

    def __init__(self, inner: nn.Module, channels: int, reduction: int):
        super().__init__()
        self.inner = inner
        self.adapter = ConvBottleneck(channels, reduction)

    def forward(self, x):
        return self.adapter(self.inner(x))


def _hidden_of(module: nn.Module, fallback: int) -> int:
    for attr in ("embed_dim", "hidden_size", "all_head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return fallback


def _wrap_attention(root: nn.Module, dim: int, reduction: int) -> int:
    """Wrap every attention child of every block in a ModuleList of ``root``; returns how many."""
    count = 0
    for module in list(root.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            for name in ATTENTION_NAMES:
                child = getattr(block, name, None) if name in block._modules else None
                if child is not None and not isinstance(child, AdaptedAttention):
                    setattr(block, name, AdaptedAttention(child, _hidden_of(child, dim), reduction))
                    count += 1
                    break
    return count


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))


def add_adapters(encoder: ItemEncoder, cfg: AdapterConfig) -> dict[str, int]:
    """Insert adapters in place and set requires_grad for adapter training.

    Trainable afterwards: adapters, (optionally) backbone layer norms, the projector and the head. Backbones are
    kept in eval mode (frozen BatchNorm statistics, no dropout), so their weights and buffers never change.

    Returns:
        {"text_adapters": n, "vision_adapters": n}
    """
    n_text = _wrap_attention(encoder.text.lm, encoder.text.hidden_size, cfg.reduction)
    if n_text == 0:
        raise ValueError(f"no attention blocks found in {type(encoder.text.lm).__name__} to adapt")
    n_vision = 0
    if cfg.vision and encoder.vision is not None:
        if encoder.vision.is_timm and hasattr(encoder.vision.visual.trunk, "blocks"):
            blocks = encoder.vision.visual.trunk.blocks
            n_vision = _wrap_attention(blocks, encoder.vision.width, cfg.reduction)
            if n_vision == 0:  # a CNN: adapt each stage's output channels
                for i, stage in enumerate(blocks):
                    channels = _stage_channels(stage)
                    blocks[i] = AdaptedStage(stage, channels, cfg.reduction)
                    n_vision += 1
        else:
            n_vision = _wrap_attention(encoder.vision.visual, encoder.vision.width, cfg.reduction)
    for p in encoder.parameters():
        p.requires_grad_(False)
    backbones = [m for m in (encoder.text, encoder.vision) if m is not None]
    for tower in backbones:
        for module in tower.modules():
            if isinstance(module, (Bottleneck, ConvBottleneck)):
                module.requires_grad_(True)
            elif cfg.train_norms and is_norm(module):
                module.requires_grad_(True)
    for module in (encoder.projector, encoder.head):
        if module is not None:
            module.requires_grad_(True)
    encoder.frozen = backbones
    encoder.train(encoder.training)
    return {"text_adapters": n_text, "vision_adapters": n_vision}


def _stage_channels(stage: nn.Module) -> int:
    """Output channels of a CNN stage: the last conv / BatchNorm inside it."""
    channels = None
    for module in stage.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
        elif isinstance(module, nn.Conv2d):
            channels = module.out_channels
    if channels is None:
        raise ValueError(f"cannot tell the output channels of stage {type(stage).__name__}")
    return channels
