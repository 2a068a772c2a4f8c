"""Behaviour-derived item pairs for alignment: Swing item-to-item pairs and user-to-item trigger->target pairs.

The pandas path (`mine_pairs`) and the Beam path (`pipelines.beam.mine_pairs`) share the per-item Swing kernel
(`swing_row`) and the per-user trigger kernel (`user_trigger_pairs`), so both give bit-identical pairs; the tests
check that.

Definitions (all on *positive* interactions, label >= ``PairConfig.positive_label``, one row per (user, item),
first ts kept):
- time split: ``cutoff`` is the (1 - heldout_frac) quantile of positive ts. Swing similarity is mined only on
  positives before the cutoff, so held-out pairs never leak into training similarity.
- Swing: sim(i, j) = sum over user pairs u < v, both positive on i and j, of w_u * w_v / (alpha + |I_u ∩ I_v|),
  with w_u = 1 / sqrt(|I_u|). I_u is the user's most recent ``swing_max_history`` training positives (caps the
  quadratic cost for heavy users). support(i, j) = |U_i ∩ U_j| (co-occurring users); pairs below
  ``min_support`` are dropped. Each item keeps its ``swing_top_n`` best partners, ties broken by smaller id.
- bounded cost (production Swing's caps): U_i is capped at ``swing_max_users`` users per item, the ones with the
  smallest seeded hash of (seed, item, user) (`user_sample_key`: a fixed-seed sample, the same on every runner);
  I_u is capped at the user's ``swing_max_history`` most recent positives. So one item's row costs at most
  swing_max_users² overlaps and swing_max_users · swing_max_history history entries, however popular the item.
  On data under both caps nothing is dropped and the scores are the uncapped definition exactly.
- trigger -> target: for each positive target of a user (in ts order), the trigger is the most similar item among
  the user's previous ``history`` positives; ties go to the most recent candidate. The similarity
  (``trigger_similarity``) is either
  "collab": cosine of the item vectors of a collaborative model (`pipelines.mining.collab`, implicit ALS on the train
  positives; QARM uses its retrieval models' item vectors), or
  "swing": the Swing score (or co-occurrence count, ``u2i_similarity``) looked up in the target's
  ``u2i_neighbours`` best Swing partners.
  Targets the chosen similarity cannot score (no vector / no similar candidate) fall back to the pre-trained
  encoder's item vectors (``trigger_fallback="encoder"``, when the caller supplies them), else are skipped.
  Each target's trigger source (collab | swing | encoder | none) is counted.
- train pairs = Swing pairs + trigger->target pairs with target ts < cutoff; held-out = trigger->target pairs with
  target ts >= cutoff. Pairs are unordered: stored with left < right and deduplicated (Swing wins over u2i, then
  the higher weight, then the later ts); held-out pairs already present in train are dropped.
"""
from __future__ import annotations

import logging
import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from pipelines.mining.collab import CollabConfig, fit_item_vectors

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["left", "right", "source", "ts", "weight"]
SOURCES = ("swing", "u2i")
TRIGGER_SIMILARITIES = ("collab", "swing")
TRIGGER_SOURCES = ("collab", "swing", "encoder", "none")  # where a target's trigger came from


