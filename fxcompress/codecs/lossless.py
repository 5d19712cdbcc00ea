"""Lossless codecs: gradients stay bit-identical to uncompressed training.

- :class:`BitMask`: a bool tensor (dropout mask, a saved comparison) at 1 bit
  per element.
- :class:`PredicateMask`: a float tensor the backward reads only through one
  predicate (``threshold_backward(g, relu_out, 0)`` reads ``relu_out <= 0``):
  1 bit per element, decoded to two representative values that give every
  consumer the same predicate.
- :class:`Select`: a choice between two constants, ``where(c, a, b)`` (an
  additive attention mask of 0 and -inf): 1 bit per element, the constants
  kept in the codec.
- :class:`ShapeOnly`: a tensor the backward reads only for its shape (the
  ``self`` of ``max_pool2d_with_indices_backward``): nothing is stored.
- :class:`NarrowInt`: int64 values known to lie in ``[0, bound)`` (max-pool
  indices, embedding ids) stored in the narrowest integer type that holds them.
- :class:`PackedInt`: integers below 16 (Inductor's max-pool window offsets,
  below 9 for a 3x3 window) packed 2, 4 or 8 per byte.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .base import Codec, Layout, pack_bits, pack_codes, select_values, unpack_bits, unpack_codes
from .uses import Predicate

__all__ = ["BitMask", "PredicateMask", "Select", "ShapeOnly", "NarrowInt", "PackedInt", "narrowest_int", "packed_bits"]


@dataclasses.dataclass(frozen=True)
class BitMask(Codec):
    layout: Layout

    @property
    def name(self) -> str:
        return "bitmask"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (pack_bits(self.layout.flatten(x)),)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return self.layout.unflatten(unpack_bits(packed, self.layout.numel))


@dataclasses.dataclass(frozen=True)
class PredicateMask(Codec):
    layout: Layout
    predicate: Predicate
    v_true: float
    v_false: float

    @property
    def name(self) -> str:
        return f"mask[{self.predicate}]"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (pack_bits(self.predicate(self.layout.flatten(x))),)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return _select(self.layout, packed, self.v_true, self.v_false)


@dataclasses.dataclass(frozen=True)
class Select(Codec):
    """A tensor that holds only ``a`` or ``b``, constants of its dtype (``where(c, a, b)``, the forward's
    own select: an additive attention mask of 0 and -inf): 1 bit per element, where ``x`` is ``a``.

    Exact for any two different values, ±inf and NaN included, where a per-group lossy code of a
    group holding -inf decodes to NaN (non-finite groups poison their codes, :mod:`.quant`).
    """

    layout: Layout
    a: float
    b: float

    @property
    def name(self) -> str:
        return "select"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = self.layout.flatten(x)
        return (pack_bits(flat.isnan() if math.isnan(self.a) else flat == self.a),)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return _select(self.layout, packed, self.a, self.b)


def _select(lay: Layout, packed: torch.Tensor, v_true: float, v_false: float) -> torch.Tensor:
    """1-bit ``packed`` as ``lay``'s tensor: ``v_true`` where a bit is set, else ``v_false``."""
    return select_values(lay.unflatten(unpack_bits(packed, lay.numel)), v_true, v_false, lay.dtype)


@dataclasses.dataclass(frozen=True)
class ShapeOnly(Codec):
    layout: Layout

    @property
    def name(self) -> str:
        return "shape-only"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ()

    def decode(self) -> torch.Tensor:
        lay = self.layout
        return torch.empty_strided(lay.shape, lay.stride, dtype=lay.dtype, device=lay.device)


@dataclasses.dataclass(frozen=True)
class Unread(ShapeOnly):
    """Nothing stored for a saved tensor the backward no longer reads (its decode is dead code)."""

    @property
    def name(self) -> str:
        return "unread"


@dataclasses.dataclass(frozen=True)
class NarrowInt(Codec):
    layout: Layout
    narrow: torch.dtype

    @property
    def name(self) -> str:
        return f"narrow[{str(self.narrow).removeprefix('torch.')}]"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x.to(self.narrow),)

    def decode(self, narrow: torch.Tensor) -> torch.Tensor:
        return narrow.to(self.layout.dtype)


@dataclasses.dataclass(frozen=True)
class PackedInt(Codec):
    """Integers known to lie in ``[0, 2**bits)`` packed ``8 // bits`` per byte (``bits`` 1, 2 or 4)."""

    layout: Layout
    bits: int

    @property
    def name(self) -> str:
        return f"packed[{self.bits}b]"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (pack_codes(self.layout.flatten(x).to(torch.uint8), self.bits),)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        codes = unpack_codes(packed, self.bits, self.layout.numel)
        return self.layout.unflatten(codes.to(self.layout.dtype))


def packed_bits(bound: int) -> int | None:
    """The fewest bits (1, 2 or 4) that hold ``[0, bound)``, or ``None`` above 16."""
    return next((bits for bits in (1, 2, 4) if bound <= 1 << bits), None)


def narrowest_int(bound: int, dtype: torch.dtype) -> torch.dtype | None:
    """The smallest integer dtype holding ``[0, bound)``, if narrower than ``dtype``."""
    for candidate in (torch.uint8, torch.int16, torch.int32):
        if candidate.itemsize >= dtype.itemsize:
            return None
        if bound - 1 <= torch.iinfo(candidate).max:
            return candidate
    return None
