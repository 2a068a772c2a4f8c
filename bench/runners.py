"""The whole cascade under several Beam runners, each in its own process, against the in-process run.

Prints, per runner: job seconds, the child's peak RSS, and whether every published table (RQ / VQ codes, aligned
and unaligned; embeddings of every kind; pairs and trigger counts) is identical to the first runner's. With
--json one JSON line last. The default data is the job's embedded default (the synthetic catalog, minilm-effnet),
so this is issue 13's "the whole cascade on the synthetic default on runners that execute for real".

    .venv/bin/python bench/runners.py --json
    .venv/bin/python bench/runners.py --runners in_process,fnapi_2 --job-args "--n-items 500" --json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNNERS = {
    "in_process": [],  # the job's default: FnApiRunner, one in-process SDK worker
    "fnapi_2": ["--runner", "FnApiRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    "portable_loopback": ["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK"],
}
# runs the job as its child and reports the largest RSS among the job and its SDK worker processes
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)")
TABLES = ("item_codes", "item_codes_unaligned", "item_embeddings", "item_embeddings_unaligned",
          "item_embeddings_text", "item_embeddings_image")


def _digest(store: Path) -> dict:
    """sha256 of each published table's sorted content, plus the metrics that must agree."""
    from feature_store import FeatureStore

    version = FeatureStore(store).read()
    out = {}
    for name in TABLES:
        try:
            if name.startswith("item_codes"):
                t = version.codes(name)
                blob = t.item_ids.tobytes() + t.rq.tobytes() + t.vq.tobytes()
            else:
                ids, emb = version.embeddings(name)
                blob = ids.tobytes() + emb.tobytes()
        except (FileNotFoundError, KeyError):  # a table this configuration does not publish
            continue
        out[name] = hashlib.sha256(blob).hexdigest()[:16]
    m = version.manifest["metrics"]
    out["pairs"] = m.get("pairs")
    out["triggers"] = m.get("triggers")
    return out


def run_one(name: str, job_args: list, root: Path, timeout: int) -> dict:
    store, work = root / name / "store", root / name / "work"
    job = [sys.executable, "-m", "pipelines.jobs.cascade", "--store", str(store), "--work-dir", str(work), *job_args,
           *RUNNERS[name]]
    cmd = [sys.executable, "-c", _MEASURE, *job]  # a shim process whose children are this job only
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"runner": name, "ok": False, "seconds": round(seconds, 1), "error": proc.stderr[-3000:]}
    rss_kb = int(next(ln for ln in proc.stderr.splitlines()[::-1] if ln.startswith("MAXRSS_KB ")).split()[1])
    return {"runner": name, "ok": True, "seconds": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024),
            "tables": _digest(store)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"comma list of {sorted(RUNNERS)}; the first is "
                                                                   "the reference")
    ap.add_argument("--job-args", default="", help="extra job flags (quoted), e.g. \"--n-items 500\"")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per job")
    ap.add_argument("--work-root", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in args.runners.split(",") if n]
    unknown = set(names) - set(RUNNERS)
    if unknown:
        ap.error(f"unknown runner(s) {sorted(unknown)}; choose from {sorted(RUNNERS)}")
    root = Path(args.work_root or tempfile.mkdtemp(prefix="qarm-runners-"))
    job_args = shlex.split(args.job_args)
    results = []
    for name in names:
        r = run_one(name, job_args, root, args.timeout)
        results.append(r)
        ref = results[0]
        if r["ok"] and ref["ok"]:
            r["identical_to_" + names[0]] = {k: r["tables"].get(k) == ref["tables"].get(k) for k in ref["tables"]}
        print(f"{name}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s"
              + (f"; identical to {names[0]}: {r.get('identical_to_' + names[0])}" if r["ok"] else
                 f"\n{r.get('error', '')}"), flush=True)
    out = {"job_args": job_args, "runners": results, "work_root": str(root)}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
