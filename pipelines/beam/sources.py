"""Source tables read on the workers: one file, a folder of part files or a glob of Parquet / CSV / TSV files.

The driver only lists the files and checks their headers (`pipelines.data.io.table_files` / `table_columns`:
small metadata). The workers count each file's rows (first pass; Parquet from its footer), then read the files in
chunks (Parquet record batches, CSV chunks read as strings like the loader) and number every record with its row
in the concatenated table (files in name order), exactly `pipelines.data.io.read_table`'s row index, plus its part
file and row inside that file for rejects. No worker holds more than one chunk.

The cascade job reads the generic Parquet / CSV source through it (``frames=True``: one DataFrame per chunk,
parsed by `pipelines.beam.read_source.ReadSource` with the loader's own parsing); presets generated in the
driver (synthetic, movielens) still go through the loader's snapshot. What remains bounded is documented in
docs/RUNNERS.md, "What the driver still holds": the string-id maps (a side input of every distinct string id)
and the window events the driver's metrics read (tests/pipelines/test_sources.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import apache_beam as beam

CHUNK_ROWS = 65_536


def _count_rows(file: str) -> tuple[str, int]:
    import pyarrow.parquet as pq

    from pipelines.data.io import table_format

    if table_format(Path(file)) == "parquet":
        return file, int(pq.ParquetFile(file).metadata.num_rows)
    n = 0
    for chunk in _csv_chunks(file, None):
        n += len(chunk)
    return file, n


def _csv_chunks(file: str, columns: Optional[list]):
    import pandas as pd

    sep = "\t" if ".tsv" in Path(file).name.lower() else ","
    yield from pd.read_csv(file, sep=sep, dtype=str, keep_default_na=False, na_values=[""], usecols=columns,
                           encoding="utf-8-sig", chunksize=CHUNK_ROWS)


def _offsets(counts: dict) -> dict:
    """file -> first row of that file in the concatenated table (files in name order)."""
    out, start = {}, 0
    for file in sorted(counts):
        out[file] = start
        start += counts[file]
    return out


class _ReadFile(beam.DoFn):
    def __init__(self, columns: Optional[list], rename: dict, per_file: Optional[dict] = None, frames: bool = False):
        self.columns, self.rename, self.per_file, self.frames = columns, rename, per_file or {}, frames

    def process(self, file: str, offsets: dict):
        import math

        import pyarrow.parquet as pq

        from pipelines.data.io import table_format

        row = offsets[file]
        name = Path(file).name
        columns = self.per_file.get(file, self.columns)
        if table_format(Path(file)) == "parquet":
            chunks = (b.to_pandas() for b in pq.ParquetFile(file).iter_batches(CHUNK_ROWS, columns=columns))
        else:
            chunks = _csv_chunks(file, columns)
        local = 0
        for frame in chunks:
            frame = frame.rename(columns=self.rename)
            if self.frames:  # one DataFrame per chunk, numbered like the records
                frame = frame.reset_index(drop=True)
                frame.attrs["parts"] = [(file, table_format(Path(file)), 0, len(frame))]
                yield {"file": name, "path": file, "row": row, "file_row": local, "frame": frame}
                row += len(frame)
                local += len(frame)
                continue
            for rec in frame.to_dict("records"):
                rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
                rec.update(_row=row, _source=name, _file_row=local)
                row += 1
                local += 1
                yield rec


class ReadTableParts(beam.PTransform):
    """A table path (file / folder / glob) -> dict records with ``_row`` (= the loader's row), ``_source`` (part
    file name) and ``_file_row`` (row inside it).

    Args:
        path: the table path, as the generic source accepts it.
        columns: columns to read (None: all); checked against every file's header in the driver.
        rename: source column -> contract column (the ``--map`` column mapping).
        optional: further columns read from the files whose header has them (the loader's optional columns).
        frames: yield one dict {file, path, row, file_row, frame} per chunk (a DataFrame of at most CHUNK_ROWS
            source rows starting at table row ``row`` / file row ``file_row``) instead of one dict per record.
    """

    def __init__(self, path, columns: Optional[Iterable[str]] = None, rename: Optional[dict] = None,
                 label: str | None = None, optional: Iterable[str] = (), frames: bool = False):
        super().__init__(label)
        from pipelines.data.io import DataError, table_columns, table_files

        self.files = [str(f) for f in table_files(Path(path))]
        self.columns = list(columns) if columns is not None else None
        if self.columns is not None:
            for f in self.files:
                present = table_columns(Path(f))
                missing = [c for c in self.columns if c not in present]
                if missing:
                    raise DataError(f"{f}: missing column(s) {missing}; columns present: {present}")
        self.per_file = {}
        optional = [c for c in dict.fromkeys(optional) if self.columns is None or c not in self.columns]
        if optional and self.columns is not None:
            for f in self.files:
                present = table_columns(Path(f))
                self.per_file[f] = list(dict.fromkeys(self.columns)) + [c for c in optional if c in present]
        self.rename = dict(rename or {})
        self.frames = bool(frames)

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self.files) | "SpreadFiles" >> beam.Reshuffle()
        offsets = (files | "CountRows" >> beam.Map(_count_rows) | "RowCounts" >> beam.combiners.ToDict()
                   | "Offsets" >> beam.Map(_offsets))
        return files | "ReadFiles" >> beam.ParDo(_ReadFile(self.columns, self.rename, self.per_file, self.frames),
                                                  beam.pvalue.AsSingleton(offsets))
