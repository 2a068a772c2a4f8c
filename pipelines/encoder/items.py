"""Item inputs for the encoder: text, decoded image, and counted handling of missing or broken modalities.

A missing image (null uri) and a broken one (file gone, corrupt bytes) both leave the item text-only; the broken
case is logged (first few) and counted by reason, never raised: one bad poster must not stop a catalog job.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

MAX_LOGGED_IMAGE_WARNINGS = 5


@dataclass
class ItemInput:
    """One item as the encoder sees it.

    Args:
        item_id: int64 id.
        title: title (may be empty).
        text: extra text (description, genres, tags) or None.
        image: a PIL image, an already preprocessed (3, S, S) float tensor, or None for no image.
    """

    item_id: int
    title: str = ""
    text: Optional[str] = None
    image: Union[Image.Image, torch.Tensor, None] = None

    def full_text(self) -> str:
        parts = [p.strip() for p in (self.title, self.text) if isinstance(p, str) and p.strip()]
        return ". ".join(parts)


@dataclass
class ModalityStats:
    """Counts of what was encoded. ``image_errors`` maps reason (missing_image, corrupt_image, ...) -> count."""

    n_items: int = 0
    both: int = 0
    text_only: int = 0
    image_only: int = 0
    neither: int = 0
    image_errors: Counter = field(default_factory=Counter)

    def add(self, has_text: bool, has_image: bool) -> None:
        self.n_items += 1
        if has_text and has_image:
            self.both += 1
        elif has_text:
            self.text_only += 1
        elif has_image:
            self.image_only += 1
        else:
            self.neither += 1

    def merge(self, other: "ModalityStats") -> "ModalityStats":
        """Add another part's counts (shards built on different workers)."""
        for name in ("n_items", "both", "text_only", "image_only", "neither"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.image_errors.update(other.image_errors)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ModalityStats":
        return cls(**{k: d[k] for k in ("n_items", "both", "text_only", "image_only", "neither")},
                   image_errors=Counter(d.get("image_errors", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"n_items": self.n_items, "both": self.both, "text_only": self.text_only,
                "image_only": self.image_only, "neither": self.neither,
                "image_errors": dict(self.image_errors)}


def resize_image(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) uint8: center crop to square, bicubic resize."""
    img = ImageOps.fit(img.convert("RGB"), (size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def normalize_image(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """(3, S, S) uint8 -> float32 normalised with the backbone's mean / std."""
    x = x.to(torch.float32) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess_image(img: Image.Image, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """PIL image -> (3, size, size) float32, ready for the vision tower."""
    return normalize_image(resize_image(img, size), mean, std)


def _clean(value) -> Optional[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    value = str(value)
    return value if value.strip() else None


class ItemCatalog:
    """Item rows of a dataset, turned into ``ItemInput`` on demand with preprocessed images cached in memory.

    Args:
        items: DataFrame with item_id, title, text (nullable), image_uri (nullable).
        image_root: folder image_uri is relative to (or None when uris are absolute).
        image_size / mean / std: preprocessing of the encoder that will read the images.
        load_images: False encodes text only (images are still counted as skipped).
        cache_images: keep decoded images (uint8, 3*S*S bytes each) for later epochs; off when each item is
            read once (side-mode cache build, catalog embedding).
    """

    def __init__(self, items: pd.DataFrame, image_root: Optional[Path], image_size: int,
                 mean: tuple, std: tuple, load_images: bool = True, cache_images: bool = True):
        missing = [c for c in ("item_id", "title") if c not in items.columns]
        if missing:
            raise ValueError(f"items table: missing column(s) {missing}; have {list(items.columns)}")
        if items["item_id"].duplicated().any():
            dup = items.loc[items["item_id"].duplicated(), "item_id"].iloc[0]
            raise ValueError(f"items table: item_id {dup} appears more than once")
        self.items = items.reset_index(drop=True)
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.load_images, self.cache_images = load_images, cache_images
        self.row_of = {int(i): r for r, i in enumerate(self.items["item_id"].to_numpy())}
        self._pixels: dict[int, Optional[torch.Tensor]] = {}  # item_id -> (3, S, S) uint8 or None
        self._failed: set[int] = set()  # items whose image failed (counted once, not retried)
        self.image_errors: Counter = Counter()
        self.image_failures: dict[int, tuple[str, str]] = {}  # item_id -> (reason, message), for the dead letter
        self._has_text = "text" in self.items.columns
        self._has_uri = "image_uri" in self.items.columns

    @classmethod
    def from_dataset(cls, dataset, encoder_config, load_images: bool = True,
                     cache_images: bool = True) -> "ItemCatalog":
        return cls(dataset.items, getattr(dataset, "image_root", None), encoder_config.image_size,
                   encoder_config.image_mean, encoder_config.image_std,
                   load_images=load_images and encoder_config.has_vision, cache_images=cache_images)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def item_ids(self) -> np.ndarray:
        return self.items["item_id"].to_numpy(dtype=np.int64)

    def pixels(self, item_id: int) -> Optional[torch.Tensor]:
        """Preprocessed (3, S, S) float image of an item, None when it has no usable image (counted once)."""
        raw = self._pixels.get(item_id) if item_id in self._pixels else self._read(item_id)
        return normalize_image(raw, self.mean, self.std) if raw is not None else None

    def _read(self, item_id: int) -> Optional[torch.Tensor]:
        row = self.items.iloc[self.row_of[item_id]]
        uri = _clean(row["image_uri"]) if self._has_uri else None
        result = None
        if uri is not None and self.load_images and item_id not in self._failed:
            try:
                result = resize_image(_load_image(uri, self.image_root), self.image_size)
            except (ValueError, OSError) as exc:
                reason = getattr(exc, "reason", "corrupt_image" if not isinstance(exc, FileNotFoundError)
                                 else "missing_image")
                self._failed.add(item_id)
                self.image_errors[reason] += 1
                self.image_failures[item_id] = (reason, str(exc))
                if sum(self.image_errors.values()) <= MAX_LOGGED_IMAGE_WARNINGS:
                    log.warning("item %s: image unusable (%s), encoding text only: %s", item_id, reason, exc)
        if self.cache_images or result is None:
            self._pixels[item_id] = result
        return result

    def inputs(self, item_ids: Iterable[int]) -> list[ItemInput]:
        out = []
        for item_id in item_ids:
            item_id = int(item_id)
            if item_id not in self.row_of:
                raise KeyError(f"item_id {item_id} is not in the items table")
            row = self.items.iloc[self.row_of[item_id]]
            out.append(ItemInput(item_id=item_id, title=_clean(row["title"]) or "",
                                 text=_clean(row["text"]) if self._has_text else None,
                                 image=self.pixels(item_id)))
        return out


def _load_image(uri: str, root: Optional[Path]) -> Image.Image:
    """Load through pipelines.data's safe loader (refuses paths escaping the root)."""
    from pipelines.data.images import load_image
    return load_image(uri, root)
