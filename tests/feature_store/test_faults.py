"""Issue 19 faults at the store: concurrent writers, a garbage CURRENT, a watermark from the future, weight files
that are not what they claim. Each test failed on main at 9ec9377."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from feature_store import FeatureStore, StoreConflictError
from pipelines.cli import main

N_WRITERS = 6


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _history_agrees_with_manifests(store: FeatureStore) -> None:
    """Every publish in the history names as `previous` the parent its manifest records."""
    for entry in store.history():
        if entry["action"] == "publish":
            assert store.read(entry["version"]).parent == entry["previous"], entry


def test_concurrent_writers_in_processes_exactly_one_publishes(store, publish, capsys, race_writers):
    """Case 1: N writers that all start from the same CURRENT: the first to publish wins, every other is refused
    (StoreConflictError naming the winner), `store verify` is clean and manifests agree with the history."""
    v1 = publish(0)
    results = race_writers(str(store.root), N_WRITERS)
    winners = [r for r in results if "published" in r]
    losers = [r for r in results if "conflict" in r]
    assert len(winners) == 1 and len(losers) == N_WRITERS - 1, results
    won = winners[0]["published"]
    assert winners[0]["parent"] == v1.id and store.current_id() == won
    for r in losers:
        assert r["current"] == won and r["expected"] == v1.id
        assert f"another writer changed CURRENT to {won} (publish by pid" in r["conflict"]
        assert f"after this job started from {v1.id}" in r["conflict"]
    assert [v.id for v in store.list()] == [v1.id, won]  # the refused writers left nothing visible
    assert main(["store", "verify", "--store", str(store.root), "--json"]) == 0
    assert _last_json(capsys)["corrupt"] == {}
    _history_agrees_with_manifests(store)


def test_a_publish_over_a_moved_current_is_refused_and_parent_always_equals_previous(store, publish, fill):
    """Case 1 at the library: publishing over a CURRENT the writer did not start from is refused; a writer that
    asked for "CURRENT at publish" records the version it replaced, so the history never disagrees."""
    v1 = publish(0)
    with store.stage(parent=v1.id) as pinned, store.stage() as floating:
        fill(pinned.path, seed=1)
        fill(floating.path, seed=2)
        v2 = publish(3)  # another writer, meanwhile
        with pytest.raises(StoreConflictError, match=f"changed CURRENT to {v2.id}"):
            pinned.publish(config={})
        v3 = floating.publish(config={})
    assert v3.parent == v2.id and store.current_id() == v3.id
    assert [h["previous"] for h in store.history()] == [None, v1.id, v2.id]
    _history_agrees_with_manifests(store)


@pytest.mark.parametrize("garbage", [b"\x00\xff\xfe\x80binary", b"", b"not-a-version\n", b"v000001-zzzz\n"])
def test_a_current_that_names_no_version_is_reported_listed_and_repaired(store, publish, garbage, capsys):
    """Case 4: binary garbage in CURRENT failed every command with a bare UnicodeDecodeError naming no file, and
    `store list` exited 1. Now: "FILE: not a version id" (exit 1), list still lists, rollback repairs."""
    v1, v2 = publish(0), publish(1)
    current = store.root / "CURRENT"
    current.write_bytes(garbage)
    root = str(store.root)
    for argv in (["store", "show", "--store", root], ["store", "verify", "--store", root],
                 ["train-ranker", "--store", root, "--n-items", "20", "--n-users", "5", "--n-events", "50",
                  "--n-clusters", "2", "--data", str(store.root.parent / "img")]):
        assert main([*argv, "--json"]) == 1, argv
        out = _last_json(capsys)
        assert f"{current}: not a version id" in (out["error"] + str(out.get("current_error"))), out
        assert out["exit"] == 1 and out.get("error_type") != "UnicodeDecodeError"
    assert main(["store", "list", "--store", root, "--json"]) == 0
    listed = _last_json(capsys)
    assert [v["id"] for v in listed["versions"]] == [v1.id, v2.id] and listed["current"] is None
    assert f"{current}: not a version id" in listed["current_error"]
    assert main(["store", "rollback", "--store", root, "--version", v1.id, "--json"]) == 0
    assert store.current_id() == v1.id
    assert main(["store", "verify", "--store", root, "--json"]) == 0


def test_verify_flags_a_watermark_from_the_future(store, fill, capsys):
    """Case 2: a version whose watermark passed the clock makes every later retrain skip new data."""
    with store.stage() as st:
        fill(st.path)
        future = st.publish(extra={"watermark": 32503680000})  # year 3000, as published by older releases
    root = str(store.root)
    assert main(["store", "verify", "--store", root, "--now", "2024-06-01T00:00:00Z", "--json"]) == 1
    out = _last_json(capsys)
    assert list(out["future_watermark"]) == [future.id] and out["corrupt"] == {}
    assert "watermark 32503680000 (3000-01-01T00:00:00Z) is later than the clock 1717200000" in out["error"]
    assert "--since" in out["error"]
    assert main(["store", "verify", "--store", root, "--now", "32503680000", "--json"]) == 0


class _Evil:
    def __reduce__(self):  # what a malicious "checkpoint" would run if it were ever unpickled
        return (os.system, ("touch PWNED",))


def _bad_files(folder: Path, name: str) -> dict:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    good = folder / f"good-{name}"
    if name.endswith(".safetensors"):
        save_file({"w": torch.ones(4)}, str(good))
    else:
        torch.save({"w": torch.ones(4)}, good)
    data = good.read_bytes()
    files = {"raw pickle": pickle.dumps({"model": _Evil()}), "truncated": data[: len(data) // 2], "empty": b"",
             "corrupt header": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[16:]}
    if not name.endswith(".safetensors"):
        buf = folder / "zip-pickle.pt"
        torch.save({"model": {"w": torch.ones(1)}, "x": _Evil()}, buf)  # a real torch zip holding an object
        files["torch.save of an object"] = buf.read_bytes()
    return files


@pytest.mark.parametrize("name", ["ranker.pt", "model.safetensors", "vision.pth", "vision.safetensors"])
def test_weight_files_that_are_not_what_they_claim_are_one_clear_error(tmp_path, name, monkeypatch):
    """Case 5 at the loaders: a pickle, a truncated copy, a corrupt header under a checkpoint's name is
    "FILE: not a ... checkpoint (reason)", a ValueError (exit 1 with the JSON line), and is never unpickled."""
    from feature_store.weights import WeightsFileError
    from pipelines.encoder.towers import load_state_file
    from ranker.checkpoint import read_checkpoint

    monkeypatch.chdir(tmp_path)
    for case, data in _bad_files(tmp_path / "src", name).items():
        path = tmp_path / case.replace(" ", "-") / name
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(WeightsFileError) as exc:
            if name == "ranker.pt":
                read_checkpoint(path)
            elif name == "model.safetensors":
                from pipelines.encoder.checkpoint import read_checkpoint as read_encoder

                (path.parent / "config.json").write_text(json.dumps({"format": "qarm-encoder/1", "mode": "full"}))
                read_encoder(path.parent)
            else:
                load_state_file(path)
        msg = str(exc.value)
        what = {"ranker.pt": "ranker", "model.safetensors": "encoder"}.get(name, "vision_weights")
        assert msg.startswith(f"{path}: not a {what} checkpoint (") and "weights_only=False" not in msg, (case, msg)
        assert isinstance(exc.value, ValueError)
    assert not (tmp_path / "PWNED").exists()


def test_train_ranker_resume_from_a_pickle_exits_1_with_the_json_line(tmp_path, capsys):
    """Case 5 at the command line: `qarm train-ranker --resume` over a pickled ranker.pt."""
    from oracle_world import oracle_world, publish_world_version, write_world_files

    world = oracle_world(n_items=60, n_users=20, n_events=800, n_clusters=4, seed=0)
    items, events = write_world_files(world, tmp_path / "data")
    publish_world_version(world, tmp_path / "store")
    out = tmp_path / "run"
    out.mkdir()
    (out / "ranker.pt").write_bytes(pickle.dumps({"model": _Evil()}))
    code = main(["train-ranker", "--dataset", "generic", "--items", str(items), "--interactions", str(events),
                 "--store", str(tmp_path / "store"), "--out", str(out), "--resume", "--epochs", "1", "--json"])
    result = _last_json(capsys)
    assert code == 1 and result["exit"] == 1 and result["error_type"] == "WeightsFileError", result
    assert result["error"].startswith(f"{out / 'ranker.pt'}: not a ranker checkpoint (")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.parametrize("bad", ["model.safetensors", "vision_weights"])
def test_pipeline_refuses_a_checkpoint_with_a_wrong_weight_file_before_the_job(tmp_path, bad, capsys):
    """Case 5 in the Beam job: the checkpoint's files are loaded on the workers, so the driver checks them first
    (a worker's traceback would be all the user saw)."""
    import torch

    from pipelines.encoder import EncoderConfig
    from pipelines.encoder.checkpoint import save_checkpoint

    weights = tmp_path / "vision.pth"
    torch.save({"w": torch.ones(2)}, weights)
    encoder = {**EncoderConfig.named("tiny").to_dict(), "vision_weights": str(weights)}
    step = save_checkpoint(tmp_path / "ckpt", 1, {"mode": "side", "encoder": encoder}, {"w": torch.ones(2)})
    target = step / "model.safetensors" if bad == "model.safetensors" else weights
    target.write_bytes(pickle.dumps({"model": _Evil()}))
    code = main(["pipeline", "--n-items", "20", "--n-users", "5", "--n-events", "100", "--n-clusters", "2",
                 "--image-size", "16", "--data", str(tmp_path / "img"), "--store", str(tmp_path / "store"),
                 "--encoder", "tiny", "--align-mode", "side", "--align-checkpoint", str(tmp_path / "ckpt"),
                 "--json"])
    result = _last_json(capsys)
    assert code == 1 and result["error_type"] == "WeightsFileError", result
    assert result["error"].startswith(f"{target}: not a ")
    assert not (tmp_path / "store" / "CURRENT").exists()
