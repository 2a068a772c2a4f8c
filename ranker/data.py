"""From a dataset + a feature-store version to ranker-ready examples.

    interactions ──time_split──> train / valid / test events
                 ──positives───> histories (last N positives strictly before each event)
    store version ─────────────> ItemFeatures per code table (aligned, unaligned), frozen embeddings

Implicit feedback (a single label value) gets sampled negatives, fixed by NegativeConfig.seed, so every
ablation row trains and is scored on exactly the same examples.

Example:
    >>> data = prepare_examples(interactions, catalog_ids, history_len=20, split=SplitConfig())
    >>> len(data.train), data.info["implicit"]
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from feature_store.split import SplitConfig, time_split  # the project's one time split
from ranker.config import NegativeConfig
from ranker.examples import Examples, UserIndex, build_examples, sample_negatives
from ranker.features import ItemFeatures

log = logging.getLogger(__name__)
UNALIGNED_EMBEDDINGS = "item_embeddings_unaligned"
USER_EMBEDDINGS = "user_embeddings"
USER_EMBEDDINGS_ASOF = "user_embeddings_asof"  # point-in-time user vectors (user_id, cut_ts, embedding)


@dataclass
class PreparedData:
    """Ranker-ready examples shared by every ablation row (they depend on the catalog only)."""

    train: Examples
    valid: Examples
    test: Examples
    users: UserIndex
    catalog_ids: np.ndarray
    popularity: np.ndarray  # (item rows,) training positives per item row
    info: dict = field(default_factory=dict)


def prepare_examples(interactions: pd.DataFrame, catalog_ids: np.ndarray, history_len: int,
                     split: SplitConfig = SplitConfig(), negatives: NegativeConfig = NegativeConfig(),
                     implicit: bool | None = None) -> PreparedData:
    """Split, attach histories, add sampled negatives when the data is implicit.

    Args:
        interactions: user_id, item_id, ts, label.
        catalog_ids: (N,) item ids forming the item vocabulary (rows 1..N).
        history_len: T.
        split: time split.
        negatives: sampler used when implicit.
        implicit: force (True/False); None = implicit iff all labels are 1.
    """
    missing = {"user_id", "item_id", "ts", "label"} - set(interactions.columns)
    if missing:
        raise ValueError(f"interactions: missing column(s) {sorted(missing)}")
    if len(interactions) == 0:
        raise ValueError("interactions: empty")
    catalog = ItemFeatures.build(catalog_ids)
    labels = interactions["label"].to_numpy()
    if implicit is None:
        implicit = bool(np.all(labels >= 0.5))
    train_df, valid_df, test_df = time_split(interactions, config=split)
    if len(train_df) == 0 or len(valid_df) == 0 or len(test_df) == 0:
        raise ValueError(f"time split {split} left an empty part (train {len(train_df)}, valid {len(valid_df)}, "
                         f"test {len(test_df)} events)")
    positives = interactions[interactions["label"] >= 0.5]
    users = UserIndex.from_ids(train_df["user_id"].to_numpy())
    parts = {}
    for salt, (name, df) in enumerate((("train", train_df), ("valid", valid_df), ("test", test_df))):
        if implicit:
            df = df[df["label"] >= 0.5]
        parts[name] = build_examples(df, positives, catalog, users, history_len, name=f"interactions[{name}]",
                                     log=interactions)
    popularity = np.bincount(parts["train"].item[parts["train"].label >= 0.5], minlength=catalog.n_rows)
    if implicit and negatives.per_positive == 0:
        raise ValueError("implicit-feedback data (all labels 1) needs sampled negatives: per_positive > 0")
    if implicit:
        for salt, name in enumerate(("train", "valid", "test")):
            counts = popularity
            if negatives.sampler in ("window", "live"):  # this window's own item distribution
                counts = np.bincount(parts[name].item[parts[name].label >= 0.5], minlength=catalog.n_rows)
            neg = sample_negatives(parts[name], catalog.n_rows, negatives, counts, salt=salt)
            parts[name] = Examples.concat([parts[name], neg])
    info = {
        "implicit": implicit,
        "negatives": negatives.__dict__ if implicit else None,
        "split": asdict(split),
        "history_len": history_len,
        "events": {k: int(len(v)) for k, v in parts.items()},
        "positive_rate": {k: float(v.label.mean()) for k, v in parts.items()},
        "users": {"train": int(len(users.user_ids)),
                  "test_users_seen_in_train": float(np.mean(parts["test"].user > 0))},
        "test_items_seen_in_train": float(np.mean(popularity[parts["test"].item] > 0)),
        "items_outside_catalog": {k: int((v.item == 0).sum()) for k, v in parts.items()},
    }
    return PreparedData(parts["train"], parts["valid"], parts["test"], users, np.sort(np.asarray(catalog_ids)),
                        popularity, info)


def item_features_from_version(version, catalog_ids: np.ndarray, code_table: str | None,
                               need_frozen: bool = False, embeddings_table: str = "item_embeddings") -> ItemFeatures:
    """ItemFeatures from a feature_store StoreVersion (see docs/ARCHITECTURE.md).

    Args:
        version: feature_store.StoreVersion.
        catalog_ids: (N,) item vocabulary.
        code_table: "item_codes" / "item_codes_unaligned" / None.
        need_frozen: load the frozen embeddings table too.
    """
    from feature_store.tables import codebook_levels

    kwargs = {}
    if code_table is not None:
        if not version.has(code_table):
            raise FileNotFoundError(f"store version {version.id} ({version.path}) has no {code_table} table; "
                                    f"it has {version.files()}")
        codes = version.codes(code_table)
        kwargs.update(code_item_ids=codes.item_ids, rq=codes.rq, vq=codes.vq,
                      source=str(version.file(code_table)))
        book_name = "codebooks" if code_table == "item_codes" else code_table.replace("item_codes", "codebooks")
        if version.has(book_name):
            books = [np.asarray(b, np.float32) for b in codebook_levels(version.codebooks(book_name))]
            if len(books) == codes.rq.shape[1]:
                kwargs.update(codebooks=books, rq_sizes=[len(b) for b in books])
    if need_frozen:
        ids, emb = version.embeddings(embeddings_table)
        kwargs.update(frozen_item_ids=ids, frozen=emb)
    return ItemFeatures.build(catalog_ids, **kwargs)


def candidate_examples(data: PreparedData, interactions: pd.DataFrame, candidates: pd.DataFrame,
                       history_len: int) -> Examples:
    """Retrieved (user, item) candidates as ranker examples at the moment the user's test window begins: the
    history is every positive before that user's first test event, as for the test events themselves.

    Args:
        data: the ablation's examples (user index, catalog).
        interactions: the contract log the examples were built from.
        candidates: user_id, item_id (e.g. `qarm retrieve` output); users without a test event are dropped.
    Returns:
        Examples in the order of the kept candidate rows (label 0: the ranker only scores them).
    """
    first = pd.Series(data.test.ts, index=data.test.user_id).groupby(level=0).min()
    kept = candidates[candidates["user_id"].isin(first.index)]
    events = pd.DataFrame({"user_id": kept["user_id"].to_numpy(np.int64), "item_id": kept["item_id"].to_numpy(np.int64),
                           "ts": first.reindex(kept["user_id"].to_numpy()).to_numpy(np.int64),
                           "label": np.zeros(len(kept), np.float32)})
    positives = interactions[interactions["label"] >= 0.5]
    return build_examples(events, positives, ItemFeatures.build(data.catalog_ids), data.users, history_len,
                          name="candidates", log=interactions)


def random_codes_like(codes: ItemFeatures, catalog_ids: np.ndarray, seed: int = 0) -> ItemFeatures:
    """The `random` control: the same table shapes as `codes` (RQ levels and sizes, VQ width), with every coded
    item's codes drawn uniformly at random (fixed seed). It has the capacity of the real codes and none of their
    content, so a real-code row beating it shows the content, not the extra parameters, helps."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(codes.has_codes)
    ids = codes.item_ids[rows - 1]  # row r holds catalog item r - 1 (row 0 is the unknown item)
    rq = np.stack([rng.integers(0, k, len(rows)) for k in codes.rq_sizes], axis=1) if codes.rq_sizes else None
    vq = ids[rng.integers(0, len(ids), (len(ids), codes.vq.shape[1]))] if codes.vq.shape[1] else None
    # the same centroids and item vectors (so content init starts the rows alike), assigned to items at random
    frozen_ids, frozen = codes.frozen_table()
    return ItemFeatures.build(catalog_ids, code_item_ids=ids, rq=rq, vq=vq, rq_sizes=list(codes.rq_sizes),
                              codebooks=codes.codebooks, frozen_item_ids=frozen_ids, frozen=frozen,
                              source="item_codes_random")


