import numpy as np
import pytest
import torch

from ranker.checkpoint import load_checkpoint
from ranker.config import RankerConfig
from ranker.data import prepare_examples
from ranker.features import build_schema
from oracle_world import oracle_world
from ranker.train import evaluate, fit


@pytest.fixture(scope="module")
def world():
    w = oracle_world(n_items=500, n_users=60, n_events=12000, seed=0)
    return w, prepare_examples(w.interactions, w.item_ids, history_len=8)


def _cfg(**kw):
    base = dict(history_len=8, epochs=3, batch_size=256, patience=0, seed=0)
    base.update(kw)
    return RankerConfig(**base)


def test_codes_beat_ids_when_codes_carry_the_signal(world):
    w, data = world
    items = w.item_features()
    ids = fit(data, items, _cfg(features="id", epochs=6), progress=False)
    codes = fit(data, items, _cfg(features="vq+rq", epochs=6), progress=False)
    assert codes["test"]["auc"] > ids["test"]["auc"] + 0.1
    assert codes["test"]["auc"] > 0.75


def test_checkpoint_loads_weights_only_and_reproduces_test_metrics(world, tmp_path):
    w, data = world
    items = w.item_features()
    cfg = _cfg(features="rq", epochs=2)
    result = fit(data, items, cfg, out_dir=tmp_path, progress=False)
    raw = torch.load(tmp_path / "ranker.pt", weights_only=True)
    assert "model" in raw and "dense_optimizer" in raw
    model, cfg2, meta = load_checkpoint(tmp_path / "ranker.pt", items=items, n_users=data.users.n_rows)
    assert cfg2 == cfg and meta["restored_best"]
    schema = build_schema(cfg2, data.users.n_rows, items)
    again = evaluate(model, data.test, schema, items)
    assert again["auc"] == pytest.approx(result["test"]["auc"], abs=1e-6)
    assert (tmp_path / "result.json").exists()


def test_resume_continues_from_the_checkpoint(world, tmp_path):
    w, data = world
    items = w.item_features()
    first = fit(data, items, _cfg(features="id", epochs=1), out_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in first["history"]] == [0]
    with pytest.raises(ValueError, match="different config.*lr_dense"):
        fit(data, items, _cfg(features="id", epochs=3, lr_dense=0.01), out_dir=tmp_path, resume=True, progress=False)
    cont = fit(data, items, _cfg(features="id", epochs=3), out_dir=tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in cont["history"]] == [0, 1, 2]
    assert cont["history"][0] == first["history"][0]
    assert cont["steps"] == 2 * first["steps"]  # only the two new epochs ran
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(data, items, _cfg(features="id"), out_dir=tmp_path / "empty", resume=True, progress=False)


def test_early_stopping_restores_the_best_epoch(world):
    w, data = world
    items = w.item_features()
    result = fit(data, items, _cfg(features="id", epochs=6, patience=1, lr_dense=0.05, lr_sparse=0.5), progress=False)
    best = max(h["valid_auc"] for h in result["history"])
    assert result["valid"]["auc"] == pytest.approx(best, abs=1e-6)
    assert result["best_epoch"] == int(np.argmax([h["valid_auc"] for h in result["history"]]))


def test_items_without_codes_use_the_unknown_row_and_are_counted(world):
    w, data = world
    items = w.item_features(coded_fraction=0.8, seed=1)
    result = fit(data, items, _cfg(features="vq+rq", epochs=1, max_steps=3), progress=False)
    cov = result["coverage"]["test_targets"]
    expected = int((~items.has_codes[data.test.item]).sum())
    assert cov["without_codes"] == expected and expected > 0
    assert np.isfinite(result["test"]["auc"])


def test_remap_rq_tables_carries_learned_rows(world, tmp_path):
    from ranker.checkpoint import remap_rq_tables
    from ranker.features import ItemFeatures
    from ranker.model import embedding_tables

    w, data = world
    items = w.item_features()
    fit(data, items, _cfg(features="rq", epochs=1), out_dir=tmp_path, progress=False)
    model, cfg, _ = load_checkpoint(tmp_path / "ranker.pt", items=items, n_users=data.users.n_rows)
    # new version: level-0 codes relabelled by a permutation (same clusters, new ids), level 1 unchanged
    k0 = items.rq_sizes[0]
    perm = np.random.default_rng(0).permutation(k0)  # old code c -> new code perm[c]
    new_rq = w.rq.copy()
    new_rq[:, 0] = perm[w.rq[:, 0]]
    new_items = ItemFeatures.build(w.item_ids, code_item_ids=w.item_ids, rq=new_rq, vq=w.vq, rq_sizes=items.rq_sizes)
    old_for_new = np.argsort(perm)  # new code j came from old code old_for_new[j]
    new_model = remap_rq_tables(model, cfg, new_items, data.users.n_rows,
                                [old_for_new, np.arange(items.rq_sizes[1])])
    old_t, new_t = embedding_tables(model)["rq_l0"], embedding_tables(new_model)["rq_l0"]
    assert torch.equal(new_t[perm[3]], old_t[3]) and torch.equal(new_t[-1], old_t[-1])
    schema = build_schema(cfg, data.users.n_rows, items)
    before = evaluate(model, data.valid, schema, items)["auc"]
    after = evaluate(new_model, data.valid, build_schema(cfg, data.users.n_rows, new_items), new_items)["auc"]
    assert after == pytest.approx(before, abs=1e-6)  # a pure relabelling changes nothing
    with pytest.raises(ValueError, match="mappings"):
        remap_rq_tables(model, cfg, new_items, data.users.n_rows, [old_for_new])


