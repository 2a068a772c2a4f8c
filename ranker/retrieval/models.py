"""Retrieval models: a light id student and a multimodal teacher, both dot-product two-tower scorers.

TorchRec-like layout: small *Arch modules; the training wrappers in ranker.retrieval.train own the losses.
(The id tables are plain torch.nn.Embedding over dense rows: retrieval reads whole tables for indexing, and a
KeyedJaggedTensor adds nothing for one id per user / item. A sharded deployment would swap IdEmbeddingArch for
a torchrec EmbeddingCollection.)

    student = StudentArch(n_users, n_items, dim=64)                     # serving: user row -> (d,), items (N, d)
    teacher = TeacherArch(n_users, n_items, {"aligned": (N, 64), "text": (N, 384), "image": (N, 1280)}, dim=64)
    parts = teacher.score_parts(users, cand)   # {"id": (B, C), "aligned": (B, C), ...}; total = sum of parts
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class IdEmbeddingArch(nn.Module):
    """One id table. Args: rows, dim, init_std. forward(rows (B,) or (B, C)) -> (..., dim)."""

    def __init__(self, rows: int, dim: int, init_std: float = 0.05):
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table(rows)


class CodeEmbeddingArch(nn.Module):
    """The item's RQ code embeddings, one table per level (K + 1 rows: the last is the no-code row), summed.

    Args:
        codes: (N, L) int64 per catalog row; K = codebook_size.
    forward(item_rows (...)) -> (..., dim).
    """

    def __init__(self, codes: np.ndarray, codebook_size: int, dim: int, init_std: float = 0.05):
        super().__init__()
        self.register_buffer("codes", torch.as_tensor(codes, dtype=torch.long), persistent=False)
        self.levels = nn.ModuleList(IdEmbeddingArch(codebook_size + 1, dim, init_std) for _ in range(codes.shape[1]))

    def forward(self, item_rows: torch.Tensor) -> torch.Tensor:
        c = self.codes[item_rows]                                          # (..., L)
        return sum(table(c[..., l]) for l, table in enumerate(self.levels))


class StudentArch(nn.Module):
    """Light id student: user and item id embeddings (+ optional code tables), score = <user, item>.

    At serving time it reads only its own tables: `item_vectors()` (N, d) is indexed, `user_vectors(rows)`
    queries it. No multimodal input anywhere.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.05,
                 codes: np.ndarray | None = None, codebook_size: int = 0):
        super().__init__()
        self.user = IdEmbeddingArch(n_users, dim, init_std)
        self.item = IdEmbeddingArch(n_items, dim, init_std)
        self.code = CodeEmbeddingArch(codes, codebook_size, dim, init_std) if codes is not None else None
        self.n_items = n_items

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self.user(users)                                            # (B, d)

    def item_embed(self, items: torch.Tensor) -> torch.Tensor:
        e = self.item(items)                                               # (..., d)
        return e + self.code(items) if self.code is not None else e

    def item_vectors(self) -> torch.Tensor:
        return self.item_embed(torch.arange(self.n_items))                 # (N, d)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B,), items (B, C) -> (B, C)."""
        return torch.einsum("bd,bcd->bc", self.user_vectors(users), self.item_embed(items))

    def serving_vectors(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_vectors(users), self.item_vectors()


class ProjectionTowerArch(nn.Module):
    """Small projection tower of one modality: Linear(in, hidden) - ReLU - Linear(hidden, dim). (..., in) -> (..., dim)."""

    def __init__(self, in_dim: int, hidden: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SoftPromptArch(nn.Module):
    """Learnable soft prompts, one vector per modality, added to that modality's teacher input (zeros at start,
    so an untuned prompt leaves the teacher unchanged). forward(name, x (..., in_m)) -> (..., in_m)."""

    def __init__(self, dims: dict):
        super().__init__()
        self.prompts = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m, d in dims.items()})

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x + self.prompts[name]


