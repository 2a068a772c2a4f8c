"""TestPipeline tests of the job's transforms: validation dead letters, embedding NaN checks, quantization equal to
the quant library, Parquet writers readable by the feature store."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.beam.validate_records import DEAD, CountByReason, ValidateInteractions, ValidateItems


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"not an image at all")
    return root


def _item(i, title="t", text="x", uri=None, row=None):
    return {"item_id": i, "title": title, "text": text, "image_uri": uri, "_row": i if row is None else row}


def test_validate_items_dead_letters(images):
    items = [
        _item(1, uri="ok.png"),
        _item(2, uri="corrupt.png"),            # corrupt image: kept text-only
        _item(3, uri="gone.png"),               # missing image: kept text-only
        _item(4, title="", text=None),          # no text, no image: dropped
        _item(5, title=" ", text="", uri="ok.png"),  # no text but an image: kept image-only
        _item(1, title="dup", row=99),          # duplicate id: later row dropped
        {"item_id": None, "title": "x", "text": None, "image_uri": None, "_row": 7},  # no id: dropped
    ]
    with TestPipeline() as p:
        out = p | beam.Create(items) | ValidateItems(str(images), "header")
        assert_that(out["items"] | "Ids" >> beam.Map(lambda r: (r["item_id"], r["image_uri"], r["title"])),
                    equal_to([(1, "ok.png", "t"), (2, None, "t"), (3, None, "t"), (5, "ok.png", " ")]),
                    label="Valid")
        # rejects carry the id as text (the raw id) and the dense int id where known
        assert_that(out[DEAD] | "Reasons" >> beam.Map(lambda r: (r["reason"], r["item_id"], r["item_dense_id"],
                                                                 r["action"])),
                    equal_to([("corrupt_image", "2", 2, "kept_text_only"), ("missing_image", "3", 3, "kept_text_only"),
                              ("empty_text", "4", 4, "dropped"), ("empty_text", "5", 5, "kept_image_only"),
                              ("duplicate_item", "1", 1, "dropped"), ("missing_value", None, None, "dropped")]),
                    label="Dead")


def test_validate_items_require_image_drops(images):
    with TestPipeline() as p:
        out = p | beam.Create([_item(1, uri="ok.png"), _item(2, uri="corrupt.png"), _item(3)]) | ValidateItems(
            str(images), "header", require_image=True)
        assert_that(out["items"] | beam.Map(lambda r: r["item_id"]), equal_to([1]), label="Valid")
        assert_that(out[DEAD] | CountByReason(), equal_to([("corrupt_image", 1), ("missing_image", 1)]),
                    label="Counts")


def test_validate_interactions_unknown_and_bad():
    items = [_item(1), _item(2)]
    events = [
        {"user_id": 10, "item_id": 1, "ts": 5, "label": 1.0, "_row": 0},
        {"user_id": 10, "item_id": 2, "ts": 6, "label": 0.0, "_row": 1},
        {"user_id": 11, "item_id": 3, "ts": 7, "label": 1.0, "_row": 2},      # unknown item
        {"user_id": 11, "item_id": 1, "ts": None, "label": 1.0, "_row": 3},   # missing ts
        {"user_id": 12, "item_id": 2, "ts": 8, "label": 3.0, "_row": 4},      # label out of range
        {"user_id": 12, "item_id": 2, "ts": 9, "label": float("nan"), "_row": 5},
    ]
    with TestPipeline() as p:
        valid_items = p | "Items" >> beam.Create(items)
        out = p | "Events" >> beam.Create(events) | ValidateInteractions(valid_items)
        assert_that(out["interactions"] | beam.Map(lambda r: r["_row"]), equal_to([0, 1]), label="Valid")
        assert_that(out[DEAD] | "Rows" >> beam.Map(lambda r: (r["reason"], r["row"])),
                    equal_to([("unknown_item", 2), ("missing_value", 3), ("bad_label", 4), ("bad_label", 5)]),
                    label="Dead")


class _FakeModel:
    pass


class _FakeHandler(ModelHandler):
    """Embeds an item as a one-hot of its id; item 13 comes out NaN (a broken model output)."""

    def load_model(self):
        return _FakeModel()

    def run_inference(self, batch, model, inference_args=None):
        out = []
        for it in batch:
            v = np.zeros(4, np.float32)
            v[it.item_id % 4] = 1.0
            if it.item_id == 13:
                v[:] = np.nan
            out.append((it.item_id, v))
        return out


def test_embed_items_rejects_non_finite(images):
    from pipelines.encoder.config import EncoderConfig
    from pipelines.beam.embed_items import EmbedItems

    cfg = EncoderConfig.named("tiny")
    items = [_item(1, uri="ok.png"), _item(13), _item(2, uri="corrupt.png")]
    with TestPipeline() as p:
        out = p | beam.Create(items) | EmbedItems(_FakeHandler(), cfg, str(images), "embed")
        assert_that(out["embeddings"] | beam.Map(lambda kv: (kv[0], int(np.argmax(kv[1])))),
                    equal_to([(1, 1), (2, 2)]), label="Emb")
        assert_that(out[DEAD] | beam.Map(lambda r: (r["reason"], r["item_id"], r["item_dense_id"])),
                    equal_to([("nan_embedding", "13", 13), ("corrupt_image", "2", 2)]), label="Dead")


def test_quantize_items_matches_library():
    from quant import RQKMeans, VQNeighbors
    from pipelines.beam.quantize_items import QuantConfig, QuantizeItems, sample_key

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    ids = np.arange(1000, 1200)
    cfg = QuantConfig(rq_levels=2, rq_codebook_size=8, fit_sample=150, vq_k=5, seed=3, batch_size=64)
    # the library on the same hashed sample
    keep = sorted(ids, key=lambda i: sample_key(i, 3))[:150]
    rows = np.searchsorted(ids, np.sort(keep))
    q = RQKMeans(levels=2, codebook_size=8, seed=3, niter=cfg.rq_niter).fit(x[rows])
    rq = q.encode(x)
    vq_rows = VQNeighbors(k=5, faiss_gpu=False).fit(x).encode(x)
    with TestPipeline() as p:
        out = p | beam.Create(list(zip(ids.tolist(), x))) | QuantizeItems(cfg)
        assert_that(out["rq"] | "RQ" >> beam.Map(lambda kv: (kv[0], tuple(kv[1].tolist()))),
                    equal_to([(int(i), tuple(c.tolist())) for i, c in zip(ids, rq)]), label="RQ")
        assert_that(out["vq"] | "VQ" >> beam.Map(lambda kv: (kv[0], tuple(kv[1].tolist()))),
                    equal_to([(int(i), tuple(ids[r].tolist())) for i, r in zip(ids, vq_rows)]), label="VQ")


def test_writers_produce_store_tables(tmp_path):
    from feature_store.tables import read_codes, read_embeddings
    from pipelines.beam.write import WriteCodes, WriteEmbeddings

    emb = [(i, np.full(3, i, np.float32)) for i in (5, 2, 9)]
    with TestPipeline() as p:
        e = p | "E" >> beam.Create(emb)
        _ = e | WriteEmbeddings(str(tmp_path / "item_embeddings"), 3)
        rq = p | "RQ" >> beam.Create([(i, np.array([i, 1], np.int32)) for i in (5, 2, 9)])
        vq = p | "VQ" >> beam.Create([(i, np.array([i + 1, i + 2], np.int64)) for i in (5, 2, 9)])
        _ = {"rq": rq, "vq": vq} | WriteCodes(str(tmp_path / "item_codes"))
    ids, x = read_embeddings(tmp_path / "item_embeddings.parquet")
    assert ids.tolist() == [2, 5, 9] and x[:, 0].tolist() == [2.0, 5.0, 9.0]
    codes = read_codes(tmp_path / "item_codes.parquet")
    assert codes.rq.tolist() == [[2, 1], [5, 1], [9, 1]] and codes.vq.tolist() == [[3, 4], [6, 7], [10, 11]]


def _string_id_shop(tmp_path):
    """A generic source with string ids (`ids: string`) and one repeat purchase (a duplicate_interaction reject)."""
    (tmp_path / "articles.csv").write_text("article,name\nart-a,Red shirt\nart-b,Blue shirt\n")
    (tmp_path / "purchases.csv").write_text(
        "customer,article,day\n"
        "acde5020f1,art-a,2024-01-01\n"
        "acde5020f1,art-b,2024-01-02\n"
        "acde5020f1,art-b,2024-01-02\n"      # row 2: same customer, article, day -> duplicate_interaction
        "ffee0001aa,art-a,2024-01-03\n")
    (tmp_path / "m.json").write_text(
        '{"items": {"path": "articles.csv", "columns": {"item_id": "article", "title": "name"}},'
        ' "interactions": {"path": "purchases.csv", "columns": {"user_id": "customer", "item_id": "article",'
        ' "ts": "day"}}, "ids": "string"}')
    return tmp_path / "m.json"


def test_loader_rejects_with_string_ids_reach_the_dead_letter(tmp_path):
    """Issue 10 bug 1: `qarm pipeline --dataset generic` crashed with int('acde5020f1') on any loader reject."""
    import pandas as pd
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.jobs.cascade import make_plan
    from pipelines.data import DataSpec, load_dataset
    from pipelines.beam.write import WriteRejects

    mapping = _string_id_shop(tmp_path)
    ds = load_dataset(DataSpec(dataset="generic", mapping=mapping))
    assert ds.reject_counts == {"duplicate_interaction": 1}
    options = PipelineOptions(["--dataset", "generic", "--mapping", str(mapping), "--encoder", "tiny",
                               "--store", str(tmp_path / "store")])
    (tmp_path / "work").mkdir()
    plan = make_plan(options, tmp_path / "staging", tmp_path / "work", ds)   # raised ValueError before the fix
    (dup,) = plan.loader_rejects
    dense_user = int(ds.id_maps["user_id"].set_index("raw").loc["acde5020f1", "id"])
    dense_item = int(ds.id_maps["item_id"].set_index("raw").loc["art-b", "id"])
    assert (dup["user_id"], dup["item_id"], dup["row"]) == ("acde5020f1", "art-b", 2)
    with TestPipeline() as p:
        _ = p | beam.Create(list(plan.loader_rejects)) | WriteRejects(str(tmp_path / "dead_letter"))
    back = pd.read_parquet(tmp_path / "dead_letter.parquet")
    assert back[["user_id", "item_id", "reason"]].values.tolist() == [["acde5020f1", "art-b", "duplicate_interaction"]]
    # the loader's rejects table carries the dense ids too, where the loader made them
    row = ds.rejects.iloc[0]
    assert (row["user_dense_id"], row["item_dense_id"]) == (dense_user, dense_item)


def test_validation_rejects_keep_raw_string_ids():
    """Records that carry their raw ids (string-id sources) are rejected under those, with the dense ids beside."""
    items = [_item(0), {**_item(0, row=5), "_raw_item_id": "art-a"}]
    events = [{"user_id": 3, "item_id": 7, "ts": 5, "label": 1.0, "_row": 0, "_raw_user_id": "acde5020f1",
               "_raw_item_id": "art-z"}]                                   # unknown item
    with TestPipeline() as p:
        vi = p | "Items" >> beam.Create(items) | "VI" >> ValidateItems(None, "exists")
        vx = p | "Events" >> beam.Create(events) | "VX" >> ValidateInteractions(vi["items"])
        fields = ("reason", "item_id", "item_dense_id", "user_id", "user_dense_id")
        assert_that(vi[DEAD] | "I" >> beam.Map(lambda r: tuple(r[k] for k in fields)),
                    equal_to([("duplicate_item", "art-a", 0, None, None)]), label="Items")
        assert_that(vx[DEAD] | "X" >> beam.Map(lambda r: tuple(r[k] for k in fields)),
                    equal_to([("unknown_item", "art-z", 7, "acde5020f1", 3)]), label="Events")


def _events_with_unparseable_values():
    return [
        {"user_id": 10, "item_id": 1, "ts": 100, "label": 1.0, "_row": 0},
        {"user_id": 10, "item_id": 2, "ts": "notadate", "label": 1.0, "_row": 1},   # bad_timestamp
        {"user_id": 11, "item_id": 1, "ts": 300, "label": "abc", "_row": 2},        # bad_label
        {"user_id": "u7", "item_id": 2, "ts": 400, "label": 0.0, "_row": 3},        # bad_id
        {"user_id": 12, "item_id": 2, "ts": "500", "label": "1", "_row": 4},        # text that parses: kept
        {"user_id": 12, "item_id": 1, "ts": -1, "label": 1.0, "_row": 5},           # sentinel time: bad_timestamp
    ]


def test_validation_rejects_unparseable_values_like_the_loader():
    """Issue 10 bug 2, job side: the DoFns give the loader's reasons (bad_id / bad_timestamp / bad_label)."""
    items = [_item(1), _item(2), {**_item(3), "item_id": "x9", "_row": 3}]
    with TestPipeline() as p:
        vi = p | "Items" >> beam.Create(items) | "VI" >> ValidateItems(None, "exists", max_bad_fraction=0.5)
        vx = (p | "Events" >> beam.Create(_events_with_unparseable_values())
              | "VX" >> ValidateInteractions(vi["items"], max_bad_fraction=0.9))
        assert_that(vi[DEAD] | "I" >> beam.Map(lambda r: (r["reason"], r["row"], r["item_id"], r["item_dense_id"])),
                    equal_to([("bad_id", 3, "x9", None)]), label="Items")
        assert_that(vx["interactions"] | "Ok" >> beam.Map(lambda r: (r["_row"], r["ts"], r["label"])),
                    equal_to([(0, 100, 1.0), (4, 500, 1.0)]), label="Valid")
        assert_that(vx[DEAD] | "X" >> beam.Map(lambda r: (r["reason"], r["row"], r["detail"])),
                    equal_to([("bad_timestamp", 1, "ts 'notadate' is not a unix timestamp"),
                              ("bad_label", 2, "label 'abc' is not a number"),
                              ("bad_id", 3, "user_id 'u7' is not an integer"),
                              ("bad_timestamp", 5, "timestamp -1 before 1970-01-01")]), label="Dead")


def test_validation_fails_past_the_bad_share():
    with pytest.raises(Exception, match=r"validate_interactions: 3 of 6 records \(50.00%\).*--max-bad-fraction "
                                        r"0.001.*bad_timestamp interactions row 1: ts 'notadate'"):
        with TestPipeline() as p:
            items = p | "Items" >> beam.Create([_item(1), _item(2)])
            _ = (p | "Events" >> beam.Create(_events_with_unparseable_values())
                 | ValidateInteractions(items, max_bad_fraction=0.001))
