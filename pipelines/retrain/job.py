"""The scheduled retraining job: new logs in, a validated new feature-store version out (or CURRENT untouched).

Stages (each checkpointed by :class:`~pipelines.retrain.stages.StageRunner`, so a rerun after a crash resumes):

1. ``window``: interactions after the parent's watermark (or ``--since``) up to ``--until``; the pair-mining
   window is the last ``window_days`` before ``until``; the whole catalog (new items included) is exported in
   contract form.
2. ``candidate``: the cascade job (``pipelines.cascade``) on that window, fine-tuning alignment from the parent's
   encoder checkpoint and warm-starting the RQ codebooks from the parent's quantizer, published into a private
   candidate store inside the work folder (never the real one).
3. ``stability``: code churn against the parent, warm-started (the candidate) and cold (a fresh fit on the same
   embeddings), so the warm start's value is measured, not assumed.
4. ``continuity`` (optional): a reference ranker trained on the parent has its learned RQ code rows
   are remapped onto the new codebooks by centroid matching; validation AUC right after the switch is reported
   for mapped and freshly initialised tables.
5. gate, then publish into the real store with the parent recorded. The store lock is held for the whole run,
   so a second concurrent run is refused instead of racing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from pipelines.retrain.gate import GateConfig, check_gate
from pipelines.retrain.stages import StageRunner, fingerprint

log = logging.getLogger("pipelines.retrain")

DAY = 86_400
# Files of a candidate version that are recomputed by the real publish and must not be copied.
_SKIP_ON_COPY = {"manifest.json"}


class NothingToDo(Exception):
    """No interactions after the watermark and no new items: the CURRENT version is up to date."""


@dataclass(frozen=True)
class RetrainConfig:
    """What one retraining run does.

    Args:
        since: take interactions with ts > since (None: the parent version's watermark).
        until: ... and ts <= until (None: the newest interaction); a daily schedule passes the day's end.
        window_days: pairs are re-mined over interactions in (until - window_days, until].
        warm_start: fine-tune from the parent's encoder and warm-start codebooks from the parent's quantizer.
        align_epochs: alignment fine-tuning epochs.
        skip_unaligned: do not recompute the unaligned encoder's tables (the ablation's row f needs them).
        gate: publication thresholds.
        seed: seeds every stage.
        extra_flags: further `qarm pipeline` flags passed to the candidate stage unchanged.
    """

    since: Optional[int] = None
    until: Optional[int] = None
    window_days: float = 365.0
    warm_start: bool = True
    align_epochs: int = 1
    skip_unaligned: bool = False
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    extra_flags: tuple = ()

    def __post_init__(self):
        if self.window_days <= 0:
            raise ValueError(f"RetrainConfig.window_days must be > 0, got {self.window_days}")
        if self.align_epochs < 1:
            raise ValueError(f"RetrainConfig.align_epochs must be >= 1, got {self.align_epochs}")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError(f"RetrainConfig: until ({self.until}) must be after since ({self.since})")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["extra_flags"] = list(self.extra_flags)
        return out


@dataclass
class RetrainOutcome:
    """What a run decided. ``published`` False with ``reasons`` means the gate refused the candidate."""

    published: bool
    version: Optional[str]
    parent: str
    reasons: list
    summary: dict


# ------------------------------------------------------------------------------------------------ stages


def _window_stage(dataset, parent, cfg: RetrainConfig):
    """Select the interactions of this run and export the windowed dataset; returns (inputs, stage fn)."""
    inter = dataset.interactions
    if len(inter) == 0:
        raise NothingToDo("the dataset has no interactions")
    watermark = parent.extra.get("watermark")
    since = cfg.since if cfg.since is not None else watermark
    if since is None:
        raise ValueError(f"version {parent.id} records no watermark; pass --since TS")
    until = cfg.until if cfg.until is not None else int(inter["ts"].max())
    fresh = inter[(inter["ts"] > since) & (inter["ts"] <= until)]
    parent_items = parent.codes().item_ids
    new_items = np.setdiff1d(dataset.items["item_id"].to_numpy(np.int64), parent_items)
    if len(fresh) == 0 and len(new_items) == 0:
        raise NothingToDo(f"no interactions in ({since}, {until}] and no new items since {parent.id}")
    start = until - int(cfg.window_days * DAY)
    window = inter[(inter["ts"] > start) & (inter["ts"] <= until)]
    inputs = {"parent": parent.id, "since": int(since), "until": int(until), "window_start": int(start),
              "rows": int(len(window)), "items": int(len(dataset.items))}

    def run(out: Path) -> dict:
        from pipelines.data.loader import export_dataset

        windowed = dataclasses.replace(dataset, interactions=window.reset_index(drop=True))
        export_dataset(windowed, out)
        return {**inputs, "new_interactions": int(len(fresh)), "new_items": int(len(new_items)),
                "window_interactions": int(len(window)),
                "window_positives": int((window["label"] > 0).sum())}

    return inputs, run


def _cascade_flags(parent, data_dir: Path, cfg: RetrainConfig, candidate_store: Path) -> list[str]:
    """`qarm pipeline` flags for the candidate: the parent's encoder/quantizer settings, warm-started."""
    pcfg = parent.config
    enc, align, quant = pcfg.get("encoder", {}), pcfg.get("align", {}), pcfg.get("quantizer", {})
    flags = ["--dataset", "generic", "--mapping", str(data_dir / "mapping.json"), "--store", str(candidate_store),
             "--seed", str(cfg.seed), "--runner", "DirectRunner",
             "--align-mode", str(align.get("mode", "side")), "--align-epochs", str(cfg.align_epochs)]
    if enc.get("name"):
        flags += ["--encoder", str(enc["name"])]
    if enc.get("embed_dim"):
        flags += ["--embed-dim", str(enc["embed_dim"])]
    if enc.get("image_size"):
        flags += ["--encoder-image-size", str(enc["image_size"])]
    for key, flag in (("rq_levels", "--rq-levels"), ("rq_codebook_size", "--rq-codebook-size"),
                      ("vq_k", "--vq-k"), ("fit_sample", "--fit-sample")):
        if quant.get(key):
            flags += [flag, str(quant[key])]
    if cfg.warm_start:
        for folder, flag in (("encoder", "--init-encoder"), ("quantizer", "--init-quantizer")):
            if (parent.path / folder).is_dir():
                flags += [flag, str(parent.path / folder)]
    if cfg.skip_unaligned:
        flags.append("--skip-unaligned")
    return flags + list(cfg.extra_flags)


