"""Ranker continuity across a code switch: what the ranker scores right after it moves to the new codes.

A reference ranker (RQ-code features) is trained on the parent's data (events up to ``since``, early-stopped
on the new window's events before the held-out tail) with the parent's codes. It is then switched to the
candidate's codes, with no further training, and scored on the held-out tail (events after ``tail_start``,
which neither alignment nor the codebooks saw):

- ``before``: the parent ranker on the parent's codes (the gate's reference, same events),
- ``remapped``: the new codes, learned rows carried over (``feature_store.remap``, method ``warm`` by default:
  surviving codes keep their rows, other new codes take the rows of their items' previous codes or of the
  nearest parent centroid),
- ``stale``: the new codes looked up in the old rows unchanged (no remapping),
- ``fresh``: the new codes with freshly initialised code tables (the rest of the ranker kept),
- ``scratch``: a ranker trained from scratch on all events before the tail with the new codes.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("pipelines.retrain.continuity")

VARIANTS = ("before", "remapped", "stale", "fresh", "scratch")


def _rq_tables(model) -> dict:
    from ranker.model import embedding_tables

    return {name: w for name, w in embedding_tables(model).items() if name.startswith("rq_l")}


def _with_rows(model, rows: list) -> torch.nn.Module:
    switched = copy.deepcopy(model)
    for level, (name, weight) in enumerate(sorted(_rq_tables(switched).items())):
        with torch.no_grad():
            weight.copy_(torch.as_tensor(np.asarray(rows[level], np.float32)))
    return switched


def _split(inter, valid_after: int, test_after: int):
    """A global SplitConfig whose cuts fall at the two timestamps (valid: (valid_after, test_after])."""
    from feature_store.split import SplitConfig

    ts = inter["ts"].to_numpy()
    n = len(ts)
    test_frac = float((ts > test_after).sum()) / n
    valid_frac = float(((ts > valid_after) & (ts <= test_after)).sum()) / n
    return SplitConfig(method="global", valid_frac=valid_frac, test_frac=test_frac)


def continuity_report(parent, candidate, dataset, since: int, tail_start: int, until: int, seed: int = 0,
                      ranker_cfg=None, work_dir: Path | None = None, remap_method: str = "warm") -> dict:
    """Scores of the five variants on the held-out tail (see the module docstring).

    Args:
        parent, candidate: feature_store StoreVersions (same RQ depth and codebook sizes).
        dataset: the loaded Dataset (events up to ``until``).
        since: the parent's watermark; tail_start: events after it are the held-out tail.
        ranker_cfg: RankerConfig of the reference ranker (default: RQ codes, 3 epochs).
        remap_method: ``feature_store.remap`` method of the remapped variant.
    Returns:
        {variant: {"auc", "gauc", "logloss", "n", ...}, "test_events", "remap", "ranker"} or {"skipped": why}.
    """
    from feature_store.remap import RemapConfig, remap_code_tables
    from ranker.config import RankerConfig
    from ranker.data import item_features_from_version, prepare_examples
    from ranker.features import build_schema
    from ranker.train import build_train_model, evaluate, fit

    cfg = ranker_cfg or RankerConfig(features="rq", epochs=3, patience=1, seed=seed)
    inter = dataset.interactions[dataset.interactions["ts"] <= until].reset_index(drop=True)
    ts = inter["ts"].to_numpy()
    if not (ts > tail_start).any():
        return {"skipped": f"no events in the held-out tail ({tail_start}, {until}]"}
    if not ((ts > since) & (ts <= tail_start)).any():
        return {"skipped": f"no events in ({since}, {tail_start}] to validate the reference ranker on"}
    catalog = dataset.items["item_id"].to_numpy()
    old_items = item_features_from_version(parent, catalog, "item_codes")
    new_items = item_features_from_version(candidate, catalog, "item_codes")
    if old_items.rq_sizes != new_items.rq_sizes:
        return {"skipped": f"codebook sizes changed {old_items.rq_sizes} -> {new_items.rq_sizes}"}
    # the parent ranker: trained on events up to `since`, early-stopped on (since, tail_start], scored on the tail
    data = prepare_examples(inter, catalog, cfg.history_len, _split(inter, since, tail_start), cfg.negatives)
    from ranker.checkpoint import load_checkpoint

    result = fit(data, old_items, cfg, out_dir=work_dir / "parent" if work_dir else None, progress=False)
    if result.get("checkpoint"):
        model, _, _ = load_checkpoint(Path(result["checkpoint"]), old_items, data.users.n_rows)
    else:  # pragma: no cover - fit without out_dir keeps no checkpoint
        raise RuntimeError("continuity: the reference ranker left no checkpoint")
    old_schema = build_schema(cfg, data.users.n_rows, old_items)
    new_schema = build_schema(cfg, data.users.n_rows, new_items)
    old_rows = [w.detach().numpy().copy() for _, w in sorted(_rq_tables(model).items())]
    remapped = remap_code_tables([np.asarray(b) for b in old_items.codebooks],
                                 [np.asarray(b) for b in new_items.codebooks], old_rows,
                                 RemapConfig(method=remap_method, seed=seed), old_codes=parent.codes(),
                                 new_codes=candidate.codes())
    fresh_model = build_train_model(RankerConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 7}), new_schema,
                                    new_items).model
    fresh_rows = [w.detach().numpy() for _, w in sorted(_rq_tables(fresh_model).items())]
    report = {"test_events": int(len(data.test)), "ranker": {"features": cfg.features, "epochs": cfg.epochs,
                                                             "best_epoch": result.get("best_epoch")},
              "remap": {"method": remap_method, **remapped.summary()},
              "before": evaluate(model, data.test, old_schema, old_items),
              "remapped": evaluate(_with_rows(model, remapped.tables), data.test, new_schema, new_items),
              "stale": evaluate(model, data.test, new_schema, new_items),
              "fresh": evaluate(_with_rows(model, fresh_rows), data.test, new_schema, new_items)}
    # scratch: everything before the tail, the new codes (valid: the last tenth before the tail)
    before_tail = ts[ts <= tail_start]
    valid_after = int(np.quantile(before_tail, 0.9, method="lower"))
    data_s = prepare_examples(inter, catalog, cfg.history_len, _split(inter, valid_after, tail_start), cfg.negatives)
    scratch = fit(data_s, new_items, RankerConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 1}),
                  out_dir=work_dir / "scratch" if work_dir else None, progress=False)
    report["scratch"] = scratch["test"]
    for name in VARIANTS:
        report[name] = {k: report[name].get(k) for k in ("auc", "gauc", "logloss", "n")}
    log.info("continuity (held-out tail, %d events): auc before %.4f | remapped %.4f | stale %.4f | fresh %.4f | "
             "scratch %.4f", report["test_events"], *[report[v]["auc"] for v in VARIANTS])
    return report


def continuity_stage(parent, candidate, dataset, window: dict, seed: int, remap_method: str = "warm"):
    """A StageRunner stage computing :func:`continuity_report` (the rankers' checkpoints land in the stage dir)."""

    def run(out: Path) -> dict:
        return continuity_report(parent, candidate, dataset, window["since"], window["tail_start"],
                                 window["until"], seed=seed, work_dir=out / "ranker", remap_method=remap_method)

    return run
