"""Transfer: the memory bank of frozen teachers, its adapters and cache, the TMU builder, and the
mixture of finetuned members (its options, member checks and builder)."""
from .bank import BankCache, MemoryBank, TeacherMismatch, convert_channels, map_layer, resize_state
from .builder import build_tmu
from .mixture import MixtureError, MixtureOptions, build_mixture

__all__ = ["BankCache", "MemoryBank", "MixtureError", "MixtureOptions", "TeacherMismatch", "build_mixture",
           "build_tmu", "convert_channels", "map_layer", "resize_state"]
