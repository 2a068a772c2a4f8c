"""Data sources in one contract (items + interactions), with per-record rejects. See docs/ARCHITECTURE.md."""
from pipelines.data.args import add_data_arguments, data_spec_from_args
from pipelines.data.io import DataError
from pipelines.data.loader import export_dataset, load_dataset, load_id_maps, save_id_maps, write_rejects
from pipelines.data.schema import REJECT_REASONS, DataSpec, Dataset

__all__ = ["DataSpec", "Dataset", "DataError", "REJECT_REASONS", "load_dataset", "write_rejects", "save_id_maps",
           "load_id_maps", "export_dataset", "add_data_arguments", "data_spec_from_args"]
