"""Data sources in one contract (items + interactions), with per-record rejects. See docs/ARCHITECTURE.md."""
from pipelines.data.images import ImageError, check_image, load_image
from pipelines.data.io import DataError
from pipelines.data.loader import export_dataset, load_dataset, load_id_maps, save_id_maps, write_rejects
from pipelines.data.schema import REJECT_REASONS, DataSpec, Dataset
from feature_store.split import SplitConfig, time_split

__all__ = ["DataSpec", "Dataset", "DataError", "ImageError", "REJECT_REASONS", "SplitConfig", "load_dataset",
           "write_rejects", "save_id_maps", "load_id_maps", "export_dataset",
           "load_image", "check_image", "time_split"]
