"""Fixtures for mllm tests: a tiny clustered catalog with images, and pairs within clusters."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synth import make_dataset, make_pairs  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: tiny models are fastest single-threaded and do not starve other jobs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    ds = make_dataset(tmp_path_factory.mktemp("mllm_items"))
    train, heldout = make_pairs(ds)
    return ds, train, heldout
