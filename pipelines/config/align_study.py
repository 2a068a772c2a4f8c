"""`qarm align`'s config tree: alignment alone, outside the batch job (a study of the modes and their settings,
and `--target user-prompts`). Knobs that the cascade also has keep its names; the defaults here are the study's
(a fixed 64-wide embedding, epochs per mode, the pca start in every mode), said in each help text."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from feature_store.config_tree import knob
from feature_store.split import SplitSection
from pipelines.config.cascade import DataSection, UserPromptsSection
from pipelines.encoder.alignment import AlignConfig
from pipelines.encoder.config import registered_configs
from pipelines.encoder.model_io import MODES as ALIGN_MODES
from pipelines.mining.pairs import PairConfig

EPOCHS_BY_MODE = {"side": 6, "side-towers": 6, "adapters": 2, "full": 1}


@dataclass(frozen=True)
class StudyEncoderSection:
    """The multimodal encoder under study: a named config and its overrides."""

    encoder: str = knob("minilm-effnet", "named encoder config: " + ", ".join(registered_configs()))
    text_model: Optional[str] = knob(None, "override the LM: hf:<local dir> (e.g. a Qwen2 folder)")
    vision_model: Optional[str] = knob(None, "override vision: timm:<name> | open_clip:<arch> | none")
    vision_weights: Optional[str] = knob(None, "vision weights file (.safetensors / .pth)")
    embed_dim: int = knob(64, "item embedding size (the study fixes QARM's 64; the cascade's 0 means the config's)")
    encoder_image_size: Optional[int] = knob(None, "encoder input side in px (none: the config's; CPU: 128)")
    image_grid: Optional[int] = knob(None, "image tokens = grid x grid (none: the config's)")
    max_text_tokens: Optional[int] = knob(None, "text tokens at most (none: the config's)")


@dataclass(frozen=True)
class StudyTrainingSection:
    """How alignment trains and is judged."""

    align_mode: str = knob("side", "side: side network over the frozen MLLM's states; side-towers: the late-fusion "
                                   "side network over the separately run towers; adapters (VIP5); full",
                           choices=ALIGN_MODES)
    align_epochs: Optional[int] = knob(None, "alignment epochs at most (none: per mode, side 6, adapters 2, full 1)")
    align_batch_size: int = knob(128, "pairs per contrastive batch")
    align_lr: Optional[float] = knob(None, "learning rate of new layers (none: per mode, full 3e-4, else 1e-3)")
    backbone_lr_scale: float = knob(0.1, "pretrained backbone weights learn at lr x this (full; norms in adapters)")
    align_temperature: float = knob(AlignConfig.temperature, "InfoNCE temperature")
    learn_temperature: bool = knob(False, "learn the InfoNCE temperature")
    mask: str = knob("graph", "false negatives masked against every known training positive (graph) or the batch "
                              "only", choices=("graph", "batch"))
    patience: int = knob(2, "epochs without validation improvement before stopping")
    align_gate_z: float = knob(AlignConfig.gate_z, "an epoch beats step 0 (the unaligned embedding) when its "
                                                   "validation-window recall@10 gain minus this many paired "
                                                   "standard errors is above 0; else step 0 ships")
    unaligned_map: str = knob("pca", "map of the frozen MLLM's pooled state to the embedding (where alignment "
                                     "starts): pca of the training pairs' items or a seeded gaussian projection",
                              choices=("pca", "gaussian"))
    token_states: bool = knob(False, "side mode: cache token-level LM states (memory: align_result cache bytes)")
    max_steps: Optional[int] = knob(None, "stop after this many optimizer steps")
    warmup_steps: int = knob(0, "learning-rate warm-up steps")
    sources: str = knob("swing,u2i", "pair sources to train on")
    side_width: int = knob(128, "side network width")
    side_layer_stride: int = knob(2, "side modes: cache every k-th backbone layer")
    adapter_reduction: int = knob(8, "adapter bottleneck reduction factor (adapters mode)")
    init_encoder: Optional[str] = knob(None, "warm start from this encoder checkpoint")
    no_resume: bool = knob(False, "ignore checkpoints already in --out")
    save_every: int = knob(0, "checkpoint every N steps (0: per epoch)")
    torch_threads: Optional[int] = knob(None, "torch threads (none: torch's default)")
    device: str = knob("cpu", "torch device (cpu, cuda)")
    unaligned_seed: int = knob(0, "seed of the unaligned baseline's fixed map")
    max_items: Optional[int] = knob(None, "keep only the N items with most positive interactions (CPU-sized runs)")
    eval_batch_size: int = knob(64, "items per batch when caching and embedding")

    def epochs(self) -> int:
        return self.align_epochs or EPOCHS_BY_MODE[self.align_mode]


@dataclass(frozen=True)
class StudyPairsSection:
    """Behaviour pairs of the study (PairConfig's defaults)."""

    swing_top_n: int = knob(PairConfig.swing_top_n, "Swing partners kept per item")
    min_support: int = knob(PairConfig.min_support, "minimum co-occurring users of a pair")
    heldout_frac: float = knob(PairConfig.heldout_frac, "latest share of the train portion's positives whose pairs "
                                                        "are the validation pairs")
    keep_seen_heldout: bool = knob(False, "keep held-out pairs that also occur in training (default: drop them)")


@dataclass(frozen=True)
class UserTargetSection:
    """`--target user-prompts`: the MLLM as a user encoder over a published version (the knobs of the encoder are
    the user_prompts section's, shared with the cascade's stage; `--user-prompts` is the same as this target)."""

    target: str = knob("items", "items: align the item encoder; user-prompts: train the MLLM user encoder over "
                                "personalized prompts from a published version (--store)",
                       choices=("items", "user-prompts"))
    store: Optional[str] = knob(None, "user-prompts: the feature store whose version is read / extended")
    version: Optional[str] = knob(None, "user-prompts: version to read (none: CURRENT)")
    compare_retrieval: bool = knob(False, "also fit the id student, the teacher and the prompt-user-distilled "
                                          "student (test figures)")
    no_publish: bool = knob(False, "write --out only; publish no version")


@dataclass(frozen=True)
class AlignStudyConfig:
    """`qarm align`."""

    data: DataSection = field(default_factory=DataSection)
    split: SplitSection = field(default_factory=SplitSection)
    encoder: StudyEncoderSection = field(default_factory=StudyEncoderSection)
    training: StudyTrainingSection = field(default_factory=StudyTrainingSection)
    pairs: StudyPairsSection = field(default_factory=StudyPairsSection)
    users: UserTargetSection = field(default_factory=UserTargetSection)
    user_prompts: UserPromptsSection = field(default_factory=UserPromptsSection)
