"""The data pipeline: files -> conversations -> (ids, loss mask) -> packed batches. See docs/data.md."""

from .config import DataConfig
from .pipeline import PreparedDataset, prepare_dataset

__all__ = ["DataConfig", "PreparedDataset", "prepare_dataset"]
