"""The scheduled retraining job: new logs in, a validated new feature-store version out (or CURRENT untouched).

Stages (each checkpointed by :class:`~pipelines.jobs.retrain.stages.StageRunner`, so a rerun after a crash resumes):

1. ``window``: interactions after the parent's watermark (or ``--since``) up to ``--until``. The last
   ``tail_frac`` of those new events (by time) is the *held-out tail*: it is exported to no stage that learns
   (alignment, pair mining, codebooks) and is where every comparison with the parent is made. The pair-mining
   window is the last ``window_days`` before the tail; the whole catalog (new items included) is exported.
2. ``candidate``: the cascade job (``pipelines.jobs.cascade``) on that export, published into a private candidate
   store inside the work folder (never the real one). The encoder is fine-tuned from the parent's
   (``--init-encoder``) only on a scheduled refresh (every ``refresh_encoder_every`` versions, counted in the
   store's history); otherwise the parent's encoder is reused as it is (``--align-checkpoint``), so embeddings
   of existing items do not move. RQ codebooks are warm-started from the parent's quantizer. A refresh is the
   cascade's alignment with the parent's encoder as step 0: the never-worse gate keeps the parent's weights when
   no fine-tuned epoch beats them on the candidate's validation window (``metrics.alignment``).
3. ``stability``: the codes to publish (``pipelines.jobs.retrain.stability``): items that moved less than a threshold
   keep their code, the others are encoded against the parent's codebooks; the refit codebooks are used only
   when the drift metric says so. Churn by item group (unchanged / touched / new) and, for reference, the churn
   of the cascade's warm-started refit and of a cold refit. The result is a private ``final`` version.
4. ``continuity``: a reference ranker trained on the parent is switched to the final codes; AUC / GAUC on the
   held-out tail for before / remapped / stale / fresh / scratch (``pipelines.jobs.retrain.continuity``).
5. gate (``pipelines.jobs.retrain.gate``: codebook checks, tail AUC / GAUC and tail next-item recall of both encoders
   on the same queries), then publish into the real store with the parent recorded. The store lock is held for
   the whole run, so a second concurrent run is refused instead of racing.
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

from pipelines.jobs.retrain.gate import GateConfig, check_gate
from pipelines.jobs.retrain.stability import StabilityConfig
from pipelines.jobs.retrain.stages import StageRunner, fingerprint

log = logging.getLogger("pipelines.jobs.retrain")

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
        window_days: pairs are re-mined over interactions in (until - window_days, tail start].
        tail_frac: the last share (by time) of the new events kept out of alignment and fitting: the
            held-out tail every comparison with the parent is made on.
        warm_start: start from the parent's encoder and quantizer (False: fresh fine-tune and cold codebooks).
        refresh_encoder_every: fine-tune the encoder on every N-th version counted in the store's history
            (1: every run; 0: never, the parent's encoder is always reused); other runs reuse it frozen.
        align_epochs: alignment fine-tuning epochs (on a refresh).
        align_lr: fine-tuning learning rate (None: the alignment mode's default).
        stability: which items keep their codes and when codebooks are refit.
        remap_method: how the reference ranker's code rows are carried over (``feature_store.remap``).
        ranker_gate: train the reference rankers and gate on tail AUC / GAUC (continuity stage).
        skip_unaligned: do not recompute the unaligned encoder's tables (the ablation's row f needs them).
        gate: publication thresholds.
        seed: seeds every stage.
        extra_flags: the user's Beam options (``--runner FlinkRunner ...``) and further `qarm pipeline` knob
            overrides, passed to the candidate's cascade run over its parent's resolved config.
    """

    since: Optional[int] = None
    until: Optional[int] = None
    window_days: float = 365.0
    tail_frac: float = 0.2
    warm_start: bool = True
    refresh_encoder_every: int = 0
    align_epochs: int = 1
    align_lr: Optional[float] = None
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    remap_method: str = "warm"
    ranker_gate: bool = True
    skip_unaligned: bool = False
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    extra_flags: tuple = ()

    def __post_init__(self):
        from feature_store.remap import METHODS

        if self.window_days <= 0:
            raise ValueError(f"RetrainConfig.window_days must be > 0, got {self.window_days}")
        if not 0.0 < self.tail_frac < 1.0:
            raise ValueError(f"RetrainConfig.tail_frac must be in (0, 1), got {self.tail_frac}")
        if self.refresh_encoder_every < 0:
            raise ValueError(f"RetrainConfig.refresh_encoder_every must be >= 0, got {self.refresh_encoder_every}")
        if self.align_epochs < 1:
            raise ValueError(f"RetrainConfig.align_epochs must be >= 1, got {self.align_epochs}")
        if self.align_lr is not None and self.align_lr <= 0:
            raise ValueError(f"RetrainConfig.align_lr must be > 0, got {self.align_lr}")
        if self.remap_method not in METHODS:
            raise ValueError(f"RetrainConfig.remap_method must be one of {METHODS}, got {self.remap_method!r}")
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


