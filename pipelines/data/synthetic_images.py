"""Procedural item images for the synthetic dataset: a cluster fixes shape, texture and colour; items jitter them.

Everything is a deterministic function of (cluster style, per-item rng), so a cache folder can be rebuilt
bit-for-bit from the seed.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring")
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient")


@dataclass(frozen=True)
class ClusterStyle:
    """What a cluster looks like. hue in [0, 1); background_dark picks a dark or a light backdrop."""

    shape: str
    texture: str
    hue: float
    background_dark: bool

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"ClusterStyle.shape: {self.shape!r} not in {SHAPES}")
        if self.texture not in TEXTURES:
            raise ValueError(f"ClusterStyle.texture: {self.texture!r} not in {TEXTURES}")
        if not 0.0 <= self.hue < 1.0:
            raise ValueError(f"ClusterStyle.hue: {self.hue} not in [0, 1)")


def cluster_styles(n_clusters: int, rng: np.random.Generator) -> list[ClusterStyle]:
    """Distinct styles: hues spread evenly (shuffled), shapes and textures cycled so neighbours differ."""
    offset = rng.random()
    hues = [(offset + c / n_clusters) % 1.0 for c in range(n_clusters)]
    order = rng.permutation(n_clusters)
    shape_order = rng.permutation(len(SHAPES))
    texture_order = rng.permutation(len(TEXTURES))
    return [ClusterStyle(shape=SHAPES[shape_order[c % len(SHAPES)]],
                         texture=TEXTURES[texture_order[(c // len(SHAPES) + c) % len(TEXTURES)]],
                         hue=float(hues[order[c]]), background_dark=bool(c % 3 == 0))
            for c in range(n_clusters)]


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(n: int, cx: float, cy: float, r: float, rot: float, inner: float | None = None) -> list:
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        radius = r if (inner is None or k % 2 == 0) else r * inner
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif shape == "square":
        d.polygon(_polygon(4, cx, cy, r * 1.15, rot + math.pi / 4), fill=255)
    elif shape == "diamond":
        d.polygon(_polygon(4, cx, cy, r * 1.2, rot * 0.2), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(3, cx, cy, r * 1.2, rot - math.pi / 2), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, cx, cy, r, rot), fill=255)
    elif shape == "star":
        d.polygon(_polygon(5, cx, cy, r * 1.2, rot - math.pi / 2, inner=0.45), fill=255)
    elif shape == "cross":
        w = r * 0.38
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
        mask = mask.rotate(math.degrees(rot) % 90, center=(cx, cy))
    return mask


def _texture(texture: str, size: int, fg, fg2, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(5, 9))
    if texture == "solid":
        sel = np.zeros((size, size), bool)
    elif texture == "stripes":
        sel = ((xx + yy) // period) % 2 == 0 if rng.random() < 0.5 else (yy // period) % 2 == 0
    elif texture == "dots":
        sel = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3.2) ** 2
    elif texture == "checker":
        sel = ((xx // period) + (yy // period)) % 2 == 0
    else:  # gradient
        t = (xx + yy) / (2.0 * size)
        start, end = np.asarray(fg, float)[None, None], np.asarray(fg2, float)[None, None]
        arr = start * (1 - t[..., None]) + end * t[..., None]
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    arr = np.where(sel[..., None], np.asarray(fg2, np.uint8)[None, None], np.asarray(fg, np.uint8)[None, None])
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def render_item_image(style: ClusterStyle, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One item's image: the cluster's shape/texture/colour with per-item jitter, a distractor, pixel noise.

    Args:
        style: the item's cluster style.
        rng: per-item generator (seeded from (seed, item_id) by the caller).
        size: side in pixels.
    Returns:
        PIL RGB image (size, size).
    """
    hue = style.hue + rng.normal(0, 0.025)
    fg = _rgb(hue, 0.75 + rng.normal(0, 0.08), 0.85 + rng.normal(0, 0.08))
    fg2 = _rgb(hue + 0.04, 0.9, 0.45 + rng.normal(0, 0.06))
    bg_val = 0.15 + rng.random() * 0.1 if style.background_dark else 0.85 + rng.random() * 0.12
    bg = _rgb(rng.random(), 0.12 * rng.random(), bg_val)
    img = Image.new("RGB", (size, size), bg)
    # A small distractor shape of a random colour in a corner: content noise the encoder must look past.
    if rng.random() < 0.35:
        dshape = SHAPES[int(rng.integers(len(SHAPES)))]
        dmask = _shape_mask(dshape, size, size * rng.choice([0.15, 0.85]), size * rng.choice([0.15, 0.85]),
                            size * 0.09, rng.random() * math.pi)
        img.paste(Image.new("RGB", (size, size), _rgb(rng.random(), 0.6, 0.7)), mask=dmask)
    cx = size / 2 + rng.normal(0, size * 0.06)
    cy = size / 2 + rng.normal(0, size * 0.06)
    r = size * (0.27 + rng.normal(0, 0.035))
    mask = _shape_mask(style.shape, size, cx, cy, r, rng.random() * math.pi / 6)
    img.paste(_texture(style.texture, size, fg, fg2, rng), mask=mask)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
