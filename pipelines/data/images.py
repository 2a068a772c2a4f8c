"""Item images: safe path resolution, a cheap validity check, and loading as RGB.

An `image_uri` is a path relative to the dataset's image root (or absolute when there is no root). A relative
uri that resolves outside the root (``../../etc/passwd``, a symlink out) is refused: catalogs come from users.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

# Decompression-bomb guard: posters and thumbnails are tiny; anything this big is a bad record.
Image.MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An item image that cannot be used. `reason` is one of the schema's image reject reasons."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def resolve_image_path(uri: str, root: Optional[Path]) -> Path:
    """Absolute path for `uri`, refusing paths that escape `root`.

    Args:
        uri: relative (to `root`) or absolute path.
        root: the image root; None allows only absolute uris.
    Raises:
        ImageError: reason "image_escapes_root" for a path outside the root, "missing_image" for an empty uri.
    """
    if uri is None or str(uri).strip() == "":
        raise ImageError("missing_image", "empty image uri")
    if "://" in str(uri):
        raise ImageError("missing_image", f"image uri {uri!r} is remote: images are never fetched; download them "
                                          f"and point image_uri at local files under the image root")
    path = Path(str(uri))
    if root is None:
        if not path.is_absolute():
            raise ImageError("missing_image", f"relative image uri {uri!r} but the dataset has no image root")
        return path
    root_real = _real_root(str(root))
    # realpath follows symlinks, so a link pointing out of the root is caught too; an absolute uri replaces the
    # root in the join and gets the same check.
    full = os.path.realpath(os.path.join(root_real, path))
    if not full.startswith(root_real if root_real.endswith(os.sep) else root_real + os.sep):
        raise ImageError("image_escapes_root", f"image uri {uri!r} resolves to {full}, outside image root {root_real}")
    return Path(full)


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    # Resolved once per root: a catalog checks thousands of images against the same folder.
    return os.path.realpath(root).rstrip(os.sep) or os.sep


# The side of the reduced image the "draft" check decodes: JPEG's DCT scaling decodes at 1/2 .. 1/8 of full size,
# so a poster costs a fraction of a full decode, yet every entropy-coded block is still read (truncation shows).
DRAFT_SIDE = 16


def check_image(uri: str, root: Optional[Path], level: str = "draft") -> Path:
    """Validate one image without keeping it in memory; returns its resolved path.

    Args:
        level: "exists" (a non-empty regular file); "header" (PIL identifies it and `verify()` passes: reads the
            header and, for PNG, the chunk checksums, not JPEG pixel data, so a truncated JPEG passes); "draft"
            (the default: "header", then a decode of a reduced draft: JPEG at 1/8 scale via `Image.draft`, other
            formats decoded whole, so truncated or undecodable pixel data is caught; cost measured in
            docs/ARCHITECTURE.md "Image checks"); "decode" (a full-size decode).
    Raises:
        ImageError with `reason` missing_image | corrupt_image | image_escapes_root.
    """
    path = resolve_image_path(uri, root)
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("missing_image", f"image file not found: {path}") from None
    except OSError as exc:
        raise ImageError("missing_image", f"image file unreadable: {path}: {exc}") from None
    if not path.is_file():
        raise ImageError("missing_image", f"image path is not a file: {path}")
    if size == 0:
        raise ImageError("corrupt_image", f"image file is empty: {path}")
    if level == "exists":
        return path
    try:
        with Image.open(path) as img:
            if level == "decode":
                img.load()
            else:
                img.verify()
        if level == "draft":
            with Image.open(path) as img:  # verify() leaves the image unusable: open again to decode
                img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # JPEG: decode at reduced scale; a no-op elsewhere
                img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("corrupt_image", f"image file is not a readable image: {path}: {exc}") from None
    return path


def load_image(uri: str, root: Optional[Path] = None) -> Image.Image:
    """Load an item image as a PIL RGB image (fully decoded, file closed).

    Raises:
        ImageError (a ValueError) naming the file, with `reason` set.
    """
    path = resolve_image_path(uri, root)
    if not path.is_file():
        raise ImageError("missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("corrupt_image", f"image file is not a readable image: {path}: {exc}") from None
