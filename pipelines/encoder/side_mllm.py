"""``side`` mode: IISAN-Versa over the MLLM's own hidden states (an asymmetric multimodal foundation model).

The frozen MLLM runs once per item: vision tower -> projected image tokens -> language model over
``[image tokens; text tokens]``. ``MLLMStateExtractor`` keeps, after group layer-dropping (every
``layer_stride``-th layer from the top, the top layer always kept):

* the vision tower's kept layers, spatially mean-pooled: ``vision.{k}`` (B, C_k);
* the LM's kept layers over the fused sequence, pooled three ways per layer: ``lm.pool`` (B, L, H) the LM's own
  pooling (mean, or the last valid token for decoder LMs), ``lm.text`` (B, L, H) mean over the text positions,
  ``lm.image`` (B, L, H) mean over the image-token positions (zeros where the modality is absent);
* with ``SideConfig.token_states`` also the token-level states ``lm.tokens`` (B, L, G + T, H) and their mask
  ``lm.mask`` (B, G + T).

Pooled is the default because memory says so: bytes per item are ``4 * (3 * L * H + sum(C_k))`` pooled against
``4 * L * (G + T) * H`` more for tokens (``cache_bytes_per_item``): MiniLM + efficientnet-lite0 with stride 2
(L = 3, H = 384, kept vision widths 24 + 112 + 1280, G + T = 9 + 32) is 19.5 KB pooled vs 209 KB with tokens per
item, 80 MB vs 0.86 GB for the 4,116-item photo catalog and 19.5 GB vs 209 GB for a million items. Token-level states pay only where the side
network must weigh individual tokens (long texts, many image tokens); on short titles the three segment pools
carry what matters. The positions of the image tokens and of the text are known, so the segment pools keep the
modality split that a whole-sequence pool would lose.

``MLLMSideNetwork``: an intra-modal SAN over the vision layers and an inter-modal SAN over the LM layers (each LM
layer's ``[pool; text; image]`` mapped to the side width), the mismatched widths (C_k, 3H) aligned to the side
width by per-layer LayerNorm + Linear maps, fused by a learned per-item gate.

The network is a residual over the unaligned embedding (issue 18): ``normalize(base(pooled) + head(fused))`` with
the head's output layer initialised to zero, so training starts exactly at the frozen MLLM's embedding.

From the same states (no second backbone pass): ``UnalignedHead`` (the frozen MLLM's pooled output, top layer,
through the base map to D: pipelines.encoder.base_map) and ``ModalityHead`` (text-only: the top LM layer's
text-position mean; image-only: the top vision layer; each through its own fixed seeded map). The text positions of the fused
sequence have attended to the image tokens (bidirectional LM) or follow them (decoder LM): the text embedding
is the LM's reading of the text in the item's context; for items without an image it is exactly text-only.

The projector of a frozen MLLM is the encoder's seeded projector (no pretrained LLaVA projector exists offline):
the same config always gives the same projector, so caches, checkpoints and the unaligned baseline agree.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.encoder.base_map import BaseMap, pooled_top
from pipelines.encoder.config import EncoderConfig
from pipelines.encoder.encoder import ItemBatch, ItemEncoder, build_encoder, residual_head, residual_output
from pipelines.encoder.side import SideBranch, SideConfig, SideEncoder, States, select_layers

TOP_ONLY = 1 << 30  # a layer stride that keeps only the top layer


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H); rows without a valid position give zeros."""
    mask = mask.to(hidden.dtype)
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


