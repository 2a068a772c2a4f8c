"""Ranker configuration: frozen dataclasses validated on construction.

Feature sets follow QARM's Table 1: every row is "ids" plus one kind of item knowledge.

Example:
    >>> cfg = RankerConfig(features="vq+rq", history_len=20, seed=1)
    >>> cfg.uses("rq"), cfg.code_table
    (True, 'item_codes')
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# feature set -> (knowledge parts added on top of ids, code table it reads). Every row differs from its
# neighbours in one thing only: "cross" (dense counts of history items sharing the target's RQ prefix) is its
# own row, "sim" (the frozen vectors' target-history similarity, the cross feature's control: a hand-made
# similarity of the same content without codes), "random" has vq+rq's table shapes with codes drawn at random per
# item (capacity without content), "vq+rq-unaligned" has codes from the unaligned encoder (content without
# behaviour alignment), "prompt" adds the MLLM user encoder's prompt-user vector (VIP5-style personalized prompts,
# the version's user_embeddings.parquet) and its dot product with the target's aligned embedding.
FEATURE_SETS: dict[str, tuple[frozenset, str | None]] = {
    "id": (frozenset(), None),
    "frozen": (frozenset({"frozen"}), None),
    "frozen+sim": (frozenset({"frozen", "sim"}), None),
    "vq": (frozenset({"vq"}), "item_codes"),
    "rq": (frozenset({"rq"}), "item_codes"),
    "vq+rq": (frozenset({"vq", "rq"}), "item_codes"),
    "vq+rq+cross": (frozenset({"vq", "rq", "cross"}), "item_codes"),
    "vq+rq+frozen": (frozenset({"vq", "rq", "frozen"}), "item_codes"),
    "vq+rq+prompt": (frozenset({"vq", "rq", "prompt"}), "item_codes"),
    "random": (frozenset({"vq", "rq"}), "item_codes_random"),
    "vq+rq-unaligned": (frozenset({"vq", "rq"}), "item_codes_unaligned"),
}
ABLATION_ROWS: tuple[str, ...] = tuple(FEATURE_SETS)
NEGATIVE_SAMPLERS = ("window", "live", "popularity", "uniform")
CODE_INITS = ("random", "content")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")  # TorchRec's names


@dataclass(frozen=True)
class NegativeConfig:
    """Sampled negatives for implicit-feedback data (only positives logged).

    Args:
        per_positive: negatives drawn per positive event; 0 disables sampling ("auto" in the
            trainer turns it on only when the data has a single label value).
        sampler: where each window's negatives come from.
            "window" (default): proportional to the item's positives *in that window* (train, valid, test
                each their own), so negatives and positives share one cold/warm mix and a model cannot win by
                scoring never-trained ids high (or low).
            "live": uniform over the items with a positive in that window.
            "popularity": proportional to *training* positives in every window (items new in a later window
                are never negatives there: exploitable, kept for comparison).
            "uniform": uniform over the whole catalog.
        seed: fixed so every ablation row sees exactly the same negatives.
    """

    per_positive: int = 4
    sampler: str = "window"
    seed: int = 0

    def __post_init__(self):
        if self.per_positive < 0:
            raise ValueError(f"NegativeConfig.per_positive must be >= 0, got {self.per_positive}")
        if self.sampler not in NEGATIVE_SAMPLERS:
            raise ValueError(f"NegativeConfig.sampler must be one of {NEGATIVE_SAMPLERS}, got {self.sampler!r}")


@dataclass(frozen=True)
class RankerConfig:
    """Everything that shapes one ranker training run.

    Args:
        features: one of FEATURE_SETS.
        embedding_dim: width of every sparse table (TorchRec needs one dim per table; one for all
            keeps the ablation rows comparable).
        history_len: last N positives of the user strictly before the event.
        attention: DIN-style target attention over the history (otherwise mean pooling).
        code_init: "content": every code table starts from the content it encodes (RQ rows from their
            centroids, VQ rows from the items' vectors, through one fixed map: ranker.content_init); "random":
            TorchRec's uniform init. "codebook" (the former name, which set the RQ rows only) means "content".
        content_std: per-coordinate std of the content-initialised rows.
        interaction: add the pairwise dot products among the per-item part vectors of the target and the
            attended history, the user vector and the VQ bag (ranker.model.InteractionArch) to the over-arch input.
        use_user_id: include the user-id table (off helps when test users are mostly unseen).
        over_arch: hidden widths of the MLP over the concatenated features.
        batch_size: global batch (split across ranks under torchrun).
        epochs, max_steps: training length (max_steps caps the total, for tests / benchmarks).
        lr_dense, lr_sparse: Adam (dense) and Adagrad (embedding tables, fused under DMP).
        weight_decay: L2 on dense parameters.
        dropout: over-arch dropout.
        patience: epochs without validation-AUC gain before stopping; 0 disables early stopping.
        eval_batch_size: scoring batch size.
        seed: model init and shuffling.
        negatives: sampled negatives (ignored for explicit-feedback data).
        sharding: TorchRec sharding type under torchrun ("table_wise" | "row_wise" | "column_wise" |
            "data_parallel"). row_wise splits every table's rows over the ranks (tables larger than one device); it
            is a GPU layout: on CPU TorchRec 1.9 offers it for the sequence tables but not for pooled
            EmbeddingBag tables such as the user table, and its planner then says so.
        num_threads: torch intra-op threads (the dev machine is small and shared).
    """

    features: str = "id"
    embedding_dim: int = 16
    history_len: int = 20
    attention: bool = True
    code_init: str = "content"
    content_std: float = 0.5
    interaction: bool = True
    use_user_id: bool = True
    over_arch: tuple[int, ...] = (128, 64)
    batch_size: int = 512
    epochs: int = 8
    max_steps: int | None = None
    lr_dense: float = 1e-3
    lr_sparse: float = 0.01
    weight_decay: float = 0.0
    dropout: float = 0.0
    patience: int = 2
    eval_batch_size: int = 4096
    seed: int = 0
    negatives: NegativeConfig = field(default_factory=NegativeConfig)
    sharding: str = "table_wise"
    num_threads: int = 1

    def __post_init__(self):
        if self.features not in FEATURE_SETS:
            raise ValueError(f"RankerConfig.features must be one of {sorted(FEATURE_SETS)}, got {self.features!r}")
        for name in ("embedding_dim", "batch_size", "epochs", "eval_batch_size", "num_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RankerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.history_len < 0:
            raise ValueError(f"RankerConfig.history_len must be >= 0, got {self.history_len}")
        if self.code_init == "codebook":  # the former name (RQ rows only): content init is its superset
            object.__setattr__(self, "code_init", "content")
        if self.code_init not in CODE_INITS:
            raise ValueError(f"RankerConfig.code_init must be one of {CODE_INITS}, got {self.code_init!r}")
        if not self.content_std > 0:
            raise ValueError(f"RankerConfig.content_std must be > 0, got {self.content_std}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"RankerConfig.max_steps must be > 0 or None, got {self.max_steps}")
        if self.lr_dense <= 0 or self.lr_sparse <= 0:
            raise ValueError("RankerConfig.lr_dense and lr_sparse must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RankerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.patience < 0:
            raise ValueError(f"RankerConfig.patience must be >= 0, got {self.patience}")
        if self.sharding not in SHARDING_TYPES:
            raise ValueError(f"RankerConfig.sharding must be one of {'|'.join(SHARDING_TYPES)}, got {self.sharding!r}")
        if any(h <= 0 for h in self.over_arch):
            raise ValueError(f"RankerConfig.over_arch widths must be > 0, got {self.over_arch}")
        if isinstance(self.negatives, dict):  # from JSON
            object.__setattr__(self, "negatives", NegativeConfig(**self.negatives))
        object.__setattr__(self, "over_arch", tuple(self.over_arch))

    def uses(self, part: str) -> bool:
        """Whether this feature set adds `part` ("frozen", "vq", "rq", "cross", "sim", "prompt") on top of ids."""
        return part in FEATURE_SETS[self.features][0]

    @property
    def code_table(self) -> str | None:
        """Name of the feature-store code table this row reads (None for id / frozen)."""
        return FEATURE_SETS[self.features][1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RankerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"RankerConfig: unknown keys {sorted(unknown)}")
        return cls(**d)
