"""Fixtures for mllm tests: pipelines.data's synthetic world, small (96 items in 4 latent clusters, rendered
images), its mined behaviour pairs, and a validation slice split off by time."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: tiny models are fastest single-threaded and do not starve other jobs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_world(folder, n_items: int = 96, seed: int = 0):
    """(dataset, train pairs, validation pairs) from the one synthetic source (pipelines.data.synthetic)."""
    from pipelines.data import load_dataset
    from pipelines.data.schema import DataSpec
    from pipelines.encoder.alignment import split_valid_pairs
    from pipelines.mining.pairs import PairConfig, mine_pairs

    ds = load_dataset(DataSpec(dataset="synthetic", data=str(folder), n_items=n_items, n_users=80, n_events=5000,
                               n_clusters=4, image_size=32, seed=seed))
    # Swing-triggered pairs: the gate tests' expectations were set on them (the miner's default is collab now)
    pairs = mine_pairs(ds.interactions, PairConfig(heldout_frac=0.0, min_support=2, trigger_similarity="swing"))
    train, valid = split_valid_pairs(pairs.train, 0.2)
    return ds, train, valid


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("mllm_synthetic"))
