"""BLPA: batch-norm-aware K-bit codes (Chakrabarti & Moseley, NeurIPS 2019).

For the input ``x`` of a training-mode batch-norm with per-channel statistics
``mean, invstd`` and affine ``gamma, beta``, the BN output is
``y = gamma * xhat + beta`` with ``xhat = (x - mean) * invstd``. BLPA
quantizes in that normalized space, so that one K-bit code serves the BN
backward (``xhat``) and the ReLU after it (its output and its mask).

Here the code is taken of ``u = y / |gamma| = sign(gamma) * xhat + beta/|gamma|``
(for ``gamma > 0`` this is the paper's ``v = xhat + beta/gamma``; dividing by
``|gamma|`` keeps ``u > 0`` exactly where ``y > 0`` for either sign of gamma):

- ``N = 2**K`` bins of width ``D = 6 / N`` (a window six standard deviations wide);
- per channel ``shift = clamp(N/2 - floor((beta/|gamma|) / D), 1, N-1)``, so the
  ReLU threshold ``u = 0`` falls exactly on a bin edge and the window is centred
  on the channel's mean;
- ``code = clamp(ceil(u / D) - 1 + shift, 0, N-1)`` (bins are half-open
  ``(lo, hi]``, so ``y == 0`` lands below the edge, as ReLU's mask has it), and
  the side of the edge is then taken from the BN output itself, so that
  ``code >= shift`` exactly where ``y > 0``, saturated or not;
- reconstruction at the bin midpoint: ``u' = (code - shift + 1/2) * D``, hence
  ``x' = a * code + b`` and ``relu(y)' = (code >= shift) * |gamma| * u'`` with
  per-channel ``a, b``.

``gamma == 0`` is clamped to the smallest normal float: the mask stays exact
(``y = beta``), ``xhat`` saturates. Bytes: ``n * K / 8`` plus four fp32 per
channel.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import Codec, Layout, pack_codes, pack_slices, predicate_values, unpack_codes
from .uses import Predicate

__all__ = ["BLPA", "BLPAMask", "BLPARelu"]

_WINDOW = 6.0  # standard deviations covered by the N bins


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view([1, -1] + [1] * (ndim - 2))


@dataclasses.dataclass(frozen=True)
class BLPA(Codec):
    """Code of a batch-norm input; ``encode(x, y, mean, invstd, gamma, beta)``, without ``gamma, beta``
    for a batch-norm without affine parameters."""

    layout: Layout
    bits: int

    lossless = False

    @property
    def name(self) -> str:
        return f"blpa{self.bits}"

    @property
    def bins(self) -> int:
        return 1 << self.bits

    @property
    def width(self) -> float:
        return _WINDOW / self.bins

    def encode(self, x, y, mean, invstd, gamma=None, beta=None) -> tuple[torch.Tensor, ...]:
        nd, n_bins, width = x.dim(), self.bins, self.width
        tiny = torch.finfo(torch.float32).smallest_normal
        mean, invstd = mean.reshape(-1), invstd.reshape(-1)  # per channel: (C,), or (1, C, 1, 1) decomposed
        g = gamma.float() if gamma is not None else torch.ones_like(mean, dtype=torch.float32)
        bias = beta.float() if beta is not None else torch.zeros_like(g)
        sign = torch.where(g < 0, -1.0, 1.0)
        g_abs = g.abs().clamp_min(tiny)
        offset = bias / g_abs
        shift = (n_bins // 2 - torch.floor(offset / width)).clamp(1, n_bins - 1)
        per_channel = (mean.float(), invstd.float(), sign, offset, shift)
        dim, per_byte = self.layout.order[-1], 8 // self.bits  # dim: innermost in memory
        if per_byte > 1 and x.shape[dim] % per_byte == 0:
            # One code of every byte at a time, each from a strided view of x (see pack_slices).
            def part(t: torch.Tensor, j: int) -> torch.Tensor:
                return t[(slice(None),) * dim + (slice(j, None, per_byte),)]

            slices = [self._code(part(x, j), part(y, j),
                                 *(_channel_view(v[j::per_byte] if dim == 1 else v, nd) for v in per_channel))
                      for j in range(per_byte)]
            packed = pack_slices([c.permute(self.layout.order).reshape(-1) for c in slices], self.bits)
        else:
            code = self._code(x, y, *(_channel_view(v, nd) for v in per_channel))
            packed = pack_codes(self.layout.flatten(code), self.bits)
        # x' = a * code + b, from xhat' = sign * (u' - offset) and x' = xhat' / invstd + mean
        a = sign * width / invstd.float()
        b = mean.float() + sign * ((0.5 - shift) * width - offset) / invstd.float()
        return packed, a, b, shift, g_abs * width

    def _code(self, x, y, mean, invstd, sign, offset, shift) -> torch.Tensor:
        """The uint8 code of ``x`` (BN output ``y``), per-channel parameters broadcast to it."""
        xhat = (x.float() - mean) * invstd
        u = sign * xhat + offset
        code = (torch.ceil(u / self.width) - 1 + shift).clamp(0, self.bins - 1)
        code = torch.where(y > 0, torch.maximum(code, shift), torch.minimum(code, shift - 1))
        return code.to(torch.uint8)

    def _codes(self, packed: torch.Tensor) -> torch.Tensor:
        return self.layout.unflatten(unpack_codes(packed, self.bits, self.layout.numel)).float()

    def decode(self, packed, a, b, shift, gw) -> torch.Tensor:
        nd = len(self.layout.shape)
        x = self._codes(packed) * _channel_view(a, nd) + _channel_view(b, nd)
        return x.to(self.layout.dtype)

    def nbytes(self) -> int:
        channels = self.layout.shape[1]
        return -(-self.layout.numel * self.bits // 8) + 4 * 4 * channels


@dataclasses.dataclass(frozen=True)
class BLPARelu:
    """The ReLU of the BN output, decoded from the BN input's :class:`BLPA` code.

    A derived decoder: it stores nothing of its own, its ``decode`` takes the
    parts the :class:`BLPA` code of the BN input saved.
    """

    base: BLPA
    dtype: torch.dtype

    predicate = Predicate("le", (0.0,))  # the ReLU's mask: code < shift

    @property
    def name(self) -> str:
        return f"{self.base.name}:relu"

    def decode_predicate(self, packed, a, b, shift, gw) -> torch.Tensor:
        code = self.base._codes(packed)
        return predicate_values(self.predicate, code < _channel_view(shift, code.dim()), self.dtype)

    def decode(self, packed, a, b, shift, gw) -> torch.Tensor:
        nd = len(self.base.layout.shape)
        code = self.base._codes(packed)
        s = _channel_view(shift, nd)
        y = ((code - s + 0.5) * _channel_view(gw, nd)).to(self.dtype)
        # a channel with gamma ~ 0 has a bin width below the dtype's subnormals (fp16's): its
        # positive values stay positive, so the ReLU's mask is the code's, as decode_predicate's
        smallest = torch.finfo(self.dtype).tiny * torch.finfo(self.dtype).eps
        return torch.where(code >= s, y.clamp_min(smallest), torch.zeros_like(y))


@dataclasses.dataclass(frozen=True)
class BLPAMask:
    """The ReLU's mask ``y <= 0`` of the BN output, decoded from the BN input's :class:`BLPA` code.

    Under Inductor the backward recomputes a ReLU's mask from the BN input, and
    :func:`~fxcompress.passes.predicates.save_predicates` saves it from the forward
    (1 bit per element): the code has it already, ``code < shift``. A derived decoder.
    """

    base: BLPA
    layout: Layout  # the mask's: its strides may differ from the code's (a channels-last BN input)

    @property
    def name(self) -> str:
        return f"{self.base.name}:mask"

    def decode(self, packed, a, b, shift, gw) -> torch.Tensor:
        code = self.base._codes(packed)
        mask = code < _channel_view(shift, code.dim())
        return self.layout.unflatten(self.layout.flatten(mask))  # NB: a view where the layouts agree
