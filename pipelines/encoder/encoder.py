"""The MLLM item encoder: vision feature map -> projected image tokens -> LM over [image; text] -> one embedding.

LLaVA-style fusion: the vision tower's final feature map is pooled to a small grid, each cell is projected into
the LM's embedding space, and the LM reads ``[image tokens; text tokens]`` through ``inputs_embeds``. The LM's
last hidden states are pooled (mean for encoder LMs, last valid token for decoder LMs), mapped to ``embed_dim``
by the fixed base map plus a learned residual that starts at zero, and L2-normalised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.encoder.base_map import BaseMap
from pipelines.encoder.config import EncoderConfig
from pipelines.encoder.items import ItemInput, preprocess_image
from pipelines.encoder.towers import TextTower, VisionTower, build_text_tower, build_vision_tower


@dataclass
class ItemBatch:
    """A collated batch.

    item_ids (B,) int64; pixels (B, 3, S, S) float32 (zeros where has_image is False); has_image (B,) bool;
    input_ids (B, T) int64; text_mask (B, T) int64; has_text (B,) bool.
    """

    item_ids: torch.Tensor
    pixels: torch.Tensor
    has_image: torch.Tensor
    input_ids: torch.Tensor
    text_mask: torch.Tensor
    has_text: torch.Tensor

    def to(self, device) -> "ItemBatch":
        return ItemBatch(*(t.to(device) for t in (self.item_ids, self.pixels, self.has_image, self.input_ids,
                                                  self.text_mask, self.has_text)))

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


class EncoderBase(nn.Module):
    """Shared by every encoder variant: config, collate, and keeping frozen parts in eval mode.

    Subclasses set ``self.vision`` (VisionTower | None) and ``self.text`` (TextTower) and implement forward.
    """

    config: EncoderConfig
    vision: Optional[VisionTower]
    text: TextTower

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.frozen: list[nn.Module] = []  # modules kept in eval mode (frozen BatchNorm stats, no dropout)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def collate(self, items: Sequence[ItemInput]) -> ItemBatch:
        """Tokenise texts and stack images; missing modalities are flagged, never an error."""
        cfg = self.config
        if not items:
            raise ValueError("collate: empty batch")
        texts = [it.full_text() for it in items]
        ids, mask = self.text.tokenizer(texts, cfg.max_text_tokens)
        pixels = torch.zeros(len(items), 3, cfg.image_size, cfg.image_size)
        has_image = torch.zeros(len(items), dtype=torch.bool)
        if self.vision is not None:
            for i, it in enumerate(items):
                if it.image is None:
                    continue
                img = it.image if isinstance(it.image, torch.Tensor) else preprocess_image(
                    it.image, cfg.image_size, cfg.image_mean, cfg.image_std)
                if img.shape != pixels.shape[1:]:
                    raise ValueError(f"item {it.item_id}: image tensor {tuple(img.shape)}, encoder expects "
                                     f"{tuple(pixels.shape[1:])}")
                pixels[i], has_image[i] = img, True
        has_text = torch.tensor([bool(t) for t in texts])
        item_ids = torch.tensor([int(it.item_id) for it in items], dtype=torch.long)
        return ItemBatch(item_ids, pixels, has_image, ids, mask, has_text)

    def device(self) -> torch.device:
        return next(self.parameters()).device


def residual_head(width: int, embed_dim: int) -> nn.Sequential:
    """LayerNorm + Linear(width, D) whose weight and bias start at zero: the learned residual of every aligned
    encoder outputs exactly 0 before training (VIP5 / LoRA style zero-initialised up-projection)."""
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
    nn.init.zeros_(head[1].weight)
    nn.init.zeros_(head[1].bias)
    return head


def residual_output(base: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``normalize(base + residual)``: the one formula of the unaligned (residual None) and every aligned
    embedding, so a zero residual gives the unaligned embedding bit for bit. (B, D), (B, D) -> (B, D)."""
    return F.normalize(base if residual is None else base + residual, dim=-1)


