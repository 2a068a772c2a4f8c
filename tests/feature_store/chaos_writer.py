"""Fork server for the SIGKILL test: imports once, then forks writers that publish / roll back / retain forever.

Protocol (one line each way): the test writes ``spawn SEED``; this process forks a child that loops over random
store operations and answers with the child's pid. The test SIGKILLs that pid at a random moment. Forking from
here (a process that never does store I/O itself) keeps every trial cheap: no re-import per trial.
"""
from __future__ import annotations

import os
import signal
import sys

import numpy as np

from feature_store import FeatureStore, StoreLockedError, write_codebooks, write_codes, write_embeddings


def write_loop(root: str, seed: int) -> None:
    store = FeatureStore(root)
    rng = np.random.default_rng(seed)
    while True:
        action = rng.random()
        if action < 0.7:
            n = int(rng.integers(50, 600))
            with store.stage() as st:
                ids = rng.permutation(10 * n)[:n].astype(np.int64)
                write_embeddings(st.path / "item_embeddings.parquet", ids, rng.normal(size=(n, 16)))
                write_codes(st.path / "item_codes.parquet", ids, rng.integers(0, 32, (n, 3)),
                            rng.integers(0, n, (n, 4)))
                write_codebooks(st.path / "codebooks.safetensors",
                                {f"rq.level{i}": rng.normal(size=(32, 16)).astype(np.float32) for i in range(3)})
                st.publish(config={"seed": seed, "n": n}, metrics={"rows": n}, extra={"watermark": n})
        elif action < 0.85:
            versions = store.list()
            if versions:
                store.rollback(versions[int(rng.integers(len(versions)))].id)
        else:
            store.retain(int(rng.integers(2, 5)))


def warm_up() -> None:
    """One publish in a throwaway store, so the lazy imports / first-call set-up are paid once, before forking."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(tmp)
        rng = np.random.default_rng(0)
        with store.stage() as st:
            write_embeddings(st.path / "item_embeddings.parquet", np.arange(4), rng.normal(size=(4, 16)))
            write_codes(st.path / "item_codes.parquet", np.arange(4), np.zeros((4, 3), int), np.zeros((4, 4), int))
            write_codebooks(st.path / "codebooks.safetensors", {"rq.level0": np.zeros((2, 16), np.float32)})
            st.publish(config={"n": 4})
        store.read().codes()


def main() -> None:
    root = sys.argv[1]
    warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped automatically
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd != "spawn":
            break
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                write_loop(root, int(arg))
            except StoreLockedError:
                pass
            finally:
                os._exit(0)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
