"""The cascade job's config tree (`qarm pipeline`, `qarm demo`, the cascade runs of `qarm eval`, the candidate
of `qarm retrain`): every knob of the batch job, defined once here with its default.

    data      what to read (dataset, files, column mapping, clock, synthetic sizes, seed)
    split     the protocol's time split (one protocol from pair mining to the ranker)
    pairs     behaviour pairs: Swing, the trigger similarity (collab), the pair-validation share
    align     the encoder and its alignment (mode, epochs, side network, never-worse gate, warm starts)
    quant     RQ / VQ codes
    runtime   where and how the job runs (store, seeds, scratch, threads, resource hints)
    user_prompts  the optional VIP5-style user-prompt stage (off by default)

Beam's own options (--runner, --direct_num_workers, --project, ...) are not part of the tree; the manifest records
them next to it (credentials excluded, `pipelines.beam.options.beam_options_record`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from feature_store.clock import parse_duration, parse_time
from feature_store.split import SplitSection
from pipelines.data.schema import DATASETS, IMAGE_CHECKS, PRESET_SIZES, PRESETS, DataSpec
from pipelines.encoder.model_io import MODES as ALIGN_MODES
from pipelines.encoder.user_encoder import UserEncoderConfig
from pipelines.encoder.user_prompts import TEMPLATES
from pipelines.mining.collab import CollabConfig
from pipelines.mining.pairs import TRIGGER_SIMILARITIES, PairConfig
from feature_store.config_tree import check_knob_types, knob


def _positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _non_negative(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


@dataclass(frozen=True)
class DataSection:
    """What to load; `spec()` gives the loader's DataSpec (whose own defaults these are)."""

    dataset: str = knob(DataSpec.dataset, "synthetic (embedded), movielens (ml-latest-small + posters) or generic",
                        choices=DATASETS)
    data: Optional[str] = knob(None, "movielens: folder with ml-latest-small/ and posters/; synthetic: where images "
                                     "are generated (default $QARM_CACHE/synthetic); generic: base folder for "
                                     "relative --items / --interactions")
    items: Optional[str] = knob(None, "generic: item catalog (Parquet or CSV)")
    interactions: Optional[str] = knob(None, "generic: interaction log (Parquet or CSV)")
    mapping: Optional[str] = knob(None, "generic: JSON/YAML file mapping your columns onto the contract")
    column_map: tuple[str, ...] = knob((), "generic: map one column, e.g. items.item_id=sku (repeatable; overrides "
                                           "the mapping file)", aliases=("--map",), metavar="TABLE.FIELD=COLUMN")
    id_map_dir: Optional[str] = knob(None, "generic: folder of saved string->int id maps to reuse and extend",
                                     aliases=("--id-maps",))
    require_image: bool = knob(DataSpec.require_image, "keep only items with a valid image and their interactions")
    validate_images: str = knob(DataSpec.validate_images, "image check per item: exists, header, draft (header + a "
                                                          "reduced decode) or decode", choices=IMAGE_CHECKS)
    max_bad_fraction: float = knob(DataSpec.max_bad_fraction,
                                   "largest share of a table's rows whose id / timestamp / label does not parse "
                                   "(rejected below it, the load fails above it)")
    now: Optional[str] = knob(None, "the job's clock, unix seconds or ISO-8601 (default: this machine's at start); "
                                    "later events plus --max-future are rejected as bad_timestamp")
    max_future: str = knob("1d", "how far after --now an event may be stamped: seconds or 90s / 30m / 6h / 1d")
    preset: str = knob(DataSpec.preset, "synthetic: default (impression log) or sparse (purchase-like implicit log)",
                       choices=PRESETS)
    n_items: Optional[int] = knob(None, "synthetic: items (default: the preset's)")
    n_users: Optional[int] = knob(None, "synthetic: users (default: the preset's)")
    n_events: Optional[int] = knob(None, "synthetic: logged events (default: the preset's)")
    n_clusters: int = knob(DataSpec.n_clusters, "synthetic: latent clusters")
    lookalike_share: float = knob(DataSpec.lookalike_share, "synthetic: share of clusters in look-alike pairs")
    image_size: int = knob(DataSpec.image_size, "synthetic: image side (px)")
    seed: int = knob(DataSpec.seed, "data seed (synthetic data; every seeded stage unless --cascade-seed)")

    def __post_init__(self):
        parse_duration(self.max_future)  # ValueError naming the value
        if self.now is not None:
            parse_time(self.now)

    def spec(self) -> DataSpec:
        """The DataSpec these knobs describe (raises ValueError naming a bad value)."""
        from pathlib import Path

        sizes = {k: getattr(self, k) if getattr(self, k) is not None else PRESET_SIZES[self.preset][k]
                 for k in ("n_items", "n_users", "n_events")}
        path = (lambda v: None if v is None else Path(v))
        return DataSpec(dataset=self.dataset, data=path(self.data), items=path(self.items),
                        interactions=path(self.interactions), mapping=path(self.mapping),
                        column_map=tuple(self.column_map), id_map_dir=path(self.id_map_dir),
                        require_image=self.require_image, validate_images=self.validate_images,
                        n_clusters=self.n_clusters, preset=self.preset, lookalike_share=self.lookalike_share,
                        image_size=self.image_size, seed=self.seed, max_bad_fraction=self.max_bad_fraction,
                        now=None if self.now is None else parse_time(self.now),
                        max_future=parse_duration(self.max_future), **sizes)