class FutureWatermarkError(ValueError):
    """The parent's watermark is later than the clock: every newer event would be skipped for ever."""


def check_start(parent, cfg: RetrainConfig, clock) -> None:
    """A run's time bounds against the clock (DESIGN.md: a watermark never passes the clock).

    Raises:
        FutureWatermarkError: the parent's watermark (the default ``since``) is later than the clock, with how
            to recover; ValueError: ``--since`` / ``--until`` later than the clock.
    """
    from feature_store.clock import describe_ts

    watermark = parent.extra.get("watermark")
    if cfg.since is None and isinstance(watermark, (int, float)) and watermark > clock.now:
        raise FutureWatermarkError(
            f"{parent.path}: the watermark of CURRENT version {parent.id} is {int(watermark)} "
            f"({describe_ts(watermark)}), later than the clock {clock.now} ({describe_ts(clock.now)}): it was "
            f"published from an event stamped in the future, and a retrain from it would skip every event up to "
            f"then. Retrain from a time you trust with --since TS (e.g. --since {clock.now - 86_400} for the last "
            "day), or roll back to an earlier version (`qarm store rollback`); `qarm store verify` lists such "
            "versions")
    for name in ("since", "until"):
        value = getattr(cfg, name)
        if value is not None and value > clock.now:
            raise ValueError(f"--{name} {value} ({describe_ts(value)}) is later than the clock {clock.now} "
                             f"({describe_ts(clock.now)}); pass --now if the clock is wrong")


def _window_stage(dataset, parent, cfg: RetrainConfig, clock):
    """Select this run's events, cut the held-out tail, export the rest; returns (inputs, stage fn)."""
    inter = dataset.interactions
    if len(inter) == 0:
        raise NothingToDo("the dataset has no interactions")
    watermark = parent.extra.get("watermark")
    since = cfg.since if cfg.since is not None else watermark
    if since is None:
        raise ValueError(f"version {parent.id} records no watermark; pass --since TS")
    # the published watermark is `until`: never past the clock (events inside --max-future wait for the next run)
    until = cfg.until if cfg.until is not None else clock.cap(int(inter["ts"].max()))
    fresh = inter[(inter["ts"] > since) & (inter["ts"] <= until)]
    parent_items = parent.codes().item_ids
    new_items = np.setdiff1d(dataset.items["item_id"].to_numpy(np.int64), parent_items)
    if len(fresh) == 0 and len(new_items) == 0:
        raise NothingToDo(f"no interactions in ({since}, {until}] and no new items since {parent.id}")
    # the tail: events after the (1 - tail_frac) quantile of the new events' timestamps (ties go to the tail)
    tail_start = int(np.quantile(fresh["ts"].to_numpy(), 1.0 - cfg.tail_frac, method="lower")) - 1 \
        if len(fresh) else until
    tail_start = max(tail_start, int(since))
    start = tail_start - int(cfg.window_days * DAY)
    window = inter[(inter["ts"] > start) & (inter["ts"] <= tail_start)]
    inputs = {"parent": parent.id, "since": int(since), "until": int(until), "tail_start": int(tail_start),
              "window_start": int(start), "rows": int(len(window)), "items": int(len(dataset.items))}

    def run(out: Path) -> dict:
        from pipelines.data.loader import export_dataset

        windowed = dataclasses.replace(dataset, interactions=window.reset_index(drop=True))
        export_dataset(windowed, out)
        tail = fresh[fresh["ts"] > tail_start]
        return {**inputs, "new_interactions": int(len(fresh)), "new_items": int(len(new_items)),
                "window_interactions": int(len(window)), "tail_interactions": int(len(tail)),
                "window_positives": int((window["label"] > 0).sum())}

    return inputs, run