class MLLMStateExtractor(nn.Module):
    """The frozen MLLM -> the states the side network, the unaligned baseline and the modality heads read.

    Args:
        mllm: an ItemEncoder (its vision tower, projector and LM are used; its head is not).
        layer_stride: group layer-dropping stride (``select_layers``).
        token_states: also return token-level LM states (see the module docstring for the memory cost).
    """

    def __init__(self, mllm: ItemEncoder, layer_stride: int, token_states: bool = False):
        super().__init__()
        self.config = mllm.config
        self.mllm = mllm
        self.vision, self.text = mllm.vision, mllm.text
        self.lm_layers = select_layers(self.text.num_layers, layer_stride)
        self.vision_layers = select_layers(len(self.vision.layer_widths), layer_stride) if self.vision else []
        self.vision_widths = [self.vision.layer_widths[i] for i in self.vision_layers] if self.vision else []
        self.n_image = mllm.n_image_tokens
        self.token_states = token_states
        for p in self.parameters():
            p.requires_grad_(False)

    def layout(self) -> dict:
        """What the cached states look like (stored in the cache manifest; the side network is built from it)."""
        return {"kind": "mllm", "lm_width": self.text.hidden_size, "lm_layers": self.lm_layers,
                "vision_layers": self.vision_layers, "vision_widths": self.vision_widths,
                "n_image_tokens": self.n_image, "max_text_tokens": self.config.max_text_tokens,
                "pooling": self.text.pooling, "token_states": self.token_states}

    @torch.no_grad()
    def forward(self, batch: ItemBatch) -> States:
        """One backbone pass. Returns the States dict of the module docstring."""
        embeds, mask, vlayers = self.mllm.fused_inputs(batch, vision_states=self.vision is not None)
        _, hidden = self.text(embeds, mask, hidden_states=True)  # L+1 x (B, G + T, H)
        g = self.n_image
        text_present = batch.has_text.to(embeds.dtype)  # (B,)
        states: States = {"text_present": text_present}
        kept = [hidden[i + 1] for i in self.lm_layers]  # L x (B, G + T, H)
        states["lm.pool"] = torch.stack([self.text.pool(h, mask) for h in kept], dim=1)  # (B, L, H)
        states["lm.text"] = torch.stack([_masked_mean(h[:, g:], mask[:, g:]) for h in kept], 1) \
            * text_present[:, None, None]  # (B, L, H)
        if self.vision is not None:
            vision_present = batch.has_image.to(embeds.dtype)
            states["lm.image"] = torch.stack([_masked_mean(h[:, :g], mask[:, :g]) for h in kept], 1) \
                * vision_present[:, None, None]  # (B, L, H)
            for k, i in enumerate(self.vision_layers):
                states[f"vision.{k}"] = vlayers[i]  # (B, C_k), zeros without an image
            states["vision_present"] = vision_present
        if self.token_states:
            width = g + self.config.max_text_tokens
            tokens = torch.stack(kept, dim=1)  # (B, L, G + T, H)
            pad = width - tokens.shape[2]
            states["lm.tokens"] = F.pad(tokens, (0, 0, 0, pad))  # (B, L, G + Tmax, H)
            states["lm.mask"] = F.pad(mask.to(embeds.dtype), (0, pad))  # (B, G + Tmax)
        return states


def cache_bytes_per_item(layout: dict) -> dict:
    """float32 bytes one item takes in a ``side`` cache: {"pooled": n, "tokens": n (extra with token_states)}."""
    n_layers, width = len(layout["lm_layers"]), layout["lm_width"]
    segments = 3 if layout["vision_widths"] else 2
    pooled = 4 * (segments * n_layers * width + sum(layout["vision_widths"]) + 2)
    tokens = 4 * n_layers * (layout["n_image_tokens"] + layout["max_text_tokens"]) * width \
        + 4 * (layout["n_image_tokens"] + layout["max_text_tokens"])
    return {"pooled": pooled, "tokens": tokens}