@dataclass(frozen=True)
class PairsSection:
    """Behaviour pairs for alignment (`pipelines.mining.pairs.PairConfig`, whose defaults these are)."""

    swing_top_n: int = knob(PairConfig.swing_top_n, "Swing partners kept per item")
    swing_alpha: float = knob(PairConfig.swing_alpha, "Swing smoothing alpha")
    min_support: int = knob(PairConfig.min_support, "minimum co-occurring users of a pair")
    swing_max_users: int = knob(PairConfig.swing_max_users, "users per item Swing sees (a fixed-seed sample above "
                                                           "it): bounds one item's cost")
    swing_max_history: int = knob(PairConfig.swing_max_history, "most recent positives per user Swing sees")
    trigger_history: int = knob(PairConfig.history, "previous positives searched for a target's trigger")
    trigger_similarity: str = knob(PairConfig.trigger_similarity,
                                   "similarity picking each target's trigger: a collaborative model's item vectors "
                                   "(collab, QARM's) or Swing neighbours", choices=TRIGGER_SIMILARITIES)
    trigger_fallback: str = knob(PairConfig.trigger_fallback, "fallback for targets the trigger similarity cannot "
                                                              "score (encoder: the unaligned encoder's vectors)",
                                 choices=("encoder", "none"))
    collab_dim: int = knob(CollabConfig.dim, "factor size of the collaborative model (iALS)")
    collab_iterations: int = knob(CollabConfig.iterations, "ALS sweeps of the collaborative model")
    collab_reg: float = knob(CollabConfig.reg, "L2 regularisation of the collaborative model")
    collab_alpha: float = knob(CollabConfig.alpha, "confidence 1 + alpha of an observed positive")
    collab_min_count: int = knob(CollabConfig.min_count, "items with fewer train positives get no collaborative "
                                                         "vector (the fallback scores them)")
    heldout_frac: float = knob(PairConfig.heldout_frac, "latest share of the train portion's positives whose pairs "
                                                        "validate alignment (the protocol's windows never reach "
                                                        "pair mining)")

    def __post_init__(self):
        self.config(seed=0, skip_unaligned=False)  # PairConfig / CollabConfig validate

    def config(self, seed: int, skip_unaligned: bool) -> PairConfig:
        """The miner's PairConfig; the encoder fallback needs the unaligned embeddings (none without them)."""
        return PairConfig(swing_top_n=self.swing_top_n, swing_alpha=self.swing_alpha, min_support=self.min_support,
                          history=self.trigger_history, heldout_frac=self.heldout_frac, seed=seed,
                          swing_max_users=self.swing_max_users, swing_max_history=self.swing_max_history,
                          trigger_similarity=self.trigger_similarity,
                          trigger_fallback="none" if skip_unaligned else self.trigger_fallback,
                          collab=CollabConfig(dim=self.collab_dim, iterations=self.collab_iterations,
                                              reg=self.collab_reg, alpha=self.collab_alpha,
                                              min_count=self.collab_min_count, seed=seed))