@dataclass(frozen=True)
class PairConfig:
    """How pairs are mined.

    Args:
        swing_alpha: smoothing term alpha in w_u * w_v / (alpha + |I_u ∩ I_v|).
        swing_top_n: Swing partners kept per item.
        min_support: minimum co-occurring users for an item pair to count as similar.
        swing_max_history: cap on each user's (most recent) training positives used by Swing (items per user).
        swing_max_users: cap on the users per item Swing sees (a fixed-seed hash sample; users per item).
        history: how many previous positives are trigger candidates for a target (QARM: 50).
        u2i_neighbours: Swing partners per target considered when picking its trigger.
        u2i_similarity: with trigger_similarity="swing": "swing" (Swing score) or "cooccurrence" (co-occurring
            user count).
        trigger_similarity: "collab" (collaborative model's item vectors) or "swing" (Swing neighbours).
        trigger_fallback: "encoder" (pre-trained encoder vectors for targets the similarity cannot score, when
            given) or "none".
        collab: the collaborative model (pipelines.mining.collab.CollabConfig; its seed is this config's seed).
        heldout_frac: share of positives (latest in time) whose targets form the held-out pairs; 0 disables.
        positive_label: interactions with label >= this are positives.
        heldout_drop_seen: drop held-out pairs already among the training pairs (tests generalisation).
        seed: seed of the Swing user sample and the collaborative model (mining is otherwise deterministic).
    """

    swing_alpha: float = 1.0
    swing_top_n: int = 20
    min_support: int = 2
    swing_max_history: int = 200
    swing_max_users: int = 1000
    history: int = 50
    u2i_neighbours: int = 100
    u2i_similarity: str = "swing"
    trigger_similarity: str = "collab"
    trigger_fallback: str = "encoder"
    collab: CollabConfig = CollabConfig()
    heldout_frac: float = 0.1
    positive_label: float = 0.5
    heldout_drop_seen: bool = True
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.collab, dict):
            object.__setattr__(self, "collab", CollabConfig(**self.collab))
        if self.collab.seed != self.seed:
            object.__setattr__(self, "collab", replace(self.collab, seed=self.seed))
        if not self.swing_alpha > 0:
            raise ValueError(f"PairConfig.swing_alpha must be > 0, got {self.swing_alpha}")
        if self.trigger_similarity not in TRIGGER_SIMILARITIES:
            raise ValueError(f"PairConfig.trigger_similarity must be one of {TRIGGER_SIMILARITIES}, "
                             f"got {self.trigger_similarity!r}")
        if self.trigger_fallback not in ("encoder", "none"):
            raise ValueError(f"PairConfig.trigger_fallback must be 'encoder' or 'none', got {self.trigger_fallback!r}")
        for name in ("swing_top_n", "min_support", "swing_max_history", "swing_max_users", "history",
                     "u2i_neighbours"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PairConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.u2i_similarity not in ("swing", "cooccurrence"):
            raise ValueError(f"PairConfig.u2i_similarity must be 'swing' or 'cooccurrence', got {self.u2i_similarity!r}")
        if not 0.0 <= self.heldout_frac < 1.0:
            raise ValueError(f"PairConfig.heldout_frac must be in [0, 1), got {self.heldout_frac}")

    @property
    def neighbours_kept(self) -> int:
        return max(self.swing_top_n, self.u2i_neighbours)

    def to_dict(self) -> dict:
        return asdict(self)


class Neighbours(NamedTuple):
    """An item's best Swing partners, sorted by partner id (for searchsorted look-ups)."""

    partners: np.ndarray  # int64
    scores: np.ndarray  # float64
    support: np.ndarray  # int64


@dataclass
class PairSet:
    """Mined pairs. `train` / `heldout`: DataFrames with PAIR_COLUMNS (left < right)."""

    train: pd.DataFrame
    heldout: pd.DataFrame
    cutoff_ts: int | None = None
    stats: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# kernels shared by the pandas and Beam paths


def swing_row(item: int, user_histories: Iterable[tuple[int, np.ndarray]], cfg: PairConfig) -> Neighbours:
    """Swing similarity of `item` to every co-consumed item, from the users positive on `item`.

    Args:
        item: the item whose row is computed.
        user_histories: (user_id, sorted unique item ids) for every user whose capped history holds `item`.
        cfg: pair config (alpha, min_support, neighbours kept).

    Returns the best ``cfg.neighbours_kept`` partners with support >= min_support, sorted by partner id.
    """
    ordered = sorted(user_histories, key=lambda uh: uh[0])  # input order must not change float sums
    empty = Neighbours(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64))
    if len(ordered) < 2:
        return empty
    hists = [np.asarray(h, dtype=np.int64) for _, h in ordered]
    lens = np.array([len(h) for h in hists], dtype=np.int64)
    local_items, cols = np.unique(np.concatenate(hists), return_inverse=True)
    rows = np.repeat(np.arange(len(hists)), lens)
    h = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(hists), len(local_items)))
    overlap = (h @ h.T).toarray()  # |I_u ∩ I_v|
    w = 1.0 / np.sqrt(lens.astype(np.float64))
    pair_w = np.outer(w, w) / (cfg.swing_alpha + overlap)
    np.fill_diagonal(pair_w, 0.0)
    # sum_{u<v} W_uv H_uj H_vj = 0.5 * h_j^T W h_j for every column j at once
    hw = np.asarray(h.T @ pair_w)
    scores = 0.5 * np.asarray(h.T.multiply(hw).sum(axis=1)).ravel()
    support = np.asarray(h.sum(axis=0)).ravel().astype(np.int64)
    keep = (local_items != item) & (support >= cfg.min_support) & (scores > 0)
    partners, scores, support = local_items[keep], scores[keep], support[keep]
    if len(partners) > cfg.neighbours_kept:
        best = np.lexsort((partners, -scores))[: cfg.neighbours_kept]
        best.sort()  # local_items is sorted, so index order == partner-id order
        partners, scores, support = partners[best], scores[best], support[best]
    return Neighbours(partners.astype(np.int64), scores, support)


