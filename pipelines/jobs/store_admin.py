"""`qarm store list|show|diff|rollback|retain|verify|cleanup|history --store DIR [--json]`.

Exit codes follow pipelines/cli.py: 1 for a corrupt version or bad input, 2 for a missing action argument, 4 when
another writer holds the lock (StoreLockedError, mapped by the dispatcher).
"""
from __future__ import annotations

import argparse
import json
import sys

from feature_store.clock import describe_ts
from feature_store.store import CURRENT_FILE, FeatureStore
from feature_store.version import CorruptVersionError
from pipelines.jobs.outcome import EXIT_ERROR, EXIT_USAGE, CommandExit

ACTIONS = ("list", "show", "diff", "rollback", "retain", "verify", "cleanup", "history")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS,
                        help="list: versions (CURRENT marked); show: a manifest (CURRENT by default); diff: "
                             "--version vs --to (default CURRENT): config, rows, metrics and code churn; rollback: "
                             "point CURRENT at --version; retain: keep the newest --keep; verify: check every "
                             "checksum; cleanup: sweep crashed writers' leftovers; history: CURRENT changes")
    g = parser.add_argument_group("store")
    g.add_argument("--store", required=True,
                   help="feature-store root: a directory, file:///path, s3://bucket/prefix or gs://bucket/prefix")
    g.add_argument("--version", help="version id (show / diff / rollback / verify)")
    g.add_argument("--lock-timeout", type=float, default=0.0,
                   help="seconds to wait for a busy store lock before giving up (default: fail at once)")
    a = parser.add_argument_group("action options")
    a.add_argument("--to", help="diff: the newer version (default CURRENT)")
    a.add_argument("--keep", type=int, help="retain: number of newest versions to keep (CURRENT always kept)")
    a.add_argument("--no-verify", action="store_true", help="show: skip checksum verification")
    a.add_argument("--verify", action="store_true", help="list: also verify every checksum of every version")
    a.add_argument("--now", default=None, help="verify: the clock a watermark may not pass (unix seconds or "
                                               "ISO-8601; default: this machine's clock)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def run(args: argparse.Namespace) -> dict:
    store = FeatureStore(args.store)
    if args.action not in ("list", "history", "cleanup") and not store.exists():
        raise FileNotFoundError(f"feature store not found: {store.root}")
    if args.action == "list":
        return _list(store, args)
    if args.action == "show":
        version = store.read(args.version, verify=not args.no_verify)
        result = {"store": str(store.root), "version": version.id, "current": version.id == store.current_id(),
                  "verified": not args.no_verify, "path": str(version.path), "manifest": version.manifest}
        if not args.json:  # the manifest is printed in full once; the summary lines stay short
            print(json.dumps(version.manifest, indent=2, default=str))
            result.pop("manifest")
        return result
    if args.action == "diff":
        if not args.version:
            raise CommandExit(EXIT_USAGE, "diff needs --version OLD [--to NEW]")
        return {"store": str(store.root), **diff_versions(store.read(args.version), store.read(args.to))}
    if args.action == "rollback":
        if not args.version:
            raise CommandExit(EXIT_USAGE, "rollback needs --version (see `qarm store list`)")
        return {"store": str(store.root), **store.rollback(args.version, lock_timeout=args.lock_timeout)}
    if args.action == "retain":
        if args.keep is None:
            raise CommandExit(EXIT_USAGE, "retain needs --keep N")
        removed = store.retain(args.keep, lock_timeout=args.lock_timeout)
        return {"store": str(store.root), "removed": removed, "kept": [v.id for v in store.list()],
                "current": store.current_id()}
    if args.action == "verify":
        return _verify(store, args)
    if args.action == "cleanup":
        return {"store": str(store.root), "removed": store.cleanup()}
    return {"store": str(store.root), "history": store.history()}


def current_state(store: FeatureStore, ids) -> tuple:
    """(CURRENT's id or None, what is wrong with CURRENT or None): list and verify report a broken pointer and
    go on, so the store can be inspected and repaired (`rollback --version V`) from the command line."""
    try:
        current = store.current_id()
    except CorruptVersionError as exc:
        return None, str(exc)
    if current is not None and current not in ids:
        return None, (f"{store.root / CURRENT_FILE}: names {current}, which is not a version of this store; "
                      "repair it with `qarm store rollback --store ... --version V`")
    return current, None


def _verify(store: FeatureStore, args) -> dict:
    """Every version's checksums, CURRENT, and the clock: a watermark later than now makes every later
    `qarm retrain` skip new data (see `qarm retrain --since`)."""
    from feature_store.clock import resolve_now

    listed = [v.id for v in store.list()]
    ids = [args.version] if args.version else listed
    now = resolve_now(args.now)
    problems, future = {}, {}
    for version_id in ids:
        try:
            version = store.read(version_id, verify=True)
        except RuntimeError as exc:  # CorruptVersionError
            problems[version_id] = str(exc)
            continue
        watermark = version.extra.get("watermark")
        if isinstance(watermark, (int, float)) and watermark > now:
            future[version_id] = (f"{store.version_path(version_id)}: watermark {int(watermark)} "
                                  f"({describe_ts(watermark)}) is later than the clock {now} ({describe_ts(now)}); "
                                  "a `qarm retrain` on it skips every event up to then: retrain with --since TS, or "
                                  "roll back")
    current, current_error = current_state(store, listed)
    result = {"store": str(store.root), "checked": len(ids), "corrupt": problems, "future_watermark": future,
              "current": current, "current_error": current_error, "now": now}
    failures = list(problems.values()) + list(future.values()) + ([current_error] if current_error else [])
    if failures:
        raise CommandExit(EXIT_ERROR, f"{len(failures)} problem(s) in {store.root}: {failures[0]}", result)
    return result


def _list(store: FeatureStore, args) -> dict:
    versions = store.list(verify=args.verify)
    current, current_error = current_state(store, {v.id for v in versions})
    if current_error:
        print(f"qarm store list: warning: {current_error}", file=sys.stderr)
    if not args.json:
        if not versions:
            print(f"(no versions in {store.root})")
        for v in versions:
            rows = v.rows.get("item_embeddings.parquet", v.rows.get("item_codes.parquet", "-"))
            mark = "*" if v.current else " "
            status = f"  CORRUPT: {v.error}" if v.error else ""
            print(f"{mark} {v.id}  {v.created_at or '?':<25}  parent={v.parent or '-':<16}  items={rows}{status}")
    result = {"store": str(store.root), "current": current, "count": len(versions),
              "corrupt": [v.id for v in versions if v.error], "current_error": current_error}
    if args.json:  # the human form printed the table above instead
        result["versions"] = [v.to_dict() for v in versions]
    return result


def diff_versions(old, new) -> dict:
    """What changed between two StoreVersions: config keys, table rows, metrics, and code churn per code table."""
    from feature_store.remap import version_churn

    def flat(d, prefix=""):
        out = {}
        for key, value in (d or {}).items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old_cfg, new_cfg = flat(old.config), flat(new.config)
    config_changes = {k: {"old": old_cfg.get(k), "new": new_cfg.get(k)}
                      for k in sorted(set(old_cfg) | set(new_cfg)) if old_cfg.get(k) != new_cfg.get(k)}
    old_m, new_m = flat(old.metrics), flat(new.metrics)
    metrics = {k: {"old": old_m.get(k), "new": new_m.get(k)} for k in sorted(set(old_m) | set(new_m))
               if old_m.get(k) != new_m.get(k)}
    churn = {}
    for rel in sorted(set(old.files()) & set(new.files())):
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("item_codes") and name.endswith(".parquet"):
            try:
                churn[rel] = version_churn(old, new, rel)
            except ValueError as exc:  # e.g. different RQ depth
                churn[rel] = {"error": str(exc)}
    return {"old": old.id, "new": new.id, "new_is_descendant": new.parent == old.id,
            "rows": {"old": old.manifest.get("rows", {}), "new": new.manifest.get("rows", {})},
            "config_changes": config_changes, "metric_changes": metrics, "churn": churn}