class _Killed(RuntimeError):
    pass


def _kill_after_epochs(monkeypatch, k: int):
    """Make fit() die like a killed job: the validation pass of epoch k (0-based) raises, so the checkpoint on
    disk is the one written after epoch k - 1 and nothing of epoch k survives."""
    import ranker.train as train

    calls = {"n": 0}
    original = train.evaluate

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k + 1:
            raise _Killed(f"killed during epoch {k}")
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)


def _weights(path):
    raw = torch.load(path, weights_only=True)
    return raw["model"], raw["last"]


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_resume_after_epoch_k_reproduces_the_uninterrupted_run(world, tmp_path, monkeypatch, how):
    """Issue 10 bug 4: the resumed run restored the latest weights as 'best' and lost the embedding Adagrad state
    (and the dropout RNG), so it drifted from the uninterrupted run."""
    w, data = world
    items = w.item_features()
    cfg = _cfg(features="vq+rq", epochs=4, dropout=0.3, lr_sparse=0.3, lr_dense=0.02)
    full = fit(data, items, cfg, out_dir=tmp_path / "full", progress=False)

    part = tmp_path / "part"
    if how == "killed":
        with monkeypatch.context() as m:
            _kill_after_epochs(m, 2)
            with pytest.raises(_Killed):
                fit(data, items, cfg, out_dir=part, progress=False)
    else:  # a shorter run that ends normally after epoch 1 (restores its best epoch), then is extended
        fit(data, items, _cfg(features="vq+rq", epochs=2, dropout=0.3, lr_sparse=0.3, lr_dense=0.02),
            out_dir=part, progress=False)
    resumed = fit(data, items, cfg, out_dir=part, resume=True, progress=False)

    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert resumed["steps"] == full["steps"] // 2      # only epochs 2 and 3 ran after the resume
    for a, b in zip(resumed["history"], full["history"]):
        assert a["epoch"] == b["epoch"] and a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-6)
    assert resumed["best_epoch"] == full["best_epoch"]
    for split in ("valid", "test"):
        for key in ("auc", "gauc", "logloss"):
            assert resumed[split][key] == pytest.approx(full[split][key], abs=1e-6), (split, key)
    (best_a, last_a), (best_b, last_b) = _weights(part / "ranker.pt"), _weights(tmp_path / "full" / "ranker.pt")
    assert set(best_a) == set(best_b)
    for name in best_a:
        torch.testing.assert_close(best_a[name], best_b[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(last_a[name], last_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_keeps_the_best_epoch_apart_from_the_latest(world, tmp_path):
    w, data = world
    items = w.item_features()
    # a sparse learning rate this high overfits after the first epochs: the best epoch is not the last
    result = fit(data, items, _cfg(features="vq+rq", epochs=5, lr_dense=0.05, lr_sparse=2.0), out_dir=tmp_path,
                 progress=False)
    aucs = [h["valid_auc"] for h in result["history"]]
    assert result["best_epoch"] == int(np.argmax(aucs)) and result["best_epoch"] < 4, aucs
    raw = torch.load(tmp_path / "ranker.pt", weights_only=True)
    assert set(raw) >= {"model", "last", "dense_optimizer", "sparse_optimizer", "rng"}
    differs = [n for n in raw["model"] if not torch.equal(raw["model"][n], raw["last"][n])]
    assert differs  # best-epoch weights are not the latest ones
    state = raw["sparse_optimizer"]["params"]
    assert state and all(float(s["state"][0]["sum"].abs().sum()) > 0 for s in state.values())  # Adagrad sums kept
    model, cfg, meta = load_checkpoint(tmp_path / "ranker.pt", items=items, n_users=data.users.n_rows)
    again = evaluate(model, data.valid, build_schema(cfg, data.users.n_rows, items), items)
    assert again["auc"] == pytest.approx(max(aucs), abs=1e-6)


@pytest.mark.slow
def test_two_process_resume_matches_the_uninterrupted_run(tmp_path):
    """Under torchrun + DMP the embedding state lives in TorchRec's fused optimizer, sharded across ranks: it is
    gathered into the checkpoint and scattered back on resume, so a resumed run still matches."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("dist_resume_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "worker.json").read_text())
    full, resumed = out["full"], out["resumed"]
    assert full["world_size"] == 2 and resumed["steps"] * 3 == full["steps"] * 2
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2] and resumed["best_epoch"] == full["best_epoch"]
    for a, b in zip(resumed["history"], full["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-6)
    for split in ("valid", "test"):
        assert resumed[split]["auc"] == pytest.approx(full[split]["auc"], abs=1e-6)
        assert resumed[split]["logloss"] == pytest.approx(full[split]["logloss"], abs=1e-6)
    a = torch.load(tmp_path / "part" / "ranker.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "ranker.pt", weights_only=True)
    for name in b["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert a["sparse_optimizer"]["kind"] == "fused" and a["rng"]["torch"].shape[0] == 2