def versions_since_refresh(store, parent) -> int:
    """How many versions, the parent included, were published since the encoder was last fine-tuned.

    A version made by the cascade directly (no ``retrain`` config) or by a retrain run that refreshed the
    encoder (``config.retrain.encoder_refreshed``) counts as a refresh.
    """
    count, version = 1, parent
    while True:
        retrain_cfg = (version.config or {}).get("retrain")
        if not retrain_cfg or retrain_cfg.get("encoder_refreshed", True) or version.parent is None:
            return count
        version = store.read(version.parent, verify=False)
        count += 1


def refresh_due(cfg: RetrainConfig, since_refresh: int) -> bool:
    """Whether this run fine-tunes the encoder (see ``RetrainConfig.refresh_encoder_every``)."""
    if not cfg.warm_start:
        return True
    return cfg.refresh_encoder_every > 0 and since_refresh >= cfg.refresh_encoder_every


# What a candidate changes in its parent's resolved config (every other knob is inherited, so a candidate is built
# with its parent's recipe). README / docs/ARCHITECTURE.md list these.
RETRAIN_OVERRIDES = {
    "data": "the window's export: dataset generic, mapping (its folder), the retrain clock (now); synthetic-only "
            "knobs back to their defaults",
    "runtime": "store (the private candidate store), work_dir (the candidate's own scratch)",
    "align": "align_epochs and align_lr (--align-epochs / --align-lr); a warm start reuses the parent's encoder "
             "(align_checkpoint; init_encoder on a refresh; unaligned_map auto, the checkpoint keeps its map)",
    "quant": "init_quantizer (the parent's quantizer on a warm start)",
    "skip_unaligned": "set when --skip-unaligned is given",
}
_SYNTHETIC_ONLY = ("preset", "n_items", "n_users", "n_events", "n_clusters", "lookalike_share", "image_size")


def parent_cascade_config(parent):
    """The parent's resolved CascadeConfig (``manifest.resolved_config.cascade``). A version published before the
    config tree existed has none: its encoder / align / quantizer records over the defaults, with a warning."""
    from pipelines.config.cascade import CascadeConfig
    from feature_store.config_tree import tree_from_dict, with_values

    resolved = (parent.extra.get("resolved_config") or {}).get("cascade")
    if resolved:
        return tree_from_dict(CascadeConfig, resolved, where=f"version {parent.id} manifest resolved_config")
    log.warning("version %s stores no resolved config (published before qarm 0.1.0's config tree): the candidate "
                "inherits only its encoder, alignment mode and quantizer settings", parent.id)
    pcfg = parent.config
    enc, align, quant = pcfg.get("encoder", {}), pcfg.get("align", {}), pcfg.get("quantizer", {})
    known = {"encoder": enc.get("name"), "embed_dim": enc.get("embed_dim"), "encoder_image_size": enc.get("image_size"),
             "align_mode": align.get("mode"), **{k: quant.get(k) for k in ("rq_levels", "rq_codebook_size", "vq_k",
                                                                           "fit_sample", "vq_index")}}
    return with_values(CascadeConfig(), {k: v for k, v in known.items() if v})