class ItemEncoder(EncoderBase):
    """Vision tower + projector + language model + base map + residual head.

    ``forward(batch) -> (B, D)`` L2-normalised: ``normalize(base(pooled) + head(pooled))``. ``base`` is the
    unaligned embedding's fixed map (pipelines.encoder.base_map; a buffer, saved with the weights); ``head`` starts
    at zero, so a freshly built encoder computes exactly the unaligned embedding and full / adapters alignment
    starts there.
    """

    def __init__(self, config: EncoderConfig, vision: Optional[VisionTower], text: TextTower):
        super().__init__(config)
        self.vision, self.text = vision, text
        hidden = text.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if vision is not None:
                if config.projector == "mlp":
                    self.projector = nn.Sequential(nn.Linear(vision.width, hidden), nn.GELU(),
                                                   nn.Linear(hidden, hidden))
                else:
                    self.projector = nn.Linear(vision.width, hidden)
            else:
                self.projector = None
            self.head = residual_head(hidden, config.embed_dim)
        # the default base map (Gaussian, seed 0) is build_for_mode("unaligned", config)'s; training sets its own
        self.base = BaseMap.gaussian(hidden, config.embed_dim, 0)

    def fused_inputs(self, batch: ItemBatch, vision_states: bool = False):
        """The LM's input sequence ``[image tokens; text tokens]`` (one vision pass).

        Args:
            batch: from ``collate``.
            vision_states: also return the vision tower's per-layer pooled states (from the same vision pass).
        Returns:
            embeds (B, G + T, H), mask (B, G + T) int (1 = attend; G = image_grid**2, 0 without a vision tower),
            and with ``vision_states`` a list of (B, C_l) per vision layer (zeros for items without an image),
            else None.
        """
        text_embeds = self.text.embed_tokens(batch.input_ids)  # (B, T, H)
        mask = batch.text_mask.clone()  # (B, T)
        layers = None
        if self.vision is not None:
            n_img = self.config.image_grid ** 2
            img_tokens = text_embeds.new_zeros(len(batch), n_img, text_embeds.shape[-1])  # (B, G, H)
            if vision_states:
                layers = [text_embeds.new_zeros(len(batch), w) for w in self.vision.layer_widths]
            sel = batch.has_image.nonzero(as_tuple=True)[0]
            if len(sel):
                tokens, per_layer = self.vision(batch.pixels[sel], self.config.image_grid)  # (b, G, C)
                img_tokens = img_tokens.index_copy(0, sel, self.projector(tokens).to(img_tokens.dtype))
                if vision_states:
                    layers = [z.index_copy(0, sel, v.to(z.dtype)) for z, v in zip(layers, per_layer)]
            img_mask = batch.has_image.to(mask.dtype).unsqueeze(1).expand(-1, n_img)  # (B, G)
            embeds = torch.cat([img_tokens, text_embeds], dim=1)  # (B, G + T, H)
            mask = torch.cat([img_mask, mask], dim=1)
        else:
            embeds = text_embeds
        empty = mask.sum(1) == 0  # an item with neither modality still needs one attended position
        if empty.any():
            mask = mask.clone()
            mask[empty, -batch.text_mask.shape[1]] = 1
        return embeds, mask, layers

    @property
    def n_image_tokens(self) -> int:
        return self.config.image_grid ** 2 if self.vision is not None else 0

    def forward(self, batch: ItemBatch) -> torch.Tensor:
        """Args:
            batch: from ``collate``.
        Returns:
            (B, D) float32, unit L2 norm.
        """
        embeds, mask, _ = self.fused_inputs(batch)
        hidden, _ = self.text(embeds, mask)  # (B, G + T, H)
        pooled = self.text.pool(hidden, mask)  # (B, H)
        return residual_output(self.base(pooled), self.head(pooled))


def build_encoder(config: EncoderConfig) -> ItemEncoder:
    """Build the MLLM encoder described by ``config`` (pretrained backbones when the config names weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # tiny backbones are random: make them reproducible
        vision = build_vision_tower(config)
        text = build_text_tower(config)
    return ItemEncoder(config, vision, text)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
