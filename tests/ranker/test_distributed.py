import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ranker.checkpoint import load_checkpoint
from ranker.data import prepare_examples
from ranker.features import build_schema
from oracle_world import oracle_world
from ranker.train import evaluate

REPO = Path(__file__).resolve().parents[2]


def _two_process_training(tmp_path, sharding: str, auc_tolerance: float) -> dict:
    """2 torchrun ranks (gloo on CPU; nccl, one GPU each, where torch sees CUDA) train a few DMP steps with every
    table sharded ``sharding``; the checkpoint gathered from both ranks reproduces rank 0's distributed test AUC
    in one CPU process. Returns rank 0's worker.json."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("dist_worker.py")), str(tmp_path), sharding]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker = json.loads((tmp_path / "worker.json").read_text())
    assert worker["world_size"] == 2 and worker["steps"] == 6
    world = oracle_world(n_items=200, n_users=60, n_events=2000, seed=1)
    data = prepare_examples(world.interactions, world.item_ids, history_len=4)
    items = world.item_features()
    model, cfg, meta = load_checkpoint(tmp_path / "ranker.pt", items=items, n_users=data.users.n_rows)
    assert cfg.sharding == sharding
    single = evaluate(model, data.test, build_schema(cfg, data.users.n_rows, items), items)
    assert single["auc"] == pytest.approx(worker["test_auc"], abs=auc_tolerance)
    return worker


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise"])
def test_two_process_dmp_training(tmp_path, sharding):
    _two_process_training(tmp_path, sharding, auc_tolerance=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: nccl runs one rank per GPU")
def test_two_process_dmp_training_on_cuda_row_wise(tmp_path):
    """nccl + row-wise sharding: every table's rows split over the two GPUs (bench/gpu_check.sh runs this)."""
    worker = _two_process_training(tmp_path, "row_wise", auc_tolerance=1e-4)  # GPU vs CPU float sums
    assert worker["device"].startswith("cuda")
