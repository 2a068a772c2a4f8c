"""Shared fixtures. Tests never touch the network; ../shared data is optional and skipped when absent."""
from __future__ import annotations

import os
from pathlib import Path

import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# test-only helpers that live beside the tests (the oracle world), importable from every test module
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = Path(os.environ.get("QARM_SHARED", REPO.parent / "shared"))
MOVIELENS = SHARED / "data" / "movielens"


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    if not (MOVIELENS / "ml-latest-small" / "ratings.csv").exists():
        pytest.skip(f"MovieLens data not found at {MOVIELENS} (../shared beside the checkout); skipping real-data test")
    return MOVIELENS
