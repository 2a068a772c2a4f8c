"""Shared pieces of the side networks, and the late-fusion ``side-towers`` mode.

``side`` (the default, side_mllm.py) runs the side network over the MLLM's own hidden states; ``side-towers``
(this file) is the earlier IISAN variant over the text and vision towers run separately, fused late.

IISAN / IISAN-Versa decoupled side network over frozen, layer-dropped backbone hidden states.

The backbones (text LM, vision tower) run once per item with no gradient; the pooled hidden state of every
``layer_stride``-th layer (counted from the top, so the last layer is always kept: "group layer-dropping") is all
the side network needs, so those states are cached to disk (cache.py) and training touches only the small side
network. Three side adapted networks (SANs): one per modality plus an inter-modal one that reads the sum of both
modalities' states at top-aligned layers; their outputs are mixed by learned gates (a softmax over the branches
present for the item). Text and vision widths differ (384 vs 16..1280 for MiniLM/efficientnet): a per-layer
LayerNorm + linear map brings every state to the side width.

The same ``extract_states`` runs when building the cache and at inference, so a side encoder restored with
``load_encoder`` reproduces the training-time embeddings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from pipelines.encoder.base_map import pooled_top
from pipelines.encoder.config import EncoderConfig
from pipelines.encoder.encoder import EncoderBase, ItemBatch, residual_head, residual_output
from pipelines.encoder.towers import TextTower, VisionTower

States = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SideConfig:
    """Args:
        width: side network width.
        layer_stride: keep every ``layer_stride``-th backbone layer (from the top); 1 keeps all.
        reduction: bottleneck reduction inside each SAN block.
        dropout: dropout inside SAN blocks (training only).
        token_states: ``side`` mode: also cache the language model's token-level states of every kept layer
            and pool them with a learned attention query (memory: see side_mllm.cache_bytes_per_item).
    """

    width: int = 128
    layer_stride: int = 2
    reduction: int = 2
    dropout: float = 0.1
    token_states: bool = False

    def __post_init__(self):
        if self.width <= 0 or self.layer_stride <= 0 or self.reduction <= 0:
            raise ValueError("SideConfig: width, layer_stride and reduction must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SideConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def select_layers(n_layers: int, stride: int) -> list[int]:
    """Indices kept by group layer-dropping, bottom to top; the top layer is always kept.

    >>> select_layers(6, 2)
    [1, 3, 5]
    """
    return sorted(range(n_layers - 1, -1, -stride))


class StateExtractor(nn.Module):
    """Frozen backbones -> pooled per-layer states (the side network's only input).

    States dict: "text" (B, Lt, Ht), "text_present" (B,) float, "vision.{k}" (B, C_k) for each kept vision layer,
    "vision_present" (B,) float, and "lm.pool" (B, 1, H): the frozen MLLM's own pooled output over the fused
    ``[image tokens; text]`` sequence (one more LM pass): the unaligned embedding the side network's residual
    starts from.

    Args:
        mllm: the ItemEncoder the towers belong to (its projector fuses the image tokens).
    """

    def __init__(self, config: EncoderConfig, vision: Optional[VisionTower], text: TextTower, layer_stride: int,
                 mllm: nn.Module):
        super().__init__()
        self.config, self.vision, self.text = config, vision, text
        self.mllm = mllm
        self.text_layers = select_layers(text.num_layers, layer_stride)
        self.vision_layers = select_layers(len(vision.layer_widths), layer_stride) if vision is not None else []
        self.vision_widths = [vision.layer_widths[i] for i in self.vision_layers] if vision is not None else []
        for p in self.parameters():
            p.requires_grad_(False)

    def layout(self) -> dict:
        """What the cached states look like (stored in the cache manifest; the side network is built from it)."""
        return {"kind": "towers", "text_width": self.text.hidden_size, "text_layers": self.text_layers,
                "vision_layers": self.vision_layers, "vision_widths": self.vision_widths,
                "lm_width": self.text.hidden_size}

    @torch.no_grad()
    def forward(self, batch: ItemBatch) -> States:
        embeds = self.text.embed_tokens(batch.input_ids)  # (B, T, H)
        _, hidden = self.text(embeds, batch.text_mask, hidden_states=True)  # L+1 x (B, T, H)
        pooled = [self.text.pool(hidden[i + 1], batch.text_mask) for i in self.text_layers]
        text_present = batch.has_text.float()
        states = {"text": torch.stack(pooled, dim=1) * text_present[:, None, None],  # (B, Lt, H)
                  "text_present": text_present}
        fused, fused_mask, _ = self.mllm.fused_inputs(batch)
        states["lm.pool"] = self.text.pool(self.text(fused, fused_mask)[0], fused_mask)[:, None]  # (B, 1, H)
        if self.vision is not None:
            n = len(batch)
            sel = batch.has_image.nonzero(as_tuple=True)[0]
            layers = [embeds.new_zeros(n, w) for w in self.vision_widths]
            if len(sel):
                _, per_layer = self.vision(batch.pixels[sel], grid=1)
                layers = [z.index_copy(0, sel, per_layer[i].to(z.dtype)) for z, i in zip(layers, self.vision_layers)]
            for k, layer in enumerate(layers):
                states[f"vision.{k}"] = layer  # (B, C_k)
            states["vision_present"] = batch.has_image.float()
        return states


class SideBlock(nn.Module):
    """Bottleneck MLP with pre-norm and residual. (B, d) -> (B, d)."""

    def __init__(self, width: int, reduction: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width // reduction), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width // reduction, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class SideBranch(nn.Module):
    """One SAN: s_0 = block_0(x_0); s_l = block_l(g_l * s_{l-1} + (1 - g_l) * x_l), g_l = sigmoid(learned)."""

    def __init__(self, n_layers: int, width: int, reduction: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(SideBlock(width, reduction, dropout) for _ in range(n_layers))
        self.gates = nn.Parameter(torch.zeros(n_layers))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        s = self.blocks[0](xs[0])
        for layer in range(1, len(xs)):
            g = torch.sigmoid(self.gates[layer])
            s = self.blocks[layer](g * s + (1 - g) * xs[layer])
        return s  # (B, d)


class SideNetwork(nn.Module):
    """Intra-modal SANs (text, vision) + inter-modal SAN + learned gate fusion + a zero-initialised residual head
    over the unaligned embedding: ``normalize(base(lm.pool) + head(fused))``. States -> (B, D)."""

    def __init__(self, text_width: int, n_text: int, vision_widths: list[int], embed_dim: int, cfg: SideConfig,
                 base: nn.Module):
        super().__init__()
        self.base = base
        d = cfg.width
        self.text_maps = nn.ModuleList(nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, d))
                                       for _ in range(n_text))
        self.text_san = SideBranch(n_text, d, cfg.reduction, cfg.dropout)
        self.has_vision = bool(vision_widths)
        if self.has_vision:
            # The linear maps that align mismatched text / vision widths to the side width.
            self.vision_maps = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d)) for w in vision_widths)
            self.vision_san = SideBranch(len(vision_widths), d, cfg.reduction, cfg.dropout)
            self.n_inter = min(n_text, len(vision_widths))
            self.inter_san = SideBranch(self.n_inter, d, cfg.reduction, cfg.dropout)
        self.fusion = nn.Parameter(torch.zeros(3))  # logits over (text, vision, inter)
        self.head = residual_head(d, embed_dim)

    def forward(self, states: States) -> torch.Tensor:
        text_present = states["text_present"][:, None]  # (B, 1)
        text_in = [m(states["text"][:, i]) * text_present for i, m in enumerate(self.text_maps)]  # Lt x (B, d)
        branches = [self.text_san(text_in)]
        present = [text_present]
        if self.has_vision:
            vision_present = states["vision_present"][:, None]
            vision_in = [m(states[f"vision.{k}"]) * vision_present for k, m in enumerate(self.vision_maps)]
            k = self.n_inter
            inter_in = [t + v for t, v in zip(text_in[-k:], vision_in[-k:])]  # top-aligned layers
            branches += [self.vision_san(vision_in), self.inter_san(inter_in)]
            present += [vision_present, torch.maximum(text_present, vision_present)]
        logits = self.fusion[: len(branches)].expand(len(text_present), -1)  # (B, n_branches)
        available = torch.cat(present, dim=1) > 0
        # An item with neither modality keeps uniform weights over zero inputs instead of NaNs.
        available = available | ~available.any(dim=1, keepdim=True)
        weights = torch.softmax(logits.masked_fill(~available, float("-inf")), dim=1)
        fused = sum(w[:, None] * b for w, b in zip(weights.unbind(1), branches))  # (B, d)
        return residual_output(self.base(pooled_top(states)), self.head(fused))


class SideEncoder(EncoderBase):
    """Frozen backbones + a head over their cached-able states (a SideNetwork, or the unaligned projection).

    ``forward(batch)`` runs the backbones; ``forward_states(states)`` skips them (training on the cache).
    """

    def __init__(self, config: EncoderConfig, extractor: StateExtractor, head: nn.Module):
        super().__init__(config)
        self.extractor = extractor
        self.vision, self.text = extractor.vision, extractor.text
        self.head = head
        self.frozen = [extractor]

    def forward_states(self, states: States) -> torch.Tensor:
        return self.head(states)

    def forward(self, batch: ItemBatch) -> torch.Tensor:
        return self.head(self.extractor(batch))


class SideHeadOnly(nn.Module):
    """A side network without its backbones: what ``train_side`` trains straight from a cache.

    ``forward_states(states) -> (B, D)``; ``head`` is the side network (same state-dict keys as SideEncoder's).
    """

    def __init__(self, config: EncoderConfig, head: nn.Module):
        super().__init__()
        self.config, self.head = config, head

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward_states(self, states: States) -> torch.Tensor:
        return self.head(states)


def towers_side_network(layout: dict, config: EncoderConfig, side: SideConfig, base=None) -> SideNetwork:
    """The late-fusion side network for a ``towers`` cache layout (seeded by the encoder config); ``base`` as in
    ``side_mllm.mllm_side_network``."""
    from pipelines.encoder.base_map import BaseMap

    if "lm_width" not in layout:
        raise ValueError("a side-towers cache or checkpoint from before issue 18 lacks the MLLM's pooled state "
                         "(lm.pool) the residual starts from: rebuild the cache / retrain")
    base = base if base is not None else BaseMap.gaussian(layout["lm_width"], config.embed_dim, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return SideNetwork(layout["text_width"], len(layout["text_layers"]), list(layout["vision_widths"]),
                           config.embed_dim, side, base)


def build_towers_side_encoder(config: EncoderConfig, side: SideConfig, vision: Optional[VisionTower],
                              text: TextTower, mllm: Optional[nn.Module] = None, base=None) -> SideEncoder:
    """``side-towers`` mode: frozen towers run separately + the late-fusion side network (``mllm``: the
    ItemEncoder over these towers, built with its seeded projector when not given)."""
    from pipelines.encoder.encoder import ItemEncoder

    mllm = mllm if mllm is not None else ItemEncoder(config, vision, text)
    extractor = StateExtractor(config, vision, text, side.layer_stride, mllm)
    return SideEncoder(config, extractor, towers_side_network(extractor.layout(), config, side, base))
