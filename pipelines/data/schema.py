"""The data contract shared by every source: `DataSpec` (what to load) and `Dataset` (what was loaded).

Contract (../shared/DESIGN.md):
    items:        item_id int64 (unique), title str, text str|None, image_uri str|None, + attribute columns
    interactions: user_id int64, item_id int64, ts int64 (unix seconds), label float32 (1 = positive), sorted by ts
    rejects:      source, row, item_id, user_id (raw ids as text), item_dense_id, user_dense_id (Int64, where the
                  loader made one), reason, detail, action  (one row per bad record)
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import pandas as pd

DATASETS = ("synthetic", "movielens", "generic")
PRESETS = ("default", "sparse")
# sizes a preset uses when --n-items / --n-users / --n-events are not given
PRESET_SIZES = {"default": {"n_items": 2000, "n_users": 600, "n_events": 60000},
                "sparse": {"n_items": 4000, "n_users": 1000, "n_events": 4500}}
IMAGE_CHECKS = ("exists", "header", "draft", "decode")

from feature_store.clock import DEFAULT_MAX_FUTURE_S, EventClock, resolve_now
from feature_store.contract import INTERACTION_COLUMNS, ITEM_COLUMNS  # noqa: F401 (re-exported)

REJECT_COLUMNS = ("source", "row", "item_id", "user_id", "item_dense_id", "user_dense_id", "reason", "detail", "action")

# Every per-record problem a source can report. Tests inject each one; `qarm data stats` counts them.
REJECT_REASONS = (
    "duplicate_item",      # item id seen before in the catalog: later row dropped, first kept
    "empty_text",          # no title and no text: kept image-only if it has a valid image, else dropped
    "missing_image",       # image_uri names a file that does not exist: item kept text-only
    "corrupt_image",       # file exists but is not a readable image: item kept text-only
    "image_escapes_root",  # image_uri resolves outside the image root: item kept text-only
    "unknown_item",        # interaction names an item not in the (accepted) catalog: dropped
    "missing_value",       # a required field (user, item, timestamp) is empty in this row: dropped
    "bad_label",           # label not a number, or outside [0, 1] after mapping: dropped
    "bad_timestamp",       # timestamp that does not parse, before 1970 (a sentinel, not an event time), or later
                           # than the job's clock plus --max-future (feature_store.clock): dropped
    "bad_id",              # user / item id that is not an integer where ids are integers: dropped
    "duplicate_interaction",  # same user, item, ts and label as an earlier row (double logging): dropped
)


@dataclass(frozen=True)
class DataSpec:
    """What to load. Built by hand, or from the shared CLI flags with `data_spec_from_args`.

    Args:
        dataset: "synthetic" (embedded, generated), "movielens" (ml-latest-small + posters) or "generic".
        data: synthetic: folder for the generated images (a per-config cache folder when None);
            movielens: folder holding ml-latest-small/ and posters/; generic: base folder for relative paths.
        items, interactions: generic only: the item catalog and the interaction log (Parquet or CSV).
        mapping: generic only: JSON/YAML file mapping source columns onto the contract.
        column_map: generic only: extra "table.field=column" overrides (e.g. "items.item_id=sku"), applied
            after the mapping file.
        id_map_dir: generic only: folder of saved id maps to reuse and extend, so dense ids stay stable
            across runs on growing data.
        require_image: keep only items with a valid image, and interactions on them.
        validate_images: how hard to check each image: "exists" (stat), "header" (PIL open + verify; a
            truncated JPEG passes), "draft" (the default: header, then a decode of a reduced draft, which catches
            truncated and undecodable files at a fraction of a full decode) or "decode" (full decode; slowest).
        n_items, n_users, n_events, n_clusters: synthetic sizes.
        lookalike_share: synthetic: share of clusters that come in look-alike pairs (same shape, colour and most
            words; users like each independently), so content similarity is not behaviour similarity.
        image_size: synthetic image side in pixels.
        seed: synthetic generator seed (the whole dataset is a deterministic function of the spec).
        max_bad_fraction: the largest share of a table's rows whose values may fail to parse (bad_id,
            bad_timestamp, bad_label rejects) before the load fails with an error naming file, column and rows.
        now: the clock (unix seconds): events later than ``now + max_future`` are ``bad_timestamp`` rejects,
            counted against ``max_bad_fraction``. None: this machine's clock when the data is loaded (a job
            resolves it once at start and loads with it, `feature_store.clock`).
        max_future: seconds an event may lie after ``now`` (clock skew of the logging machines); default 1 day.
        preset: synthetic: the shape of the generated world. "default": an impression log with 0/1 labels and
            dozens of events per item; "sparse": shaped like a small shop's purchase log (implicit positives
            only, about 4 events per user, most items bought once or twice, repeat purchases, new items
            dominating later windows). ``n_items`` / ``n_users`` / ``n_events`` count what is logged either way.
    """

    dataset: str = "synthetic"
    data: Optional[Path] = None
    items: Optional[Path] = None
    interactions: Optional[Path] = None
    mapping: Optional[Path] = None
    column_map: tuple[str, ...] = ()
    id_map_dir: Optional[Path] = None
    require_image: bool = False
    validate_images: str = "draft"
    n_items: int = 2000
    n_users: int = 600
    n_events: int = 60000
    n_clusters: int = 16
    lookalike_share: float = 0.5
    image_size: int = 64
    seed: int = 0
    max_bad_fraction: float = 0.001
    preset: str = "default"
    now: Optional[int] = None
    max_future: int = DEFAULT_MAX_FUTURE_S

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"DataSpec.dataset: {self.dataset!r} is not one of {DATASETS}")
        if self.preset not in PRESETS:
            raise ValueError(f"DataSpec.preset (--preset): {self.preset!r} is not one of {PRESETS}")
        if self.preset != "default" and self.dataset != "synthetic":
            raise ValueError(f"DataSpec.preset: --preset {self.preset} shapes the synthetic data only "
                             f"(got --dataset {self.dataset})")
        for name in ("data", "items", "interactions", "mapping", "id_map_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "column_map", tuple(self.column_map))
        if self.validate_images not in IMAGE_CHECKS:
            raise ValueError(f"DataSpec.validate_images: {self.validate_images!r} is not one of {IMAGE_CHECKS}")
        for name, low in (("seed", 0), ("n_items", 1), ("n_users", 1), ("n_events", 1), ("n_clusters", 1),
                          ("image_size", 8)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataSpec.{name}: must be an int >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints in, plain ints out (JSON-able)
        if not isinstance(self.require_image, bool):
            raise ValueError(f"DataSpec.require_image: must be a bool, got {self.require_image!r}")
        if (isinstance(self.max_bad_fraction, bool) or not isinstance(self.max_bad_fraction, (int, float))
                or not 0.0 <= self.max_bad_fraction <= 1.0):
            raise ValueError(f"DataSpec.max_bad_fraction (--max-bad-fraction): must be in [0, 1], "
                             f"got {self.max_bad_fraction!r}")
        object.__setattr__(self, "max_bad_fraction", float(self.max_bad_fraction))
        clock = EventClock(0 if self.now is None else self.now, self.max_future)  # validates both
        object.__setattr__(self, "max_future", clock.max_future)
        if self.now is not None:
            object.__setattr__(self, "now", clock.now)
        if not isinstance(self.lookalike_share, (int, float)) or not 0.0 <= self.lookalike_share <= 1.0:
            raise ValueError(f"DataSpec.lookalike_share: must be in [0, 1], got {self.lookalike_share!r}")
        if self.dataset == "synthetic" and self.n_clusters > self.n_items:
            raise ValueError(f"DataSpec.n_clusters: {self.n_clusters} clusters need at least as many items "
                             f"(n_items={self.n_items})")
        if self.dataset == "movielens" and self.data is None:
            raise ValueError("DataSpec.data: --dataset movielens needs --data DIR (holding ml-latest-small/ "
                             "and posters/)")
        if self.dataset != "generic":
            flags = {"items": "--items", "interactions": "--interactions", "mapping": "--mapping",
                     "id_map_dir": "--id-maps"}
            stray = [flag for name, flag in flags.items() if getattr(self, name) is not None]
            stray += ["--map"] if self.column_map else []
            if stray:
                raise ValueError(f"DataSpec: {', '.join(stray)} only apply to --dataset generic "
                                 f"(got --dataset {self.dataset})")
        if self.dataset == "generic" and (self.items is None or self.interactions is None) and self.mapping is None:
            raise ValueError("DataSpec: --dataset generic needs --items FILE and --interactions FILE "
                             "(or a --mapping file naming them)")

    def clock(self) -> EventClock:
        """The clock the data is checked against (``now``, else this machine's clock at the call)."""
        return EventClock(resolve_now(self.now), self.max_future)

    def at_clock(self) -> "DataSpec":
        """This spec with ``now`` fixed (resolved once, so a job and its workers share one clock)."""
        return self if self.now is not None else replace(self, now=resolve_now())

    @classmethod
    def from_dict(cls, config: dict) -> "DataSpec":
        """Inverse of `to_dict` (e.g. the spec stored in a feature-store manifest). Unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"DataSpec.from_dict: unknown key(s) {unknown}; known: {sorted(known)}")
        values = dict(config)
        if "column_map" in values:
            values["column_map"] = tuple(values["column_map"] or ())
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-able form, stored next to artifacts so they record the data they came from."""
        out = {}
        for key, value in self.__dict__.items():
            out[key] = str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
        return out


@dataclass
class Dataset:
    """A loaded, validated source in contract form.

    Attributes:
        items: one row per accepted item (see module docstring); `image_uri` is None for text-only items.
        interactions: accepted interactions, sorted by (ts, user_id, item_id), index 0..n-1.
        image_root: folder that relative `image_uri`s resolve against (None when there are no images).
        rejects: one row per bad record (REJECT_COLUMNS), never silently dropped.
        reject_counts: reason -> count over `rejects`.
        id_maps: field ("item_id" / "user_id") -> DataFrame(raw str, id int64), for sources whose ids were
            strings and got dense int64 ids; empty when ids were already integers.
        filtered: counts removed on purpose by the spec (e.g. require_image), which are not bad records.
        name: short human name ("synthetic", "movielens", "generic:<file>").
        spec: the DataSpec that produced it.
    """

    items: pd.DataFrame
    interactions: pd.DataFrame
    image_root: Optional[Path]
    rejects: pd.DataFrame
    reject_counts: dict
    id_maps: dict = field(default_factory=dict)
    filtered: dict = field(default_factory=dict)
    name: str = ""
    spec: Optional[DataSpec] = None

    def stats(self) -> dict:
        """Summary figures (what `qarm data stats` prints)."""
        items, inter = self.items, self.interactions
        has_text = items["title"].fillna("").str.strip().ne("") | items["text"].fillna("").str.strip().ne("")
        return {
            "dataset": self.name,
            "users": int(inter["user_id"].nunique()),
            "items": int(len(items)),
            "items_with_interactions": int(inter["item_id"].nunique()),
            "interactions": int(len(inter)),
            "positives": int((inter["label"] >= 0.5).sum()),
            "positive_rate": round(float(inter["label"].mean()), 4) if len(inter) else 0.0,
            "items_with_image": int(items["image_uri"].notna().sum()),
            "items_with_text": int(has_text.sum()),
            "ts_min": int(inter["ts"].min()) if len(inter) else None,
            "ts_max": int(inter["ts"].max()) if len(inter) else None,
            "days": round((int(inter["ts"].max()) - int(inter["ts"].min())) / 86400, 1) if len(inter) else 0.0,
            "events_per_user": _spread(inter.groupby("user_id").size()) if len(inter) else {},
            "events_per_item": _spread(inter.groupby("item_id").size()) if len(inter) else {},
            "rejected": dict(self.reject_counts),
            "rejected_total": int(len(self.rejects)),
            "filtered": dict(self.filtered),
        }

    def fingerprint(self) -> str:
        """sha256 (hex) of the accepted items and interactions (values, column names and order; not the spec).

        Equal data gives an equal fingerprint whatever source or flags produced it: store it in manifests, and
        let a scheduled job compare it to skip a rerun on unchanged data. Image bytes are not hashed (uris are).
        """
        digest = hashlib.sha256()
        for frame in (self.items, self.interactions):
            digest.update(json.dumps([list(map(str, frame.columns)), [str(t) for t in frame.dtypes]]).encode())
            digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        return digest.hexdigest()

    def image_path(self, uri: Optional[str]) -> Optional[Path]:
        """Absolute path of an item's image (None for text-only items)."""
        if uri is None or (isinstance(uri, float) and pd.isna(uri)):
            return None
        path = Path(uri)
        return path if path.is_absolute() or self.image_root is None else self.image_root / path


def _spread(counts: pd.Series) -> dict:
    """min / median / p90 / max of per-key counts (how sparse ids are)."""
    q = counts.quantile([0.5, 0.9])
    return {"min": int(counts.min()), "p50": round(float(q[0.5]), 1), "p90": round(float(q[0.9]), 1),
            "max": int(counts.max())}
