import json

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.encoder import load_encoder

REQUIRED = ["mode", "n_pairs_train", "n_pairs_heldout", "recall@10_aligned", "recall@10_unaligned",
            "recall@50_aligned", "recall@50_unaligned", "mrr_aligned", "mrr_unaligned", "trainable_params",
            "total_params", "seconds_per_epoch", "peak_rss_mb"]


@pytest.mark.slow
def test_qarm_align_synthetic_end_to_end(tmp_path, capsys):
    code = main(["align", "--dataset", "synthetic", "--data", str(tmp_path / "data"), "--n-items", "120",
                 "--n-users", "80", "--n-events", "4000", "--encoder", "tiny", "--align-mode", "side", "--align-epochs", "3",
                 "--align-batch-size", "64", "--side-width", "32", "--keep-seen-heldout", "--torch-threads", "1",
                 "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and all(k in result for k in REQUIRED)
    assert result["n_pairs_train"] > 0 and result["n_pairs_heldout"] > 0
    assert 0.0 <= result["recall@10_aligned"] <= result["recall@50_aligned"] <= 1.0
    assert 0 < result["trainable_params"] < result["total_params"]
    # one protocol: the validation window judged the gate, the test window is reported for both embeddings
    gate = result["alignment"]
    assert gate["judge"] == "valid_next_item" and gate["kept"] in (True, False) and result["n_valid_queries"] > 0
    assert gate["valid_next_item"]["step0"]["recall@10"] == pytest.approx(result["next_item_valid_recall@10_unaligned"])
    assert result["n_test_queries"] > 0 and result["next_item_test_recall@10_aligned"] is not None
    out = tmp_path / "out"
    saved = json.loads((out / "align_result.json").read_text())
    assert saved["config"]["encoder"]["name"] == "tiny" and saved["config"]["align"]["mode"] == "side"
    from feature_store.tables import read_embeddings
    ids, emb = read_embeddings(out / "item_embeddings.parquet")
    assert emb.shape == (120, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert load_encoder(out).config.name == "tiny"


def test_qarm_align_reports_bad_input(tmp_path, capsys):
    code = main(["align", "--dataset", "movielens", "--data", str(tmp_path / "nowhere"), "--encoder", "tiny",
                 "--out", str(tmp_path / "out"), "--json"])
    assert code == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not result["ok"] and "nowhere" in result["error"]