def candidate_config(parent, data_dir: Path, cfg: RetrainConfig, candidate_store: Path, refresh: bool, now: int):
    """(the candidate's CascadeConfig, the overridden knobs): the parent's resolved config with exactly the
    documented overrides (RETRAIN_OVERRIDES); ``cfg.extra_flags`` may override further knobs on top."""
    from pipelines.config.cascade import DataSection
    from feature_store.config_tree import with_values

    base = parent_cascade_config(parent)
    over = {"dataset": "generic", "data": None, "items": None, "interactions": None, "column_map": (),
            "id_map_dir": None, "mapping": str(data_dir / "mapping.json"), "now": str(int(now)),
            **{k: getattr(DataSection, k) for k in _SYNTHETIC_ONLY},
            "store": str(candidate_store), "work_dir": None, "align_epochs": cfg.align_epochs,
            "align_checkpoint": None, "init_encoder": None, "init_quantizer": None}
    if cfg.align_lr is not None:
        over["align_lr"] = cfg.align_lr
    if cfg.warm_start:
        if (parent.path / "encoder").is_dir():
            over["init_encoder" if refresh else "align_checkpoint"] = str(parent.path / "encoder")
            if not refresh:
                over["unaligned_map"] = "auto"  # a reused checkpoint keeps its own unaligned map
        if (parent.path / "quantizer").is_dir():
            over["init_quantizer"] = str(parent.path / "quantizer")
    if cfg.skip_unaligned:
        over["skip_unaligned"] = True
    return with_values(base, over, where="retrain overrides"), over


def _candidate_stage(parent, data_dir: Path, cfg: RetrainConfig, refresh: bool, now: int):
    def run(out: Path) -> dict:
        from feature_store.io import atomic_write_text
        from feature_store.config_tree import to_yaml
        from pipelines.jobs import cascade

        config, _ = candidate_config(parent, data_dir, cfg, out / "store", refresh, now)
        config_file = out / "candidate_config.yaml"
        atomic_write_text(config_file, to_yaml(config))
        # the user's Beam options (runner and all) and any further knob overrides, on top of the parent's recipe
        summary = cascade.run(["--config", str(config_file), *cfg.extra_flags], save_main_session=False)
        return {"version": summary["version"], "stages": summary["stages"], "dead_letter": summary["dead_letter"],
                "metrics": summary["metrics"], "seconds": summary["seconds"], "encoder_refreshed": refresh,
                "runner": summary["runner"]}

    return run


def _stability_stage(parent, candidate, dataset, window: dict, cfg: RetrainConfig):
    """Stable codes into a private ``final`` version; churn by item group; warm-refit and cold-refit churn."""

    def run(out: Path) -> dict:
        from feature_store import FeatureStore
        from feature_store.remap import code_churn
        from feature_store.tables import CodeTable, codebook_levels, write_codes
        from pipelines.jobs.retrain.stability import churn_by_group, item_groups, stable_codes
        from pipelines.beam.job_report import code_metrics
        from quant import RQKMeans

        p_codes, c_codes = parent.codes(), candidate.codes()
        p_ids, p_emb = parent.embeddings()
        c_ids, c_emb = candidate.embeddings()
        p_books = codebook_levels(parent.codebooks(as_numpy=True))
        c_books = codebook_levels(candidate.codebooks(as_numpy=True))
        if not (np.array_equal(p_ids, p_codes.item_ids) and np.array_equal(c_ids, c_codes.item_ids)):
            raise ValueError("stability: a version's embeddings and codes cover different items")
        same_shape = [b.shape for b in p_books] == [b.shape for b in c_books]
        if cfg.warm_start and same_shape:
            chosen = stable_codes(p_ids, p_emb, p_codes.rq, p_books, c_ids, c_emb, c_codes.rq, c_books,
                                  cfg.stability)
        else:  # a cold run, or other codebook sizes: the cascade's refit as it is
            chosen = {"rq": c_codes.rq, "refit": True, "kept": np.zeros(len(c_ids), bool),
                      "summary": {"refit": True, "reason": "cold run" if not cfg.warm_start else
                                  "codebook sizes changed"}}
        refit = chosen["refit"]
        final_codes = CodeTable(item_ids=c_ids, rq=np.asarray(chosen["rq"], np.int32), vq=c_codes.vq)
        # the final version: the candidate's files, its codes replaced; the parent's codebooks unless refit
        store = FeatureStore(out / "store")
        books_from = candidate if refit else parent
        metrics = dict(candidate.metrics)
        metrics["codes_aligned"] = code_metrics(final_codes, [int(b.shape[0]) for b in
                                                              (c_books if refit else p_books)])
        with store.stage(parent=None) as st:
            for rel in candidate.files():
                if rel == "manifest.json" or rel == "item_codes.parquet" or rel == "codebooks.safetensors" \
                        or rel.startswith("quantizer/"):
                    continue
                _copy(candidate.path / rel, Path(st.path) / rel)
            for rel in books_from.files():
                if rel == "codebooks.safetensors" or rel.startswith("quantizer/"):
                    _copy(books_from.path / rel, Path(st.path) / rel)
            write_codes(Path(st.path) / "item_codes.parquet", final_codes.item_ids, final_codes.rq, final_codes.vq)
            final = st.publish(config=candidate.config, metrics=metrics, extra=candidate.extra)
        groups = item_groups(p_ids, c_ids, dataset.interactions, window["since"], window["until"])
        by_group = churn_by_group(p_ids, p_codes.rq, c_ids, final_codes.rq, groups)
        refit_by_group = churn_by_group(p_ids, p_codes.rq, c_ids, c_codes.rq, groups)
        cold_q = RQKMeans(levels=len(c_books), codebook_size=int(c_books[0].shape[0]), seed=cfg.seed + 1).fit(c_emb)
        cold_codes = CodeTable(item_ids=c_ids, rq=cold_q.encode(c_emb).astype(np.int32),
                               vq=np.zeros((len(c_ids), 0), np.int64))
        return {"final_version": final.id, "codes": chosen["summary"], "refit": refit,
                "groups": by_group, "groups_warm_refit": refit_by_group,
                "published": _churn_view(code_churn(p_codes, final_codes)),
                "warm": _churn_view(code_churn(p_codes, c_codes)),
                "cold": _churn_view(code_churn(p_codes, cold_codes))}

    return run


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)


