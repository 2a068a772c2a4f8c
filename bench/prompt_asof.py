"""The `vq+rq+prompt` row under different user-vector tables, paired on the same examples (issue 22, the leak).

    # 1. a child of VERSION without user_embeddings_asof.parquet: the ranker reads it the former way (one vector
    #    per user over the whole train portion); prints the child's id
    python bench/prompt_asof.py serving-child --store S --version VERSION
    # 2. train vq+rq once and vq+rq+prompt on each named version (same data, config, split and model seeds as
    #    the qarm eval report REPORT), then paired bootstrap intervals between every pair of variants
    python bench/prompt_asof.py paired --store S --report runs/x/ablation.json --dataset synthetic \
        --variant vq+rq=V1 --variant serving=V2 --variant asof-k4=V1 --variant asof-k64=V3 --seeds 3

`vq+rq` is the row without the feature; every other variant is the prompt row on its version. Prints JSON: per
pair "A - B" the AUC / GAUC difference with its 95% interval, per variant the test AUC of each model seed and the
fit's `prompt_vectors` record (which table, how many training examples got a vector).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def serving_child(args) -> str:
    from feature_store import FeatureStore

    store = FeatureStore(args.store)
    parent = store.read(args.version)
    with store.stage(parent=store.current_id()) as st:
        for name in parent.files():
            if name in ("manifest.json", "user_embeddings_asof.parquet"):
                continue
            dest = Path(st.path) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(parent.file(name), dest)
        return st.publish(config=parent.config, metrics=parent.metrics,
                          extra={**parent.extra, "protocol": parent.manifest.get("protocol")}).id


def paired(args) -> dict:
    from feature_store import FeatureStore
    from feature_store.split import SplitConfig
    from pipelines.beam.data_flags import data_spec_from_args
    from pipelines.data import load_dataset
    from ranker.ablation import run_rows
    from ranker.config import RankerConfig
    from ranker.data import prepare_examples, store_items
    from ranker.stats import BootstrapConfig, PairedEvaluation, summarize_runs

    report = json.loads(Path(args.report).read_text())
    cfg = RankerConfig.from_dict(report["config"])
    split = SplitConfig(**report["plan"]["split"])
    ds = load_dataset(data_spec_from_args(args))
    catalog = ds.items["item_id"].to_numpy()
    data = prepare_examples(ds.interactions, catalog, cfg.history_len, split, cfg.negatives)
    store = FeatureStore(args.store)
    runs = {}
    for name, vid in (v.split("=", 1) for v in args.variant):
        row = "vq+rq" if name == "vq+rq" else "vq+rq+prompt"
        got, skipped = run_rows(data, store_items(store.read(vid), catalog), cfg, args.seeds, (row,), progress=False)
        if row not in got:
            raise SystemExit(f"{name}: {skipped}")
        runs[name] = got[row]
    evaluation = PairedEvaluation(data.test.user_id, data.test.label, BootstrapConfig(**report["plan"]["bootstrap"]))
    out = {"pairs": {}}
    names = list(runs)
    for i, base in enumerate(names):
        summary = summarize_runs(runs, baseline=base, evaluation=evaluation)
        for other in names[i + 1:]:
            r = summary[other]
            out["pairs"][f"{other} - {base}"] = {k: r.get(k) for k in ("auc_diff", "auc_diff_ci95", "gauc_diff",
                                                                     "gauc_diff_ci95")}
    out["auc_per_run"] = {k: [x["test"]["auc"] for x in v] for k, v in runs.items()}
    out["prompt_vectors"] = {k: v[0].get("prompt_vectors") for k, v in runs.items()}
    return out


def main(argv=None) -> int:
    from pipelines.beam.data_flags import add_data_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    child = sub.add_parser("serving-child")
    child.add_argument("--store", required=True)
    child.add_argument("--version", required=True)
    pair = sub.add_parser("paired")
    pair.add_argument("--store", required=True)
    pair.add_argument("--report", required=True, help="a qarm eval ablation.json (ranker config, split, bootstrap)")
    pair.add_argument("--variant", action="append", required=True, help="NAME=VERSION (NAME vq+rq: the row without "
                                                                         "the feature)")
    pair.add_argument("--seeds", type=int, default=3)
    add_data_arguments(pair)
    args = parser.parse_args(argv)
    print(serving_child(args) if args.cmd == "serving-child" else json.dumps(paired(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
