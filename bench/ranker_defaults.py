"""Choose the ranker's defaults on the VALIDATION window: a grid of RankerConfig settings x ablation rows x model
seeds on one store version, reporting validation AUC / GAUC only (the test window is scored by `fit` but never
printed or written here: choices made with this script cannot be tuned on test).

    python bench/ranker_defaults.py --dataset synthetic --preset sparse --store /tmp/s --rows id,vq+rq \
        --grid "code_init=random,content;interaction=false,true" --seeds 2 --json

Each grid point runs every row for every seed (seed = --seed + s; --seed is also the synthetic data's seed); the output has, per point and row, the mean and
std over seeds of the best epoch's validation AUC / GAUC, and per point the rows' difference to --baseline paired
by seed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from feature_store import FeatureStore  # noqa: E402
from feature_store.io import dumps_strict  # noqa: E402
from feature_store.split import add_split_arguments, check_protocol, split_from_args  # noqa: E402
from pipelines.beam.data_flags import add_data_arguments, data_spec_from_args  # noqa: E402
from pipelines.data import load_dataset  # noqa: E402
from ranker.ablation import run_rows  # noqa: E402
from ranker.args import add_ranker_arguments, config_from_args  # noqa: E402
from ranker.config import RankerConfig  # noqa: E402
from ranker.data import prepare_examples, store_items  # noqa: E402
from ranker.stats import mean_std  # noqa: E402

log = logging.getLogger("ranker_defaults")


def parse_grid(text: str) -> list[dict]:
    """"a=1,2;b=x" -> [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}] (values parsed as JSON where they parse)."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        if not values:
            raise ValueError(f"--grid: expected key=v1,v2 in {part!r}")
        axes.append([(key.strip(), _value(v.strip())) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)] or [{}]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def validation_summary(runs: dict, baseline: str | None) -> dict:
    """{row: {valid_auc_mean, valid_auc_std, valid_gauc_mean, ..., per_seed, [vs baseline]}} from fit results."""
    out = {}
    for row, results in runs.items():
        entry = {"best_epochs": [r["best_epoch"] for r in results]}
        for metric in ("auc", "gauc"):
            values = [r["valid"][metric] for r in results]
            entry[f"valid_{metric}_per_seed"] = values
            entry[f"valid_{metric}_mean"], entry[f"valid_{metric}_std"] = mean_std(values)
            if baseline in runs and row != baseline:
                base = [r["valid"][metric] for r in runs[baseline]]
                diff = [None if a is None or b is None else a - b for a, b in zip(values, base)]
                entry[f"valid_{metric}_vs_{baseline}_mean"], entry[f"valid_{metric}_vs_{baseline}_std"] = mean_std(diff)
        out[row] = entry
    return out


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    add_ranker_arguments(parser, with_features=False)
    parser.add_argument("--seeds", type=int, default=2, help="model seeds per row and grid point")
    parser.add_argument("--rows", default="id,frozen,frozen+sim,vq+rq,vq+rq+frozen", help="ablation rows")
    parser.add_argument("--grid", default="", help='RankerConfig overrides, e.g. "code_init=random,content;interaction=false,true"')
    parser.add_argument("--baseline", default="id", help="row the others are compared with (paired by seed)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ranker.ablation").setLevel(logging.WARNING)  # its per-run line has the test metrics
    t0 = time.perf_counter()
    dataset = load_dataset(data_spec_from_args(args))
    split = split_from_args(args)
    base_cfg = config_from_args(args, features="id")
    version = FeatureStore(args.store).read(args.version)
    check_protocol(version.manifest.get("protocol"), dataset.interactions, split, version.id,
                   args.allow_protocol_mismatch)
    catalog = dataset.items["item_id"].to_numpy()
    data = prepare_examples(dataset.interactions, catalog, base_cfg.history_len, split, base_cfg.negatives)
    items = store_items(version, catalog)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    points = []
    for overrides in parse_grid(args.grid):
        cfg = RankerConfig.from_dict({**base_cfg.to_dict(), **overrides})
        runs, skipped = run_rows(data, items, cfg, args.seeds, rows, progress=False, tag=f"{overrides} ")
        summary = validation_summary(runs, args.baseline)
        points.append({"overrides": overrides, "rows": summary, "skipped": skipped})
        for row, s in summary.items():
            log.info("VALID %s %-14s auc %.4f ± %.4f  gauc %s", overrides, row, s["valid_auc_mean"],
                     s["valid_auc_std"], "n/a" if s["valid_gauc_mean"] is None else f"{s['valid_gauc_mean']:.4f}")
    result = {"command": "ranker_defaults", "dataset": dataset.name, "store": str(args.store), "version": version.id,
              "split": split.__dict__, "seeds": args.seeds, "base_config": base_cfg.to_dict(), "data": data.info,
              "window": "valid", "points": points, "seconds": time.perf_counter() - t0}
    text = dumps_strict(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(_table(points, rows))
    if args.json:
        print(text)
    return 0


def _table(points: list, rows: tuple) -> str:
    """Validation AUC (GAUC) per grid point (lines) and row (columns), mean over seeds."""
    lines = ["| settings | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for p in points:
        cells = []
        for row in rows:
            s = p["rows"].get(row)
            if s is None:
                cells.append("skipped")
                continue
            g = "n/a" if s["valid_gauc_mean"] is None else f"{s['valid_gauc_mean']:.4f}"
            cells.append(f"{s['valid_auc_mean']:.4f} ± {s['valid_auc_std']:.4f} ({g})")
        lines.append(f"| {json.dumps(p['overrides'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    np.seterr(all="ignore")
    sys.exit(main())