def _churn_view(churn: dict) -> dict:
    keep = ("common_items", "added_items", "removed_items", "rq_level_churn", "rq_code_churn", "vq_churn",
            "vq_overlap")
    return {k: churn[k] for k in keep if k in churn}


def tail_recall(parent, candidate, dataset, window: dict, seed: int) -> dict:
    """Next-item recall of both encoders on the held-out tail's positives: the same queries, the same catalog.

    Queries and targets are restricted to items both versions embed, and both encoders rank only those items,
    so the two figures differ only by the embeddings (issue: each side measured on its own set is not comparable).
    """
    from pipelines.encoder.retrieval_eval import next_item_queries, next_item_recall

    inter = dataset.interactions[dataset.interactions["ts"] <= window["until"]].reset_index(drop=True)
    positive = (inter["label"] >= 0.5).to_numpy()
    p_ids, p_emb = parent.embeddings()
    c_ids, c_emb = candidate.embeddings()
    common = np.intersect1d(p_ids, c_ids)
    queries = next_item_queries(inter[positive], (inter["ts"] > window["tail_start"]).to_numpy()[positive])
    queries = queries[(queries["target"].isin(common) & queries["query"].isin(common)).to_numpy()]
    out = {}
    for name, ids, emb in (("parent", p_ids, p_emb), ("candidate", c_ids, c_emb)):
        keep = np.isin(ids, common)
        out[name] = next_item_recall(ids[keep], emb[keep], queries, k=(10, 50))
    return out


# ------------------------------------------------------------------------------------------------ the job


def gate_views(final_summary: dict, stability: dict, recall: dict, continuity: Optional[dict]) -> tuple[dict, dict]:
    """(candidate, parent) metrics for ``check_gate``, both measured on the held-out tail where compared."""
    codes = final_summary.get("codes_aligned", {})
    groups = stability.get("groups", {})
    carried = [g for g in ("unchanged", "touched") if groups.get(g, {}).get("code_churn") is not None]
    n = sum(groups[g]["items"] for g in carried)
    churn = sum(groups[g]["code_churn"] * groups[g]["items"] for g in carried) / n if n else None
    cont = continuity if continuity and "skipped" not in continuity else {}
    cand = {"collision_rate": codes.get("collision_rate"), "utilization": codes.get("utilization"),
            "recall@10_aligned": recall.get("candidate", {}).get("recall@10"), "churn": churn,
            "auc": cont.get("remapped", {}).get("auc"), "gauc": cont.get("remapped", {}).get("gauc")}
    for key in ("auc", "gauc"):
        cand[f"{key}_diff_ci"] = ((cont.get("remapped") or {}).get("vs_before") or {}).get(key, {}).get("ci95")
    par = {"recall@10_aligned": recall.get("parent", {}).get("recall@10"),
           "auc": cont.get("before", {}).get("auc"), "gauc": cont.get("before", {}).get("gauc")}
    return cand, par


