"""Retrieval data on the protocol split: id maps, positives per window, and the store's item features.

Everything is held as dense row indices: users 0..U-1 (every user of the interaction log), items 0..N-1 (the
catalog, sorted by item_id). Positives are interactions with label > 0.5. The split is the one protocol
(`feature_store.split`), so the retrieval models see exactly the ranker's train / valid / test windows.

    data = prepare_retrieval_data(interactions, catalog_ids, SplitConfig("global"))
    feats = load_item_features(FeatureStore(root).read(version), data.item_ids)

Bound: the positives of one log are held in memory (int64 pairs, 16 bytes each: 100M positives = 1.6 GB); the
catalog's feature tables likewise (N × d float32). A larger log is sharded by user upstream.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from feature_store.split import SplitConfig, split_labels

MODALITY_TABLES = {"aligned": "item_embeddings", "text": "item_embeddings_text", "image": "item_embeddings_image"}
WINDOWS = {"train": 0, "valid": 1, "test": 2}


@dataclass
class RetrievalData:
    """Positives of each window as row indices.

    Attributes:
        user_ids: (U,) int64 raw user ids; row u is user_ids[u].
        item_ids: (N,) int64 raw item ids (the catalog, sorted); row i is item_ids[i].
        pairs: {"train"|"valid"|"test": (P, 2) int64 [user row, item row]} positive pairs per window.
        split: the SplitConfig used.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    pairs: dict
    split: SplitConfig
    _sets: dict = field(default_factory=dict, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def positives(self, window: str) -> list:
        """Per user row, the set of positive item rows in the window. List of U sets (cached)."""
        if window not in self._sets:
            sets = [set() for _ in range(self.n_users)]
            for u, i in self.pairs[window].tolist():
                sets[u].add(i)
            self._sets[window] = sets
        return self._sets[window]

    def eval_users(self, window: str) -> tuple[np.ndarray, list]:
        """Users evaluated on a window and their targets.

        A user is evaluated when it has at least one training positive (an id model has no representation of a
        user it never saw; cold users are counted in `info`, not scored) and at least one positive in the window
        that is not one of its training positives (those are excluded from the candidates, so they cannot be
        targets either).
        Returns:
            (users (E,) int64 rows, targets: E sets of item rows)
        """
        train, win = self.positives("train"), self.positives(window)
        users, targets = [], []
        for u in range(self.n_users):
            t = win[u] - train[u]
            if train[u] and t:
                users.append(u)
                targets.append(t)
        return np.asarray(users, dtype=np.int64), targets

    @property
    def info(self) -> dict:
        out = {"users": self.n_users, "items": self.n_items, "split": dataclasses.asdict(self.split)}
        for w in WINDOWS:
            out[f"{w}_positives"] = int(len(self.pairs[w]))
        train_items = np.unique(self.pairs["train"][:, 1])
        for w in ("valid", "test"):
            users, targets = self.eval_users(w)
            n_t = sum(len(t) for t in targets)
            cold = sum(len(t - set(train_items.tolist())) for t in targets) if targets else 0
            out[f"{w}_eval_users"] = int(len(users))
            out[f"{w}_targets"] = int(n_t)
            out[f"{w}_targets_on_cold_items"] = int(cold)
            win_users = np.unique(self.pairs[w][:, 0])
            out[f"{w}_cold_users_skipped"] = int(np.sum(np.isin(win_users, np.unique(self.pairs["train"][:, 0]),
                                                                invert=True)))
        return out


def prepare_retrieval_data(interactions: pd.DataFrame, catalog_ids, split: SplitConfig = SplitConfig()) -> RetrievalData:
    """Positives per window as dense rows.

    Args:
        interactions: contract interactions (user_id, item_id, ts, label).
        catalog_ids: the live catalog's item ids; interactions on items outside it are dropped (they cannot be
            retrieved). Every catalog item is a candidate under full ranking.
        split: the protocol's time split (applied to the whole log, as the ranker does).
    """
    for col in ("user_id", "item_id", "ts", "label"):
        if col not in interactions.columns:
            raise ValueError(f"interactions: missing column {col!r} (have {list(interactions.columns)})")
    item_ids = np.unique(np.asarray(catalog_ids, dtype=np.int64))
    if len(item_ids) == 0:
        raise ValueError("prepare_retrieval_data: the catalog is empty")
    part = split_labels(interactions, split)
    user_ids = np.unique(interactions["user_id"].to_numpy(np.int64))
    pos = interactions["label"].to_numpy(np.float64) > 0.5
    items = interactions["item_id"].to_numpy(np.int64)
    in_cat = np.isin(items, item_ids)
    u_rows = np.searchsorted(user_ids, interactions["user_id"].to_numpy(np.int64))
    i_rows = np.searchsorted(item_ids, items)
    pairs = {}
    for w, p in WINDOWS.items():
        m = pos & in_cat & (part == p)
        pr = np.stack([u_rows[m], i_rows[m]], 1).astype(np.int64)
        pairs[w] = np.unique(pr, axis=0) if len(pr) else pr.reshape(0, 2)   # repeats count once
    return RetrievalData(user_ids=user_ids, item_ids=item_ids, pairs=pairs, split=split)


@dataclass
class ItemFeatures:
    """The teacher's multimodal inputs and the student's optional code tables, aligned with the catalog rows.

    Attributes:
        modalities: {name: (N, d_m) float32} — "aligned" (item_embeddings), "text", "image" where the version has
            them; rows of items the table lacks are zeros and flagged in `present`.
        present: {name: (N,) bool}.
        codes: (N, L) int64 RQ codes or None; items without codes get the padding code K (one extra row per level).
        codebook_size: K per level (max code + 1) or 0.
        version_id: the store version read.
    """

    modalities: dict
    present: dict
    codes: np.ndarray | None
    codebook_size: int
    version_id: str | None = None

    @property
    def names(self) -> list:
        return list(self.modalities)

    def coverage(self) -> dict:
        return {m: float(p.mean()) for m, p in self.present.items()}


def load_item_features(version, item_ids: np.ndarray, modalities=("aligned", "text", "image")) -> ItemFeatures:
    """Read the version's embedding tables (and item_codes) onto the catalog rows.

    Args:
        version: a feature_store StoreVersion.
        item_ids: (N,) sorted catalog ids.
        modalities: which of MODALITY_TABLES to read (missing tables are skipped).
    """
    mods, present = {}, {}
    for name in modalities:
        table = MODALITY_TABLES[name]
        if not version.has(table):
            continue
        ids, emb = version.embeddings(table)
        rows, ok = _rows_in(ids, item_ids)
        x = np.zeros((len(item_ids), emb.shape[1]), dtype=np.float32)
        x[ok] = emb[rows[ok]]
        mods[name], present[name] = x, ok
    if not mods:
        raise ValueError(f"store version {version.id} has none of the embedding tables "
                         f"{[MODALITY_TABLES[m] for m in modalities]}: the teacher needs at least one")
    codes, k = None, 0
    if version.has("item_codes"):
        ct = version.codes("item_codes")
        rows, ok = _rows_in(ct.item_ids, item_ids)
        k = int(ct.rq.max()) + 1 if ct.rq.size else 0
        codes = np.full((len(item_ids), ct.rq.shape[1]), k, dtype=np.int64)
        codes[ok] = ct.rq[rows[ok]]
    return ItemFeatures(mods, present, codes, k, version.id)


def _rows_in(table_ids: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each catalog id, its row in the (sorted) table ids and whether it is there."""
    table_ids = np.asarray(table_ids)
    order = np.argsort(table_ids, kind="stable")
    pos = np.searchsorted(table_ids[order], item_ids)
    pos = np.clip(pos, 0, max(len(table_ids) - 1, 0))
    ok = table_ids[order][pos] == item_ids if len(table_ids) else np.zeros(len(item_ids), bool)
    return order[pos], ok
