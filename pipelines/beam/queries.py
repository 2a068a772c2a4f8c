"""Next-item queries of one protocol window, computed on the workers: the alignment gate's judge (issue 18).

    WindowEvents rows -> NextItemQueries(window=1) -> (query, target) rows -> write_queries -> valid_queries.parquet

Per user (one GroupByKey value: that user's window positives plus the last train positive WindowEvents keeps),
the rows are ordered as the driver's loader orders them (ts, item, file row, table row) and
`pipelines.encoder.retrieval_eval.next_item_queries` picks each window positive's query (the user's previous positive):
the same rows the driver's `pipelines.jobs.cascade.window_metrics` measures that window on, never a whole-log object.
"""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

QUERIES_SCHEMA = pa.schema([pa.field("query", pa.int64()), pa.field("target", pa.int64())])
ORDER = ("ts", "item_id", "o_file", "o_row")  # inside one user: the loader's row order (read_window_events)


def _user_queries(keyed, window: int):
    import pandas as pd

    from pipelines.encoder.retrieval_eval import next_item_queries

    _, rows = keyed
    frame = pd.DataFrame(list(rows)).sort_values(list(ORDER), kind="stable").reset_index(drop=True)
    queries = next_item_queries(frame, (frame["part"].to_numpy() == window))
    for query, target in zip(queries["query"].tolist(), queries["target"].tolist()):
        yield {"query": int(query), "target": int(target)}


class NextItemQueries(beam.PTransform):
    """WindowEvents rows (user_id, item_id, ts, label, part, o_file, o_row) -> {"query", "target"} dicts of the
    positives of protocol part ``window`` (1 valid, 2 test).

    Args:
        window: the protocol part whose positives are the targets.
        positive_label: labels at or above it are positives (the queries are positives too).
    """

    def __init__(self, window: int, positive_label: float, label: str | None = None):
        super().__init__(label)
        if window not in (1, 2):
            raise ValueError(f"NextItemQueries: window must be 1 (valid) or 2 (test), got {window}")
        self.window, self.positive_label = int(window), float(positive_label)

    def expand(self, window_rows):
        pos, window = self.positive_label, self.window
        return (window_rows | "Positives" >> beam.Filter(lambda r: float(r["label"]) >= pos)
                | "KeyByUser" >> beam.Map(lambda r: (int(r["user_id"]), r))
                | "GroupByUser" >> beam.GroupByKey()
                | "UserQueries" >> beam.FlatMap(_user_queries, window))


class write_queries(beam.PTransform):  # noqa: N801 - reads like a verb in the graph
    """{"query", "target"} rows -> ``<prefix>.parquet`` (one file; empty when the window has no query)."""

    def __init__(self, prefix: str, label: str | None = None):
        super().__init__(label)
        self.prefix = prefix

    def expand(self, rows):
        from pipelines.beam.write import _write

        return _write(rows, self.prefix, QUERIES_SCHEMA)