def top_partners(item: int, nb: Neighbours, top_n: int) -> list[tuple[int, int, float, int]]:
    """The `top_n` best partners of `item` as (item, partner, score, support), best first, ties by smaller id."""
    order = np.lexsort((nb.partners, -nb.scores))[:top_n]
    return [(int(item), int(nb.partners[k]), float(nb.scores[k]), int(nb.support[k])) for k in order]


def user_sample_key(seed: int, item: int, user: int) -> int:
    """Seeded, runner-independent hash of (item, user): each item keeps the users with the smallest keys."""
    digest = hashlib.blake2b(f"swing:{seed}:{int(item)}:{int(user)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def cap_users(item: int, user_histories: Iterable[tuple[int, np.ndarray]], cfg: PairConfig) -> list:
    """The fixed-seed sample of at most ``swing_max_users`` (user, history) of `item` (all of them under the cap)."""
    rows = list(user_histories)
    if len(rows) <= cfg.swing_max_users:
        return rows
    return sorted(rows, key=lambda uh: (user_sample_key(cfg.seed, item, uh[0]), uh[0]))[: cfg.swing_max_users]


def _swing_sims(cands: np.ndarray, nb, cfg: PairConfig):
    """Swing similarity of each candidate to the target (0 when not a partner); None when nothing is similar."""
    if nb is None or len(nb.partners) == 0:
        return None
    pos = np.searchsorted(nb.partners, cands)
    pos_c = np.minimum(pos, len(nb.partners) - 1)
    hit = nb.partners[pos_c] == cands
    values = nb.scores if cfg.u2i_similarity == "swing" else nb.support.astype(np.float64)
    sims = np.where(hit, values[pos_c], 0.0)
    return sims if (sims > 0).any() else None


def _vector_sims(cands: np.ndarray, target: int, vectors):
    """Cosine (unit vectors) of each candidate to the target (-inf without a vector); None when none scores."""
    if vectors is None:
        return None
    tv = vectors.get(target)
    if tv is None:
        return None
    sims = np.full(len(cands), -np.inf)
    for k, c in enumerate(cands.tolist()):
        cv = vectors.get(c)
        if cv is not None:
            sims[k] = float(np.dot(np.asarray(cv, np.float64), np.asarray(tv, np.float64)))
    return sims if np.isfinite(sims).any() else None


def trigger_candidates(items: np.ndarray, k: int, cfg: PairConfig) -> np.ndarray:
    """The trigger candidates of the user's k-th positive (items sorted by (ts, item)): its ``history`` previous."""
    return items[max(0, k - cfg.history): k]


def target_swing_sims(cands: np.ndarray, nb, cfg: PairConfig):
    """Swing similarity of each candidate to a target whose Neighbours are `nb` (None: nothing similar).

    Needs the target's neighbours and the candidate ids only, so the Beam path computes it where the target's
    neighbours are and ships the (at most ``history``) similarities to the user instead of the neighbour list."""
    return _swing_sims(np.asarray(cands, np.int64), nb, cfg)


def pick_triggers(user: int, items: np.ndarray, ts: np.ndarray, cfg: PairConfig, neighbours=None, collab=None,
                  encoder=None, swing_sims=None) -> tuple[list[tuple], dict]:
    """Trigger -> target pairs of one user, with each target's trigger source.

    Args:
        user: user id (carried into the output).
        items, ts: the user's positives sorted by (ts, item id).
        cfg: pair config (history, trigger_similarity, u2i_similarity, trigger_fallback).
        neighbours: item -> Neighbours (Swing; any mapping with .get), used when trigger_similarity="swing".
        collab: item -> unit vector of the collaborative model, used when trigger_similarity="collab".
        encoder: item -> unit vector of the pre-trained encoder: the fallback (trigger_fallback="encoder").
        swing_sims: instead of `neighbours`: per position k, ``target_swing_sims`` of the k-th positive's
            candidates (None where nothing is similar), precomputed where the targets' neighbours are.
    Returns:
        ([(trigger, target, similarity, target_ts, user, source), ...], {source: targets}) over TRIGGER_SOURCES.
    """
    out, counts = [], dict.fromkeys(TRIGGER_SOURCES, 0)
    items = np.asarray(items, np.int64)
    for k in range(1, len(items)):
        target = int(items[k])
        cands = trigger_candidates(items, k, cfg)
        if cfg.trigger_similarity == "swing":
            source = "swing"
            if swing_sims is not None:
                sims = swing_sims[k]
            else:
                sims = target_swing_sims(cands, neighbours.get(target) if neighbours is not None else None, cfg)
        else:
            sims, source = _vector_sims(cands, target, collab), "collab"
        if sims is None and cfg.trigger_fallback == "encoder":
            sims, source = _vector_sims(cands, target, encoder), "encoder"
        if sims is None:
            counts["none"] += 1
            continue
        counts[source] += 1
        # argmax over the reversed candidates: ties go to the most recent one
        best = len(cands) - 1 - int(np.argmax(sims[::-1]))
        out.append((int(cands[best]), target, float(sims[best]), int(ts[k]), int(user), source))
    return out, counts


def user_trigger_pairs(user: int, items: np.ndarray, ts: np.ndarray, neighbours: dict,
                       cfg: PairConfig) -> tuple[list[tuple[int, int, float, int, int]], int]:
    """Swing-only trigger -> target pairs of one user (no fallback): ([(trigger, target, sim, ts, user)], skipped)."""
    swing_only = replace(cfg, trigger_similarity="swing", trigger_fallback="none")
    rows, counts = pick_triggers(user, items, ts, swing_only, neighbours=neighbours)
    return [r[:5] for r in rows], counts["none"]


def time_cutoff(ts: np.ndarray, heldout_frac: float) -> int | None:
    """The first held-out ts: the (1 - heldout_frac) quantile of positive ts (None when nothing is held out)."""
    if heldout_frac <= 0 or len(ts) == 0:
        return None
    return int(np.quantile(np.asarray(ts, dtype=np.int64), 1.0 - heldout_frac, method="higher"))


def quantile_index(n: int, q: float) -> int:
    """Index into the n sorted values that ``np.quantile(values, q, method="higher")`` returns (numpy's own
    virtual-index arithmetic, so the distributed quantile equals the in-memory one exactly)."""
    virtual = n * q + (1.0 + q * (1.0 - 1.0 - 1.0)) - 1.0
    return int(min(max(np.ceil(virtual), 0), n - 1))


def canonical(left: int, right: int) -> tuple[int, int]:
    return (left, right) if left < right else (right, left)


def dedup_rank(row: tuple) -> tuple:
    """Sort key choosing which duplicate of an unordered pair survives: Swing first, higher weight, later ts."""
    _, _, source, ts, weight = row
    return (SOURCES.index(source), -weight, -ts)


# ----------------------------------------------------------------------------------------------------------------
# pandas path


def positives(interactions: pd.DataFrame, cfg: PairConfig) -> pd.DataFrame:
    """Positive (user, item, ts) rows, one per (user, item) with its first ts, sorted by (user, ts, item)."""
    missing = [c for c in ("user_id", "item_id", "ts", "label") if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions: missing column(s) {missing}; have {list(interactions.columns)}")
    pos = interactions.loc[interactions["label"] >= cfg.positive_label, ["user_id", "item_id", "ts"]]
    pos = pos.astype({"user_id": np.int64, "item_id": np.int64, "ts": np.int64})
    pos = pos.sort_values(["user_id", "item_id", "ts"], kind="stable").drop_duplicates(["user_id", "item_id"])
    return pos.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)


def _capped_histories(train_pos: pd.DataFrame, max_history: int) -> dict[int, np.ndarray]:
    recent = train_pos.groupby("user_id", sort=False).tail(max_history)
    return {int(u): np.sort(g["item_id"].to_numpy()) for u, g in recent.groupby("user_id", sort=True)}


def swing_neighbours(train_pos: pd.DataFrame, cfg: PairConfig) -> dict[int, Neighbours]:
    """item -> Neighbours over training positives (see module doc)."""
    hists = _capped_histories(train_pos, cfg.swing_max_history)
    by_item: dict[int, list[tuple[int, np.ndarray]]] = {}
    for user, hist in hists.items():
        for item in hist:
            by_item.setdefault(int(item), []).append((user, hist))
    out = {}
    for n_done, (item, uh) in enumerate(sorted(by_item.items())):
        nb = swing_row(item, cap_users(item, uh, cfg), cfg)
        if len(nb.partners):
            out[item] = nb
        if n_done and n_done % 2000 == 0:
            log.info("swing: %d / %d items", n_done, len(by_item))
    return out


def swing_scores(interactions: pd.DataFrame, cfg: PairConfig | None = None) -> pd.DataFrame:
    """Swing scores over all positives (no time split): DataFrame[item, partner, score, support]."""
    cfg = cfg or PairConfig(heldout_frac=0.0, min_support=1)
    nbs = swing_neighbours(positives(interactions, cfg), cfg)
    rows = [(i, int(p), float(s), int(c)) for i, nb in nbs.items() for p, s, c in zip(*nb)]
    return pd.DataFrame(rows, columns=["item", "partner", "score", "support"])


def _split(interactions: pd.DataFrame, cfg: PairConfig):
    pos = positives(interactions, cfg)
    cutoff = time_cutoff(pos["ts"].to_numpy(), cfg.heldout_frac)
    train_pos = pos if cutoff is None else pos[pos["ts"] < cutoff]
    return pos, train_pos, cutoff


def swing_pairs(interactions: pd.DataFrame, cfg: PairConfig) -> pd.DataFrame:
    """Directed Swing pairs from training positives: DataFrame[item, partner, score, support, ts]."""
    _, train_pos, _ = _split(interactions, cfg)
    return _swing_pair_frame(train_pos, swing_neighbours(train_pos, cfg), cfg)


def _swing_pair_frame(train_pos: pd.DataFrame, nbs: dict, cfg: PairConfig) -> pd.DataFrame:
    last_ts = train_pos.groupby("item_id")["ts"].max().to_dict()
    rows = [r + (max(last_ts[r[0]], last_ts[r[1]]),) for i, nb in sorted(nbs.items())
            for r in top_partners(i, nb, cfg.swing_top_n)]
    return pd.DataFrame(rows, columns=["item", "partner", "score", "support", "ts"])


def collab_vectors(train_pos: pd.DataFrame, cfg: PairConfig) -> dict[int, np.ndarray]:
    """item -> unit vector of the collaborative model fitted on the training positives (pipelines.mining.collab)."""
    return fit_item_vectors(train_pos[["user_id", "item_id"]].to_numpy(np.int64), cfg.collab)


def trigger_target_pairs(interactions: pd.DataFrame, cfg: PairConfig, encoder_vectors: dict | None = None,
                         with_source: bool = False) -> pd.DataFrame:
    """Directed trigger->target pairs for every target: DataFrame[trigger, target, score, ts, user_id(, source)]."""
    pos, train_pos, _ = _split(interactions, cfg)
    frame, _ = _u2i_frame(pos, _similarities(train_pos, cfg), encoder_vectors, cfg)
    return frame if with_source else frame.drop(columns=["source"])


def _similarities(train_pos: pd.DataFrame, cfg: PairConfig) -> dict:
    nbs = swing_neighbours(train_pos, cfg)
    return {"neighbours": nbs, "collab": collab_vectors(train_pos, cfg) if cfg.trigger_similarity == "collab"
            else None}


def _u2i_frame(pos: pd.DataFrame, sims: dict, encoder_vectors, cfg: PairConfig) -> tuple[pd.DataFrame, dict]:
    rows, counts = [], dict.fromkeys(TRIGGER_SOURCES, 0)
    for user, g in pos.groupby("user_id", sort=True):
        out, c = pick_triggers(int(user), g["item_id"].to_numpy(), g["ts"].to_numpy(), cfg,
                               neighbours=sims["neighbours"], collab=sims["collab"], encoder=encoder_vectors)
        rows.extend(out)
        for key, value in c.items():
            counts[key] += value
    return pd.DataFrame(rows, columns=["trigger", "target", "score", "ts", "user_id", "source"]), counts


def dedup_pairs(rows: Iterable[tuple]) -> list[tuple]:
    """Unordered dedup of (left, right, source, ts, weight) rows; returns canonical rows sorted by (left, right)."""
    best: dict[tuple[int, int], tuple] = {}
    for row in rows:
        key = canonical(row[0], row[1])
        cand = (key[0], key[1], row[2], row[3], row[4])
        if key not in best or dedup_rank(cand) < dedup_rank(best[key]):
            best[key] = cand
    return [best[k] for k in sorted(best)]


def _frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    return df.astype({"left": np.int64, "right": np.int64, "source": str, "ts": np.int64, "weight": np.float64})


def mine_pairs(interactions: pd.DataFrame, cfg: PairConfig | None = None,
               encoder_vectors: dict | None = None) -> PairSet:
    """Mine training and held-out pairs from interactions (user_id, item_id, ts, label).

    Args:
        interactions: the interaction table (DESIGN.md contract).
        cfg: pair config; defaults to PairConfig().
        encoder_vectors: item -> unit vector of the pre-trained encoder (the trigger fallback), or None.

    Returns a PairSet; `stats` counts positives, pairs by source, duplicates and skipped targets.
    """
    cfg = cfg or PairConfig()
    pos, train_pos, cutoff = _split(interactions, cfg)
    log.info("pairs: %d positives, %d users, cutoff ts %s", len(pos), pos["user_id"].nunique(), cutoff)
    sims = _similarities(train_pos, cfg)
    nbs = sims["neighbours"]
    swing = _swing_pair_frame(train_pos, nbs, cfg)
    u2i, trigger_counts = _u2i_frame(pos, sims, encoder_vectors, cfg)
    swing_rows = [(r.item, r.partner, "swing", r.ts, r.score) for r in swing.itertuples(index=False)]
    u2i_rows = [(r.trigger, r.target, "u2i", r.ts, r.score) for r in u2i.itertuples(index=False)]
    is_held = [cutoff is not None and r[3] >= cutoff for r in u2i_rows]
    train = dedup_pairs(swing_rows + [r for r, h in zip(u2i_rows, is_held) if not h])
    train_keys = {(r[0], r[1]) for r in train}
    held_all = dedup_pairs([r for r, h in zip(u2i_rows, is_held) if h])
    heldout = [r for r in held_all if not (cfg.heldout_drop_seen and (r[0], r[1]) in train_keys)]
    stats = {
        "positives": int(len(pos)), "train_positives": int(len(train_pos)), "users": int(pos["user_id"].nunique()),
        "items_with_partners": len(nbs), "swing_pairs_directed": int(len(swing)),
        "u2i_pairs_directed": int(len(u2i)), "u2i_targets_without_trigger": int(trigger_counts["none"]),
        "trigger_sources": trigger_counts,
        "train_pairs": len(train), "heldout_pairs": len(heldout),
        "heldout_dropped_seen_in_train": len(held_all) - len(heldout),
        "train_by_source": {s: sum(r[2] == s for r in train) for s in SOURCES},
    }
    log.info("pairs: %s", stats)
    return PairSet(_frame(train), _frame(heldout), cutoff, stats, cfg.to_dict())
