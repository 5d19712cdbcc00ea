"""One-kernel encoders for the per-group integer codecs: ``torch.ops.fxcompress.affine_encode``.

With ``CompressConfig(encoders="triton")``, :class:`~fxcompress.codecs.quant.GroupAffine`
and :class:`~fxcompress.codecs.quant.ClampedAffine` encode through this op
instead of aten ops. It computes exactly what their aten code computes (the
same groups, ranges, dither, codes and packing; ``tests/test_kernels.py``
checks the Triton kernel bit for bit against the aten code, in Triton's
interpreter on the CPU, and ``tests/test_gpu.py`` on CUDA, where it is
compiled without fused multiply-adds and with a correctly rounded division,
as the aten ops compute, one kernel each; a group holding NaN or inf has
codes of no meaning on either path, and decodes to NaN) in one pass over the input:

    before (aten ops, ~50 nodes per encoder)       after (one node; one seed per graph)
      g = x.view(-1, 2, 128).transpose(1, 2)        packed, lo, scale = fxcompress.affine_encode(
      lo = g.amin(-1).amin(-1); hi = ...                 x.view(-1), seed, stream=7, bits=4, group=256)
      u = frac(rand(n_groups) + i * phi)
      codes = floor((g/2 - lo/2) * (2/scale) + u)
      packed = codes[..., 0] | codes[..., 1] << 4

Why: most saved tensors are made by kernels no encoder can fuse into
(cuDNN's convolutions, cuBLAS's matrix products), so their encoders run
alone, and Inductor generates them as looped reductions that ran far below
the GPU's bandwidth (``bench/results/traffic_h200.json``: 1,120 GB/s on an
H200, where the model's own kernels reach 2,200-3,400), each lowered and
code-generated apart (a profile of the CPU Triton proxy put most of int4's
extra compile time in Inductor's handling of codec code). Here each program
loads a block of whole groups once, keeps them in registers, and writes the
packed bytes and the groups' ranges. Whether that is faster on a GPU is for
``bench/encoders.py`` (variants ``triton`` and ``fxcompress``) to say.

:class:`SplitAffine` (rounding to nearest with a one-sided predicate) and
:class:`GroupFP8` keep their aten encoders. A norm's input
(:class:`~fxcompress.codecs.quant.Normalized`) is coded by the same kernel,
which reads the norm's statistics (:class:`Norm`) and normalizes each element
as it loads it.

On CUDA tensors the op launches the Triton kernel; elsewhere it runs the
codec's aten code (the reference), so a graph with the op runs on any
device.

Stochastic rounding's draws (one uniform number per group, which the aten
code draws with ``rand``) are made inside the kernel: group ``g``'s is the
first word of Philox-4x32-10 (Salmon et al., "Parallel random numbers: as
easy as 1, 2, 3", SC 2011) at counter ``(g, stream, 0, 0)`` under the key
``seed``, its top 24 bits as a float in ``[0, 1)``. ``seed`` is one int64
tensor drawn from PyTorch's generator in the graph (``aten.randint``; seeded
by ``torch.manual_seed``, so steps are reproducible) and shared by every
encoder of the graph (:func:`share_seed`), ``stream`` a number of the
encoder's own, so no two groups of a step share a counter. A graph of N
encoders then runs no kernel of draws (it ran N: ``rand`` cannot fuse into
an extern kernel) and no draws are written or read. :func:`draws` computes
the same numbers with aten ops, for the reference.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Optional

import torch
import torch.fx as fx

from ..errors import UnsupportedError
from .base import Layout
from .quant import _MIN_SCALE, _PHI, ClampedAffine, GroupAffine
from .uses import Predicate

__all__ = ["affine_encode", "draws", "new_seed", "share_seed", "triton_available", "require_triton", "encode_kernel",
           "launch_encode"]

_ELEMENTS_PER_PROGRAM = 4096  # a block of whole groups: 8 KiB of bf16 per program
_NO_FMA = {"enable_fp_fusion": False}  # a Triton launch option


def triton_available() -> bool:
    """Whether Triton can be imported (it comes with CUDA builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> None:
    """Raise :class:`UnsupportedError` where CUDA tensors would need the kernel and Triton is missing."""
    if not triton_available():
        raise UnsupportedError(
            "encoders='triton' needs Triton for CUDA tensors, and it cannot be imported (it comes with CUDA "
            "builds of PyTorch, or `pip install triton`); use encoders='aten'")


def encode_kernel():
    """The Triton kernel, imported on first use so that importing fxcompress never needs Triton."""
    from ._triton_encode import affine_encode_kernel

    return affine_encode_kernel


def _shapes(n: int, bits: int, group: int) -> tuple[int, int]:
    """``(n_groups, packed bytes)`` of an encoding of ``n`` elements."""
    n_groups = -(-n // group)
    return n_groups, n_groups * group * bits // 8


def launch_encode(kernel, x: torch.Tensor, seed: Optional[torch.Tensor], stream: int, bits: int, group: int,
                  clamp: Optional[float], norm: "Norm | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``kernel`` (:func:`encode_kernel`, or its interpreted form in the tests) on a 1-D ``x``."""
    n = x.numel()
    n_groups, n_bytes = _shapes(n, bits, group)
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    lo = torch.empty(n_groups, 1, 1, dtype=torch.float32, device=x.device)
    scale = torch.empty(n_groups, 1, 1, dtype=torch.float32, device=x.device)
    constants = _launch_constants(bits, group, clamp, x.dtype, seed is not None, norm is not None,
                                  norm is not None and norm.shift is not None)
    blocks = -(-n_groups // constants["BLOCK_GROUPS"])
    # NB: unread pointers (the seed's when rounding to nearest, the statistics' without a norm) point at lo.
    # No fused multiply-adds, so that the codes are the aten code's (a kernel per op) on CUDA too.
    mean, rstd, shift = (lo, lo, lo) if norm is None else (norm.mean, norm.rstd, lo if norm.shift is None else norm.shift)
    index = (1, 1, 1, 1) if norm is None else norm.index
    kernel[(blocks,)](x, seed if seed is not None else lo, stream, packed, lo, scale, n, n_groups,
                      mean, rstd, shift, *index, **constants, **_NO_FMA)
    return packed, lo, scale


@dataclasses.dataclass(frozen=True)
class Norm:
    """A norm's statistics for an encoder of its input (:class:`~fxcompress.codecs.quant.Normalized`):
    the kernel codes ``((x + shift) - mean) * rstd``, each 1-D, element ``i`` of ``x`` (memory order)
    reading ``mean[(i // stat_div) % stat_mod]`` and ``shift[(i // shift_div) % shift_mod]``."""

    mean: torch.Tensor
    rstd: torch.Tensor
    shift: Optional[torch.Tensor]
    index: tuple[int, int, int, int]  # stat_div, stat_mod, shift_div, shift_mod

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's arithmetic in aten ops (the reference)."""
        i = torch.arange(x.numel(), device=x.device)
        stat_div, stat_mod, shift_div, shift_mod = self.index
        x = x.float()
        if self.shift is not None:
            x = x + self.shift.float()[(i // shift_div) % shift_mod]
        k = (i // stat_div) % stat_mod
        return (x - self.mean[k]) * self.rstd[k]


def memory_index(layout: Layout, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(div, mod)`` such that element ``i`` of ``layout`` (memory order) reads element ``(i // div) % mod``
    of a contiguous tensor of ``shape`` broadcast to it; ``None`` where no such pair exists (the dims
    it varies along are not adjacent in memory, in its own order)."""
    varying = [d for d in range(len(shape)) if shape[d] != 1]
    if not varying:
        return 1, 1
    if len(shape) != len(layout.shape) or any(shape[d] != layout.shape[d] for d in varying):
        return None
    in_memory = [d for d in layout.order if layout.shape[d] != 1]
    at = [in_memory.index(d) for d in varying]
    if at != list(range(at[0], at[0] + len(at))):  # NB: adjacent, and in the stat's own (dim) order
        return None
    return layout.stride[varying[-1]], math.prod(shape[d] for d in varying)


PHILOX_ROUNDS = 10
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers (Salmon et al., Philox-4x32)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the key schedule's increments (the golden ratio, sqrt(3) - 1)
_U32 = 0xFFFFFFFF
SEED_BOUND = 1 << 62  # seeds are drawn from [0, SEED_BOUND): both key words vary


def philox(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor],
           rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 on int64 tensors holding 32-bit words: ``counter`` four words, ``key`` two.

    The kernel's generator in aten ops (the reference), checked against the
    published answers of Random123, the authors' library (``tests/test_kernels.py``).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_M[0])
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def _mul_hi_lo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low words of the 64-bit product of 32-bit words ``a`` and ``m``, in int64
    without overflow: ``m`` in 16-bit halves, each partial product below 2**48."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _U32


def draws(seed: torch.Tensor, stream: int, n_groups: int) -> torch.Tensor:
    """The kernel's ``n_groups`` uniform draws in ``[0, 1)`` (float32) for ``seed`` and ``stream``:
    for group ``g``, the top 24 bits of Philox's first word at counter ``(g, stream, 0, 0)``."""
    seed = seed.reshape(()).to(torch.int64)
    g = torch.arange(n_groups, dtype=torch.int64, device=seed.device)
    zero = torch.zeros_like(g)
    word = philox((g, zero + stream, zero, zero), (seed & _U32, (seed >> 32) & _U32))[0]
    return (word >> 8).to(torch.float32) * 2.0 ** -24  # NB: exact: 24 bits fit a float32


def new_seed(device: torch.device) -> torch.Tensor:
    """One seed for the draws, from PyTorch's generator (``torch.manual_seed`` makes it reproducible)."""
    return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device=device)


def share_seed(graph: fx.Graph) -> None:
    """Make the stochastic encoders of ``graph`` read one seed, each with a ``stream`` of its own.

    Each encoder is traced with a seed of its own (:func:`new_seed`): under
    Inductor each would be a kernel. The first encoder's seed comes before
    every encoder, so all read it, and the others' seeds are erased. An
    encoder whose seed is not such a draw (a decomposition table that
    rewrote ``randint``) keeps it, with stream 0: a key of its own, so its
    counters still collide with no other encoder's; only the saving is lost.
    """
    op = torch.ops.fxcompress.affine_encode.default

    def own_draw(node: fx.Node) -> bool:
        seed = node.args[1]
        return seed is not None and seed.target is torch.ops.aten.randint.low and len(seed.users) == 1

    encoders = [n for n in graph.nodes if n.target is op and own_draw(n)]
    if not encoders:
        return
    shared = encoders[0].args[1]
    for stream, node in enumerate(encoders):
        own = node.args[1]
        node.update_arg(1, shared)
        node.update_arg(2, stream)
        if own is not shared:
            graph.erase_node(own)


@functools.lru_cache(maxsize=None)
def _launch_constants(bits: int, group: int, clamp: Optional[float], dtype: torch.dtype, stochastic: bool,
                      norm: bool = False, shift: bool = False) -> dict:
    """The kernel's compile-time constants (cached: a step launches every encoder every time)."""
    per_byte = 8 // bits
    n_group_bytes = group // per_byte
    bytes_p2 = 1 << (n_group_bytes - 1).bit_length()
    block = max(1, _ELEMENTS_PER_PROGRAM // (per_byte * bytes_p2))
    levels = (1 << bits) - 1
    steps = levels - 1 if clamp is not None else levels
    # NB: the clamp value rounded to x's dtype, in which the kernel tests x <= c, as the op does
    c = 0.0 if clamp is None else float(torch.tensor(clamp, dtype=torch.float64).to(dtype))
    return dict(GROUP=group, BITS=bits, BYTES=n_group_bytes, BYTES_P2=bytes_p2, BLOCK_GROUPS=block,
                STOCHASTIC=stochastic, CLAMPED=clamp is not None, C=c, STEP_FACTOR=2.0 / steps,
                LEVELS=levels, PHI=_PHI, MIN_SCALE=_MIN_SCALE, ROUNDS=PHILOX_ROUNDS, NORM=norm, SHIFT=shift)


def _reference(x: torch.Tensor, seed: Optional[torch.Tensor], stream: int, bits: int, group: int,
               clamp: Optional[float], norm: Norm | None = None) -> tuple[torch.Tensor, ...]:
    """The codec's aten code on a 1-D ``x``, with the kernel's draws: what the kernel computes."""
    x = x if norm is None else norm.normalize(x)
    inner = GroupAffine(Layout.of(x), bits, group, seed is not None)
    r = None if seed is None else draws(seed, stream, _shapes(x.numel(), bits, group)[0]).view(-1, 1, 1)
    if clamp is None:
        return inner._encode(x, r)
    predicate = Predicate("le", (clamp,))
    return ClampedAffine(inner, predicate, predicate.near_values(x.dtype))._encode(x, r)


@torch.library.custom_op("fxcompress::affine_encode", mutates_args=())
def affine_encode(x: torch.Tensor, seed: Optional[torch.Tensor], stream: int, bits: int, group: int,
                  clamp: Optional[float], mean: Optional[torch.Tensor] = None, rstd: Optional[torch.Tensor] = None,
                  shift: Optional[torch.Tensor] = None, index: Optional[list[int]] = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group affine ``bits``-bit codes of the 1-D dense ``x``: ``(packed, lo, scale)``.

    ``seed`` (one int64) and ``stream``: the key and the counter's second word of
    stochastic rounding's draws (:func:`draws`); ``seed=None`` rounds to nearest.
    ``clamp``: ``None`` for :class:`GroupAffine`'s codes, or ``c`` for
    :class:`ClampedAffine`'s (code 0 for ``x <= c``). ``mean``, ``rstd`` (1-D fp32),
    ``shift`` and ``index``: the codes of a norm's input in its normalized space (:class:`Norm`).
    """
    torch._check(seed is None or (seed.dtype == torch.int64 and seed.numel() == 1),
                 lambda: f"affine_encode: the seed must be one int64, not {seed.numel()} {seed.dtype}")
    torch._check(0 <= stream < 1 << 31, lambda: f"affine_encode: stream {stream} is not in [0, 2**31)")
    torch._check((mean is None) == (rstd is None) == (index is None) and (mean is not None or shift is None)
                 and (clamp is None or mean is None), lambda: "affine_encode: mean, rstd and index come together")
    norm = None if mean is None else Norm(mean, rstd, shift, tuple(index))
    if x.is_cuda:
        require_triton()
        # NB: Triton launches on the current device; contiguous() is a no-op on what the codecs
        # pass (a dense tensor's memory-order view)
        with torch.cuda.device(x.device):
            return launch_encode(encode_kernel(), x.contiguous(), seed, stream, bits, group, clamp, norm)
    return tuple(t.contiguous() for t in _reference(x, seed, stream, bits, group, clamp, norm))


@affine_encode.register_fake
def _(x, seed, stream, bits, group, clamp, mean=None, rstd=None, shift=None, index=None):
    n_groups, n_bytes = _shapes(x.numel(), bits, group)
    return (x.new_empty(n_bytes, dtype=torch.uint8), x.new_empty(n_groups, 1, 1, dtype=torch.float32),
            x.new_empty(n_groups, 1, 1, dtype=torch.float32))
