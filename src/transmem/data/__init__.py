"""Data: generators and readers, all yielding clips in the (T, C, H, W) layout, values in [0, 1]."""
from .errors import DataError
from .registry import DataConfig, build_datasets, list_datasets, register_dataset

__all__ = ["DataError", "DataConfig", "build_datasets", "list_datasets", "register_dataset"]
