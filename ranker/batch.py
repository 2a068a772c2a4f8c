"""Building KeyedJaggedTensor batches from Examples (a hand-checkable layout).

Layout: one KJT for seq features (EmbeddingCollection), one for bag features (EmbeddingBagCollection);
keys follow the schema order; values are key-major (all of key 0's values for the batch, then key 1's ...),
and `lengths` has one entry per (key, sample). Target features have length 1; "hist_*" features have the
history length of each sample (most recent first); "vq" has Kv values per coded item and a single unknown
row (0) otherwise.

Example (B=2, T=2, features id only, sample 0 has history [5, 3], sample 1 has none):
    seq keys   = ["item_id", "hist_item_id"]
    values     = [7, 9,   5, 3]
    lengths    = [1, 1,   2, 0]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from ranker.examples import Examples
from ranker.features import UNKNOWN_ROW, FeatureSchema, ItemFeatures


@dataclass
class RankerBatch:
    """One batch. B = batch size, T = history_len, d = frozen width.

    Attributes:
        seq: KJT over schema.seq_keys.
        bag: KJT over schema.bag_keys (may have no keys).
        dense: (B, n_dense) float32: log1p(hist_len), log1p(prior events), smoothed prior positive
            rate, then schema.dense_parts: the RQ-prefix cross features, the frozen similarity features, the
            prompt-user score of the target and the prompt-user vector.
        frozen_target: (B, d) float32 (d = 0 when unused).
        frozen_hist: (B, T, d) float32.
        hist_len: (B,) int64.
        labels: (B,) float32.
    """

    seq: KeyedJaggedTensor
    bag: KeyedJaggedTensor
    dense: torch.Tensor
    frozen_target: torch.Tensor
    frozen_hist: torch.Tensor
    hist_len: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankerBatch":
        return RankerBatch(*(getattr(self, f).to(device=device, non_blocking=non_blocking) for f in
                             ("seq", "bag", "dense", "frozen_target", "frozen_hist", "hist_len", "labels")))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _kjt(keys: list, values: list, lengths: list) -> KeyedJaggedTensor:
    if not keys:
        return KeyedJaggedTensor.empty()
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
                             lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))


def _seq_values(schema: FeatureSchema, items: ItemFeatures, ex: Examples, name: str):
    """(values, lengths) of one seq feature for the batch."""
    hist_side = name.startswith("hist_")
    part = name[5:] if hist_side else name
    if hist_side:
        valid = ex.hist >= 0  # (B, T)
        rows = ex.hist[valid]  # row-major = sample by sample, most recent first
        lengths = valid.sum(1)
    else:
        rows = ex.item
        lengths = np.ones(len(ex), np.int64)
    if part == "item_id":
        return rows, lengths
    level = int(part[len("rq_l"):])
    return items.rq[rows, level], lengths


def cross_features(rq_target: np.ndarray, rq_hist: np.ndarray, target_known: np.ndarray,
                   hist_known: np.ndarray, hist_len: np.ndarray) -> np.ndarray:
    """History items sharing the target's RQ prefix, for each prefix length p = 1..L.

    Args:
        rq_target: (B, L) codes; rq_hist: (B, T, L); *_known: masks of items that have codes
            ((B,), (B, T); padding counts as unknown); hist_len: (B,).
    Returns:
        (B, 2L): log1p(count_p) for p = 1..L, then count_p / max(hist_len, 1).
    """
    eq = rq_hist == rq_target[:, None, :]  # (B, T, L)
    prefix = np.cumprod(eq, axis=2).astype(bool) & hist_known[:, :, None] & target_known[:, None, None]
    counts = prefix.sum(1).astype(np.float32)  # (B, L)
    share = counts / np.maximum(hist_len, 1)[:, None].astype(np.float32)
    return np.concatenate([np.log1p(counts), share], axis=1)


def similarity_features(target: np.ndarray, hist: np.ndarray, hist_valid: np.ndarray,
                        hist_len: np.ndarray) -> np.ndarray:
    """The frozen vectors' similarity between the target and the history: the prefix cross feature's control (the
    same statistics, with "shares the RQ prefix" (0/1) replaced by the cosine similarity).

    Args:
        target: (B, d) frozen target vectors; hist: (B, T, d) history vectors; hist_valid: (B, T) mask (padding
            and zero vectors, i.e. items without one, count as similarity 0); hist_len: (B,).
    Returns:
        (B, 3): log1p(soft count), soft count / max(hist_len, 1), max cosine over the valid positions (0 without
        history), where soft count = sum over valid positions of max(cos, 0).
    """
    t_norm = np.linalg.norm(target, axis=-1)  # (B,)
    h_norm = np.linalg.norm(hist, axis=-1)  # (B, T)
    denom = t_norm[:, None] * h_norm
    cos = np.divide(np.einsum("bd,btd->bt", target, hist), denom, out=np.zeros_like(denom), where=denom > 0)
    cos = np.where(hist_valid, cos, 0.0)
    soft = np.maximum(cos, 0.0).sum(1)
    best = np.where(hist_valid.any(1), np.where(hist_valid, cos, -np.inf).max(1, initial=-np.inf), 0.0)
    return np.stack([np.log1p(soft), soft / np.maximum(hist_len, 1), best], axis=1).astype(np.float32)


def build_batch(ex: Examples, schema: FeatureSchema, items: ItemFeatures) -> RankerBatch:
    """Turn B examples into a RankerBatch following `schema`.

    Args:
        ex: B examples (Examples.take of a batch's indices).
        schema: feature schema (KJT keys, dense width).
        items: per-row codes / frozen vectors.
    """
    b, t = len(ex), schema.history_len
    values, lengths = [], []
    for name in schema.seq_keys:
        v, l = _seq_values(schema, items, ex, name)
        values.append(v)
        lengths.append(l)
    seq = _kjt(schema.seq_keys, values, lengths)
    values, lengths = [], []
    for name in schema.bag_keys:
        if name == "user_id":
            values.append(ex.user)
            lengths.append(np.ones(b, np.int64))
        elif name == "vq":
            coded = items.has_codes[ex.item]
            kv = items.vq.shape[1]
            vq_rows = items.vq[ex.item]  # (B, Kv)
            # coded items: their Kv neighbour rows; others: the single unknown row
            keep = np.zeros((b, kv), bool)
            keep[coded] = True
            keep[~coded, 0] = True
            values.append(np.where(coded[:, None], vq_rows, UNKNOWN_ROW)[keep])
            lengths.append(np.where(coded, kv, 1))
        else:  # pragma: no cover - schema and builder are written together
            raise ValueError(f"no batch builder for bag feature {name!r}")
    bag = _kjt(schema.bag_keys, values, lengths)

    hist_valid = ex.hist >= 0 if t > 0 else np.zeros((b, 0), bool)
    prior_rate = (ex.prior_positives + 1.0) / (ex.prior_events + 2.0)  # Laplace-smoothed
    dense = [np.stack([np.log1p(ex.hist_len.astype(np.float32)), np.log1p(ex.prior_events.astype(np.float32)),
                       prior_rate.astype(np.float32)], axis=1)]
    hist_rows = np.where(hist_valid, ex.hist, UNKNOWN_ROW)
    d = schema.frozen_dim
    if d:
        frozen_target = items.frozen[ex.item]
        frozen_hist = items.frozen[hist_rows] * hist_valid[:, :, None]
    else:
        frozen_target = np.zeros((b, 0), np.float32)
        frozen_hist = np.zeros((b, t, 0), np.float32)
    if "cross" in schema.dense_parts:
        dense.append(cross_features(items.rq[ex.item], items.rq[hist_rows], items.has_codes[ex.item],
                                    items.has_codes[hist_rows] & hist_valid, ex.hist_len))
    if "sim" in schema.dense_parts:
        dense.append(similarity_features(frozen_target, frozen_hist, hist_valid, ex.hist_len))
    if "prompt" in schema.dense_parts:  # the prompt-user vector and its score of the target (aligned embedding)
        user = items.user_vectors_of(ex.user_id, ex.ts)                           # (B, d_u), as of ex.ts
        dense.append(np.concatenate([(user * items.frozen[ex.item]).sum(1, keepdims=True), user], axis=1))
    dense = np.concatenate(dense, axis=1).astype(np.float32)
    if dense.shape[1] != schema.n_dense:  # pragma: no cover - schema and builder are written together
        raise ValueError(f"built {dense.shape[1]} dense features, the schema says {schema.n_dense}")
    return RankerBatch(seq=seq, bag=bag, dense=torch.from_numpy(dense),
                       frozen_target=torch.from_numpy(np.ascontiguousarray(frozen_target, np.float32)),
                       frozen_hist=torch.from_numpy(np.ascontiguousarray(frozen_hist, np.float32)),
                       hist_len=torch.from_numpy(ex.hist_len.astype(np.int64)),
                       labels=torch.from_numpy(ex.label.astype(np.float32)))
