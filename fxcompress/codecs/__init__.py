"""Saved-tensor codecs: one module per family."""
from .base import Codec, Layout
from .lossless import BitMask, NarrowInt, PackedInt, PredicateMask, ShapeOnly

__all__ = ["Codec", "Layout", "BitMask", "PredicateMask", "ShapeOnly", "NarrowInt", "PackedInt"]
