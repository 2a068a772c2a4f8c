"""The embedded synthetic dataset: latent clusters decide item content and user clicks.

Generative story (all from `spec.seed`):
- Each of `n_clusters` latent clusters has a visual style (shape, texture, hue; see synthetic_images) and a
  vocabulary (themed words plus a colour and shape word). Items pick a cluster; their image renders the style
  with jitter and distractors, their title/text mix cluster words with shared noise words (and, sometimes, a
  word from another cluster).
- Items are released over time: a starting catalog, then a steady stream, so later periods contain items that
  never appeared earlier (the cold-start case content codes exist for).
- Look-alike pairs (`lookalike_share` of the clusters): the second cluster of a pair copies the first's shape,
  colour and most words, differing only in texture and a few words, while users like the two independently. A
  generic content encoder sees one group where behaviour sees two: the headroom behaviour alignment can win.
- Users like 1-3 clusters (popular clusters more often). A feed shows them fresh items, about half from liked
  clusters; the click probability is sigmoid(BASE + LIKE_WEIGHT * liked + item quality + user bias), so the
  cluster decides most of it while each item id is seen only a few dozen times.

Presets (`DataSpec.preset`, `--preset`): "default" is the impression log above. "sparse" is shaped like a small
shop's purchase log, where content codes are supposed to matter most and ids alone have little to learn from:
only the clicks are logged (implicit positives, label 1), users are many and light (about 4 events each, a
heavy-tailed activity), most items are bought once or twice, 10% of events repeat an earlier purchase of the same
user, and the catalog keeps arriving with feeds favouring items days old, so later windows are dominated by items
that earlier windows never saw.

The latent cluster id is in `items["cluster"]` for tests and diagnostics; models must not use it as a feature.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.io import atomic_write_json
from pipelines.data.schema import DataSpec, Dataset
from pipelines.data.synthetic_images import TEXTURES, cluster_styles, render_item_image
from pipelines.data.validate import RejectLog, finalize

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2          # bump when the generative story changes: invalidates image caches
START_TS = 1_600_000_000       # 2020-09-13, unix seconds
SPAN_S = 90 * 24 * 3600        # events cover 90 days
INITIAL_CATALOG = 0.35         # fraction of items available from the start; the rest arrive over time
RELEASE_END = 0.92             # last release at this fraction of the span, so the last days still see new items
FRESHNESS_S = 12 * 24 * 3600   # feeds favour items younger than about this
LIKED_EXPOSURE = 0.5           # share of impressions drawn from the user's liked clusters
BASE_LOGIT = -2.2              # click logit for a disliked cluster (~10%)
LIKE_WEIGHT = 3.0              # added for a liked cluster (~69%): the cluster dominates the click
ITEM_QUALITY_SD = 0.4          # per-item effect: what item ids alone can learn
USER_BIAS_SD = 0.3
CROSS_WORD_RATE = 0.12         # chance a title word comes from another cluster (text noise)
LOOKALIKE_SHARED_WORDS = 5     # of a look-alike cluster's 8 words, this many are its twin's

THEMES = (
    ("ocean", "coral", "tide", "reef", "harbor", "wave", "sailor", "lagoon"),
    ("forest", "pine", "moss", "fern", "cabin", "trail", "acorn", "timber"),
    ("desert", "dune", "cactus", "mirage", "canyon", "oasis", "sandstone", "nomad"),
    ("galaxy", "comet", "orbit", "nebula", "rocket", "lunar", "stellar", "cosmos"),
    ("kitchen", "spice", "bakery", "kettle", "pasta", "herb", "skillet", "pantry"),
    ("racing", "engine", "turbo", "garage", "piston", "rally", "speedway", "chrome"),
    ("garden", "tulip", "petal", "orchid", "bloom", "meadow", "blossom", "ivy"),
    ("winter", "frost", "glacier", "snowfall", "alpine", "icicle", "blizzard", "sled"),
    ("jazz", "saxophone", "melody", "rhythm", "vinyl", "trumpet", "ballad", "groove"),
    ("castle", "knight", "dragon", "throne", "armor", "kingdom", "quest", "banner"),
    ("robot", "circuit", "laser", "android", "quantum", "cyber", "gadget", "module"),
    ("safari", "lion", "savanna", "zebra", "jungle", "tiger", "wildlife", "explorer"),
    ("candy", "caramel", "sugar", "lollipop", "toffee", "sprinkle", "cupcake", "fudge"),
    ("stadium", "soccer", "goal", "athlete", "trophy", "league", "sprint", "champion"),
    ("library", "novel", "poetry", "scroll", "ink", "chapter", "author", "archive"),
    ("volcano", "lava", "magma", "ember", "ash", "crater", "basalt", "inferno"),
)
NOISE_WORDS = ("classic", "new", "deluxe", "edition", "set", "pack", "premium", "mini", "original", "limited",
               "collection", "series", "bundle", "vintage", "modern", "special", "essential", "plus", "max", "daily")
COLOUR_WORDS = ((0.0, "red"), (0.08, "orange"), (0.15, "yellow"), (0.3, "green"), (0.45, "teal"), (0.55, "cyan"),
                (0.63, "blue"), (0.75, "violet"), (0.85, "magenta"), (0.95, "crimson"))


def _cluster_vocab(c: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Themed words for cluster c; beyond the hand-written themes, pronounceable made-up words."""
    if c < len(THEMES):
        return THEMES[c]
    syll = ("ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "qu", "fin", "bra", "zu", "pel", "nor", "ti", "gan")
    return tuple("".join(rng.choice(syll, size=int(rng.integers(2, 4)))) for _ in range(8))


def _make_lookalikes(styles: list, vocabs: list, share: float) -> tuple[list, list]:
    """Turn the first `share` of the clusters into look-alike pairs (2j, 2j+1).

    The second cluster of a pair copies the first's shape, hue, backdrop and LOOKALIKE_SHARED_WORDS of its words;
    only its texture and its remaining words tell it apart. Users like the two independently, so surface content
    says "same" where behaviour says "different": what a behaviour-aligned encoder can learn and a generic one
    misses.
    """
    styles, vocabs = list(styles), list(vocabs)
    for j in range(int(share * len(styles)) // 2):
        a, b = 2 * j, 2 * j + 1
        texture = styles[b].texture if styles[b].texture != styles[a].texture else \
            TEXTURES[(TEXTURES.index(styles[a].texture) + 1) % len(TEXTURES)]
        styles[b] = replace(styles[a], texture=texture, hue=(styles[a].hue + 0.015) % 1.0)
        vocabs[b] = tuple(vocabs[a][:LOOKALIKE_SHARED_WORDS]) + tuple(vocabs[b][LOOKALIKE_SHARED_WORDS:])
    return styles, vocabs


def _colour_word(hue: float) -> str:
    return min(COLOUR_WORDS, key=lambda hw: min(abs(hue - hw[0]), 1 - abs(hue - hw[0])))[1]


@dataclass(frozen=True)
class WorldShape:
    """The knobs a preset turns (see the module docstring)."""

    initial_catalog: float = INITIAL_CATALOG
    freshness_s: int = FRESHNESS_S
    activity_sigma: float = 0.8
    implicit: bool = False
    repeat_rate: float = 0.0


SHAPES = {"default": WorldShape(),
          "sparse": WorldShape(initial_catalog=0.1, freshness_s=3 * 24 * 3600, activity_sigma=1.0, implicit=True,
                               repeat_rate=0.1)}


def _make_items(spec: DataSpec, rng: np.random.Generator):
    n, k = spec.n_items, spec.n_clusters
    styles = cluster_styles(k, rng)
    vocabs = [_cluster_vocab(c, rng) for c in range(k)]
    styles, vocabs = _make_lookalikes(styles, vocabs, spec.lookalike_share)
    # Every cluster gets items; the rest are assigned at random (mildly unequal cluster sizes).
    cluster = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    rng.shuffle(cluster)
    n_initial = max(1, int(round(SHAPES[spec.preset].initial_catalog * n)))
    release = np.concatenate([np.full(n_initial, START_TS, dtype=np.int64),
                              np.sort(START_TS + rng.integers(0, int(RELEASE_END * SPAN_S), n - n_initial))])
    titles, texts = _make_texts(cluster, styles, vocabs, rng)
    items = pd.DataFrame({"item_id": np.arange(n, dtype=np.int64), "title": titles, "text": texts,
                          "image_uri": [f"{i:06d}.png" for i in range(n)], "cluster": cluster.astype(np.int64),
                          "release_ts": release})
    return items, styles


def _make_texts(cluster: np.ndarray, styles, vocabs, rng: np.random.Generator) -> tuple[list, list]:
    """Titles (2 cluster words + 1 noise word, sometimes a word of another cluster) and descriptions (2-4 cluster
    words, 2-4 noise words, often the colour and shape the image shows), in random order.

    Random draws are made in bulk (one array per kind) so a large catalog costs a string join per item."""
    n, k = len(cluster), len(vocabs)
    vocab = np.array(vocabs, dtype=object)                     # (k, W)
    noise = np.array(NOISE_WORDS, dtype=object)
    n_words = vocab.shape[1]
    w1 = rng.integers(0, n_words, n)
    w2 = (w1 + rng.integers(1, n_words, n)) % n_words         # a second, different cluster word
    cross = rng.random(n) < CROSS_WORD_RATE
    cross_pos, cross_c, cross_w = rng.integers(0, 2, n), rng.integers(0, k, n), rng.integers(0, n_words, n)
    title_noise, noise_pos = rng.integers(0, len(noise), n), rng.integers(0, 3, n)
    n_cluster_words, n_noise_words = rng.integers(2, 5, n), rng.integers(2, 5, n)
    desc_cluster, desc_noise = rng.integers(0, n_words, (n, 4)), rng.integers(0, len(noise), (n, 4))
    says_picture = rng.random(n) < 0.6
    order_keys = rng.random((n, 10))                          # shuffles the description words
    picture_words = [(_colour_word(st.hue), st.shape) for st in styles]
    titles, texts = [], []
    for i in range(n):
        c = int(cluster[i])
        words = [vocab[c, w1[i]], vocab[c, w2[i]]]
        if cross[i]:
            words[cross_pos[i]] = vocab[cross_c[i], cross_w[i]]
        words.insert(int(noise_pos[i]), noise[title_noise[i]])
        titles.append(" ".join(words).capitalize())
        desc = list(vocab[c, desc_cluster[i, : n_cluster_words[i]]]) + list(noise[desc_noise[i, : n_noise_words[i]]])
        if says_picture[i]:
            desc += picture_words[c]
        order = np.argsort(order_keys[i, : len(desc)])
        texts.append(" ".join(desc[j] for j in order) + ".")
    return titles, texts


def _make_interactions(spec: DataSpec, items: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    shape = SHAPES[spec.preset]
    if not shape.implicit:
        return _impressions(spec, items, rng, shape, spec.n_events)
    # implicit: simulate enough impressions, log only the clicks, then add repeat purchases
    n_fresh = int(round(spec.n_events * (1.0 - shape.repeat_rate)))
    log = _impressions(spec, items, rng, shape, max(4 * n_fresh, 100))
    clicks = log[log["label"] >= 0.5]
    while len(clicks) < n_fresh:  # a world with a low click rate: simulate more
        log = _impressions(spec, items, rng, shape, 2 * len(log))
        clicks = log[log["label"] >= 0.5]
    clicks = clicks.iloc[np.sort(rng.choice(len(clicks), n_fresh, replace=False))]
    n_repeat = spec.n_events - n_fresh
    src = clicks.iloc[rng.integers(0, len(clicks), n_repeat)]
    later = np.minimum(src["ts"].to_numpy() + rng.integers(3600, 30 * 24 * 3600, n_repeat), START_TS + SPAN_S - 1)
    repeats = src.assign(ts=later.astype(np.int64))
    out = pd.concat([clicks, repeats], ignore_index=True).assign(label=np.float32(1.0))
    return out.sort_values("ts", kind="stable").reset_index(drop=True)


def _impressions(spec: DataSpec, items: pd.DataFrame, rng: np.random.Generator, shape: WorldShape,
                 n_events: int) -> pd.DataFrame:
    n_users, k = spec.n_users, spec.n_clusters
    cluster = items["cluster"].to_numpy()
    release = items["release_ts"].to_numpy()
    popularity = rng.dirichlet(np.full(k, 2.0))
    liked = np.zeros((n_users, k), dtype=bool)
    for u in range(n_users):
        liked[u, rng.choice(k, size=min(k, int(rng.integers(1, 4))), replace=False, p=popularity)] = True
    n_liked = liked.sum(1)
    liked_pad = np.zeros((n_users, int(n_liked.max())), dtype=np.int64)  # (U, max liked) cluster ids, left-packed
    for u in range(n_users):
        liked_pad[u, : n_liked[u]] = np.flatnonzero(liked[u])
    quality = rng.normal(0, ITEM_QUALITY_SD, len(items))
    user_bias = rng.normal(0, USER_BIAS_SD, n_users)
    activity = rng.lognormal(0, shape.activity_sigma, n_users)
    activity /= activity.sum()

    ts = np.sort(START_TS + rng.integers(0, SPAN_S, n_events))
    users = rng.choice(n_users, size=n_events, p=activity)
    shown = np.empty(n_events, dtype=np.int64)
    n_periods = 60
    edges = np.searchsorted(ts, START_TS + np.linspace(0, SPAN_S, n_periods + 1)[1:-1])
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, n_events]):
        if lo == hi:
            continue
        now = ts[hi - 1]
        avail = np.flatnonzero(release <= now)
        fresh = 1.0 / (1.0 + (now - release[avail]) / shape.freshness_s)
        from_liked = rng.random(hi - lo) < LIKED_EXPOSURE
        # Random feed slots: any available item, fresher ones more often.
        rand_idx = np.flatnonzero(~from_liked) + lo
        shown[rand_idx] = rng.choice(avail, size=len(rand_idx), p=fresh / fresh.sum())
        # Personalised slots: a liked cluster first, then an available item of it.
        liked_idx = np.flatnonzero(from_liked) + lo
        slot_users = users[liked_idx]
        pick = liked_pad[slot_users, (rng.random(len(liked_idx)) * n_liked[slot_users]).astype(np.int64)]
        for c in np.unique(pick):
            slots = liked_idx[pick == c]
            pool = avail[cluster[avail] == c]
            if len(pool) == 0:  # cluster has no released item yet: fall back to the open feed
                shown[slots] = rng.choice(avail, size=len(slots), p=fresh / fresh.sum())
                continue
            w = fresh[cluster[avail] == c]
            shown[slots] = rng.choice(pool, size=len(slots), p=w / w.sum())
    logit = BASE_LOGIT + LIKE_WEIGHT * liked[users, cluster[shown]] + quality[shown] + user_bias[users]
    label = (rng.random(n_events) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return pd.DataFrame({"user_id": users.astype(np.int64), "item_id": shown, "ts": ts.astype(np.int64),
                         "label": label})


def _cache_key(spec: DataSpec) -> str:
    cfg = {"v": GENERATOR_VERSION, "n_items": spec.n_items, "n_clusters": spec.n_clusters,
           **({"preset": spec.preset} if spec.preset != "default" else {}),
           "lookalike_share": spec.lookalike_share,
           "image_size": spec.image_size, "seed": spec.seed}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("QARM_CACHE", Path.home() / ".cache" / "qarm")) / "synthetic"


def _ensure_images(spec: DataSpec, items: pd.DataFrame, styles) -> Path:
    """Render the images once into <data or cache>/images-<key>/; later loads reuse them.

    The folder is built aside and renamed into place, so a reader never sees a half-written set.
    """
    base = Path(spec.data) if spec.data is not None else default_cache_dir()
    key = _cache_key(spec)
    final = base / f"images-{key}"
    marker = final / "_COMPLETE.json"
    if marker.exists():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".images-{key}.", dir=base))
    try:
        try:
            from tqdm import tqdm
            it = tqdm(range(len(items)), desc="synthetic images", disable=None, leave=False)
        except ImportError:  # pragma: no cover
            it = range(len(items))
        for i in it:
            row = items.iloc[i]
            img = render_item_image(styles[int(row["cluster"])],
                                    np.random.default_rng([spec.seed, int(row["item_id"])]), spec.image_size)
            img.save(tmp / row["image_uri"], format="PNG", optimize=False)
        atomic_write_json(tmp / "_COMPLETE.json", {"key": key, "n_items": len(items), "spec": spec.to_dict()})
        try:
            os.rename(tmp, final)
        except OSError:
            if not marker.exists():  # a stale partial folder without a marker: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic: wrote %d images to %s", len(items), final)
    return final


def load_synthetic(spec: DataSpec) -> Dataset:
    """Generate (or reuse the cached images of) the synthetic dataset for `spec`; see the module docstring."""
    rng = np.random.default_rng(spec.seed)
    items, styles = _make_items(spec, rng)
    interactions = _make_interactions(spec, items, rng)
    image_root = _ensure_images(spec, items, styles)
    return finalize(items, interactions, spec=spec, name="synthetic", image_root=image_root, rejects=RejectLog(),
                    items_source="synthetic:items", interactions_source="synthetic:interactions",
                    check_images=True)