class AttentionPool(nn.Module):
    """A learned query attends over the tokens of one layer. (B, T, H), (B, T) -> (B, H)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.zeros(width))  # zero query: starts as the masked mean

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (self.norm(tokens) @ self.query) / tokens.shape[-1] ** 0.5  # (B, T)
        scores = scores.masked_fill(mask <= 0, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # an all-masked row gives zeros
        return (weights.unsqueeze(-1) * tokens).sum(1)


class MLLMSideNetwork(nn.Module):
    """The unaligned embedding plus a learned residual: intra-modal SAN over vision layers + inter-modal SAN over
    the LM's fused layers + gated fusion + a head whose output layer starts at zero.

    ``forward = normalize(base(pooled top state) + head(fused))``: at step 0 the head outputs exactly zero, so the
    aligned embedding equals the unaligned one (``UnalignedHead`` over the same ``base``) bit for bit, and training
    moves it away from the frozen MLLM only as far as the pairs pull.

    Args:
        layout: ``MLLMStateExtractor.layout()`` (also in the cache manifest).
        embed_dim: output width D.
        cfg: SideConfig (width, reduction, dropout).
        base: the unaligned embedding's map (pipelines.encoder.base_map; saved with the network's weights).
    forward(states) -> (B, D) L2-normalised.
    """

    def __init__(self, layout: dict, embed_dim: int, cfg: SideConfig, base: BaseMap):
        super().__init__()
        self.base = base
        d, h = cfg.width, layout["lm_width"]
        n_lm = len(layout["lm_layers"])
        self.has_vision = bool(layout["vision_widths"])
        self.token_states = bool(layout.get("token_states"))
        segments = 3 if self.has_vision else 2
        if self.token_states:
            self.token_pools = nn.ModuleList(AttentionPool(h) for _ in range(n_lm))
        # linear maps that align the LM width (3 pooled segments) and each vision width to the side width d
        self.lm_maps = nn.ModuleList(nn.Sequential(nn.LayerNorm(segments * h), nn.Linear(segments * h, d))
                                     for _ in range(n_lm))
        self.inter_san = SideBranch(n_lm, d, cfg.reduction, cfg.dropout)
        if self.has_vision:
            self.vision_maps = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d))
                                             for w in layout["vision_widths"])
            self.vision_san = SideBranch(len(layout["vision_widths"]), d, cfg.reduction, cfg.dropout)
            self.gate = nn.Linear(2 * d, 2)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.head = residual_head(d, embed_dim)

    def forward(self, states: States) -> torch.Tensor:
        pooled = states["lm.pool"]  # (B, L, H)
        inter_in = []
        for i, m in enumerate(self.lm_maps):
            first = pooled[:, i]
            if self.token_states:
                first = self.token_pools[i](states["lm.tokens"][:, i], states["lm.mask"])  # (B, H)
            parts = [first, states["lm.text"][:, i]] + ([states["lm.image"][:, i]] if self.has_vision else [])
            inter_in.append(m(torch.cat(parts, dim=-1)))  # (B, d)
        inter = self.inter_san(inter_in)  # (B, d)
        if not self.has_vision:
            return residual_output(self.base(pooled_top(states)), self.head(inter))
        vision_present = states["vision_present"][:, None]  # (B, 1)
        vision = self.vision_san([m(states[f"vision.{k}"]) * vision_present for k, m in enumerate(self.vision_maps)])
        logits = self.gate(torch.cat([inter, vision], dim=-1))  # (B, 2)
        # no image: all weight on the inter-modal branch (the vision branch read zeros)
        logits = torch.stack([logits[:, 0], logits[:, 1].masked_fill(vision_present[:, 0] <= 0, float("-inf"))], 1)
        w = torch.softmax(logits, dim=1)
        fused = w[:, :1] * inter + w[:, 1:] * vision  # (B, d)
        return residual_output(self.base(pooled_top(states)), self.head(fused))


class UnalignedHead(nn.Module):
    """The unaligned baseline: the frozen MLLM's pooled output (top LM layer, ``lm.pool``) through the base map
    (pipelines.encoder.base_map: a seeded Gaussian or the train items' PCA). States -> (B, D); equals every aligned
    network over the same ``base`` at step 0 (``residual_output`` with a zero residual)."""

    def __init__(self, base: BaseMap):
        super().__init__()
        self.base = base

    def forward(self, states: States) -> torch.Tensor:
        return residual_output(self.base(pooled_top(states)), None)


class ModalityHead(nn.Module):
    """A per-modality frozen embedding for distillation: ``text`` (top LM layer's text-position mean) or
    ``image`` (top vision layer, spatial mean), reduced to D by its own fixed seeded map; zeros where the item
    lacks the modality. States -> (B, D)."""

    def __init__(self, modality: str, layout: dict, embed_dim: int, seed: int):
        super().__init__()
        if modality not in ("text", "image"):
            raise ValueError(f"ModalityHead: modality must be text|image, got {modality!r}")
        if modality == "image" and not layout["vision_widths"]:
            raise ValueError("ModalityHead: an image embedding needs an encoder with a vision tower")
        self.modality = modality
        self.top_vision = len(layout["vision_widths"]) - 1
        width = layout["lm_width"] if modality == "text" else layout["vision_widths"][-1]
        # distinct seeds per modality: the maps are independent draws
        self.map = BaseMap.gaussian(width, embed_dim, seed + (1 if modality == "text" else 2))

    def forward(self, states: States) -> torch.Tensor:
        if self.modality == "text":
            return self.map(states["lm.text"][:, -1]) * states["text_present"][:, None]
        return self.map(states[f"vision.{self.top_vision}"]) * states["vision_present"][:, None]


def mllm_side_network(layout: dict, config: EncoderConfig, side: SideConfig,
                      base: Optional[BaseMap] = None) -> MLLMSideNetwork:
    """The side network for an ``mllm`` cache layout, seeded by the encoder config; ``base`` defaults to the
    Gaussian map of seed 0 (``build_for_mode("unaligned", config)``'s; a checkpoint's own base replaces it on
    load)."""
    base = base if base is not None else BaseMap.gaussian(layout["lm_width"], config.embed_dim, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MLLMSideNetwork(layout, config.embed_dim, side, base)


def build_mllm_side_encoder(config: EncoderConfig, side: SideConfig,
                            mllm: Optional[ItemEncoder] = None, base: Optional[BaseMap] = None) -> SideEncoder:
    """``side`` mode: the frozen MLLM (built from ``config`` unless given) + the side network over its states."""
    extractor = MLLMStateExtractor(mllm if mllm is not None else build_encoder(config), side.layer_stride,
                                   side.token_states)
    return SideEncoder(config, extractor, mllm_side_network(extractor.layout(), config, side, base))


def build_unaligned_encoder(config: EncoderConfig, seed: int = 0, mllm: Optional[ItemEncoder] = None,
                            base: Optional[BaseMap] = None) -> SideEncoder:
    """The frozen MLLM's pooled output through the base map (``base``, else the Gaussian map of ``seed``; no
    behaviour training); equals the ``unaligned`` embedding ``embed_from_cache`` reads from a side cache of the
    same encoder config, and every aligned encoder over the same base at step 0."""
    extractor = MLLMStateExtractor(mllm if mllm is not None else build_encoder(config), TOP_ONLY)
    base = base if base is not None else BaseMap.gaussian(extractor.text.hidden_size, config.embed_dim, seed)
    return SideEncoder(config, extractor, UnalignedHead(base))
