"""The alignment trainer over shards: 2 gloo processes train like 1 process with the same global batch."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.encoder import EncoderConfig
from pipelines.encoder.alignment import AlignConfig
from pipelines.encoder.checkpoint import resolve_checkpoint
from pipelines.encoder.distributed import Communicator
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.onepass import build_mllm_cache
from pipelines.beam.align_trainer import launch, main, read_pairs
from pipelines.encoder.side import SideConfig

TINY = EncoderConfig.named("tiny")


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory):
    """What the job writes: the side cache, pair part files and the AlignConfig JSON."""
    ds, train, valid = tiny_data
    root = tmp_path_factory.mktemp("shards")
    build_mllm_cache(TINY, ItemCatalog.from_dataset(ds, TINY), SideConfig(width=32, dropout=0.0),
                     cache_dir=root / "cache", shard_size=40, progress=False)
    (root / "train").mkdir()
    half = len(train) // 2  # two part files, written in the "wrong" order: the reader sorts
    train.iloc[half:].to_parquet(root / "train" / "part-0.parquet")
    train.iloc[:half].to_parquet(root / "train" / "part-1.parquet")
    valid.to_parquet(root / "valid.parquet")
    # the gate's judge: next-item style queries (a later pair's left item -> its right item)
    valid.rename(columns={"left": "query", "right": "target"})[["query", "target"]].to_parquet(
        root / "queries.parquet")
    # dropout 0: with dropout each rank draws its own masks, so the curves could only agree in distribution
    cfg = AlignConfig(mode="side", epochs=2, batch_size=30, lr=3e-3, progress=False, seed=3, num_threads=1,
                      side=SideConfig(width=32, dropout=0.0), patience=None)
    (root / "align.json").write_text(json.dumps(cfg.to_dict()))
    return root


def _argv(root, out):
    return ["--config", str(root / "align.json"), "--cache", str(root / "cache"), "--train-pairs",
            str(root / "train"), "--valid-pairs", str(root / "valid.parquet"), "--valid-queries",
            str(root / "queries.parquet"), "--out", str(out)]


def _weights(out):
    return load_file(str(resolve_checkpoint(out) / "model.safetensors"))


def _assert_same_training(one: dict, two: dict, one_out, two_out, *, rtol: float, atol: float) -> None:
    """Two data-parallel ranks trained like one process with the same global batch: loss curves, weights,
    validation recall and the never-worse gate's choice agree."""
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == one["steps"] > 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=rtol, atol=atol)
    # the loss fell, so the equal curves are of a model that learned (not two constant curves)
    assert np.mean(one["losses"][-3:]) < np.mean(one["losses"][:3]) - 0.05
    w1, w2 = _weights(one_out), _weights(two_out)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=10 * rtol, atol=atol)
    assert [v["recall@10"] for v in two["valid"]] == pytest.approx([v["recall@10"] for v in one["valid"]], abs=1e-9)
    # the never-worse gate judged the same step 0 and epochs on the validation queries and chose the same weights
    assert one["alignment"]["judge"] == two["alignment"]["judge"] == "valid_next_item"
    assert one["alignment"]["kept"] == two["alignment"]["kept"]
    assert one["alignment"]["best_epoch"] == two["alignment"]["best_epoch"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(shards, tmp_path):
    one = launch(1, _argv(shards, tmp_path / "one"), threads_per_proc=1, timeout=600)
    two = launch(2, _argv(shards, tmp_path / "two"), threads_per_proc=1, timeout=600)
    _assert_same_training(one, two, tmp_path / "one", tmp_path / "two", rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: nccl runs one rank per GPU")
def test_two_nccl_processes_match_one_gpu_process(shards, tmp_path):
    """The nccl branch of the data-parallel trainer: 2 ranks on 2 GPUs against 1 rank on one GPU
    (bench/gpu_check.sh runs this)."""
    config = json.loads((shards / "align.json").read_text())
    (tmp_path / "align_cuda.json").write_text(json.dumps({**config, "device": "cuda"}))
    runs = {}
    for nproc in (1, 2):
        argv = _argv(shards, tmp_path / f"nproc{nproc}")
        argv[argv.index("--config") + 1] = str(tmp_path / "align_cuda.json")
        runs[nproc] = launch(nproc, argv, threads_per_proc=1, timeout=600)
        assert runs[nproc]["config"]["device"].startswith("cuda")
    # GPU reductions are ordered differently from one GPU to two: looser than the CPU test
    _assert_same_training(runs[1], runs[2], tmp_path / "nproc1", tmp_path / "nproc2", rtol=1e-3, atol=1e-4)


def test_in_process_trainer_reads_part_files_and_writes_its_result(shards, tmp_path):
    summary = main(_argv(shards, tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written["losses"] == summary["losses"] and written["world_size"] == 1
    assert written["config"]["batch_size"] == 30 and resolve_checkpoint(tmp_path / "run").is_dir()
    pairs = read_pairs(str(shards / "train"))
    assert pairs[["left", "right"]].equals(pairs.sort_values(["left", "right", "source", "ts", "weight"])[
        ["left", "right"]].reset_index(drop=True))


def test_a_failing_trainer_names_its_exit_code_and_output(shards, tmp_path):
    with pytest.raises(RuntimeError, match="(?s)exited with code 1.*pass --cache DIR"):
        launch(1, ["--config", str(shards / "align.json"), "--train-pairs", str(shards / "train"),
                   "--out", str(tmp_path / "bad")], timeout=300)


@pytest.mark.parametrize("n,world", [(7, 2), (8, 4), (3, 4), (30, 2)])
def test_local_slices_cover_the_batch_once(n, world):
    slices = [Communicator(rank=r, world_size=world).local_slice(n) for r in range(world)]
    rows = [i for s in slices for i in range(n)[s]]
    assert rows == list(range(n))
