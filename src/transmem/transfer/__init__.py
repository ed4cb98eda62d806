"""Transfer: the memory bank of frozen teachers, its adapters and cache, and the TMU builder."""
from .bank import BankCache, MemoryBank, TeacherMismatch, convert_channels, map_layer, resize_state
from .builder import build_tmu

__all__ = ["BankCache", "MemoryBank", "TeacherMismatch", "build_tmu", "convert_channels", "map_layer",
           "resize_state"]
