"""DataSpec validation and the shared command-line flags."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipelines.data import DataSpec
from pipelines.beam.data_flags import add_data_arguments, data_spec_from_args


def test_defaults_are_the_embedded_synthetic_set():
    spec = DataSpec()
    assert spec.dataset == "synthetic" and spec.n_items == 2000 and spec.n_users == 600 and spec.seed == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(dataset="imagenet"), "dataset"),
    (dict(dataset="movielens"), "data"),
    (dict(dataset="generic"), "--items"),
    (dict(validate_images="maybe"), "validate_images"),
    (dict(n_users=0), "n_users"),
    (dict(image_size=2), "image_size"),
    (dict(seed=-1), "seed"),
    (dict(lookalike_share=1.5), "lookalike_share"),
    (dict(dataset="synthetic", mapping="m.yaml"), "only apply to --dataset generic"),
])
def test_bad_specs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataSpec(**kwargs)


def test_spec_is_frozen_and_serialisable():
    spec = DataSpec(dataset="movielens", data="some/dir")
    assert isinstance(spec.data, Path)
    with pytest.raises(Exception):
        spec.seed = 3
    assert json.loads(json.dumps(spec.to_dict()))["data"] == "some/dir"
    generic = DataSpec(dataset="generic", items="i.csv", interactions="e.csv", column_map=["items.item_id=sku"])
    assert DataSpec.from_dict(json.loads(json.dumps(generic.to_dict()))) == generic
    with pytest.raises(ValueError, match="unknown key"):
        DataSpec.from_dict({"dataset": "synthetic", "n_itemz": 3})


def test_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(["--dataset", "generic", "--items", "i.csv", "--interactions", "e.parquet",
                              "--map", "items.item_id=sku", "--map", "ids=string", "--require-image",
                              "--validate-images", "decode", "--seed", "7"])
    spec = data_spec_from_args(args)
    assert spec == DataSpec(dataset="generic", items=Path("i.csv"), interactions=Path("e.parquet"),
                            column_map=("items.item_id=sku", "ids=string"), require_image=True,
                            validate_images="decode", seed=7)
    defaults = data_spec_from_args(parser.parse_args([]))
    assert defaults == DataSpec()


def test_fingerprint_follows_content(tmp_path):
    from pipelines.data import load_dataset
    tiny = dict(dataset="synthetic", n_items=20, n_users=5, n_events=100, n_clusters=2, image_size=8)
    a = load_dataset(DataSpec(data=tmp_path, **tiny))
    b = load_dataset(DataSpec(data=tmp_path, validate_images="exists", **tiny))  # other flags, same data
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    b.interactions.loc[3, "label"] = 1.0 - b.interactions.loc[3, "label"]
    assert a.fingerprint() != b.fingerprint()


def test_stats_by_hand():
    import pandas as pd

    from pipelines.data.schema import Dataset
    from pipelines.data.validate import empty_rejects
    items = pd.DataFrame({"item_id": [1, 2, 3], "title": ["a", "", "c"], "text": [None, None, "x"],
                          "image_uri": ["1.png", None, None]})
    inter = pd.DataFrame({"user_id": [7, 7, 8, 7], "item_id": [1, 2, 1, 1], "ts": [0, 86400, 2 * 86400, 3 * 86400],
                          "label": [1.0, 0.0, 1.0, 0.0]})
    s = Dataset(items, inter, None, empty_rejects(), {}).stats()
    assert (s["users"], s["items"], s["items_with_interactions"], s["interactions"], s["positives"]) == (2, 3, 2, 4, 2)
    assert s["positive_rate"] == 0.5 and s["items_with_image"] == 1 and s["items_with_text"] == 2
    assert s["days"] == 3.0
    assert s["events_per_user"] == {"min": 1, "p50": 2.0, "p90": 2.8, "max": 3}   # counts 3, 1
    assert s["events_per_item"] == {"min": 1, "p50": 2.0, "p90": 2.8, "max": 3}