def _candidate_stage(parent, data_dir: Path, cfg: RetrainConfig):
    def run(out: Path) -> dict:
        from pipelines import cascade

        summary = cascade.run(_cascade_flags(parent, data_dir, cfg, out / "store"), save_main_session=False)
        return {"version": summary["version"], "stages": summary["stages"], "dead_letter": summary["dead_letter"],
                "metrics": summary["metrics"], "seconds": summary["seconds"]}

    return run


def _stability_stage(parent, candidate, seed: int):
    """Churn of the warm-started codes vs a cold refit on the same candidate embeddings."""

    def run(out: Path) -> dict:
        from feature_store.remap import code_churn
        from feature_store.tables import CodeTable, codebook_levels
        from quant import RQKMeans

        new_codes = candidate.codes()
        warm = code_churn(parent.codes(), new_codes)
        books = codebook_levels(candidate.codebooks(as_numpy=True))
        ids, emb = candidate.embeddings()
        cold_q = RQKMeans(levels=len(books), codebook_size=int(books[0].shape[0]), seed=seed + 1).fit(emb)
        cold_codes = CodeTable(item_ids=ids, rq=cold_q.encode(emb).astype(np.int32),
                               vq=np.zeros((len(ids), 0), np.int64))
        cold = code_churn(parent.codes(), cold_codes)
        return {"warm": _churn_view(warm), "cold": _churn_view(cold)}

    return run


def _churn_view(churn: dict) -> dict:
    keep = ("common_items", "added_items", "removed_items", "rq_level_churn", "rq_code_churn", "vq_churn",
            "vq_overlap")
    return {k: churn[k] for k in keep if k in churn}


# ------------------------------------------------------------------------------------------------ the job


def candidate_metrics(candidate_summary: dict, stability: dict) -> dict:
    """The gate's view of a candidate: collision, utilization, held-out recall, churn."""
    metrics = candidate_summary["metrics"]
    codes = metrics.get("codes_aligned", {})
    heldout = metrics.get("heldout_aligned", {})
    return {"collision_rate": codes.get("collision_rate"), "utilization": codes.get("utilization"),
            "recall@10_aligned": heldout.get("recall@10"),
            "churn": (stability.get("warm") or {}).get("rq_code_churn")}


def parent_gate_metrics(parent) -> dict:
    heldout = parent.metrics.get("heldout_aligned", {})
    return {"recall@10_aligned": heldout.get("recall@10")}


