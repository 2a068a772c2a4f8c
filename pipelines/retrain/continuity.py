"""Ranker continuity across a codebook refit: what the ranker scores right after it switches to new codes.

A ranker trained on the parent version has learned one row per RQ code. After a refit, code ``j`` of the new
codebook need not mean what code ``j`` meant before, so the retraining job maps the learned rows onto the new
codes (``feature_store.remap``) before the ranker goes on training. This stage measures that on held-out events
after the parent's watermark, with no further training ("right after the switch"):

- ``before``: the parent ranker on the parent's codes (the reference),
- ``mapped_items`` / ``mapped_centroids``: the new codes, rows remapped by item votes / by centroid matching,
- ``stale``: the new codes read with the old rows unchanged (what happens without remapping),
- ``fresh``: the new codes with freshly initialised code tables (what a cold restart of the code tables gives).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("pipelines.retrain.continuity")


def _rq_tables(model) -> dict:
    from ranker.model import embedding_tables

    return {name: w for name, w in embedding_tables(model).items() if name.startswith("rq_l")}


def _with_rows(model, rows: list) -> torch.nn.Module:
    switched = copy.deepcopy(model)
    for level, (name, weight) in enumerate(sorted(_rq_tables(switched).items())):
        with torch.no_grad():
            weight.copy_(torch.as_tensor(np.asarray(rows[level], np.float32)))
    return switched


def continuity_report(parent, candidate, dataset, since: int, until: int, seed: int = 0,
                      ranker_cfg=None, work_dir: Path | None = None) -> dict:
    """Train a ranker on the parent version, switch it to the candidate's codes, and score the new events.

    Args:
        parent, candidate: feature_store StoreVersions (same RQ depth and codebook sizes).
        dataset: the loaded Dataset (interactions up to ``until`` are used; events in (since, until] are the test).
        ranker_cfg: RankerConfig of the reference ranker (default: RQ codes, 3 epochs).
    """
    from feature_store.remap import RemapConfig, remap_code_tables
    from feature_store.split import SplitConfig
    from ranker.config import RankerConfig
    from ranker.data import item_features_from_version, prepare_examples
    from ranker.features import build_schema
    from ranker.train import build_train_model, evaluate, fit

    cfg = ranker_cfg or RankerConfig(features="rq", epochs=3, patience=1, seed=seed)
    inter = dataset.interactions[dataset.interactions["ts"] <= until]
    n_new = int((inter["ts"] > since).sum())
    if n_new == 0:
        return {"skipped": f"no events in ({since}, {until}] to score"}
    test_frac = n_new / len(inter)
    split = SplitConfig(method="global", valid_frac=min(0.1, test_frac), test_frac=test_frac)
    catalog = dataset.items["item_id"].to_numpy()
    data = prepare_examples(inter, catalog, cfg.history_len, split, cfg.negatives)
    old_items = item_features_from_version(parent, catalog, "item_codes")
    new_items = item_features_from_version(candidate, catalog, "item_codes")
    if old_items.rq_sizes != new_items.rq_sizes:
        return {"skipped": f"codebook sizes changed {old_items.rq_sizes} -> {new_items.rq_sizes}; rows cannot carry over"}
    result = fit(data, old_items, cfg, out_dir=work_dir, progress=False)
    # fit keeps the best state in its checkpoint; rebuild the model from it (weights_only load)
    from ranker.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(Path(result["checkpoint"]), old_items, data.users.n_rows)
    old_schema = build_schema(cfg, data.users.n_rows, old_items)
    new_schema = build_schema(cfg, data.users.n_rows, new_items)
    old_rows = [w.detach().numpy().copy() for _, w in sorted(_rq_tables(model).items())]
    old_codes, new_codes = parent.codes(), candidate.codes()
    old_books = [np.asarray(b) for b in old_items.codebooks]
    new_books = [np.asarray(b) for b in new_items.codebooks]
    variants = {
        "mapped_items": remap_code_tables(old_books, new_books, old_rows, RemapConfig(method="items"),
                                          old_codes=old_codes, new_codes=new_codes),
        "mapped_centroids": remap_code_tables(old_books, new_books, old_rows, RemapConfig(method="one_to_one")),
    }
    fresh_model = build_train_model(RankerConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 7}), new_schema,
                                    new_items).model
    fresh_rows = [w.detach().numpy() for _, w in sorted(_rq_tables(fresh_model).items())]
    report = {"test_events": int(len(data.test)), "ranker": {"features": cfg.features, "epochs": cfg.epochs},
              "before": evaluate(model, data.test, old_schema, old_items)}
    for name, remapped in variants.items():
        report[name] = evaluate(_with_rows(model, remapped.tables), data.test, new_schema, new_items)
        report[name]["remap"] = remapped.summary()
    report["stale"] = evaluate(model, data.test, new_schema, new_items)
    report["fresh"] = evaluate(_with_rows(model, fresh_rows), data.test, new_schema, new_items)
    log.info("continuity: auc before %.4f | mapped(items) %.4f | mapped(centroids) %.4f | stale %.4f | fresh %.4f",
             report["before"]["auc"], report["mapped_items"]["auc"], report["mapped_centroids"]["auc"],
             report["stale"]["auc"], report["fresh"]["auc"])
    return report


def continuity_stage(parent, candidate, dataset, window: dict, seed: int):
    """A StageRunner stage computing :func:`continuity_report` (the ranker checkpoint lands in the stage dir)."""

    def run(out: Path) -> dict:
        return continuity_report(parent, candidate, dataset, window["since"], window["until"], seed=seed,
                                 work_dir=out / "ranker")

    return run
