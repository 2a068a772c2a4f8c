"""Run by torchrun in tests/ranker/test_distributed.py: a few DMP training steps on the toy world."""
import json
import sys
from pathlib import Path

from ranker.config import RankerConfig
from ranker.data import prepare_examples
from ranker.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the oracle world fixture
from oracle_world import oracle_world  # noqa: E402


def main(out_dir: str, sharding: str) -> None:
    world = oracle_world(n_items=200, n_users=60, n_events=2000, seed=1)
    data = prepare_examples(world.interactions, world.item_ids, history_len=4)
    cfg = RankerConfig(features="vq+rq", history_len=4, epochs=2, max_steps=6, batch_size=64, sharding=sharding)
    result = fit(data, world.item_features(), cfg, out_dir=Path(out_dir), progress=False)
    if result["world_size"] > 1 and __import__("torch.distributed").distributed.get_rank() == 0:
        (Path(out_dir) / "worker.json").write_text(json.dumps({"world_size": result["world_size"],
                                                               "test_auc": result["test"]["auc"],
                                                               "steps": result["steps"],
                                                               "device": result["device"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
