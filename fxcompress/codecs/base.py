"""The codec interface and the memory-layout helpers every codec shares.

A codec turns one saved tensor into a few smaller tensors (``encode``, run
in the forward graph) and back (``decode``, run in the backward graph right
before the first use). Both are plain PyTorch functions: the rewrite traces
them to aten ops with ``make_fx`` and splices them into the graphs, so
Inductor can fuse them like any other op.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import torch

__all__ = ["Codec", "Layout", "predicate_values", "select_values", "pack_bits", "unpack_bits", "pack_codes", "pack_slices", "unpack_codes", "unpack_slices"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shape, strides, dtype and device of a dense tensor, and its memory order.

    ``order`` is the permutation of dimensions from outermost to innermost in
    memory, so that ``x.permute(order)`` is contiguous (channels-last stays
    channels-last without a copy).
    """

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(sorted(range(len(self.shape)), key=lambda d: (-self.stride[d], -self.shape[d])))

    def is_dense(self) -> bool:
        """True when the tensor covers its storage exactly once (no gaps, no overlap)."""
        return all(s == d for s, d, n in zip(self.stride, self.dense().stride, self.shape) if n != 1)

    def overlaps(self) -> bool:
        """True when two elements share a place in memory (an ``expand``'s zero stride)."""
        end = 1
        for d in reversed(self.order):
            if self.shape[d] == 1:
                continue
            if self.stride[d] < end:
                return True
            end = self.stride[d] * (self.shape[d] - 1) + 1
        return False

    def dense(self) -> "Layout":
        """The dense layout with this one's memory order: that of ``x.permute(order).contiguous()``
        permuted back, which :meth:`flatten` and :meth:`unflatten` read and write."""
        stride, step = [0] * len(self.shape), 1
        for d in reversed(self.order):
            stride[d] = step
            step *= self.shape[d]
        return dataclasses.replace(self, stride=tuple(stride))

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a 1-D view in memory order (no copy for a dense ``x``)."""
        return x.permute(self.order).reshape(-1)

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`flatten`: the original shape and strides."""
        order = self.order
        inverse = [order.index(d) for d in range(len(order))]
        return flat.view([self.shape[d] for d in order]).permute(inverse)

    @staticmethod
    def of(val: torch.Tensor) -> "Layout":
        return Layout(tuple(val.shape), tuple(val.stride()), val.dtype, val.device)


class Codec(abc.ABC):
    """Encode/decode pair for one saved tensor of a given :class:`Layout`.

    Subclasses are frozen dataclasses, so equal codecs hash equal and their
    traced subgraphs are shared between same-layout tensors.

    A lossy codec that keeps a predicate of ``x`` exact beside the values (a
    ReLU output's ``x <= 0``: a mask, a reserved code) has it as ``predicate``
    and also defines ``decode_predicate(*parts)``: a tensor of ``x``'s layout
    on which the predicate holds exactly where it held on ``x``, made from
    the parts that carry it, without the values (:func:`predicate_values`).
    The rewrite gives the readers of the predicate alone (``threshold_backward``)
    that decode of their own, so the decoded values die at their last value
    reader (the convolution backward) instead of living on for a ReLU
    backward that Inductor inlines into later kernels, and those kernels read
    the codes, not a dense tensor.

    A code of a norm's input taken in the norm's space (``Normalized``) also
    defines ``decode_centered(*parts)``: ``x - mean`` in fp32 (or ``x``'s
    dtype where wider), which a decomposed norm backward subtracts first and
    the codes hold up to a scaling (the rewrite's
    :func:`~fxcompress.passes.rewrite._centered_readers`).
    """

    #: bit-identical round trip for every consumer it is chosen for
    lossless: bool = True

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short name shown in the report, e.g. ``bitmask``."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward side: the tensors saved instead of ``x``."""

    @abc.abstractmethod
    def decode(self, *parts: torch.Tensor) -> torch.Tensor:
        """Backward side: a tensor with ``x``'s layout that every consumer accepts."""