def load_store_items(store_root: Path, version_id: str | None, catalog_ids: np.ndarray,
                     random_seed: int = 0) -> tuple[dict, str]:
    """Every ItemFeatures variant the ablation rows read, keyed like ``items_for`` asks for them:
    "ids", "item_codes", "frozen", "item_codes+frozen", "item_codes_random" and, if the version has it,
    "item_codes_unaligned"; plus the version id read."""
    from feature_store import FeatureStore

    version = FeatureStore(store_root).read(version_id)
    return store_items(version, catalog_ids, random_seed), version.id


def store_items(version, catalog_ids: np.ndarray, random_seed: int = 0) -> dict:
    """See :func:`load_store_items` (for an already-read StoreVersion).

    Every code table carries the item vectors of the encoder that made it (the aligned embeddings; the unaligned
    ones for the unaligned codes, where the version has them): content init starts the VQ rows from them. Only the
    rows with "frozen" among their features feed them to the model (ranker.features.build_schema)."""
    codes = item_features_from_version(version, catalog_ids, "item_codes", need_frozen=True)
    out = {"ids": ItemFeatures.build(catalog_ids), "item_codes": codes,
           "frozen": item_features_from_version(version, catalog_ids, None, need_frozen=True),
           "item_codes+frozen": codes,
           "item_codes_random": random_codes_like(codes, catalog_ids, random_seed)}
    prompt = prompt_user_vectors(version)
    if prompt is not None:
        out["item_codes+prompt"] = replace(codes, **prompt)
    if version.has("item_codes_unaligned"):
        unaligned_vectors = UNALIGNED_EMBEDDINGS if version.has(UNALIGNED_EMBEDDINGS) else None
        out["item_codes_unaligned"] = item_features_from_version(
            version, catalog_ids, "item_codes_unaligned", need_frozen=unaligned_vectors is not None,
            embeddings_table=unaligned_vectors or "item_embeddings")
    return out


