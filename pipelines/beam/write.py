"""Writing feature-store tables with `beam.io.parquetio` into a staging folder (one file per table, the names the
store's contract expects). Readers sort by item_id, so shard order never matters; the store's publish step
fsyncs, checksums and validates the files before they become visible.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa

from feature_store.tables import codes_schema, embeddings_schema
from pipelines.beam.common import REJECT_FIELDS, count

REJECTS_SCHEMA = pa.schema([
    pa.field("stage", pa.string()), pa.field("source", pa.string()), pa.field("row", pa.int64()),
    # raw ids as the source wrote them (text), and the dense int64 ids where known
    pa.field("item_id", pa.string()), pa.field("user_id", pa.string()),
    pa.field("item_dense_id", pa.int64()), pa.field("user_dense_id", pa.int64()), pa.field("reason", pa.string()),
    pa.field("detail", pa.string()), pa.field("action", pa.string()),
])


def _write(pcoll, path_without_suffix: str, schema: pa.Schema):
    return pcoll | "WriteParquet" >> beam.io.WriteToParquet(
        path_without_suffix, schema, file_name_suffix=".parquet", num_shards=1, shard_name_template="",
        codec="zstd")


class WriteEmbeddings(beam.PTransform):
    """(item_id, emb (d,)) -> ``<prefix>.parquet`` with the store's embeddings schema."""

    def __init__(self, prefix: str, dim: int, stage: str = "write", label: str | None = None):
        super().__init__(label)
        self.prefix, self.dim, self.stage = prefix, dim, stage

    def expand(self, emb):
        rows = (emb | "ToRow" >> beam.Map(lambda kv: {"item_id": int(kv[0]),
                                                     "embedding": np.asarray(kv[1], np.float32).tolist()})
                | "CountIn" >> count(self.stage, "in") | "Count" >> count(self.stage, "out"))
        return _write(rows, self.prefix, embeddings_schema(self.dim))


def _code_row(keyed):
    item_id, grouped = keyed
    rq, vq = list(grouped["rq"]), list(grouped["vq"])
    return {"item_id": int(item_id), "rq": np.asarray(rq[0], np.int32).tolist(),
            "vq": np.asarray(vq[0], np.int64).tolist() if vq else []}


class WriteCodes(beam.PTransform):
    """{"rq": (item_id, rq), "vq": (item_id, vq)} -> ``<prefix>.parquet`` (item_id, rq list<int32>, vq list<int64>)."""

    def __init__(self, prefix: str, stage: str = "write", label: str | None = None):
        super().__init__(label)
        self.prefix, self.stage = prefix, stage

    def expand(self, codes):
        rows = ({"rq": codes["rq"], "vq": codes["vq"]} | "JoinRqVq" >> beam.CoGroupByKey()
                | "ToRow" >> beam.Map(_code_row) | "CountIn" >> count(self.stage, "in")
                | "Count" >> count(self.stage, "out"))
        return _write(rows, self.prefix, codes_schema())


class WriteRejects(beam.PTransform):
    """dead-letter records -> ``<prefix>.parquet`` (`REJECT_FIELDS`: stage, source, row, item_id / user_id as raw
    text, item_dense_id / user_dense_id int64 where known, reason, detail, action)."""

    def __init__(self, prefix: str, label: str | None = None):
        super().__init__(label)
        self.prefix = prefix

    def expand(self, dead):
        rows = dead | "Project" >> beam.Map(lambda r: {k: r.get(k) for k in REJECT_FIELDS})
        return _write(rows, self.prefix, REJECTS_SCHEMA)


PAIRS_SCHEMA = pa.schema([pa.field("left", pa.int64()), pa.field("right", pa.int64()), pa.field("source", pa.string()),
                          pa.field("ts", pa.int64()), pa.field("weight", pa.float64())])


class write_pairs(beam.PTransform):  # noqa: N801 - reads like a verb in the graph
    """pair tuples (left, right, source, ts, weight) -> ``<prefix>.parquet``."""

    def __init__(self, prefix: str, label: str | None = None):
        super().__init__(label)
        self.prefix = prefix

    def expand(self, pairs):
        rows = pairs | "ToRow" >> beam.Map(lambda r: dict(zip(("left", "right", "source", "ts", "weight"), r)))
        return _write(rows, self.prefix, PAIRS_SCHEMA)
