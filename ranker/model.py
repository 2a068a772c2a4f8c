"""The ranking model, TorchRec style (cf. torchrec/models/dlrm.py): small *Arch modules, a *Train
wrapper owning the loss.

    RankerBatch ──seq KJT──> SparseArch.ec  (item id / RQ-level tables shared by target and history)
                └─bag KJT──> SparseArch.ebc (user id, VQ neighbour bag, mean-pooled)
    ItemVectorArch: per-item vector = concat(item id emb, rq_l0 .. rq_l{L-1} embs, frozen @ W)
    TargetAttentionArch: DIN-style attention of the target vector over the history vectors
    InteractionArch (cfg.interaction): pairwise dot products among the target's and the attended history's part
        vectors, the user vector and the VQ bag (DLRM style)
    OverArch: MLP over concat(user, vq, target, attended history, [dot products], dense) -> logit

Example:
    >>> model = RankerModel(schema, RankerConfig(features="vq+rq"))
    >>> logits = model(build_batch(examples.take(np.arange(8)), schema, items))   # (8,)
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from ranker.batch import RankerBatch
from ranker.config import RankerConfig
from ranker.features import FeatureSchema, table_configs


class SparseArch(nn.Module):
    """Embedding lookups.

    Args:
        schema: feature schema (tables come from `table_configs(schema, dim)`).
        embedding_dim: D.
        device: where tables are allocated ("meta" defers allocation to DistributedModelParallel).
    Call:
        seq KJT, bag KJT -> ({seq feature: (B, len, D) padded dense}, {bag feature: (B, D)})
    """

    def __init__(self, schema: FeatureSchema, embedding_dim: int, device: torch.device | None = None):
        super().__init__()
        seq_cfgs, bag_cfgs = table_configs(schema, embedding_dim)
        self.schema = schema
        self.ec = EmbeddingCollection(tables=seq_cfgs, device=device)
        self.ebc = EmbeddingBagCollection(tables=bag_cfgs, device=device) if bag_cfgs else None

    def forward(self, seq, bag) -> tuple[dict, dict]:
        jagged = self.ec(seq)
        seq_out = {}
        for name in self.schema.seq_keys:
            length = self.schema.history_len if name.startswith("hist_") else 1
            seq_out[name] = jagged[name].to_padded_dense(desired_length=length)  # (B, length, D)
        bag_out = {}
        if self.ebc is not None:
            pooled = self.ebc(bag)
            bag_out = {name: pooled[name] for name in self.schema.bag_keys}  # (B, D)
        return seq_out, bag_out


class ItemVectorArch(nn.Module):
    """Concatenate an item's parts into one vector, for the target and every history position.

    Args:
        parts: seq feature names of the target side, e.g. ("item_id", "rq_l0", "rq_l1").
        embedding_dim: D.
        frozen_dim: d of the frozen embedding (0 = unused); projected to D by a trainable linear map
            (the vector itself stays frozen: the cascade baseline).
    Call:
        seq_out, frozen_target (B, d), frozen_hist (B, T, d) -> target (B, W), history (B, T, W),
        W = D * (len(parts) + [frozen_dim > 0]).
    """

    def __init__(self, parts: tuple, embedding_dim: int, frozen_dim: int):
        super().__init__()
        self.parts = parts
        self.frozen_proj = nn.Linear(frozen_dim, embedding_dim) if frozen_dim else None
        self.width = embedding_dim * (len(parts) + (1 if frozen_dim else 0))

    def forward(self, seq_out: dict, frozen_target: torch.Tensor, frozen_hist: torch.Tensor):
        target = [seq_out[p][:, 0] for p in self.parts]  # each (B, D)
        history = [seq_out["hist_" + p] for p in self.parts if "hist_" + p in seq_out]  # each (B, T, D)
        if self.frozen_proj is not None:
            target.append(self.frozen_proj(frozen_target))
            if history:
                history.append(self.frozen_proj(frozen_hist))
        return torch.cat(target, dim=-1), (torch.cat(history, dim=-1) if history else None)


class TargetAttentionArch(nn.Module):
    """DIN-style target attention: score(q, k) = MLP([q, k, q - k, q * k]), softmax over the valid
    history positions, weighted sum of the keys. Users without history get zeros.

    The first MLP layer on [q, k, q - k, q * k] equals A q + B k + C (q * k) (A, B, C absorb the q - k
    block), so the query term is computed once per sample instead of once per position: same function
    class, half the per-position work.

    Args:
        width: W of query and keys.
        hidden: MLP width.
        use_attention: False = plain mean over the valid positions (ablation of the attention).
    Call:
        query (B, W), keys (B, T, W), lengths (B,) -> (B, W)
    """

    def __init__(self, width: int, hidden: int = 64, use_attention: bool = True):
        super().__init__()
        self.use_attention = use_attention
        self.query_proj = nn.Linear(width, hidden)
        self.key_proj = nn.Linear(width, hidden, bias=False)
        self.product_proj = nn.Linear(width, hidden, bias=False)
        self.score_out = nn.Linear(hidden, 1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t, w = keys.shape
        mask = torch.arange(t, device=keys.device)[None, :] < lengths[:, None]  # (B, T)
        if self.use_attention:
            hidden = torch.relu(self.query_proj(query)[:, None, :] + self.key_proj(keys)
                                + self.product_proj(query[:, None, :] * keys))  # (B, T, H)
            logits = self.score_out(hidden).squeeze(-1)  # (B, T)
            logits = logits.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(logits, dim=1)
            weights = torch.nan_to_num(weights, nan=0.0)  # all-masked rows
        else:
            weights = mask.float() / lengths.clamp(min=1)[:, None].float()
        return torch.einsum("bt,btw->bw", weights, keys)  # (B, W)


class InteractionArch(nn.Module):
    """Pairwise dot products among F feature vectors of one width: DLRM's interaction (cf. torchrec.models.dlrm
    InteractionArch, here without its dense row, since the ranker's dense inputs are not embeddings). A dot product
    is what an MLP over concatenated vectors learns poorly from few events, and what a similarity is.

    Args:
        num_features: F.
    Call:
        features (B, F, D) -> (B, F * (F - 1) / 2): <f_i, f_j> for i < j, in torch.triu_indices(F, F, 1) order.
    """

    def __init__(self, num_features: int):
        super().__init__()
        if num_features < 2:
            raise ValueError(f"InteractionArch needs >= 2 features, got {num_features}")
        self.num_features = num_features
        self.register_buffer("triu", torch.triu_indices(num_features, num_features, offset=1), persistent=False)

    @property
    def out_features(self) -> int:
        return self.num_features * (self.num_features - 1) // 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(features, features.transpose(1, 2))  # (B, F, F)
        return gram[:, self.triu[0], self.triu[1]]


class OverArch(nn.Module):
    """MLP -> one logit. Call: (B, in_features) -> (B,)."""

    def __init__(self, in_features: int, hidden: tuple, dropout: float = 0.0):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


class RankerModel(nn.Module):
    """The ranker. Call: RankerBatch -> logits (B,).

    Args:
        schema: feature schema.
        cfg: ranker config (embedding_dim, attention, over_arch, dropout).
        device: table allocation device ("meta" under DistributedModelParallel).
    """

    def __init__(self, schema: FeatureSchema, cfg: RankerConfig, device: torch.device | None = None):
        super().__init__()
        d = cfg.embedding_dim
        self.schema = schema
        self.sparse_arch = SparseArch(schema, d, device=device)
        self.item_arch = ItemVectorArch(schema.item_parts, d, schema.frozen_dim)
        width = self.item_arch.width
        self.attention_arch = (TargetAttentionArch(width, use_attention=cfg.attention)
                               if schema.history_len > 0 else None)
        n_in = width * (2 if self.attention_arch else 1) + d * len(schema.bag_keys) + schema.n_dense
        self.interaction_arch = None
        if cfg.interaction:
            per_item = width // d  # item id, RQ levels, frozen projection
            n_vectors = per_item * (2 if self.attention_arch else 1) + len(schema.bag_keys)
            if n_vectors >= 2:
                self.interaction_arch = InteractionArch(n_vectors)
                n_in += self.interaction_arch.out_features
        self.embedding_dim = d
        self.over_arch = OverArch(n_in, cfg.over_arch, cfg.dropout)

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        seq_out, bag_out = self.sparse_arch(batch.seq, batch.bag)
        target, history = self.item_arch(seq_out, batch.frozen_target, batch.frozen_hist)  # (B, W), (B, T, W)
        bags = [bag_out[name] for name in self.schema.bag_keys]  # each (B, D)
        parts = bags + [target]
        attended = None
        if self.attention_arch is not None:
            attended = self.attention_arch(target, history, batch.hist_len)  # (B, W)
            parts.append(attended)
        if self.interaction_arch is not None:
            parts.append(self.interaction_arch(self._interaction_inputs(target, attended, bags)))
        parts.append(batch.dense)
        return self.over_arch(torch.cat(parts, dim=-1))

    def _interaction_inputs(self, target: torch.Tensor, attended: torch.Tensor | None, bags: list) -> torch.Tensor:
        """(B, F, D): the target's part vectors (item id, RQ levels, frozen projection), the attended history's
        same parts, then the bag vectors (user, VQ)."""
        b, d = target.shape[0], self.embedding_dim
        stack = [target.view(b, -1, d)]
        if attended is not None:
            stack.append(attended.view(b, -1, d))
        stack += [v.unsqueeze(1) for v in bags]
        return torch.cat(stack, dim=1)


class RankerTrain(nn.Module):
    """Owns the BCE loss (cf. torchrec DLRMTrain).

    Call: RankerBatch -> (loss, (loss.detach(), logits.detach(), labels))
    """

    def __init__(self, model: RankerModel):
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: RankerBatch):
        logits = self.model(batch)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def embedding_tables(model: nn.Module) -> dict:
    """{table name: weight} of an *unsharded* model's sparse arch."""
    model = model.model if isinstance(model, RankerTrain) else model
    tables = {name: m.weight for name, m in model.sparse_arch.ec.embeddings.items()}
    if model.sparse_arch.ebc is not None:
        tables.update({name: m.weight for name, m in model.sparse_arch.ebc.embedding_bags.items()})
    return tables