def retrain(store_root: Path, dataset, cfg: RetrainConfig, work_root: Optional[Path] = None,
            continuity: bool = False, lock_timeout: float = 0.0) -> RetrainOutcome:
    """Run one retraining job against the CURRENT version of ``store_root``.

    Args:
        store_root: the feature store; its CURRENT version is the parent.
        dataset: a loaded ``pipelines.data.Dataset`` (the full log; the job selects its window).
        cfg: the run's settings.
        work_root: where stage checkpoints live (default ``<store>/.retrain``); one folder per run key.
        continuity: train a reference ranker on the parent and report AUC right after the switch to the new
            codes, with remapped vs fresh code rows (costs one ranker fit).
    Raises:
        NothingToDo: nothing new since the parent's watermark.
        StoreLockedError: another run holds the store lock.
    """
    from feature_store import FeatureStore

    t0 = time.perf_counter()
    store = FeatureStore(store_root)
    with store.lock(timeout=lock_timeout, purpose="qarm retrain"):
        if store.current_id() is None:
            raise ValueError(f"store {store_root} has no CURRENT version: run `qarm pipeline` first")
        parent = store.read()
        window_inputs, window_fn = _window_stage(dataset, parent, cfg)
        # The gate is not part of the key: a rerun with other thresholds reuses the computed stages.
        work_cfg = {k: v for k, v in cfg.to_dict().items() if k != "gate"}
        run_key = fingerprint({"window": window_inputs, "config": work_cfg,
                               "continuity": continuity})[:16]
        workdir = Path(work_root or Path(store_root) / ".retrain") / f"run-{run_key}"
        runner = StageRunner(workdir)
        window = runner.run("window", window_inputs, window_fn)
        cand = runner.run("candidate", {"window": window_inputs, "config": work_cfg},
                          _candidate_stage(parent, runner.path("window"), cfg))
        candidate = FeatureStore(runner.path("candidate") / "store").read(cand["version"])
        stability = runner.run("stability", {"candidate": cand["version"], "seed": cfg.seed},
                               _stability_stage(parent, candidate, cfg.seed))
        continuity_report = None
        if continuity:
            from pipelines.retrain.continuity import continuity_stage

            continuity_report = runner.run("continuity", {"candidate": cand["version"], "seed": cfg.seed},
                                           continuity_stage(parent, candidate, dataset, window, cfg.seed))
        gate_view = candidate_metrics(cand, stability)
        reasons = check_gate(gate_view, parent_gate_metrics(parent), cfg.gate)
        summary = {"parent": parent.id, "since": window["since"], "until": window["until"],
                   "new_interactions": window["new_interactions"], "new_items": window["new_items"],
                   "window_interactions": window["window_interactions"], "candidate": gate_view,
                   "churn_warm": stability["warm"], "churn_cold": stability["cold"],
                   "continuity": continuity_report, "gate": {"passed": not reasons, "reasons": reasons,
                                                      "config": dataclasses.asdict(cfg.gate)},
                   "stages": runner.summary(), "workdir": str(workdir)}
        if reasons:
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            log.warning("gate refused the candidate: %s; CURRENT stays %s", "; ".join(reasons), parent.id)
            return RetrainOutcome(False, None, parent.id, reasons, summary)
        version = _publish(store, parent, candidate, cfg, summary, window)
        summary["version"] = version.id
        summary["seconds"] = round(time.perf_counter() - t0, 3)
    shutil.rmtree(workdir, ignore_errors=True)  # published: the checkpoints have served their purpose
    return RetrainOutcome(True, version.id, parent.id, [], summary)


def _publish(store, parent, candidate, cfg: RetrainConfig, summary: dict, window: dict):
    """Copy the candidate's files into a real staging folder and publish it with the parent recorded."""
    with store.stage(parent=parent.id, require_parent_current=True) as st:
        for rel in candidate.files():
            if rel in _SKIP_ON_COPY:
                continue
            dest = Path(st.path) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(candidate.path / rel, dest)
        config = {**candidate.config, "retrain": {**cfg.to_dict(), "parent": parent.id}}
        metrics = {**candidate.metrics, "retrain": {k: summary[k] for k in (
            "new_interactions", "new_items", "window_interactions", "churn_warm", "churn_cold", "continuity")}}
        extra = {**candidate.extra, "watermark": window["until"], "since": window["since"], "job": "qarm retrain"}
        return st.publish(config=json.loads(json.dumps(config, default=str)), metrics=metrics, extra=extra)
