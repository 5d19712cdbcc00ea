"""Saved-tensor codecs: one module per family."""
from .base import Codec, Layout
from .lossless import BitMask, NarrowInt, PackedInt, PredicateMask, Select, ShapeOnly, Unread

__all__ = ["Codec", "Layout", "BitMask", "PredicateMask", "Select", "ShapeOnly", "Unread", "NarrowInt", "PackedInt"]