@dataclass(frozen=True)
class AlignSection:
    """The multimodal encoder and its alignment to behaviour."""

    encoder: str = knob("minilm-effnet", "named encoder config (pipelines.encoder.config): minilm-effnet (real "
                                         "weights) or tiny (tests)")
    embed_dim: int = knob(0, "item embedding size (0: the encoder config's; QARM: 64)")
    encoder_image_size: int = knob(0, "encoder input pixels (0: the config's)")
    align_mode: str = knob("side", "full fine-tuning, VIP5 adapters, or the IISAN side network", choices=ALIGN_MODES)
    align_epochs: int = knob(6, "alignment epochs at most (early stopping on the validation pairs, patience 2)")
    align_batch_size: int = knob(128, "pairs per contrastive batch (global over --align-nproc)")
    align_lr: Optional[float] = knob(None, "alignment learning rate (none: the mode's)")
    align_temperature: Optional[float] = knob(None, "InfoNCE temperature (none: the trainer's)")
    align_gate_z: Optional[float] = knob(None, "never-worse gate: an epoch replaces step 0 only when its validation "
                                               "recall@10 gain minus this many paired standard errors is > 0 (none: "
                                               "the trainer's 1.645)")
    align_nproc: int = knob(1, "data-parallel alignment processes on the align worker (gloo on CPU, nccl on GPU)")
    side_layer_stride: int = knob(2, "side mode: keep every k-th backbone layer (IISAN layer dropping)")
    side_dropout: float = knob(0.1, "side mode: dropout inside the side network while training")
    side_cache_dir: Optional[str] = knob(None, "side mode: folder of the frozen MLLM's hidden-state cache, reused "
                                               "by later runs over the same items and encoder (default: in "
                                               "--work-dir)")
    side_cache_shard_size: int = knob(4096, "side mode: items per hidden-state cache shard (one worker's unit)")
    unaligned_map: str = knob("auto", "map of the frozen MLLM's state to the unaligned embedding (step 0): pca of "
                                      "the train-portion items (side mode; auto's choice there) or a seeded "
                                      "gaussian projection", choices=("auto", "pca", "gaussian"))
    align_checkpoint: Optional[str] = knob(None, "reuse this aligned encoder checkpoint instead of training")
    init_encoder: Optional[str] = knob(None, "warm-start alignment from this encoder checkpoint (retraining passes "
                                             "the parent's encoder/)")

    def __post_init__(self):
        _positive(self, "align_epochs", "align_batch_size", "align_nproc", "side_layer_stride",
                  "side_cache_shard_size")
        _non_negative(self, "embed_dim", "encoder_image_size")
        for name in ("align_lr", "align_temperature"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.side_dropout < 1.0:
            raise ValueError(f"--side-dropout must be in [0, 1), got {self.side_dropout}")

    def resolved_unaligned_map(self) -> str:
        """auto: pca where side mode's cache gives the frozen states to fit it on, else gaussian."""
        if self.unaligned_map != "auto":
            return self.unaligned_map
        return "pca" if self.align_mode == "side" and not self.align_checkpoint else "gaussian"


@dataclass(frozen=True)
class QuantSection:
    """Semantic-ID codes: RQ (residual k-means) and VQ (nearest items)."""

    rq_levels: int = knob(3, "RQ levels")
    rq_codebook_size: int = knob(0, "centroids per RQ level (0: auto ~sqrt(N))")
    fit_sample: int = knob(100_000, "items the RQ codebooks are fitted on (0: all)")
    vq_k: int = knob(25, "neighbours in the VQ code (QARM: 25)")
    vq_index: str = knob("flat", "faiss index of the gathered VQ k-NN", choices=("flat", "ivf"))
    vq_gather_max: int = knob(200_000, "largest catalog whose VQ base is gathered into each worker (exact); above "
                                       "it a distributed IVF search")
    vq_nlist: int = knob(0, "IVF lists of the distributed k-NN (0: ~4 sqrt(N))")
    vq_nprobe: int = knob(16, "IVF lists each query searches (distributed k-NN)")
    init_quantizer: Optional[str] = knob(None, "warm-start RQ codebooks from this saved quantizer (the parent's "
                                               "quantizer/)")

    def __post_init__(self):
        _positive(self, "rq_levels", "vq_k", "vq_gather_max", "vq_nprobe")
        _non_negative(self, "rq_codebook_size", "fit_sample", "vq_nlist")


@dataclass(frozen=True)
class RuntimeSection:
    """Where and how the job runs; none of it changes what a version contains except the seeds."""

    store: Optional[str] = knob(None, "feature-store root the job publishes into (required; a directory, "
                                      "file://, s3:// or gs://)")
    cascade_seed: Optional[int] = knob(None, "seed of pair mining, alignment and quantization (none: --seed); the "
                                             "data stays fixed when only this changes")
    work_dir: Optional[str] = knob(None, "scratch folder (default: a temp folder; on a distributed runner a path "
                                         "every worker can read)")
    embed_batch_size: int = knob(64, "items per RunInference batch")
    torch_threads: int = knob(2, "torch threads per worker")
    align_min_ram: Optional[str] = knob(None, "resource hint of the align worker, e.g. 16GB (Dataflow honours it)")
    align_accelerator: Optional[str] = knob(None, "accelerator hint of the align step, e.g. "
                                                  "'type:nvidia-tesla-t4;count:1;install-nvidia-driver'")
    read_sources: str = knob("auto", "where the source is read: auto (generic files on the workers, presets in the "
                                     "driver) or driver", choices=("auto", "workers", "driver"))
    skip_unaligned: bool = knob(False, "do not embed / quantize with the unaligned encoder (no *_unaligned tables; "
                                       "ablation row f needs them)")

    def __post_init__(self):
        _positive(self, "embed_batch_size", "torch_threads")


@dataclass(frozen=True)
class UserPromptsSection:
    """The optional user-prompt stage (issue 22; pipelines.beam.user_prompt_stage): after the aligned item
    embeddings, the MLLM reads VIP5-style personalized prompts of the protocol's train portion and becomes a user
    encoder (never worse than history pooling, its step 0); user_embeddings.parquet (and its point-in-time
    companion user_embeddings_asof.parquet) goes into the same version.
    Defaults are UserEncoderConfig's; the seed and threads are the job's (the cascade seed, --torch-threads)."""

    user_prompts: bool = knob(False, "add the user-prompt stage (user_embeddings.parquet in this version; "
                                     "manifest.metrics.user_prompts says whether step 0 or the trained encoder "
                                     "shipped)")
    user_prompt_template: str = knob(UserEncoderConfig.template, "prompt template", choices=tuple(sorted(TEMPLATES)))
    user_prompt_max_events: int = knob(UserEncoderConfig.max_events, "last train-portion positives a prompt reads")
    user_prompt_token_budget: int = knob(UserEncoderConfig.token_budget, "LM tokens per prompt at most (oldest "
                                                                         "events dropped)")
    user_prompt_image_tokens: int = knob(UserEncoderConfig.image_tokens, "image tokens per item in a prompt")
    user_prompt_title_tokens: int = knob(UserEncoderConfig.title_tokens, "word pieces of each item title")
    user_prompt_train_cuts: int = knob(UserEncoderConfig.train_cuts, "training prompts per user (cut before each of "
                                                                     "its last N train positives)")
    user_prompt_max_train: Optional[int] = knob(UserEncoderConfig.max_train_prompts, "cap on training prompts "
                                                                                     "(seeded sample)")
    user_prompt_asof_cuts: int = knob(UserEncoderConfig.asof_cuts, "point-in-time vectors per user besides its train "
                                                                   "end (user_embeddings_asof.parquet, what the "
                                                                   "ranker's prompt feature reads): N prompt cuts "
                                                                   "spread evenly over its train-positive times")
    user_prompt_negatives: int = knob(UserEncoderConfig.negatives, "catalog items sampled per batch as extra "
                                                                   "negatives (0: in-batch only)")
    user_prompt_adapters: bool = knob(UserEncoderConfig.adapters, "VIP5 bottleneck adapters in the frozen LM (off: "
                                                                  "id tokens + head only)")
    user_prompt_adapter_reduction: int = knob(UserEncoderConfig.adapter_reduction, "adapter bottleneck reduction")
    user_prompt_epochs: int = knob(UserEncoderConfig.epochs, "user encoder training epochs at most")
    user_prompt_batch_size: int = knob(UserEncoderConfig.batch_size, "prompts per contrastive batch")
    user_prompt_lr: float = knob(UserEncoderConfig.lr, "user encoder learning rate")
    user_prompt_temperature: float = knob(UserEncoderConfig.temperature, "InfoNCE temperature")
    user_prompt_patience: int = knob(UserEncoderConfig.patience, "epochs without a better validation score before "
                                                                 "stopping")
    user_prompt_gate_z: float = knob(UserEncoderConfig.gate_z, "never-worse gate: the trained encoder replaces step "
                                                               "0 only when its validation recall@10 gain minus this "
                                                               "many paired standard errors is above 0")
    user_prompt_device: str = knob(UserEncoderConfig.device, "torch device of the user encoder (cpu, cuda)")

    def __post_init__(self):
        check_knob_types(self)
        try:
            self.encoder_config()
        except ValueError as exc:  # name the flag, not the library field
            raise ValueError(f"user-prompt stage: {_user_prompt_flags(str(exc))}") from None

    def encoder_config(self, seed: int = 0, num_threads: Optional[int] = None) -> UserEncoderConfig:
        """The UserEncoderConfig this stage trains with (``seed``: the cascade seed; ``num_threads``: the worker's
        torch threads)."""
        return UserEncoderConfig(**{field: getattr(self, knob_name) for knob_name, field in _USER_PROMPT_FIELDS},
                                 seed=seed, num_threads=num_threads)


# (knob, UserEncoderConfig field) of the user-prompt stage
_USER_PROMPT_FIELDS = (("user_prompt_template", "template"), ("user_prompt_max_events", "max_events"),
                       ("user_prompt_token_budget", "token_budget"), ("user_prompt_image_tokens", "image_tokens"),
                       ("user_prompt_title_tokens", "title_tokens"), ("user_prompt_train_cuts", "train_cuts"),
                       ("user_prompt_max_train", "max_train_prompts"), ("user_prompt_asof_cuts", "asof_cuts"),
                       ("user_prompt_negatives", "negatives"),
                       ("user_prompt_adapters", "adapters"), ("user_prompt_adapter_reduction", "adapter_reduction"),
                       ("user_prompt_epochs", "epochs"), ("user_prompt_batch_size", "batch_size"),
                       ("user_prompt_lr", "lr"), ("user_prompt_temperature", "temperature"),
                       ("user_prompt_patience", "patience"), ("user_prompt_gate_z", "gate_z"),
                       ("user_prompt_device", "device"))


def _user_prompt_flags(message: str) -> str:
    """UserEncoderConfig's message with its field names written as the stage's flags."""
    import re

    by_field = {field: "--" + knob_name.replace("_", "-") for knob_name, field in _USER_PROMPT_FIELDS}
    names = "|".join(sorted(by_field, key=len, reverse=True))
    message = re.sub(rf"(?:UserEncoderConfig\.)?\b({names})\b", lambda m: by_field[m.group(1)], message)
    return message.replace("UserEncoderConfig: ", "")


@dataclass(frozen=True)
class CascadeConfig:
    """The whole config of one cascade run (see the module docstring)."""

    data: DataSection = field(default_factory=DataSection)
    split: SplitSection = field(default_factory=SplitSection)
    pairs: PairsSection = field(default_factory=PairsSection)
    align: AlignSection = field(default_factory=AlignSection)
    quant: QuantSection = field(default_factory=QuantSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    user_prompts: UserPromptsSection = field(default_factory=UserPromptsSection)

    def cascade(self) -> "CascadeConfig":
        """The cascade's own sections (of a tree that extends this one: `qarm demo`, `qarm eval`)."""
        from feature_store.config_tree import sections

        return CascadeConfig(**{name: getattr(self, name) for name, _ in sections(CascadeConfig)})

    def seed(self) -> int:
        """The seed of every seeded cascade stage: --cascade-seed, else the data --seed."""
        return int(self.data.seed if self.runtime.cascade_seed is None else self.runtime.cascade_seed)
