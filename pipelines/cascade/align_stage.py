"""The align stage: train (or reuse) the aligned item encoder on the mined train pairs.

Side mode (the default) is one backbone pass per job: the frozen MLLM runs once per item into a sharded
hidden-state cache (reused across runs when its fingerprint matches, e.g. the cascade seeds of `qarm eval`), the
side network trains on the cache, and every embedding the version needs (aligned, unaligned, text-only,
image-only) is read from the same cache (pipelines.mllm.onepass). full / adapters keep their own passes
(RunInference over the trained checkpoint).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd

from pipelines.cascade.plan import AlignPlan
from pipelines.transforms.common import counter, stage_timer

log = logging.getLogger("pipelines.cascade")


def _dataset_view(items: list[dict], image_root: Optional[str]):
    """A minimal Dataset-shaped object (items, image_root) for the encoder's trainer."""
    from types import SimpleNamespace

    frame = pd.DataFrame(items).drop(columns=["_row"], errors="ignore").sort_values("item_id").reset_index(drop=True)
    return SimpleNamespace(items=frame, image_root=Path(image_root) if image_root else None, name="cascade")


def _pair_frame(rows) -> pd.DataFrame:
    from pipelines.pairs import PAIR_COLUMNS

    return pd.DataFrame(sorted(rows), columns=PAIR_COLUMNS)


ONEPASS_DIR = "onepass"  # work_dir/onepass/item_embeddings{,_unaligned}.parquet: read back by the graph
MODALITY_TABLES = ("text", "image")  # written straight into the staged version
NONFINITE = "nonfinite.json"  # {kind: [item ids whose embedding was not finite]}


def one_pass(plan: AlignPlan) -> bool:
    """Whether this job embeds from the side cache (trained here) instead of running RunInference."""
    return plan.mode == "side" and not plan.checkpoint


def align_stage(_, items, train_pairs, plan: AlignPlan, image_root: Optional[str], out_dir: str,
                work_dir: str, valid_pairs=()):
    """Single-worker stage: train (or reuse) the aligned encoder and copy its checkpoint to `out_dir`.

    Args:
        items: validated item dicts (side input).
        train_pairs: pair tuples from MinePairs (side input).
        valid_pairs: MinePairs' later train-portion pairs: alignment's early stopping (side input).
        plan: AlignPlan.
        image_root: the dataset's image root.
        out_dir: where the aligned checkpoint goes (the staging version's ``encoder/``).
        work_dir: scratch for training (optimizer state, side-network cache: not part of the version).
    Returns:
        `out_dir` (RunInference loads the aligned model from it).
    """
    import torch

    from pipelines.mllm.checkpoint import resolve_checkpoint

    with stage_timer("align"):
        counter("align", "in").inc(len(train_pairs))
        if plan.checkpoint:
            source = resolve_checkpoint(Path(plan.checkpoint))
            log.info("align: reusing checkpoint %s", source)
        elif one_pass(plan):
            source = _side_one_pass(items, train_pairs, valid_pairs, plan, image_root, Path(out_dir).parent,
                                    Path(work_dir))
        else:
            from pipelines.mllm.align import AlignConfig, train_alignment
            from pipelines.mllm.config import EncoderConfig

            torch.set_num_threads(plan.threads)
            extra = {k: v for k, v in (("lr", plan.lr), ("temperature", plan.temperature)) if v}
            cfg = AlignConfig(mode=plan.mode, epochs=plan.epochs, batch_size=plan.batch_size, seed=plan.seed,
                              num_threads=plan.threads, progress=False, resume=False, **extra)
            train_dir = Path(work_dir) / "align"
            result = train_alignment(EncoderConfig.from_dict(plan.encoder), _dataset_view(items, image_root),
                                     _pair_frame(train_pairs), cfg, train_dir,
                                     init_checkpoint=Path(plan.init_encoder) if plan.init_encoder else None,
                                     valid_pairs=_pair_frame(valid_pairs) if valid_pairs else None)
            log.info("align: %s", result.summary())
            source = resolve_checkpoint(train_dir)
        # the version keeps the weights and their config, not optimizer state or caches
        Path(out_dir).mkdir(parents=True, exist_ok=False)
        for name in ("config.json", "model.safetensors", "trainer_state.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, Path(out_dir) / name)
        counter("align", "out").inc(1)
    return out_dir


def _side_one_pass(items, train_pairs, valid_pairs, plan: AlignPlan, image_root: Optional[str], staging: Path,
                   work_dir: Path) -> Path:
    """Cache the frozen MLLM once, train the side network on it, write every embedding from the same cache.

    Returns the checkpoint folder (copied into the version by the caller)."""
    import time

    import numpy as np
    import torch

    from feature_store.io import atomic_write_json
    from pipelines.mllm.align import AlignConfig, train_side
    from pipelines.mllm.checkpoint import resolve_checkpoint
    from pipelines.mllm.config import EncoderConfig
    from pipelines.mllm.items import ItemCatalog
    from pipelines.mllm.onepass import build_mllm_cache, embed_from_cache, write_embedding_tables
    from pipelines.mllm.side import SideConfig

    torch.set_num_threads(plan.threads)
    enc_cfg = EncoderConfig.from_dict(plan.encoder)
    catalog = ItemCatalog.from_dataset(_dataset_view(items, image_root), enc_cfg, cache_images=False)
    cache_dir = Path(plan.cache_dir) if plan.cache_dir else work_dir / "side_cache"
    t0 = time.perf_counter()
    with stage_timer("align", "cache", total=False):
        cache = build_mllm_cache(enc_cfg, catalog, side=SideConfig(layer_stride=plan.layer_stride),
                                 cache_dir=cache_dir, progress=False)
    log.info("align: side cache of %d items %s in %.1fs (%s)", len(cache),
             "built" if getattr(cache, "built", True) else "reused", time.perf_counter() - t0, cache_dir)
    extra = {k: v for k, v in (("lr", plan.lr), ("temperature", plan.temperature)) if v}
    cfg = AlignConfig(mode="side", epochs=plan.epochs, batch_size=plan.batch_size, seed=plan.seed,
                      num_threads=plan.threads, progress=False, resume=False, side=SideConfig(layer_stride=plan.layer_stride),
                      **extra)
    train_dir = work_dir / "align"
    with stage_timer("align", "train", total=False):
        result = train_side(cache, _pair_frame(train_pairs), _pair_frame(valid_pairs) if valid_pairs else None, cfg,
                            train_dir, init_checkpoint=Path(plan.init_encoder) if plan.init_encoder else None)
    log.info("align: %s", result.summary())
    with stage_timer("align", "embed", total=False):
        tables = embed_from_cache(result.encoder, cache, unaligned_seed=plan.seed, progress=False)
        finite, bad = {}, {}
        for kind, (ids, emb) in tables.items():  # a non-finite row goes to the dead letter, not into a table
            ok = np.isfinite(emb).all(axis=1)
            finite[kind], bad[kind] = (ids[ok], emb[ok]), ids[~ok].tolist()
        write_embedding_tables({k: v for k, v in finite.items() if k in ("aligned", "unaligned")},
                               work_dir / ONEPASS_DIR)
        write_embedding_tables({k: v for k, v in finite.items() if k in MODALITY_TABLES}, staging)
        atomic_write_json(work_dir / ONEPASS_DIR / NONFINITE, bad)
    return resolve_checkpoint(train_dir)
