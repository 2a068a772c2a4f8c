"""Statistics of an ablation: mean ± std over seeds, and paired bootstrap intervals of a row's gain over a baseline.

The bootstrap resamples *test users* with replacement (a user's events stay together, so the interval reflects
how many independent users the test window has, not how many events). One resample is applied to every seed
and to both rows, so the difference is paired twice: by user and by seed (row run s is compared with baseline
run s). Resampling users with replacement is the same as weighting each user's events by its multiplicity, so
each replicate is a weighted AUC / GAUC computed in O(N) from sort orders prepared once.

Example:
    >>> ev = PairedEvaluation(users, labels)
    >>> ev.diff_ci(row_logits_per_seed, id_logits_per_seed, metric="gauc")["ci95"]
    [0.0012, 0.0051]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranker.metrics import auc, undefined_reasons


@dataclass(frozen=True)
class BootstrapConfig:
    """Args:
        replicates: bootstrap resamples of the test users.
        seed: resampling seed (fixed: every row is compared on the same resamples).
        level: two-sided confidence level of the percentile interval.
    """

    replicates: int = 1000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if self.replicates < 10:
            raise ValueError(f"BootstrapConfig.replicates must be >= 10, got {self.replicates}")
        if not 0.5 < self.level < 1.0:
            raise ValueError(f"BootstrapConfig.level must be in (0.5, 1), got {self.level}")


class _SortedScores:
    """One run's scores prepared for weighted AUC: sort order and tie groups, computed once."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, user_index: np.ndarray):
        order = np.argsort(scores, kind="mergesort")
        s = scores[order]
        self.group = np.r_[0, np.cumsum(np.diff(s) != 0)]  # tie-group id per sorted element
        self.n_groups = int(self.group[-1]) + 1 if len(s) else 0
        self.pos = labels[order] > 0.5
        self.user = user_index[order]

    def weighted_auc(self, user_weight: np.ndarray) -> float:
        """AUC with each event weighted by its user's weight (ties count one half)."""
        w = user_weight[self.user]
        pos_w = np.bincount(self.group, weights=w * self.pos, minlength=self.n_groups)
        neg_w = np.bincount(self.group, weights=w * ~self.pos, minlength=self.n_groups)
        total_pos, total_neg = pos_w.sum(), neg_w.sum()
        if total_pos == 0 or total_neg == 0:
            return float("nan")
        below = np.cumsum(neg_w) - neg_w
        return float((pos_w * (below + 0.5 * neg_w)).sum() / (total_pos * total_neg))


def per_user_auc(user_index: np.ndarray, labels: np.ndarray, scores: np.ndarray, n_users: int):
    """Per-user AUC and event count.

    Args:
        user_index: (N,) user index in [0, n_users).
    Returns:
        (auc (n_users,) with NaN for users lacking a class, events (n_users,) int).
    """
    order = np.argsort(user_index, kind="mergesort")
    u, y, s = user_index[order], labels[order], scores[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(u)) + 1, len(u)]
    aucs = np.full(n_users, np.nan)
    counts = np.zeros(n_users, np.int64)
    for start, end in zip(bounds[:-1], bounds[1:]):
        aucs[u[start]] = auc(y[start:end], s[start:end])
        counts[u[start]] = end - start
    return aucs, counts


class PairedEvaluation:
    """Paired bootstrap over the test users of one fixed set of test events.

    Args:
        users: (N,) user id of every test event (the same events for every row and seed).
        labels: (N,) 0/1.
        config: BootstrapConfig.
    """

    def __init__(self, users: np.ndarray, labels: np.ndarray, config: BootstrapConfig = BootstrapConfig()):
        self.unique_users, self.user_index = np.unique(np.asarray(users), return_inverse=True)
        self.labels = np.asarray(labels, dtype=np.float64)
        self.config = config
        rng = np.random.default_rng(config.seed)
        n = len(self.unique_users)
        # (B, U) multiplicity of each user in each resample: the same draws for every comparison
        draws = rng.integers(0, n, size=(config.replicates, n))
        self.weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)

    def _gauc_parts(self, scores: np.ndarray):
        aucs, counts = per_user_auc(self.user_index, self.labels, np.asarray(scores, np.float64),
                                    len(self.unique_users))
        valid = ~np.isnan(aucs)
        return np.where(valid, aucs, 0.0) * counts, np.where(valid, counts, 0).astype(np.float64)

    def replicates(self, scores: np.ndarray, metric: str) -> np.ndarray:
        """(B,) the metric of one run on every resample."""
        if metric == "gauc":
            num, den = self._gauc_parts(scores)
            total = self.weights @ den  # a resample without a user of both classes has no GAUC (NaN, not 0)
            return np.divide(self.weights @ num, total, out=np.full(len(total), np.nan), where=total > 0)
        if metric == "auc":
            prepared = _SortedScores(np.asarray(scores, np.float64), self.labels, self.user_index)
            return np.array([prepared.weighted_auc(w) for w in self.weights])
        raise ValueError(f"metric must be 'auc' or 'gauc', got {metric!r}")

    def diff_ci(self, row_scores: list, base_scores: list, metric: str) -> dict:
        """Mean over seeds of (row - baseline) on each resample; its percentile interval.

        Args:
            row_scores, base_scores: per seed (N,) scores, paired by position (row seed s vs baseline seed s).
        Returns:
            {"mean": observed mean difference over seeds (AUC units), "ci95": [lo, hi], "seeds": S,
             "replicates": B, "replicates_defined": resamples where the metric exists}; where the metric is
            undefined on the test events (or on every resample) "mean" and "ci95" are None and "undefined" says why.
        """
        if len(row_scores) != len(base_scores) or not row_scores:
            raise ValueError(f"diff_ci: {len(row_scores)} row runs vs {len(base_scores)} baseline runs; "
                             f"pair them by seed")
        out = {"seeds": len(row_scores), "replicates": self.config.replicates}
        reason = self.undefined_reason(metric)
        if reason:
            return {**out, "mean": None, "ci95": None, "replicates_defined": 0, "undefined": reason}
        full = np.ones(len(self.unique_users))
        observed, reps = [], np.zeros(self.config.replicates)
        for a, b in zip(row_scores, base_scores):
            if len(a) != len(self.labels) or len(b) != len(self.labels):
                raise ValueError("diff_ci: runs scored different test events; rows must share one example set")
            observed.append(_metric_at(self, a, metric, full) - _metric_at(self, b, metric, full))
            reps += self.replicates(a, metric) - self.replicates(b, metric)
        reps /= len(row_scores)
        defined = int(np.isfinite(reps).sum())
        if defined == 0:
            return {**out, "mean": float(np.mean(observed)), "ci95": None, "replicates_defined": 0,
                    "undefined": f"{metric} is undefined on every one of the {self.config.replicates} resamples"}
        alpha = (1.0 - self.config.level) / 2.0
        lo, hi = np.nanquantile(reps, [alpha, 1.0 - alpha])
        return {**out, "mean": float(np.mean(observed)), "ci95": [float(lo), float(hi)], "replicates_defined": defined}

    def undefined_reason(self, metric: str) -> str | None:
        """Why `metric` cannot be computed on these test events (None when it can)."""
        if len(self.unique_users) == 0:
            return "no test users to resample"
        return undefined_reasons(self.unique_users[self.user_index], self.labels).get(metric)


