"""Tiny generated inputs for the data-source tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_png(path: Path, colour=(200, 30, 30), size=8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="PNG")
    return path


@pytest.fixture
def catalog_dir(tmp_path) -> Path:
    """A small generic catalog with string ids, ISO dates, images, and one instance of every bad record."""
    root = tmp_path / "shop"
    img = root / "img"
    write_png(img / "a.png")
    write_png(img / "b.png", (30, 200, 30))
    write_png(img / "e.png", (30, 30, 200))
    (img / "broken.png").write_bytes(b"not a png at all")
    write_png(tmp_path / "outside.png")
    (root / "items.csv").write_text(
        "sku,name,description,picture,brand\n"
        "A-1,Red mug,ceramic mug,a.png,acme\n"         # row 0: fine
        "B-2,Green cup,,b.png,acme\n"                  # row 1: fine, no description
        "C-3,Blue bowl,a bowl,missing.png,zenith\n"    # row 2: missing_image -> text-only
        "D-4,Plate,flat plate,broken.png,zenith\n"     # row 3: corrupt_image -> text-only
        "A-1,Red mug again,dup,a.png,acme\n"           # row 4: duplicate_item -> dropped
        "E-5,,,e.png,acme\n"                           # row 5: empty_text, has image -> image-only
        "F-6,,,,acme\n"                                # row 6: empty_text, no image -> dropped
        "G-7,Spoon,steel spoon,../../outside.png,acme\n"  # row 7: image_escapes_root -> text-only
    )
    (root / "events.csv").write_text(
        "uid,sku,when,clicked\n"
        "u1,A-1,2024-01-01T10:00:00Z,1\n"   # row 0
        "u2,B-2,2024-01-02,0\n"             # row 1
        "u1,C-3,2024-01-03T00:00:00,1\n"    # row 2
        "u3,Z-9,2024-01-04,1\n"             # row 3: unknown_item
        "u2,F-6,2024-01-05,1\n"             # row 4: item dropped for empty text -> unknown_item
        ",A-1,2024-01-06,1\n"               # row 5: missing_value (user)
        "u3,E-5,2024-01-07,7\n"             # row 6: bad_label
        "u3,G-7,2024-01-08,0\n"             # row 7
        "u1,D-4,2024-01-01T09:00:00Z,0\n"   # row 8: earliest event
        "u1,D-4,2024-01-01T09:00:00Z,0\n"   # row 9: duplicate_interaction (same as row 8)
        "u1,D-4,2024-01-01T09:00:00Z,1\n"   # row 10: same second, other label: a distinct event, kept
        "u2,A-1,-1,1\n"                     # row 11: bad_timestamp (a -1 sentinel)
    )
    (root / "mapping.yaml").write_text(
        "items:\n  path: items.csv\n  columns: {item_id: sku, title: name, text: description, image_uri: picture}\n"
        "  attributes: [brand]\n"
        "interactions:\n  path: events.csv\n  columns: {user_id: uid, item_id: sku, ts: when, label: clicked}\n"
        "image_root: img\n"
    )
    return root


def rng_ints(n, high, seed=0):
    return np.random.default_rng(seed).integers(0, high, n)


@pytest.fixture
def png():
    """The `write_png(path, colour, size)` helper, as a fixture (conftest modules are not importable)."""
    return write_png