def prompt_user_vectors(version) -> dict | None:
    """The MLLM user encoder's vectors of a version (qarm align --target user-prompts / the cascade's user-prompt
    stage) as ItemFeatures fields, or None without them.

    With user_embeddings_asof.parquet (point-in-time: an example at time t reads the vector of its user's latest
    cut <= t, a prompt that read only events before the cut, so a training example never sees its own label's
    event in the feature) the ranker reads that: user_vectors_source "asof". Older versions, with
    user_embeddings.parquet only, give every example of a user the one serving vector over the whole train
    portion (training examples' targets are inside that prompt): user_vectors_source "serving"."""
    from feature_store.tables import read_asof_embeddings, read_embeddings

    if version.has(USER_EMBEDDINGS_ASOF):
        user_ids, cut_ts, vectors = read_asof_embeddings(version.file(USER_EMBEDDINGS_ASOF))
        return {"user_ids": user_ids, "user_vectors": vectors, "user_cut_ts": cut_ts, "user_vectors_source": "asof"}
    if version.has(USER_EMBEDDINGS):
        log.warning("store version %s has %s.parquet but no %s.parquet: the prompt feature reads one vector per "
                    "user over the whole train portion (training examples' own events are in it)", version.id,
                    USER_EMBEDDINGS, USER_EMBEDDINGS_ASOF)
        user_ids, vectors = read_embeddings(version.file(USER_EMBEDDINGS), id_column="user_id")
        return {"user_ids": user_ids, "user_vectors": vectors, "user_cut_ts": None, "user_vectors_source": "serving"}
    return None


def prompt_vectors_source(version) -> str | None:
    """What the "prompt" rows of ``version`` read (see :func:`prompt_user_vectors`): "asof", "serving" or None."""
    return "asof" if version.has(USER_EMBEDDINGS_ASOF) else "serving" if version.has(USER_EMBEDDINGS) else None


def items_for(features_by_table: dict, feature_set: str) -> ItemFeatures:
    """Pick the ItemFeatures a feature set reads (raises naming the missing table)."""
    from ranker.config import FEATURE_SETS

    parts, table = FEATURE_SETS[feature_set]
    if not parts:
        key = "ids"
    elif "frozen" in parts:
        key = f"{table}+frozen" if table else "frozen"
    elif "prompt" in parts:
        key = f"{table}+prompt"
    else:
        key = table or "item_codes"
    if key not in features_by_table:
        raise FileNotFoundError(f"feature set {feature_set!r} needs the {key} table, which this store version lacks")
    return features_by_table[key]
