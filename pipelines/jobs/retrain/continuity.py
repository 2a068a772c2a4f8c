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

log = logging.getLogger("pipelines.jobs.retrain.continuity")

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
                      ranker_cfg=None, work_dir: Path | None = None, remap_method: str = "warm",
                      bootstrap: int = 500) -> dict:
    """Scores of the five variants on the held-out tail (see the module docstring).

    Args:
        parent, candidate: feature_store StoreVersions (same RQ depth and codebook sizes).
        dataset: the loaded Dataset (events up to ``until``).
        since: the parent's watermark; tail_start: events after it are the held-out tail.
        ranker_cfg: RankerConfig of the reference ranker (default: RQ codes, 3 epochs).
        remap_method: ``feature_store.remap`` method of the remapped variant.
        bootstrap: replicates of the paired (by user) bootstrap of each variant's difference to ``before``.
    Returns:
        {variant: {"auc", "gauc", "logloss", "n", "vs_before": {"auc": {"mean", "ci95"}, "gauc": ...}},
        "test_events", "test_users", "remap", "ranker"} or {"skipped": why}.
    """
    from ranker.config import RankerConfig
    from ranker.data import item_features_from_version

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
    reference = _reference_ranker(inter, catalog, old_items, cfg, since, tail_start, work_dir)
    scores, remapped = _carried_over_scores(reference, parent, candidate, old_items, new_items, cfg, remap_method,
                                            seed)
    scores["scratch"] = _scratch_scores(inter, catalog, reference["data"], new_items, cfg, tail_start, work_dir)
    report = _paired_report(reference, scores, bootstrap, seed)
    report["remap"] = {"method": remap_method, **remapped.summary()}
    log.info("continuity (held-out tail, %d events): auc %s", report["test_events"],
             " | ".join(f"{v} {_fmt(report[v]['auc'])}" for v in VARIANTS))
    return report


def _reference_ranker(inter, catalog, old_items, cfg, since: int, tail_start: int, work_dir) -> dict:
    """The parent ranker: trained on events up to ``since``, early-stopped on (since, tail_start], scored on the
    tail. Returns {"data", "result", "model", "cfg"}."""
    from ranker.checkpoint import load_checkpoint
    from ranker.data import prepare_examples
    from ranker.train import fit

    data = prepare_examples(inter, catalog, cfg.history_len, _split(inter, since, tail_start), cfg.negatives)
    result = fit(data, old_items, cfg, out_dir=work_dir / "parent" if work_dir else None, progress=False)
    if not result.get("checkpoint"):  # pragma: no cover - fit without out_dir keeps no checkpoint
        raise RuntimeError("continuity: the reference ranker left no checkpoint")
    model, _, _ = load_checkpoint(Path(result["checkpoint"]), old_items, data.users.n_rows)
    return {"data": data, "result": result, "model": model, "cfg": cfg}


def _carried_over_scores(reference, parent, candidate, old_items, new_items, cfg, remap_method: str, seed: int):
    """Tail scores of the parent ranker under the old codes (before), the new codes with its rows remapped, kept
    as they were (stale) and re-initialised (fresh). Returns ({variant: (n,) scores}, the remap result)."""
    from feature_store.remap import RemapConfig, remap_code_tables
    from ranker.checkpoint import remap_rq_tables
    from ranker.config import RankerConfig
    from ranker.features import build_schema
    from ranker.model import RankerModel, RankerTrain
    from ranker.train import build_train_model, score

    data, model = reference["data"], reference["model"]
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

    def scored(module, schema, items):
        if isinstance(module, RankerModel):
            module = RankerTrain(module)
        return score(module, data.test, schema, items, cfg.eval_batch_size)

    return {
        "before": scored(model, old_schema, old_items),
        # the ranker's own warm start (ranker.checkpoint.remap_rq_tables) with the remap's row mapping
        "remapped": scored(remap_rq_tables(model, cfg, new_items, data.users.n_rows, remapped.mapping), new_schema,
                           new_items),
        "stale": scored(model, new_schema, new_items),
        "fresh": scored(_with_rows(model, fresh_rows), new_schema, new_items),
    }, remapped


def _scratch_scores(inter, catalog, data, new_items, cfg, tail_start: int, work_dir) -> np.ndarray:
    """A ranker trained from scratch on everything before the tail under the new codes (valid: the last tenth
    before the tail), scored on the same tail events as the parent ranker."""
    from ranker.config import RankerConfig
    from ranker.data import prepare_examples
    from ranker.train import fit

    ts = inter["ts"].to_numpy()
    valid_after = int(np.quantile(ts[ts <= tail_start], 0.9, method="lower"))
    data_s = prepare_examples(inter, catalog, cfg.history_len, _split(inter, valid_after, tail_start), cfg.negatives)
    if not (np.array_equal(data_s.test.user_id, data.test.user_id) and np.array_equal(data_s.test.label,
                                                                                       data.test.label)):
        raise RuntimeError("continuity: the scratch ranker's tail events differ from the parent ranker's")
    scratch_cfg = RankerConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + 1})
    scratch = fit(data_s, new_items, scratch_cfg, out_dir=work_dir / "scratch" if work_dir else None,
                  progress=False, return_test_scores=True)
    return scratch["test_scores"]


def _paired_report(reference, scores: dict, bootstrap: int, seed: int) -> dict:
    """Each variant's metrics and its paired (by user) bootstrap difference to ``before``; remapped also against
    fresh and scratch (does carrying the rows over beat a restart, on the same users?)."""
    from ranker.metrics import ranking_metrics
    from ranker.stats import BootstrapConfig, PairedEvaluation

    data, cfg = reference["data"], reference["cfg"]
    users, labels = data.test.user_id, data.test.label
    paired = PairedEvaluation(users, labels, BootstrapConfig(replicates=bootstrap, seed=seed))
    report = {"test_events": int(len(data.test)), "test_users": int(len(np.unique(users))),
              "ranker": {"features": cfg.features, "epochs": cfg.epochs,
                         "best_epoch": reference["result"].get("best_epoch")}}
    for name in VARIANTS:
        m = ranking_metrics(users, labels, scores[name])
        report[name] = {k: m.get(k) for k in ("auc", "gauc", "logloss", "n")}
        if name != "before":
            report[name]["vs_before"] = {metric: paired.diff_ci([scores[name]], [scores["before"]], metric)
                                         for metric in ("auc", "gauc")}
    for other in ("fresh", "scratch"):
        report["remapped"][f"vs_{other}"] = {metric: paired.diff_ci([scores["remapped"]], [scores[other]], metric)
                                             for metric in ("auc", "gauc")}
    return report


def continuity_stage(parent, candidate, dataset, window: dict, seed: int, remap_method: str = "warm"):
    """A StageRunner stage computing :func:`continuity_report` (the rankers' checkpoints land in the stage dir)."""

    def run(out: Path) -> dict:
        return continuity_report(parent, candidate, dataset, window["since"], window["tail_start"],
                                 window["until"], seed=seed, work_dir=out / "ranker", remap_method=remap_method)

    return run


def _fmt(value) -> str:
    """An AUC for the log line: undefined (None, e.g. a one-class tail) prints as n/a."""
    return "n/a" if value is None else f"{value:.4f}"
