"""Run by torchrun in tests/ranker/test_train.py: DMP training uninterrupted vs. stopped after epoch 0 and resumed."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from ranker.config import RankerConfig
from ranker.data import prepare_examples
from ranker.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the oracle world fixture
from oracle_world import oracle_world  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    world = oracle_world(n_items=200, n_users=60, n_events=2000, seed=1)
    data = prepare_examples(world.interactions, world.item_ids, history_len=4)
    items = world.item_features()

    def cfg(epochs):
        return RankerConfig(features="vq+rq", history_len=4, epochs=epochs, batch_size=64, sharding="table_wise",
                            lr_sparse=0.3, dropout=0.3, patience=0, seed=0)

    full = fit(data, items, cfg(3), out_dir=out / "full", progress=False)
    fit(data, items, cfg(1), out_dir=out / "part", progress=False)
    resumed = fit(data, items, cfg(3), out_dir=out / "part", resume=True, progress=False)
    if dist.get_rank() == 0:
        keep = ("history", "best_epoch", "valid", "test", "world_size", "steps")
        (out / "worker.json").write_text(json.dumps({"full": {k: full[k] for k in keep},
                                                     "resumed": {k: resumed[k] for k in keep}}))


if __name__ == "__main__":
    main(sys.argv[1])