class TeacherArch(nn.Module):
    """Multimodal teacher: the student's id part plus, per modality m, a user vector u_m and an item vector
    h_m(i) = tower_m(x_m[i] + prompt_m). Score parts: id = <u, e_i>, m = <u_m, h_m(i)>; score = Σ parts.

    Args:
        modalities: {name: (N, d_m) float32} catalog features (standardised here: centred, unit mean norm,
            stored as buffers — inputs, not weights).
        use_prompts: build a SoftPromptArch (the prompts are zeros until tuned).
    """

    def __init__(self, n_users: int, n_items: int, modalities: dict, dim: int = 64, hidden: int = 128,
                 init_std: float = 0.05, use_prompts: bool = True):
        super().__init__()
        self.names = list(modalities)
        self.user = IdEmbeddingArch(n_users, dim, init_std)
        self.item = IdEmbeddingArch(n_items, dim, init_std)
        self.user_m = nn.ModuleDict({m: IdEmbeddingArch(n_users, dim, init_std) for m in self.names})
        self.towers = nn.ModuleDict()
        for m, x in modalities.items():
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
            x = x - x.mean(0, keepdim=True)
            x = x / x.norm(dim=1).mean().clamp_min(1e-6)
            self.register_buffer(f"x_{m}", x, persistent=False)
            self.towers[m] = ProjectionTowerArch(x.shape[1], hidden, dim)
        self.prompt = SoftPromptArch({m: x.shape[1] for m, x in modalities.items()}) if use_prompts else None
        self.n_items = n_items

    def item_parts(self, rows: torch.Tensor) -> dict:
        """{"id": (R, d), m: (R, d)} — the item vector parts of the given catalog rows (towers on those rows)."""
        out = {"id": self.item(rows)}
        for m in self.names:
            x = getattr(self, f"x_{m}")[rows]                              # (R, d_m)
            if self.prompt is not None:
                x = self.prompt(m, x)
            out[m] = self.towers[m](x)
        return out

    def item_tables(self) -> dict:
        """{"id": (N, d), m: (N, d)} — every item vector part (one tower pass over the catalog)."""
        return self.item_parts(torch.arange(self.n_items))

    def set_graph(self, users: np.ndarray, items: np.ndarray) -> None:
        """Content profiles: each user's modality vector gains the mean of h_m over its training positives
        (a one-hop user-item graph aggregation, as in VBPR / MMGCN-style teachers). users, items: (P,) rows."""
        u = torch.as_tensor(users, dtype=torch.long)
        deg = torch.bincount(u, minlength=self.user.table.num_embeddings).clamp_min(1).float()
        vals = 1.0 / deg[u]
        self._graph = torch.sparse_coo_tensor(torch.stack([u, torch.as_tensor(items, dtype=torch.long)]), vals,
                                              (self.user.table.num_embeddings, self.n_items)).coalesce()

    def user_tables(self, users: torch.Tensor, item_tables: dict | None = None) -> dict:
        """{"id": (B, d), m: (B, d)}. With a graph (set_graph) the modality parts add the user's content profile,
        computed from the full item tables (item_tables(), recomputed if None)."""
        out = {"id": self.user(users)}
        graph = getattr(self, "_graph", None)
        if graph is not None and self.names and item_tables is None:
            item_tables = self.item_tables()
        for m in self.names:
            out[m] = self.user_m[m](users)
            if graph is not None:
                out[m] = out[m] + torch.sparse.mm(graph, item_tables[m])[users]
        return out

    def score_parts(self, users: torch.Tensor, items: torch.Tensor, item_tables: dict | None = None) -> dict:
        """users (B,), items (B, C) -> {part: (B, C)}; item_tables from item_tables() (recomputed if None)."""
        it = item_tables if item_tables is not None else self.item_tables()
        ut = self.user_tables(users, it)
        return {p: torch.einsum("bd,bcd->bc", ut[p], it[p][items]) for p in ut}

    def score(self, users: torch.Tensor, items: torch.Tensor, item_tables: dict | None = None) -> torch.Tensor:
        return sum(self.score_parts(users, items, item_tables).values())

    def serving_vectors(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated parts: <[u, u_m...], [e_i, h_m(i)...]> = the total score. (B, d(1+M)), (N, d(1+M))."""
        it = self.item_tables()
        ut = self.user_tables(users, it)
        return torch.cat([ut[p] for p in ut], 1), torch.cat([it[p] for p in ut], 1)

    def frozen_parameters(self):
        """Every parameter except the prompts (what prompt tuning must leave bit-identical)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("prompt.")]


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class FixedVectorTeacher(nn.Module):
    """A teacher whose user and item vectors are given, not learned: e.g. the MLLM user encoder's prompt-user
    vectors against the aligned item embeddings (VIP5-style personalized prompts, issue 22). It has the parts
    interface fit_student's distillation reads (names, item_tables, user_tables, serving_vectors; no prompts), so
    PromptMM's list-wise / modality KD distils it into the id student unchanged.

    Args:
        user_vectors: (U, d) per user row (zeros for users without a vector: they score every item 0).
        item_vectors: (N, d) per catalog row.
        scale: scores are scale * <u, v> (cosines / the encoder's training temperature give a peaked softmax).
        name: the part's name.
    """

    def __init__(self, user_vectors, item_vectors, scale: float = 1.0, name: str = "prompt_user"):
        super().__init__()
        self.names = [name]
        self.prompt = None
        self.register_buffer("u", torch.as_tensor(np.asarray(user_vectors, np.float32)) * float(scale))
        self.register_buffer("v", torch.as_tensor(np.asarray(item_vectors, np.float32)))
        self.n_items = int(self.v.shape[0])

    def item_tables(self) -> dict:
        return {self.names[0]: self.v}

    def user_tables(self, users: torch.Tensor, item_tables: dict | None = None) -> dict:
        return {self.names[0]: self.u[users]}

    def serving_vectors(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u[users], self.v