def predicate_values(predicate, truth: torch.Tensor, dtype: torch.dtype,
                     near: tuple[float, float] | None = None) -> torch.Tensor:
    """``truth`` (bool) as values of ``dtype`` on which ``predicate`` is true exactly where ``truth`` is.

    The dtype's largest finite value on each side of a one-sided predicate's constant (finite, so
    the same in the fp8 dtypes, which have no infinity); for a two-sided one, the lowest value
    (outside) and ``near[0]``, a value inside (:meth:`~fxcompress.codecs.uses.Predicate.near_values`).
    Exact in every float dtype, and only ever compared: the predicate's readers read nothing else.
    """
    big = torch.finfo(dtype).max
    if predicate.two_sided:
        v_true, v_false = -big, near[0]
    else:
        v_true, v_false = (-big, big) if predicate.kind in ("le", "lt") else (big, -big)
    return select_values(truth, v_true, v_false, dtype)


def select_values(truth: torch.Tensor, v_true: float, v_false: float, dtype: torch.dtype) -> torch.Tensor:
    """``truth`` (bool) as ``dtype`` values: ``v_true`` where it is set, else ``v_false``."""
    return torch.where(truth, torch.scalar_tensor(v_true, dtype=dtype, device=truth.device),
                       torch.scalar_tensor(v_false, dtype=dtype, device=truth.device))


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Bit offsets of the ``8 // bits`` codes in a byte: 0, bits, 2*bits, ..."""
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D uint8 codes below ``2**bits`` into bytes, ``8 // bits`` per byte.

    Code ``i`` lands at bit offset ``bits * (i % (8 // bits))``; the input is
    zero-padded to a whole number of bytes. (:func:`pack_slices` packs codes
    computed apart, one place of each byte at a time.)
    """
    if bits == 8:
        return codes
    per_byte = 8 // bits
    n = codes.numel()
    if n % per_byte:
        codes = torch.constant_pad_nd(codes, [0, per_byte - n % per_byte])
    codes = codes.view(-1, per_byte)
    shifts = _shifts(bits, codes.device)
    weights = torch.bitwise_left_shift(torch.ones_like(shifts), shifts)
    return (codes * weights).sum(-1, dtype=torch.uint8)


def pack_slices(slices: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
    """Pack ``8 // bits`` uint8 tensors of codes into one byte per element, ``slices[j]`` at bit offset ``bits * j``.

    NB: a codec that computes each slice from its own view of the input
    (one code of every byte at a time) never forms a tensor with one
    element per code, so every op of its encoder runs over the bytes' index,
    the loop of the reduction that finds the groups' ranges, and Inductor
    fuses the encoder into that one kernel. A tensor of all the codes is a
    loop of its own: past Inductor's inlining limit (30 ops on GPUs) it is
    written out, and the encoder becomes three kernels that read the input twice.
    """
    if len(slices) != 8 // bits:
        raise ValueError(f"{len(slices)} slices of {bits}-bit codes: a byte holds {8 // bits}")
    packed = slices[0]
    for j, codes in enumerate(slices[1:], 1):
        packed = packed | (codes << bits * j)
    return packed.reshape(-1)


def unpack_slices(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_slices` on bytes of shape ``(..., n)``: the codes as ``(..., 8 // bits, n)``,
    ``[..., j, i]`` the code at bit offset ``bits * j`` of byte ``i``."""
    shifts = _shifts(bits, packed.device).view(-1, 1)
    return torch.bitwise_right_shift(packed.unsqueeze(-2), shifts).bitwise_and((1 << bits) - 1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as 1-D uint8."""
    if bits == 8:
        return packed if packed.numel() == n else packed[:n]
    shifted = torch.bitwise_right_shift(packed.unsqueeze(-1), _shifts(bits, packed.device))
    codes = shifted.bitwise_and((1 << bits) - 1).view(-1)
    return codes if codes.numel() == n else codes[:n]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor 8 elements per byte (element ``i`` is bit ``i % 8``)."""
    return pack_codes(bits.to(torch.uint8), 1)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a 1-D bool tensor."""
    return unpack_codes(packed, 1, n).ne(0)
