import numpy as np
import pytest

from pipelines.encoder import EncoderConfig
from pipelines.encoder.alignment import AlignConfig, train_alignment
from pipelines.encoder.embed_catalog import embed_catalog
from pipelines.beam.model_handler import ItemEncoderModelHandler
from pipelines.encoder.side import SideConfig

beam = pytest.importorskip("apache_beam")


def test_run_inference_matches_embed_catalog(tiny_data, tmp_path):
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    ds, train, _ = tiny_data
    result = train_alignment(EncoderConfig.named("tiny"), ds, train.iloc[:64],
                             AlignConfig(mode="side", epochs=1, progress=False, side=SideConfig(width=32)),
                             out_dir=tmp_path / "enc")
    ids, expected, _ = embed_catalog(result.encoder, ds, progress=False)
    expected_by_id = dict(zip(ids.tolist(), expected))
    rows = ds.items[["item_id", "title", "text", "image_uri"]].to_dict("records")
    rows.append({"item_id": 999, "title": "broken poster", "text": None, "image_uri": "missing.png"})
    handler = ItemEncoderModelHandler(checkpoint=str(tmp_path / "enc"), image_root=str(ds.image_root),
                                      max_batch_size=16)

    def check(outputs):
        got = dict(outputs)
        assert set(got) == set(expected_by_id) | {999}
        for item_id, emb in expected_by_id.items():
            assert np.allclose(got[item_id], emb, atol=1e-5), item_id
        assert np.isclose(np.linalg.norm(got[999]), 1.0, atol=1e-5)  # text-only fallback, no crash

    with TestPipeline() as p:
        out = p | beam.Create(rows) | RunInference(handler)
        assert_that(out, check)


def test_handler_needs_a_model_source():
    with pytest.raises(ValueError, match="checkpoint"):
        ItemEncoderModelHandler()
