"""Data: generators and readers, all yielding clips in the (T, C, H, W) layout, values in [0, 1]."""
from .errors import DataError
from .registry import (DataConfig, Units, adopt_fitted, build_datasets, describe, frame_size_of, list_datasets,
                       inflow_hint, physical_units, pixel_km, register_dataset)

__all__ = ["DataError", "DataConfig", "Units", "adopt_fitted", "build_datasets", "describe", "frame_size_of", "list_datasets", "inflow_hint", "physical_units", "pixel_km",
           "register_dataset"]
