"""Lossy codecs: per-group affine integers (int8/int4/int2) and fp8 with a per-group scale.

Groups are ``group`` consecutive elements in memory order (channels-last
stays channels-last, no reshape copy). Every group stores its own range, so
one outlier costs precision only in its group. A group's ``b``-bit codes are
packed ``8 / b`` to a byte, byte ``i`` holding elements ``i``, ``i + G*b/8``,
``i + 2*G*b/8``, ... of the group (in the low bits first): each place in
the bytes covers a contiguous part of the group (:func:`_groups` says why).

``GroupAffine(bits=b)``, per group of G elements with minimum ``lo`` and
``scale = (max - lo) / (2**b - 1)``::

    code = clamp(floor((x - lo) / scale + u), 0, 2**b - 1)     u = 1/2, or U[0, 1) stochastic
    x'   = lo + code * scale

Deterministic rounding errs by at most ``scale / 2`` per element; stochastic
rounding by less than ``scale`` and is unbiased (``E[x'] = x``). The
stochastic ``u`` takes one uniform draw ``r`` per group, spread over the
group's elements by the golden-ratio (Weyl) sequence ``u_i = frac(r + i*phi)``:
each ``u_i`` is uniform on [0, 1) by itself, so every element is rounded
without bias, and the group's ``u_i`` are evenly spread (stratified), so the
errors of nearby equal values cancel instead of adding up; and it costs a
multiply-add per element where a per-element draw runs a random generator. With
``g = ceil(n / G)`` groups, bytes: ``g * G * b / 8`` for the codes plus
``8 * g`` (``lo`` and ``scale`` in fp32).

``GroupFP8``: ``x' = fp8(x / s) * s`` with ``s = amax|x| / fp8_max`` per group;
error at most half an fp8 ulp of each element (2**-4 relative for e4m3,
2**-3 for e5m2) plus half the smallest subnormal step times ``s``. Bytes:
``g * G`` plus ``4 * g``.

A tensor also read through a predicate (ReLU's ``x <= 0`` in
``threshold_backward``) keeps it exactly: :class:`MaskedLossy` stores the
packed 1-bit mask beside the codes; with rounding to nearest and a one-sided
predicate, :class:`SplitAffine` keeps it in the codes themselves, at 2 bytes
per group instead of a bit per element (and one pass over the tensor fewer).
Stochastic rounding keeps the mask there: the split's forced codes are biased.
The output of a clamp (ReLU: ``x <= 0`` only where ``x == 0``) needs neither:
:class:`ClampedAffine` reserves code 0 for the clamp value and spreads the
other codes over the group's values above it, unbiased, at no extra bytes.

A group holding NaN or ±inf decodes to NaN as a whole: non-finite
activations reach the backward as non-finite (AMP's GradScaler sees them),
never as finite garbage.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import InternalError
from .base import Codec, Layout, pack_bits, pack_slices, predicate_values, unpack_bits, unpack_slices
from .uses import Predicate

__all__ = ["ClampedAffine", "GroupAffine", "GroupFP8", "MaskedLossy", "Normalized", "SplitAffine", "FP8_FORMATS"]

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# NB: scales never go below fp32's smallest normal number: 1/scale stays finite, and GPUs that
# flush denormals to zero cannot turn a scale into 0 (found by tests/test_codec_properties.py).
_MIN_SCALE = torch.finfo(torch.float32).tiny


def _groups(layout: Layout, x: torch.Tensor, group: int, dtype: torch.dtype | None = torch.float32,
            per_byte: int = 1) -> torch.Tensor:
    """``x`` in memory order as ``(n_groups, group // per_byte, per_byte)`` in ``dtype`` (``None``: its
    own), the last group padded by repetition. ``per_byte`` is how many codes share a byte.

    ``[k, b, j]`` is element ``j * (group // per_byte) + b`` of group ``k``: byte ``b`` of a group
    holds the codes of elements ``b``, ``b + group / per_byte``, ... (int4: ``b`` and ``b + G/2``),
    so each place in a byte (:func:`_slices`) reads a contiguous run of the group. Inductor then
    sees the group's reduction read with stride 1 (an inner reduction: one pass, vector loads;
    neighbouring elements in one byte made every read strided, and an int4 group two passes),
    and decoders read runs of consecutive bytes.
    """
    flat = layout.flatten(x)
    n = flat.numel()
    if n % group:
        flat = torch.cat([flat, flat[-1:].expand(group - n % group)])
    g = flat.view(-1, per_byte, group // per_byte).transpose(1, 2)
    return g if dtype is None else g.to(dtype)


def _n_groups(layout: Layout, group: int) -> int:
    """How many groups of ``group`` elements hold ``layout``'s tensor (the last one padded)."""
    return -(-layout.numel // group)


def _group_min(g: torch.Tensor) -> torch.Tensor:
    """Per-group minimum of :func:`_groups`' groups, as ``(n_groups, 1, 1)``.

    NB: over a byte's codes first, then over the bytes: the reduction then runs
    over the packed bytes' index, the same loop as the quantize-and-pack that
    reads its result (:func:`_slices`), and Inductor makes the encoder one
    kernel that reads ``x`` once (over all ``G`` elements at once, the pack's
    loop would differ and the encoder would read ``x`` twice, in two or three kernels).
    Each of a byte's codes comes from its own contiguous run of the group (:func:`_groups`).
    """
    return g.amin(-1).amin(-1, keepdim=True).unsqueeze(-1)


def _group_max(g: torch.Tensor) -> torch.Tensor:
    """Per-group maximum, as :func:`_group_min`."""
    return g.amax(-1).amax(-1, keepdim=True).unsqueeze(-1)


def _slices(g: torch.Tensor) -> list[torch.Tensor]:
    """:func:`_groups`' groups one code of each byte at a time: ``g[..., j:j+1]``, the ``j``-th code of every byte.

    An encoder computes each code slice apart and packs them with
    :func:`pack_slices`, so that all its ops run over the bytes' index.
    """
    return [g[..., j:j + 1] for j in range(g.shape[-1])]


def _ungroup(layout: Layout, groups: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_groups`: ``(n_groups, group // per_byte, per_byte)`` back to ``layout``."""
    return _unflatten(layout, groups.transpose(1, 2).reshape(-1))


def _unplace(layout: Layout, places: torch.Tensor) -> torch.Tensor:
    """Decoded codes in the order :meth:`GroupAffine._unpack` gives them, ``(n_groups, per_byte,
    group // per_byte)``, back to ``layout``: that order is the elements' (``[k, j, b]`` is element
    ``j * (group // per_byte) + b`` of group ``k``), so a reshape, with no view that undoes another."""
    return _unflatten(layout, places.reshape(-1))


def _unflatten(layout: Layout, flat: torch.Tensor) -> torch.Tensor:
    """Memory-order elements, the last group's padding included, as ``layout``."""
    if flat.numel() != layout.numel:
        flat = flat[: layout.numel]
    return layout.unflatten(flat.to(layout.dtype))


def _poison_nonfinite(param: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``param`` per group, NaN where the group holds a NaN or an inf.

    ``scale`` is the group's: made from its min and max (or max-abs), which propagate NaN and
    reach ±inf whenever the group holds one, it is NaN or ±inf exactly then. NB: ``param +
    scale * 0``, two ops where isfinite tests on both extremes take a dozen; no code generator
    folds ``* 0`` away (Inductor keeps NaN semantics: Triton without fast-math, C++ with
    ``-fno-finite-math-only``), and ``tests/test_quant.py`` checks it compiled.
    """
    return param + scale * 0.0


_PHI = (math.sqrt(5) - 1) / 2  # frac of the golden ratio: i * phi mod 1 spreads evenly over [0, 1)


def _dither(g: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    """Stochastic rounding's ``u`` for :func:`_groups`' groups, per code slice (:func:`_slices`):
    ``frac(r + i * phi)``, ``r`` the group's draw (:meth:`GroupAffine._draw`), ``i`` the element's place in its group."""
    n_groups, n_bytes, per_byte = g.shape
    dither = []
    for j in range(per_byte):  # NB: slice j holds the group's elements j * n_bytes ... (j + 1) * n_bytes - 1
        # NB: per slice, never a tensor with one element per code (see _group_min)
        i = torch.arange(j * n_bytes, (j + 1) * n_bytes, device=g.device, dtype=torch.float32).view(1, -1, 1)
        u = r + i * _PHI
        dither.append(u - u.floor())  # NB: exact in fp32 (Sterbenz), so u < 1
    return dither


@dataclasses.dataclass(frozen=True)
class GroupAffine(Codec):
    layout: Layout
    bits: int
    group: int
    stochastic: bool
    kernel: bool = False  # encode through one fxcompress.affine_encode kernel (codecs/kernels.py), not aten ops

    lossless = False

    @property
    def name(self) -> str:
        return f"int{self.bits}" + ("" if self.stochastic else "/det") + ("/triton" if self.kernel else "")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kernel:
            return _kernel_encode(self, x, None)
        return self._encode(x, self._draw(x))

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The aten code of :meth:`encode`, with the dither's draws ``r`` (``None`` when rounding to nearest)."""
        g = _groups(self.layout, x, self.group, per_byte=self.per_byte)
        lo, hi, scale, codes = self._codes(g, r)
        return self._pack(codes), _poison_nonfinite(lo, scale), scale

    def _draw(self, x: torch.Tensor) -> torch.Tensor | None:
        """Stochastic rounding's one uniform draw per group, as ``(n_groups, 1, 1)``; ``None`` when rounding to nearest."""
        if not self.stochastic:
            return None
        return torch.rand(_n_groups(self.layout, self.group), 1, 1, dtype=torch.float32, device=x.device)

    def decode(self, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _unplace(self.layout, self._values(self._unpack(packed, lo), lo, scale))

    def _codes(self, g: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Per group ``lo``, ``hi``, ``scale``, and the codes of ``g`` as float, before clamping, per code slice."""
        lo, hi = _group_min(g), _group_max(g)
        scale = self._scale(lo, hi)
        return lo, hi, scale, self._round(g, lo, scale, r)

    def _round(self, g: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, r: torch.Tensor | None) -> list[torch.Tensor]:
        """``floor((x - lo) / scale + u)`` per code slice of ``g`` (:func:`_slices`): float codes, before clamping."""
        grid = self._grid_of(lo, scale)  # NB: once per encoder, not once per code slice
        return [(self._steps(x, grid) + u).floor() for x, u in zip(_slices(g), self._rounding(g, r))]

    @staticmethod
    def _grid_of(lo: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`_steps` takes of a grid: ``lo / 2`` and ``2 / scale``."""
        return lo * 0.5, 2.0 / scale

    @staticmethod
    def _steps(x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``(x - lo) / scale`` on a :meth:`_grid_of`. NB: in halves, so that ``x - lo`` cannot overflow
        for huge values of both signs."""
        lo_half, per_step = grid
        return (x * 0.5 - lo_half) * per_step

    def _pack(self, codes: list[torch.Tensor], clamp: bool = True) -> torch.Tensor:
        """Float code slices to packed bytes; ``clamp=False`` for codes already within ``[0, levels]``."""
        return pack_slices([(c.clamp(0, self.levels) if clamp else c).to(torch.uint8) for c in codes], self.bits)

    def _unpack(self, packed: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """The codes as ``(n_groups, per_byte, group // per_byte)``, ``[k, j, b]`` the code at bit
        offset ``bits * j`` of group ``k``'s byte ``b``: the elements' order (:func:`_unplace`).

        NB: not seen through :func:`_groups`' transpose, which :func:`_ungroup` would undo: each
        view is a reindexing that Inductor composes and simplifies again in every kernel a
        decoder is inlined into (most are, in the backward).
        """
        return unpack_slices(packed.view(lo.numel(), self.group // self.per_byte), self.bits)

    @staticmethod
    def _values(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (codes.float() * (scale * 0.5) + lo * 0.5) * 2.0

    def _scale(self, lo: torch.Tensor, hi: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """``(hi - lo) / steps`` (``levels`` steps unless told), at least ``_MIN_SCALE``."""
        half_range = hi * 0.5 - lo * 0.5
        return (half_range * (2.0 / (steps or self.levels))).clamp_min(_MIN_SCALE)

    def _rounding(self, g: torch.Tensor, r: torch.Tensor | None) -> list[torch.Tensor] | list[float]:
        """The ``u`` added before ``floor``, per code slice: the dither of the draws ``r``, or 1/2 for rounding to nearest."""
        return _dither(g, r) if r is not None else [0.5] * g.shape[-1]

    def _bound(self, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """One step (stochastic) or half a step (nearest) of ``scale``, plus fp32 rounding in the code arithmetic."""
        eps = torch.finfo(torch.float32).eps
        return (scale if self.stochastic else scale / 2) * (1 + 4 * self.levels * eps) + g.abs() * (4 * eps)

    def nbytes(self) -> int:
        g = _n_groups(self.layout, self.group)
        return g * self.group * self.bits // 8 + 8 * g

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|x' - x|`` (before the cast back to ``x``'s dtype): one step
        (stochastic) or half a step (nearest), plus fp32 rounding in the code arithmetic."""
        g = _groups(self.layout, x, self.group, per_byte=self.per_byte)
        scale = self._scale(_group_min(g), _group_max(g))
        return _ungroup(dataclasses.replace(self.layout, dtype=torch.float32), self._bound(scale, g))


def _kernel_encode(codec: GroupAffine, x: torch.Tensor, clamp: float | None, *norm) -> tuple[torch.Tensor, ...]:
    """``codec``'s encoding (``clamp``: :class:`ClampedAffine`'s ``c``) as one ``fxcompress.affine_encode`` node;
    ``norm``: ``mean, rstd, shift, index`` of :class:`Normalized` (``kernels.Norm``)."""
    from . import kernels  # NB: here, not at the top: kernels imports this module

    # NB: stream 0 and a seed of its own; the rewrite gives a graph's encoders one seed and streams apart
    seed = kernels.new_seed(x.device) if codec.stochastic else None
    return torch.ops.fxcompress.affine_encode(codec.layout.flatten(x), seed, 0, codec.bits, codec.group, clamp, *norm)


@dataclasses.dataclass(frozen=True)
class GroupFP8(Codec):
    layout: Layout
    fmt: str
    group: int

    lossless = False

    @property
    def name(self) -> str:
        return f"fp8[{self.fmt}]"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = FP8_FORMATS[self.fmt]
        g = _groups(self.layout, x, self.group)
        amax = _group_max(g.abs())
        scale = self._scale(amax)
        return (g * (1.0 / scale)).to(dtype), _poison_nonfinite(scale, scale)

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _ungroup(self.layout, q.float() * scale)

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        return (amax / torch.finfo(FP8_FORMATS[self.fmt]).max).clamp_min(_MIN_SCALE)

    def nbytes(self) -> int:
        g = _n_groups(self.layout, self.group)
        return g * self.group + 4 * g

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound: half an fp8 ulp of ``x / s`` (relative) plus the subnormal step, times ``s``."""
        info = torch.finfo(FP8_FORMATS[self.fmt])
        g = _groups(self.layout, x, self.group)
        scale = self._scale(_group_max(g.abs()))
        bound = g.abs() * (info.eps / 2) + scale * (info.smallest_normal * info.eps / 2)
        return _ungroup(dataclasses.replace(self.layout, dtype=torch.float32), bound)


@dataclasses.dataclass(frozen=True)
class Normalized(Codec):
    """A per-group code of a normalization's input taken in the normalized space.

    A layer- or batch-norm backward reads its input ``x`` as ``xhat = (x - mean) * rstd``:
    an error ``e`` in ``x`` reaches it as ``e * rstd``. A group's range, and so its step, is
    set by the group's largest values, and a group spans several rows of a layer-norm (tokens)
    or several channels of a channels-last batch-norm: a row of small spread beside rows of
    large spread (a vision transformer's zero-initialized class token) had its ``xhat`` wrong
    by many times its own size. So ``encode(x, mean, rstd)`` codes ``xhat`` with ``inner``
    (every row or channel on one scale: its steps are fractions of a standard deviation), and
    ``decode`` gives ``x' = xhat' / rstd + mean``, with the norm's own statistics (saved
    beside the codes in fp32). ``stat_shape``: the shape that broadcasts them to ``x``.

    ``shift_shape``: the saved tensor is an operand ``s`` of the norm's input ``x = s + p``, ``p``
    of that shape broadcasting to ``x`` (Inductor's min-cut saves a ViT's tokens before the
    position embedding is added, and recomputes the sum): ``encode(s, mean, rstd, p)`` codes
    ``(s + p - mean) * rstd`` and ``decode`` subtracts a copy of ``p`` again.

    ``repeat``: a group-norm's statistics, ``(N, G)``, each cover ``repeat = C / G`` channels; they
    are stored repeated, as ``stat_shape`` ``(N, C, 1, ...)``.

    Bytes: ``inner``'s, plus 8 per statistic (of ``stat_shape``), plus ``p``'s.
    """

    inner: GroupAffine | GroupFP8  # over xhat, in fp32, in x's layout
    dtype: torch.dtype  # x's
    stat_shape: tuple[int, ...]
    shift_shape: tuple[int, ...] | None = None
    shift_dtype: torch.dtype = torch.float32
    repeat: int = 1

    lossless = False

    @property
    def name(self) -> str:
        return f"{self.inner.name}/normalized"

    @property
    def layout(self) -> Layout:
        return dataclasses.replace(self.inner.layout, dtype=self.dtype)

    def encode(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               *shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, rstd = self._stats(mean), self._stats(rstd)
        if isinstance(self.inner, GroupAffine) and self.inner.kernel:  # NB: the kernel normalizes as it loads
            index = self.kernel_index()
            p = shift[0].reshape(-1) if shift else None
            codes = _kernel_encode(self.inner, x, None, mean.reshape(-1), rstd.reshape(-1), p, list(index))
        else:
            codes = self.inner.encode((self._shifted(x, shift) - mean) * rstd)
        # NB: copies: a view of the graph's own statistics would share their storage where the
        # backward saves them too, and not where it does not; the report counts them, so they are stored
        return (*codes, mean.clone(), rstd.clone(), *(p.clone() for p in shift))

    def kernel_index(self) -> tuple[int, int, int, int] | None:
        """``(stat_div, stat_mod, shift_div, shift_mod)`` of ``kernels.Norm`` for this layout, or ``None``
        where the statistics (or the shift) do not follow ``x``'s memory order (aten encoders then)."""
        from .kernels import memory_index

        stat = memory_index(self.inner.layout, self.stat_shape)
        shift = (1, 1) if self.shift_shape is None else memory_index(self.inner.layout, self.shift_shape)
        return None if stat is None or shift is None else (*stat, *shift)

    def decode(self, *parts: torch.Tensor) -> torch.Tensor:
        shift = parts[-1:] if self.shift_shape is not None else ()
        *codes, mean, rstd = parts[:len(parts) - len(shift)]
        x = self.inner.decode(*codes) / rstd + mean
        return (x - shift[0].float() if shift else x).to(self.dtype)

    def decode_centered(self, *parts: torch.Tensor) -> torch.Tensor:
        """``x' - mean`` in :attr:`centered_dtype`, as ``xhat' / rstd``: what a decomposed norm backward reads of ``x``
        (its first op subtracts the mean). Fewer reads than :meth:`decode` and a subtraction: Inductor
        recomputes it inside the backward's kernels, where it wrote out the decoded ``x - mean``, a
        full fp32 tensor per norm (ResNet-50's layer-2 backward held two). None with a shift: the
        backward centers ``s + p``, not the saved ``s``."""
        if self.shift_shape is not None:
            raise InternalError(f"{self.name}: a shifted operand has no centered decode")
        *codes, _, rstd = parts
        return (self.inner.decode(*codes) / rstd).to(self.centered_dtype)

    @property
    def centered_dtype(self) -> torch.dtype:
        """The dtype a norm subtracts its mean in: fp32, or ``x``'s where that is wider."""
        return torch.promote_types(self.dtype, torch.float32)

    def _stats(self, t: torch.Tensor) -> torch.Tensor:
        """A statistic in fp32 as ``stat_shape`` (a group-norm's repeated over its channels)."""
        t = t.float()
        if self.repeat > 1:
            t = t.reshape(self.stat_shape[0], -1, 1).expand(-1, -1, self.repeat)
        return t.reshape(self.stat_shape)

    def _shifted(self, x: torch.Tensor, shift: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(shift) != (self.shift_shape is not None):
            raise InternalError(f"{self.name}: {len(shift)} shift tensors for shift_shape={self.shift_shape}")
        return x.float() + shift[0].float() if shift else x.float()

    def nbytes(self) -> int:
        shift = 0 if self.shift_shape is None else math.prod(self.shift_shape) * self.shift_dtype.itemsize
        return self.inner.nbytes() + 8 * math.prod(self.stat_shape) + shift

    def max_error(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, *shift: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|x' - x|``: ``inner``'s bound on ``xhat``, over ``rstd``, plus fp32 rounding."""
        mean, rstd = self._stats(mean), self._stats(rstd)
        xs = self._shifted(x, shift)
        eps = torch.finfo(torch.float32).eps
        rounding = (xs.abs() + mean.abs() + sum(p.float().abs() * 2 for p in shift) + x.float().abs()) * (4 * eps)
        return self.inner.max_error((xs - mean) * rstd) / rstd * (1 + 4 * eps) + rounding


@dataclasses.dataclass(frozen=True)
class MaskedLossy(Codec):
    """A lossy codec plus the exact 1-bit predicate its predicate readers need.

    A ReLU output read by the next convolution (values) and by
    ``threshold_backward`` (``x <= 0``): the values are quantized, and where
    the quantized value lands on the wrong side of the threshold it is moved
    to the nearest value on the right side, so the mask is exact and the
    error stays within the quantizer's bound ``B``. For a two-sided predicate
    (hardtanh's ``outside(lo, hi)``) the bit does not say which side, and the
    nearer edge may be the wrong one: the bound is then ``2 B``.

    ``inner`` may take more forward inputs than ``x`` (:class:`Normalized`: a ReLU output
    that a batch-norm reads too, RepVGG's identity branch); ``encode`` and ``max_error``
    pass them on, and the predicate is ``x``'s own.
    """

    inner: Codec
    predicate: Predicate
    near: tuple[float, float]  # Predicate.near_values(dtype), fixed at plan time

    lossless = False

    @property
    def name(self) -> str:
        return f"{self.inner.name}+mask[{self.predicate}]"

    def encode(self, x: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lay = self.inner.layout
        return (*self.inner.encode(x, *extra), pack_bits(self.predicate(lay.flatten(x))))

    def decode(self, *parts: torch.Tensor) -> torch.Tensor:
        q = self.inner.decode(*parts[:-1])
        return self.predicate.restore(q, self._exact(parts[-1]), self.near)

    def decode_predicate(self, *parts: torch.Tensor) -> torch.Tensor:
        return predicate_values(self.predicate, self._exact(parts[-1]), self.inner.layout.dtype, self.near)

    def _exact(self, packed: torch.Tensor) -> torch.Tensor:
        """The stored 1-bit mask: the predicate's exact truth, in the layout."""
        lay = self.inner.layout
        return lay.unflatten(unpack_bits(packed, lay.numel))

    def max_error(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return self.inner.max_error(x, *extra) * (2 if self.predicate.two_sided else 1)


_LOW_SIDE = {"le": True, "lt": True, "ge": False, "gt": False}


@dataclasses.dataclass(frozen=True)
class SplitAffine(Codec):
    """Per-group affine codes that keep a one-sided predicate ``x <= c`` (``<``, ``>=``, ``>``) exact, mask-free.

    Each group also stores ``split``, the last code whose grid value lies at
    or below ``c``: ``floor((c - lo) / scale)``, kept within ``[-1, levels - 1]``.
    Elements on the predicate's low side (``x <= c`` for ``le``) are given
    codes at most ``split``, the others codes above it, so the decoder reads
    the predicate from ``code <= split`` and moves a decoded value that
    rounding put on the wrong side of ``c`` to the nearest value on the right
    one (as :class:`MaskedLossy` does). A code clamped to its side moves less
    than one step from the unclamped one, and the true value lies between
    them, so the error stays below one step (``scale``) with either rounding
    (nearest rounding's half step holds for the unclamped codes only). With
    stochastic rounding the clamped codes are biased (every value within a
    step above ``c`` decodes a step above it), so the policy picks this codec
    for rounding to nearest only. Bytes: the inner codec's plus 2 per group
    (``split`` as int16), where a mask costs ``G / 8``.
    """

    inner: GroupAffine
    predicate: Predicate
    near: tuple[float, float]  # Predicate.near_values(dtype), fixed at plan time

    lossless = False

    def __post_init__(self) -> None:
        if self.predicate.kind not in _LOW_SIDE:
            raise ValueError(f"SplitAffine needs a one-sided predicate, not {self.predicate}")

    @property
    def name(self) -> str:
        return f"{self.inner.name}+split[{self.predicate}]"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inner = self.inner
        # NB: in x's own dtype, so that the predicate is read as the op reads it
        raw = _groups(inner.layout, x, inner.group, dtype=None, per_byte=inner.per_byte)
        lo, hi, scale, codes = inner._codes(raw.float(), inner._draw(x))
        split = inner._steps(torch.full_like(lo, self.predicate.consts[0]), inner._grid_of(lo, scale)).floor()
        split = split.clamp(-1, inner.levels - 1)
        codes = [torch.where(self._swap(self.predicate(r)), torch.minimum(c, split), torch.maximum(c, split + 1))
                 for r, c in zip(_slices(raw), codes)]
        # A non-finite group decodes to NaN (``lo``); its split makes every element the
        # predicate's false side, so the restore keeps the NaN instead of a finite edge value.
        nan_split = torch.full_like(split, -1 if _LOW_SIDE[self.predicate.kind] else inner.levels)
        lo = _poison_nonfinite(lo, scale)
        split = torch.where(lo == lo, split, nan_split)
        return inner._pack(codes), lo, scale, split.to(torch.int16)

    def decode(self, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        codes = inner._unpack(packed, lo)
        want = self._truth(codes, split)
        q = inner._values(codes, lo, scale).to(inner.layout.dtype)
        return _unplace(inner.layout, self.predicate.restore(q, want, self.near))  # NB: one view chain, at the end

    def decode_predicate(self, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                         split: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        want = self._truth(inner._unpack(packed, lo), split)
        return _unplace(inner.layout, predicate_values(self.predicate, want, inner.layout.dtype, self.near))

    def _truth(self, codes: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        """The predicate's truth, read off the codes: at or below the group's split on its low side."""
        return self._swap(codes.to(torch.int16) <= split)

    def _swap(self, side: torch.Tensor) -> torch.Tensor:
        """The predicate's truth to "on the low side of ``c``", and back: flipped for ``ge``/``gt``."""
        return side if _LOW_SIDE[self.predicate.kind] else torch.logical_not(side)

    def nbytes(self) -> int:
        return self.inner.nbytes() + 2 * _n_groups(self.inner.layout, self.inner.group)

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """One step of the inner grid for both roundings, plus its fp32 slack."""
        return dataclasses.replace(self.inner, stochastic=True).max_error(x)


@dataclasses.dataclass(frozen=True)
class ClampedAffine(Codec):
    """Per-group affine codes for the output of a clamp at ``c`` (ReLU: ``c = 0``), read as values and as ``x <= c``.

    Such a tensor is ``c`` exactly wherever ``x <= c`` holds. Code 0 is
    reserved for ``c``; codes ``1..L`` (``L = 2**b - 1``) are an affine grid
    over the group's values above ``c``, from their minimum ``lo`` to the
    maximum ``hi``, ``L - 1`` steps::

        code = 0                                              where x <= c
        code = 1 + clamp(floor((x - lo) / scale + u), 0, L - 1) elsewhere,  scale = (hi - lo) / (L - 1)
        x'   = c if code == 0 else lo + (code - 1) * scale

    The predicate is exact (``code == 0``), no element ever rounds across
    ``c`` (every grid value is at least ``lo > c``), so stochastic rounding
    stays unbiased, as with :class:`MaskedLossy`, but with no mask: bytes
    are the inner codec's. The price is one level of the grid (the step is
    ``L / (L - 1)`` times the plain codec's over the same range; 1.5x at
    int2, 1.07x at int4). Bound: the inner codec's for ``x > c``; ``|x - c|``
    for ``x <= c``, which is 0 on a clamp's output (the only tensors the
    policy gives this codec).
    """

    inner: GroupAffine
    predicate: Predicate  # le(c)
    near: tuple[float, float]  # Predicate.near_values(dtype), fixed at plan time

    lossless = False

    def __post_init__(self) -> None:
        if self.predicate.kind != "le" or self.inner.levels < 2:
            raise ValueError(f"ClampedAffine keeps le(c) with 2 or more bits, not {self.predicate} at {self.inner.bits}")

    @property
    def name(self) -> str:
        return f"{self.inner.name}+clamped[{self.predicate}]"

    @property
    def steps(self) -> int:
        return self.inner.levels - 1

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.inner.kernel:
            return _kernel_encode(self.inner, x, self.predicate.consts[0])
        return self._encode(x, self.inner._draw(x))

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The aten code of :meth:`encode`, with the dither's draws ``r`` (``None`` when rounding to nearest)."""
        inner = self.inner
        # NB: in x's own dtype, so that the predicate is read as the op reads it
        raw = _groups(inner.layout, x, inner.group, dtype=None, per_byte=inner.per_byte)
        g, clamped = raw.float(), self.predicate(raw)
        lo, hi, scale = self._grid(g, clamped)
        codes = inner._round(g, lo, scale, r)
        # A non-finite group decodes to NaN (``lo``) as a whole: no element gets code 0 (NaN codes would).
        # NB: "finite" read off the NaN of the stored ``lo``: two ops per element where four isfinite tests are a dozen.
        lo = _poison_nonfinite(lo, scale)
        codes = [torch.where(lo == lo, torch.where(c_is, 0.0, c.clamp(0, self.steps) + 1), 1.0)
                 for c, c_is in zip(codes, _slices(clamped))]
        return inner._pack(codes, clamp=False), lo, scale

    def decode(self, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        codes = inner._unpack(packed, lo)
        clamped = codes == 0
        values = inner._values(codes.float() - 1, lo, scale)
        c = torch.scalar_tensor(self.predicate.consts[0], dtype=values.dtype, device=values.device)
        q = torch.where(clamped, c, values).to(inner.layout.dtype)
        # NB: a grid value rounds to c only below fp32's normal range (``lo * 0.5`` underflowing);
        # the restore keeps the predicate exact there too, fused into the same pass. Elementwise,
        # so in the codes' order, and the values and the mask reach the layout through one view chain.
        return _unplace(inner.layout, self.predicate.restore(q, clamped, self.near))

    def decode_predicate(self, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        clamped = inner._unpack(packed, lo) == 0
        return _unplace(inner.layout, predicate_values(self.predicate, clamped, inner.layout.dtype, self.near))

    def _grid(self, g: torch.Tensor, clamped: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per group ``lo`` (least value above ``c``), ``hi`` and ``scale``; a group of ``c`` alone gets ``lo = hi``."""
        hi = _group_max(g)
        lo = _group_min(torch.where(clamped, torch.full_like(g, math.inf), g))
        lo = torch.minimum(lo, hi)
        return lo, hi, self.inner._scale(lo, hi, self.steps)

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        raw = _groups(inner.layout, x, inner.group, dtype=None, per_byte=inner.per_byte)
        g, clamped = raw.float(), self.predicate(raw)
        _, _, scale = self._grid(g, clamped)
        bound = torch.where(clamped, (g - self.predicate.consts[0]).abs(), inner._bound(scale, g))
        return _ungroup(dataclasses.replace(inner.layout, dtype=torch.float32), bound)
