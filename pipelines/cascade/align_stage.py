"""The align stage: train (or reuse) the aligned item encoder on the mined train pairs."""
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


def align_stage(_, items, train_pairs, plan: AlignPlan, image_root: Optional[str], out_dir: str,
                work_dir: str):
    """Single-worker stage: train (or reuse) the aligned encoder and copy its checkpoint to `out_dir`.

    Args:
        items: validated item dicts (side input).
        train_pairs: pair tuples from MinePairs (side input).
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
                                     init_checkpoint=Path(plan.init_encoder) if plan.init_encoder else None)
            log.info("align: %s", result.summary())
            source = resolve_checkpoint(train_dir)
        # the version keeps the weights and their config, not optimizer state or caches
        Path(out_dir).mkdir(parents=True, exist_ok=False)
        for name in ("config.json", "model.safetensors", "trainer_state.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, Path(out_dir) / name)
        counter("align", "out").inc(1)
    return out_dir
