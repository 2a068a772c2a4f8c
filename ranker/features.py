"""Item-side knowledge (ids, codes, frozen vectors) and the one feature schema the tables come from.

Row conventions (hand-checkable): item row 0 and user row 0 are the reserved *unknown* rows; item `i`
of the catalog has row `i + 1`. An RQ table of codebook size K has K + 1 rows, row K = unknown
(items without codes, e.g. new after the feature-store version was cut).

Example:
    >>> feats = ItemFeatures.build(item_ids=np.array([10, 20, 30]), code_item_ids=np.array([10, 20]),
    ...                            rq=np.array([[0, 1], [1, 1]]), vq=np.array([[20], [10]]), rq_sizes=[2, 2])
    >>> feats.rows(np.array([20, 30, 99])).tolist(), feats.rq[feats.rows(np.array([30]))].tolist()
    ([2, 3, 0], [[2, 2]])
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torchrec import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from ranker.config import RankerConfig

log = logging.getLogger(__name__)
UNKNOWN_ROW = 0
N_BASE_DENSE = 3
N_SIM_DENSE = 3


@dataclass
class ItemFeatures:
    """Per-item-row lookup arrays. N = number of catalog items; rows = N + 1 (row 0 unknown).

    Attributes:
        item_ids: (N,) int64 sorted catalog item ids.
        has_codes: (N + 1,) bool, True where the code table covers the item.
        rq: (N + 1, L) int64 RQ codes; unknown = rq_sizes[l] at level l. L may be 0.
        rq_sizes: codebook size K per level.
        vq: (N + 1, Kv) int64 item *rows* of the VQ neighbours (0 = neighbour outside the catalog).
        frozen: (N + 1, d) float32 frozen item embedding (zeros where missing) or None.
        codebooks: list of (K, d_code) float32 centroids per RQ level, or None.
        user_ids, user_vectors: (U,) sorted raw user ids, (U, d_u) their prompt-user vectors (the version's
            user_embeddings.parquet), or None; read only by feature sets with "prompt".
        user_cut_ts: None (the vectors above are one per user: every example of the user reads the same one), or
            (R,) int64 cut times: then user_ids / user_vectors are R rows sorted by (user, cut) of the version's
            user_embeddings_asof.parquet, and an example at time t reads the row of the latest cut <= t (its
            prompt read only events with ts < cut <= t), zeros when the user has no cut <= t.
        user_vectors_source: "asof" / "serving" / None: which table the prompt vectors came from.
    """

    item_ids: np.ndarray
    has_codes: np.ndarray
    rq: np.ndarray
    rq_sizes: list
    vq: np.ndarray
    frozen: np.ndarray | None = None
    has_frozen: np.ndarray | None = None
    codebooks: list | None = None
    user_ids: np.ndarray | None = None
    user_vectors: np.ndarray | None = None
    user_cut_ts: np.ndarray | None = None
    user_vectors_source: str | None = None

    @property
    def n_rows(self) -> int:
        return len(self.item_ids) + 1

    def user_vectors_of(self, user_ids: np.ndarray, ts: np.ndarray | None = None) -> np.ndarray:
        """(B, d_u) prompt-user vectors of raw user ids at times ``ts`` (B,); zeros for users without one.

        With ``user_cut_ts`` (the as-of table) each example reads its user's row of the latest cut <= its ts
        (``asof_rows``) and ``ts`` is required; without, every example of a user reads the user's one vector."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        out = np.zeros((len(user_ids), self.user_vectors.shape[1]), np.float32)
        if self.user_cut_ts is not None:
            if ts is None:
                raise ValueError("as-of user vectors need the examples' ts")
            rows = asof_rows(self.user_ids, self.user_cut_ts, user_ids, np.asarray(ts, np.int64))
            out[rows >= 0] = self.user_vectors[rows[rows >= 0]]
        elif len(self.user_ids):
            pos = np.minimum(np.searchsorted(self.user_ids, user_ids), len(self.user_ids) - 1)
            found = self.user_ids[pos] == user_ids
            out[found] = self.user_vectors[pos[found]]
        return out

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Map item ids to table rows; ids outside the catalog map to UNKNOWN_ROW."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos_clipped = np.minimum(pos, len(self.item_ids) - 1)
        found = (len(self.item_ids) > 0) & (self.item_ids[pos_clipped] == item_ids)
        return np.where(found, pos_clipped + 1, UNKNOWN_ROW).astype(np.int64)

    @classmethod
    def build(
        cls,
        item_ids: np.ndarray,
        code_item_ids: np.ndarray | None = None,
        rq: np.ndarray | None = None,
        vq: np.ndarray | None = None,
        rq_sizes: list | None = None,
        frozen_item_ids: np.ndarray | None = None,
        frozen: np.ndarray | None = None,
        codebooks: list | None = None,
        source: str = "item_codes",
    ) -> "ItemFeatures":
        """Align a code table and an embedding table (each keyed by item id) to the catalog rows.

        Args:
            item_ids: (N,) catalog item ids (unique).
            code_item_ids: (M,) item ids of the code table.
            rq: (M, L) RQ codes in [0, K_l).
            vq: (M, Kv) VQ neighbour *item ids*.
            rq_sizes: K_l per level; inferred as max + 1 when not given (codebooks give it exactly).
            frozen_item_ids, frozen: (M2,), (M2, d) frozen embeddings.
            codebooks: list of (K_l, d) centroids.
            source: name used in error messages (file or table).
        """
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError(f"{source}: catalog item ids are not unique")
        order = np.sort(item_ids)
        n_rows = len(order) + 1
        feats = cls(item_ids=order, has_codes=np.zeros(n_rows, dtype=bool), rq=np.zeros((n_rows, 0), np.int64),
                    rq_sizes=[], vq=np.zeros((n_rows, 0), np.int64), codebooks=codebooks)
        if code_item_ids is not None:
            feats._set_codes(np.asarray(code_item_ids, np.int64), rq, vq, rq_sizes, codebooks, source)
        if frozen is not None:
            frozen = np.asarray(frozen, dtype=np.float32)
            rows = feats.rows(frozen_item_ids)
            table = np.zeros((n_rows, frozen.shape[1]), dtype=np.float32)
            table[rows[rows > 0]] = frozen[rows > 0]
            feats.frozen = table
            feats.has_frozen = np.zeros(n_rows, dtype=bool)
            feats.has_frozen[rows[rows > 0]] = True
        return feats

    def _set_codes(self, code_item_ids, rq, vq, rq_sizes, codebooks, source):
        if len(np.unique(code_item_ids)) != len(code_item_ids):
            raise ValueError(f"{source}: duplicate item_id in code table")
        rq = np.zeros((len(code_item_ids), 0), np.int64) if rq is None else np.asarray(rq, np.int64)
        vq = np.zeros((len(code_item_ids), 0), np.int64) if vq is None else np.asarray(vq, np.int64)
        if rq.shape[0] != len(code_item_ids) or vq.shape[0] != len(code_item_ids):
            raise ValueError(f"{source}: rq {rq.shape} / vq {vq.shape} rows differ from {len(code_item_ids)} item ids")
        if rq_sizes is None:
            rq_sizes = [int(k) for k in (codebooks and [len(c) for c in codebooks]) or (rq.max(0) + 1 if rq.size else [])]
        rq_sizes = [int(k) for k in rq_sizes]
        if len(rq_sizes) != rq.shape[1]:
            raise ValueError(f"{source}: {rq.shape[1]} RQ levels but {len(rq_sizes)} codebook sizes")
        for level, k in enumerate(rq_sizes):
            bad = np.flatnonzero((rq[:, level] < 0) | (rq[:, level] >= k))
            if len(bad):
                raise ValueError(f"{source}: rq level {level} code {rq[bad[0], level]} outside [0, {k}) "
                                 f"at row {bad[0]} (item_id {code_item_ids[bad[0]]})")
        rows = self.rows(code_item_ids)
        known = rows > 0
        if (~known).any():
            log.info("%s: %d coded items are not in the catalog and are ignored", source, int((~known).sum()))
        self.rq_sizes = rq_sizes
        self.rq = np.tile(np.asarray(rq_sizes, np.int64), (self.n_rows, 1))  # unknown row everywhere first
        self.rq[rows[known]] = rq[known]
        if vq.size:
            vq_rows = self.rows(vq.reshape(-1)).reshape(vq.shape)
            outside = float((vq_rows == UNKNOWN_ROW).mean())
            if outside > 0.5:
                raise ValueError(f"{source}: {outside:.0%} of VQ neighbour ids are not catalog item ids "
                                 "(the vq column must hold neighbour item ids, not row indices)")
        else:
            vq_rows = vq
        self.vq = np.zeros((self.n_rows, vq.shape[1]), np.int64)
        self.vq[rows[known]] = vq_rows[known]
        self.has_codes[rows[known]] = True

    def frozen_table(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(item ids (M,), vectors (M, d)) of the items with a frozen vector, as `build` takes them; (None, None)
        without vectors."""
        if self.frozen is None:
            return None, None
        rows = np.flatnonzero(self.has_frozen)
        return self.item_ids[rows - 1], self.frozen[rows]

    def coverage(self, rows: np.ndarray) -> dict:
        """Counts of item rows (any shape, -1 = padding) lacking codes / a frozen vector."""
        rows = np.asarray(rows).reshape(-1)
        rows = rows[rows >= 0]
        out = {"items": int(len(rows)), "unknown_item": int((rows == UNKNOWN_ROW).sum()),
               "without_codes": int((~self.has_codes[rows]).sum())}
        if self.has_frozen is not None:
            out["without_frozen"] = int((~self.has_frozen[rows]).sum())
        return out


def asof_rows(table_users: np.ndarray, table_cuts: np.ndarray, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(B,) row of the table (sorted by (user, cut)) holding user ``users[b]``'s latest cut <= ``ts[b]``; -1 when
    the user has no row or no cut <= ts. Vectorised: each (user, time) becomes one int64 key, the user's rank
    times (distinct cuts + 1) plus the count of distinct cuts <= the time, so one searchsorted finds it.

    Example: table rows (7, 10), (7, 20), (9, 5); queries (7, 9) -> -1 (no cut <= 9), (7, 10) -> 0,
    (7, 25) -> 1, (9, 4) -> -1, (9, 5) -> 2, (8, 30) -> -1 (no rows)."""
    out = np.full(len(users), -1, np.int64)
    if not len(table_users) or not len(users):
        return out
    uniq_users = np.unique(table_users)
    uniq_cuts = np.unique(table_cuts)
    width = np.int64(len(uniq_cuts) + 1)
    keys = np.searchsorted(uniq_users, table_users) * width + np.searchsorted(uniq_cuts, table_cuts, "right")
    rank = np.minimum(np.searchsorted(uniq_users, users), len(uniq_users) - 1)
    known = uniq_users[rank] == users
    q = rank * width + np.searchsorted(uniq_cuts, ts, "right")
    pos = np.searchsorted(keys, q, "right") - 1
    hit = known & (pos >= 0)
    hit[hit] &= table_users[pos[hit]] == users[hit]
    out[hit] = pos[hit]
    return out


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse input feature.

    Args:
        name: KJT key.
        table: embedding table it looks up (features may share a table).
        rows: rows of that table.
        kind: "seq" (EmbeddingCollection, per-value embeddings) or "bag" (EmbeddingBagCollection, pooled).
        pooling: "sum" | "mean" for bags.
    """

    name: str
    table: str
    rows: int
    kind: str
    pooling: str = "sum"


@dataclass(frozen=True)
class FeatureSchema:
    """The ranker's sparse inputs, in KJT key order, plus the dense width.

    seq features go into one KJT (EmbeddingCollection), bag features into another (EmbeddingBagCollection).
    Per-item parts ("item_id", "rq_l{l}") exist twice: for the target and as "hist_" + name for the history,
    sharing one table, so target attention compares both in the same space.
    """

    features: tuple
    item_parts: tuple  # target-side seq names that make up the per-item vector, e.g. ("item_id", "rq_l0")
    rq_levels: int
    history_len: int
    frozen_dim: int
    n_dense: int
    dense_parts: tuple = ()  # extra dense blocks after the base ones, in order: "cross", "sim", "prompt"

    @property
    def seq_keys(self) -> list:
        return [f.name for f in self.features if f.kind == "seq"]

    @property
    def bag_keys(self) -> list:
        return [f.name for f in self.features if f.kind == "bag"]


def dense_parts(cfg: RankerConfig) -> tuple:
    """The dense blocks after the base ones: "cross" (per RQ prefix length p: log1p(count) and share of history
    items sharing the target's prefix) and "sim" (the frozen vectors' target-history similarity,
    ranker.batch.similarity_features); both need a history. "prompt": the prompt-user vector's dot product with
    the target's aligned embedding, then the vector itself (needs no history: the vector read the user's train
    portion)."""
    history = () if cfg.history_len == 0 else tuple(
        p for p, needs in (("cross", "rq"), ("sim", "frozen")) if cfg.uses(p) and cfg.uses(needs))
    return history + (("prompt",) if cfg.uses("prompt") else ())


def n_dense_features(cfg: RankerConfig, rq_levels: int, prompt_dim: int = 0) -> int:
    """Dense inputs: log1p(history length), log1p(user's prior events), smoothed prior positive rate, then the
    blocks of :func:`dense_parts` (prompt: 1 + the user vectors' width ``prompt_dim``)."""
    width = {"cross": 2 * rq_levels, "sim": N_SIM_DENSE, "prompt": 1 + prompt_dim}
    return N_BASE_DENSE + sum(width[p] for p in dense_parts(cfg))


def build_schema(cfg: RankerConfig, n_users: int, items: ItemFeatures) -> FeatureSchema:
    """The single source of truth for feature names, tables and their sizes.

    Args:
        cfg: feature set and history length.
        n_users: user rows including the unknown row 0.
        items: gives the item vocabulary, RQ levels / sizes and the frozen width.
    """
    feats = []
    if cfg.use_user_id:
        feats.append(FeatureSpec("user_id", "user", n_users, "bag"))
    parts = [("item_id", "item", items.n_rows)]
    rq_levels = 0
    if cfg.uses("rq"):
        if not items.rq_sizes:
            raise ValueError(f"feature set {cfg.features!r} needs RQ codes but the code table has none")
        rq_levels = len(items.rq_sizes)
        parts += [(f"rq_l{l}", f"rq_l{l}", k + 1) for l, k in enumerate(items.rq_sizes)]
    for name, table, rows in parts:
        feats.append(FeatureSpec(name, table, rows, "seq"))
        if cfg.history_len > 0:
            feats.append(FeatureSpec("hist_" + name, table, rows, "seq"))
    if cfg.uses("vq"):
        if items.vq.shape[1] == 0:
            raise ValueError(f"feature set {cfg.features!r} needs VQ codes but the code table has none")
        feats.append(FeatureSpec("vq", "vq", items.n_rows, "bag", pooling="mean"))
    frozen_dim = 0
    if cfg.uses("frozen"):
        if items.frozen is None:
            raise ValueError("feature set 'frozen' needs item embeddings but none were loaded")
        frozen_dim = items.frozen.shape[1]
    prompt_dim = 0
    if cfg.uses("prompt"):
        if items.user_vectors is None or items.frozen is None:
            raise ValueError(f"feature set {cfg.features!r} needs the version's user_embeddings.parquet (qarm align "
                             "--target user-prompts) and its item embeddings")
        prompt_dim = items.user_vectors.shape[1]
    return FeatureSchema(features=tuple(feats), item_parts=tuple(p[0] for p in parts), rq_levels=rq_levels,
                         history_len=cfg.history_len, frozen_dim=frozen_dim,
                         n_dense=n_dense_features(cfg, rq_levels, prompt_dim), dense_parts=dense_parts(cfg))


def table_configs(schema: FeatureSchema, embedding_dim: int) -> tuple[list, list]:
    """(EmbeddingConfig list for seq features, EmbeddingBagConfig list for bag features), one per table."""
    seq, bag = {}, {}
    for f in schema.features:
        group = seq if f.kind == "seq" else bag
        entry = group.setdefault(f.table, {"rows": f.rows, "names": [], "pooling": f.pooling})
        if entry["rows"] != f.rows:
            raise ValueError(f"table {f.table}: features disagree on rows ({entry['rows']} vs {f.rows})")
        entry["names"].append(f.name)
    seq_cfgs = [EmbeddingConfig(name=t, embedding_dim=embedding_dim, num_embeddings=e["rows"], feature_names=e["names"])
                for t, e in seq.items()]
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    bag_cfgs = [EmbeddingBagConfig(name=t, embedding_dim=embedding_dim, num_embeddings=e["rows"],
                                   feature_names=e["names"], pooling=pooling[e["pooling"]]) for t, e in bag.items()]
    return seq_cfgs, bag_cfgs
