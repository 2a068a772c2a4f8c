import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_list_show_rollback_retain_verify(store, publish, capsys):
    v1, v2, v3 = publish(0), publish(1), publish(2)
    root = str(store.root)

    assert main(["store", "list", "--store", root, "--json"]) == 0
    listed = _last_json(capsys)
    assert listed["ok"] and listed["current"] == v3.id and listed["count"] == 3
    assert [v["current"] for v in listed["versions"]] == [False, False, True]

    assert main(["store", "list", "--store", root]) == 0
    human = capsys.readouterr().out
    assert f"* {v3.id}" in human and f"  {v1.id}" in human

    assert main(["store", "show", "--store", root, "--json"]) == 0
    shown = _last_json(capsys)
    assert shown["version"] == v3.id and shown["manifest"]["parent"] == v2.id and shown["verified"]

    assert main(["store", "rollback", "--store", root, "--version", v1.id, "--json"]) == 0
    assert _last_json(capsys)["current"] == v1.id
    assert store.current_id() == v1.id

    assert main(["store", "retain", "--store", root, "--keep", "1", "--json"]) == 0
    retained = _last_json(capsys)
    assert retained["removed"] == [v2.id] and retained["kept"] == [v1.id, v3.id]

    assert main(["store", "verify", "--store", root, "--json"]) == 0
    assert _last_json(capsys)["checked"] == 2

    assert main(["store", "history", "--store", root, "--json"]) == 0
    assert [h["action"] for h in _last_json(capsys)["history"]] == ["publish"] * 3 + ["rollback"]


def test_errors_exit_codes(store, publish, capsys):
    v1 = publish(0)
    root = str(store.root)
    os.chmod(v1.path / "item_codes.parquet", 0o644)  # published files are read-only
    (v1.path / "item_codes.parquet").write_bytes(b"garbage")
    assert main(["store", "show", "--store", root, "--json"]) == 1
    err = _last_json(capsys)
    assert not err["ok"] and "item_codes.parquet" in err["error"] and err["error_type"] == "CorruptVersionError"
    assert main(["store", "verify", "--store", root, "--json"]) == 1
    assert v1.id in _last_json(capsys)["corrupt"]
    assert main(["store", "list", "--store", root, "--verify"]) == 0
    assert f"* {v1.id}" in capsys.readouterr().out.split("CORRUPT")[0]
    assert main(["store", "rollback", "--store", root, "--json"]) == 2
    assert main(["store", "rollback", "--store", root, "--version", "v000042-deadbeef", "--json"]) == 1
    assert "not found" in _last_json(capsys)["error"]
    assert main(["store", "show", "--store", str(store.root.parent / "nope"), "--json"]) == 1
    assert "feature store not found" in _last_json(capsys)["error"]


def test_lock_held_exits_4(store, publish, capsys):
    v1 = publish(0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom feature_store import FeatureStore\n"
         "with FeatureStore(sys.argv[1]).lock(purpose='retrain'):\n    print('locked', flush=True)\n"
         "    time.sleep(60)\n", str(store.root)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["store", "rollback", "--store", str(store.root), "--version", v1.id, "--json"]) == 4
        result = _last_json(capsys)
        assert result["holder"]["pid"] == holder.pid and "locked" in result["error"]
    finally:
        holder.kill()
        holder.wait()


def test_console_script(store, publish):
    v1 = publish(0)
    qarm = Path(sys.executable).with_name("qarm")
    if not qarm.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(qarm), "store", "list", "--store", str(store.root), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["command"] == "store" and result["current"] == v1.id


def test_diff_reports_config_and_churn(store, fill, capsys):
    from feature_store.tables import write_codes

    with store.stage() as st:
        fill(st.path, seed=0)
        write_codes(st.path / "item_codes.parquet", [1, 2, 3, 4], [[0, 0], [0, 1], [1, 1], [1, 0]])
        old = st.publish(config={"quantizer": {"levels": 2, "seed": 0}}, metrics={"collision_rate": 0.5})
    with store.stage() as st:
        fill(st.path, seed=1)
        write_codes(st.path / "item_codes.parquet", [2, 3, 4, 5], [[0, 1], [1, 0], [1, 0], [0, 0]])
        new = st.publish(config={"quantizer": {"levels": 2, "seed": 1}}, metrics={"collision_rate": 0.25})
    assert main(["store", "diff", "--store", str(store.root), "--version", old.id, "--json"]) == 0
    diff = _last_json(capsys)
    assert diff["new"] == new.id and diff["new_is_descendant"]
    assert diff["config_changes"] == {"quantizer.seed": {"old": 0, "new": 1}}
    assert diff["metric_changes"]["collision_rate"] == {"old": 0.5, "new": 0.25}
    churn = diff["churn"]["item_codes.parquet"]
    # common items 2, 3, 4: only item 3 changed (level 1: 1 -> 0)
    assert churn["common_items"] == 3 and churn["rq_code_churn"] == pytest.approx(1 / 3)
    assert churn["rq_level_churn"] == pytest.approx([0.0, 1 / 3])