def retrain(store_root: Path, dataset, cfg: RetrainConfig, work_root: Optional[Path] = None,
            continuity: Optional[bool] = None, lock_timeout: float = 0.0, clock=None) -> RetrainOutcome:
    """Run one retraining job against the CURRENT version of ``store_root``.

    Long on purpose (about 95 lines): it is the run's one sequence under the store lock — run key, stages in order,
    the refused-refresh retry, the gate, publish — and every stage body lives in its own ``_*_stage`` function;
    splitting the sequence would spread the lock's scope over several functions.

    Args:
        store_root: the feature store; its CURRENT version is the parent.
        dataset: a loaded ``pipelines.data.Dataset`` (the full log; the job selects its window), loaded with
            the same clock.
        cfg: the run's settings.
        work_root: where stage checkpoints live (default ``<store>/.retrain``; for an object store, ``retrain`` in
            its local cache); one folder per run key.
        continuity: override ``cfg.ranker_gate`` (train the reference rankers and gate on the tail AUC).
        clock: the run's `feature_store.clock.EventClock` (default: this machine's clock): the published
            watermark never passes it. Not part of the run key, so a rerun resumes whatever its clock.
    Raises:
        NothingToDo: nothing new since the parent's watermark.
        StoreLockedError: another run holds the store lock.
        FutureWatermarkError: the parent's watermark is later than the clock (the message says how to recover).
    """
    from feature_store import FeatureStore
    from feature_store.clock import EventClock, resolve_now

    clock = clock or EventClock(resolve_now())
    if continuity is not None:
        cfg = dataclasses.replace(cfg, ranker_gate=bool(continuity))
    t0 = time.perf_counter()
    store = FeatureStore(store_root)
    with store.lock(timeout=lock_timeout, purpose="qarm retrain"):
        if store.current_id() is None:
            raise ValueError(f"store {store_root} has no CURRENT version: run `qarm pipeline` first")
        parent = store.read()
        check_start(parent, cfg, clock)
        window_inputs, window_fn = _window_stage(dataset, parent, cfg, clock)
        since_refresh = versions_since_refresh(store, parent)
        refresh = refresh_due(cfg, since_refresh)
        # The gate is not part of the key: a rerun with other thresholds reuses the computed stages.
        work_cfg = {k: v for k, v in cfg.to_dict().items() if k != "gate"}
        run_key = fingerprint({"window": window_inputs, "config": work_cfg, "refresh": refresh})[:16]
        workdir = Path(work_root or store.scratch_dir(".retrain")) / f"run-{run_key}"  # local, also for s3://
        runner = StageRunner(workdir)
        window = runner.run("window", window_inputs, window_fn)
        cand_cfg = {k: v for k, v in work_cfg.items() if k not in ("stability", "remap_method", "ranker_gate")}

        def build(refresh: bool, suffix: str = ""):
            cand = runner.run("candidate" + suffix, {"window": window_inputs, "config": cand_cfg, "refresh": refresh},
                              _candidate_stage(parent, runner.path("window"), cfg, refresh, clock.now))
            candidate = FeatureStore(runner.path("candidate" + suffix) / "store").read(cand["version"])
            stability = runner.run("stability" + suffix, {"candidate": cand["version"],
                                                          "stability": work_cfg["stability"], "seed": cfg.seed},
                                   _stability_stage(parent, candidate, dataset, window, cfg))
            final = FeatureStore(runner.path("stability" + suffix) / "store").read(stability["final_version"])
            recall = tail_recall(parent, final, dataset, window, cfg.seed)
            continuity_report = None
            if cfg.ranker_gate:
                from pipelines.jobs.retrain.continuity import continuity_stage

                continuity_report = runner.run("continuity" + suffix, {"final": final.id, "seed": cfg.seed,
                                                                       "remap": cfg.remap_method},
                                               continuity_stage(parent, final, dataset, window, cfg.seed,
                                                                cfg.remap_method))
            gate_view, parent_view = gate_views(final.metrics, stability, recall, continuity_report)
            return final, stability, recall, continuity_report, gate_view, parent_view, check_gate(
                gate_view, parent_view, cfg.gate)

        final, stability, recall, continuity_report, gate_view, parent_view, reasons = build(refresh)
        refused_refresh = None
        if reasons and refresh and cfg.warm_start and cfg.refresh_encoder_every != 1:
            # a scheduled encoder refresh the gate refused: publish the frozen-encoder version of the same day
            # instead (new items still get codes); the refresh is due again on the next run
            log.warning("gate refused the encoder refresh (%s); trying the frozen encoder", "; ".join(reasons))
            refused_refresh = {"reasons": reasons, "candidate": gate_view, "churn_groups": stability["groups"],
                               "continuity": continuity_report}
            refresh = False
            final, stability, recall, continuity_report, gate_view, parent_view, reasons = build(False, "-frozen")
        summary = {"parent": parent.id, "since": window["since"], "until": window["until"],
                   "tail_start": window["tail_start"], "tail_interactions": window["tail_interactions"],
                   "new_interactions": window["new_interactions"], "new_items": window["new_items"],
                   "window_interactions": window["window_interactions"],
                   "encoder_refreshed": refresh, "versions_since_refresh": since_refresh,
                   "refused_refresh": refused_refresh,
                   "candidate": gate_view, "parent_on_tail": parent_view, "tail_recall": recall,
                   "codes": stability["codes"], "churn_groups": stability["groups"],
                   "churn_groups_warm_refit": stability["groups_warm_refit"], "churn_published": stability["published"],
                   "churn_warm": stability["warm"], "churn_cold": stability["cold"],
                   "continuity": continuity_report, "gate": {"passed": not reasons, "reasons": reasons,
                                                      "config": dataclasses.asdict(cfg.gate)},
                   "stages": runner.summary(), "workdir": str(workdir)}
        if reasons:
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            log.warning("gate refused the candidate: %s; CURRENT stays %s", "; ".join(reasons), parent.id)
            return RetrainOutcome(False, None, parent.id, reasons, summary)
        version = _publish(store, parent, final, cfg, summary, window, refresh, clock)
        summary["version"] = version.id
        summary["seconds"] = round(time.perf_counter() - t0, 3)
    shutil.rmtree(workdir, ignore_errors=True)  # published: the checkpoints have served their purpose
    return RetrainOutcome(True, version.id, parent.id, [], summary)


def _publish(store, parent, candidate, cfg: RetrainConfig, summary: dict, window: dict, refresh: bool, clock):
    """Copy the final version's files into a real staging folder and publish it with the parent recorded."""
    with store.stage(parent=parent.id, require_parent_current=True) as st:
        for rel in candidate.files():
            if rel in _SKIP_ON_COPY:
                continue
            _copy(candidate.path / rel, Path(st.path) / rel)
        config = {**candidate.config, "retrain": {**cfg.to_dict(), "parent": parent.id, "encoder_refreshed": refresh}}
        metrics = {**candidate.metrics, "retrain": {k: summary[k] for k in (
            "new_interactions", "new_items", "window_interactions", "tail_interactions", "tail_start", "codes",
            "churn_groups", "churn_warm", "churn_cold", "tail_recall", "continuity", "parent_on_tail")}}
        extra = {**candidate.extra, "watermark": window["until"], "since": window["since"], "job": "qarm retrain",
                 "clock": clock.to_dict()}
        return st.publish(config=json.loads(json.dumps(config, default=str)), metrics=metrics, extra=extra)