def _metric_at(ev: PairedEvaluation, scores: np.ndarray, metric: str, user_weight: np.ndarray) -> float:
    if metric == "gauc":
        num, den = ev._gauc_parts(scores)
        total = user_weight @ den
        return float((user_weight @ num) / total) if total > 0 else float("nan")
    return _SortedScores(np.asarray(scores, np.float64), ev.labels, ev.user_index).weighted_auc(user_weight)


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for a single value) of the defined values; (None, None) when none is defined
    (None / NaN entries are undefined metrics, never zeros)."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if len(arr) == 0:
        return None, None
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize_runs(runs: dict, baseline: str = "id", evaluation: PairedEvaluation | None = None,
                   pairs: dict | None = None) -> dict:
    """Mean / std over runs per row, the paired gain over the baseline row, and (with `evaluation`) bootstrap
    intervals of that gain.

    Args:
        runs: {row: [fit result, ...]}; a result may carry "test_scores" (N,) for the intervals.
        baseline: the row every other row is compared with.
        evaluation: PairedEvaluation over the shared test events (None: no intervals).
        pairs: {row: [index into runs[baseline] for each run of the row]} (default: run i with baseline run i).
    Returns:
        {row: {auc_mean, auc_std, gauc_mean, gauc_std, logloss_mean, logloss_std, auc_per_run, gauc_per_run,
               delta_auc_pt_mean, delta_auc_pt_std, auc_diff_ci95, gauc_diff_ci95, ...}}
    """
    rows = {}
    base = runs.get(baseline, [])
    for name, results in runs.items():
        row = _summary_row(results)
        index = (pairs or {}).get(name, list(range(len(results))))
        if base and name != baseline and len(index) == len(results) and max(index, default=-1) < len(base):
            paired_base = [base[i] for i in index]
            for metric in ("auc", "gauc"):
                delta = [None if r["test"][metric] is None or b["test"][metric] is None
                         else (r["test"][metric] - b["test"][metric]) * 100.0  # points, paired by seed
                         for r, b in zip(results, paired_base)]
                row[f"delta_{metric}_pt_mean"], row[f"delta_{metric}_pt_std"] = mean_std(delta)
            if evaluation is not None and all("test_scores" in r for r in results + paired_base):
                for metric in ("auc", "gauc"):
                    ci = evaluation.diff_ci([r["test_scores"] for r in results],
                                            [b["test_scores"] for b in paired_base], metric)
                    row[f"{metric}_diff"] = ci["mean"]
                    row[f"{metric}_diff_ci95"] = ci["ci95"]
                    if ci.get("undefined"):
                        row.setdefault("undefined", {}).setdefault(f"{metric}_diff_ci95", ci["undefined"])
        rows[name] = row
    return rows


def _summary_row(results: list) -> dict:
    """Mean / std over one row's runs; an undefined metric is None with its reason in row["undefined"]."""
    values = {m: [r["test"][m] for r in results] for m in ("auc", "gauc", "logloss")}
    row = {"runs": len(results), "best_epochs": [r["best_epoch"] for r in results],
           "auc_per_run": values["auc"], "gauc_per_run": values["gauc"]}
    for metric, vals in values.items():
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(vals)
    reasons = {m: why for r in results for m, why in r["test"].get("undefined", {}).items()}
    if reasons:
        row["undefined"] = reasons
    buckets = {}
    for r in results:
        for bucket, m in r.get("test_by_popularity", {}).items():
            buckets.setdefault(bucket, {"auc": [], "n": m["n"]})["auc"].append(m["auc"])
    if buckets:
        row["auc_by_popularity"] = {b: {"auc_mean": mean_std(v["auc"])[0], "n": v["n"]} for b, v in buckets.items()}
    return row
