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

    before (aten ops, ~50 nodes per encoder)       after (one node)
      g = x.view(-1, 2, 128).transpose(1, 2)        packed, lo, scale = fxcompress.affine_encode(
      lo = g.amin(-1).amin(-1); hi = ...                 x.view(-1), rand(n_groups), bits=4, group=256)
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
:class:`GroupFP8` keep their aten encoders.

On CUDA tensors the op launches the Triton kernel; elsewhere it runs the
codec's aten code (the reference), so a graph with the op runs on any
device. The dither ``r`` (one uniform draw per group) is an input drawn by
aten ``rand`` in the graph, as the aten code draws it: the two paths consume
the generator alike, and Inductor's own random numbers replace it there.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from ..errors import UnsupportedError
from .base import Layout
from .quant import _MIN_SCALE, _PHI, ClampedAffine, GroupAffine
from .uses import Predicate

__all__ = ["affine_encode", "triton_available", "require_triton", "encode_kernel", "launch_encode"]

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


def launch_encode(kernel, x: torch.Tensor, r: Optional[torch.Tensor], bits: int, group: int,
                  clamp: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``kernel`` (:func:`encode_kernel`, or its interpreted form in the tests) on a 1-D ``x``."""
    n = x.numel()
    n_groups, n_bytes = _shapes(n, bits, group)
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    lo = torch.empty(n_groups, 1, 1, dtype=torch.float32, device=x.device)
    scale = torch.empty(n_groups, 1, 1, dtype=torch.float32, device=x.device)
    constants = _launch_constants(bits, group, clamp, x.dtype, r is not None)
    blocks = -(-n_groups // constants["BLOCK_GROUPS"])
    # NB: r's pointer is unread when rounding to nearest. No fused multiply-adds, so that the
    # codes are the aten code's (a kernel per op) on CUDA too.
    kernel[(blocks,)](x, r if r is not None else lo, packed, lo, scale, n, n_groups, **constants, **_NO_FMA)
    return packed, lo, scale


@functools.lru_cache(maxsize=None)
def _launch_constants(bits: int, group: int, clamp: Optional[float], dtype: torch.dtype, stochastic: bool) -> dict:
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
                LEVELS=levels, PHI=_PHI, MIN_SCALE=_MIN_SCALE)


def _reference(x: torch.Tensor, r: Optional[torch.Tensor], bits: int, group: int,
               clamp: Optional[float]) -> tuple[torch.Tensor, ...]:
    """The codec's aten code on a 1-D ``x``: what the kernel computes."""
    inner = GroupAffine(Layout.of(x), bits, group, r is not None)
    r = None if r is None else r.view(-1, 1, 1)
    if clamp is None:
        return inner._encode(x, r)
    predicate = Predicate("le", (clamp,))
    return ClampedAffine(inner, predicate, predicate.near_values(x.dtype))._encode(x, r)


@torch.library.custom_op("fxcompress::affine_encode", mutates_args=())
def affine_encode(x: torch.Tensor, r: Optional[torch.Tensor], bits: int, group: int,
                  clamp: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group affine ``bits``-bit codes of the 1-D dense ``x``: ``(packed, lo, scale)``.

    ``r``: one uniform draw per group for stochastic rounding, ``None`` for rounding
    to nearest. ``clamp``: ``None`` for :class:`GroupAffine`'s codes, or ``c`` for
    :class:`ClampedAffine`'s (code 0 for ``x <= c``).
    """
    n_groups, _ = _shapes(x.numel(), bits, group)
    torch._check(r is None or (r.dtype == torch.float32 and r.numel() == n_groups),
                 lambda: f"affine_encode: r must hold {n_groups} float32 draws, not {r.numel()} {r.dtype}")
    if x.is_cuda:
        require_triton()
        # NB: Triton launches on the current device; contiguous() is a no-op on what the codecs
        # pass (a dense tensor's memory-order view, a fresh draw)
        with torch.cuda.device(x.device):
            return launch_encode(encode_kernel(), x.contiguous(), None if r is None else r.contiguous(),
                                 bits, group, clamp)
    return tuple(t.contiguous() for t in _reference(x, r, bits, group, clamp))


@affine_encode.register_fake
def _(x, r, bits, group, clamp):
    n_groups, n_bytes = _shapes(x.numel(), bits, group)
    return (x.new_empty(n_bytes, dtype=torch.uint8), x.new_empty(n_groups, 1, 1, dtype=torch.float32),
            x.new_empty(n_groups, 1, 1, dtype=torch.float32))
