"""Transfer: the memory bank of frozen teachers, its adapters and cache."""
from .bank import BankCache, MemoryBank, TeacherMismatch, convert_channels, map_layer, resize_state

__all__ = ["BankCache", "MemoryBank", "TeacherMismatch", "convert_channels", "map_layer", "resize_state"]
