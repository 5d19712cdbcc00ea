"""One saved tensor's int4 encoder alone: how fast Inductor's kernels for it run, beside a copy.

    python bench/encoders.py --device cuda --out bench/results/encoders_H.json
    python bench/encoders.py --device cpu --shapes 2,64,16,16   # smoke: every variant round-trips

On an H200 the 104 encoders of a ResNet-50 int4 step (batch 64) ran at 1,120 GB/s where the
model's own kernels reach 2,200-3,400 GB/s (``results/traffic_h200.json``), and making them
persistent reductions did not help (``results/history/2026-12-01-int4-in-32-bit-words/``).
This script times candidate formulations of the same encoder on activation-sized tensors in
seconds of device time, so that a GPU session can choose between them before the library changes:

- ``copy``: ``x.clone()``, the bandwidth a kernel reading and writing ``x`` gets;
- ``fxcompress``: the library's ``GroupAffine`` encoder (stochastic rounding), as traced into steps;
- ``fxcompress/det``: the same, rounding to nearest (what the random draw costs);
- ``triton`` and ``triton/det``: the same encoder as one hand-written Triton kernel
  (``CompressConfig(encoders="triton")``, ``fxcompress/codecs/kernels.py``), on the CPU its aten code;
- ``two-pass`` (rounding to nearest) and ``two-pass/sr`` (stochastic): the group's min and max as
  a reduction over its 256 contiguous elements, then the codes as a pointwise kernel over the
  bytes (reads ``x`` twice, but each kernel is Inductor's simplest kind);
- ``words``: the codes of 8 elements in one int32 word, so a group is 32 words and its reduction
  persistent (the layout measured and reverted on 2026-12-01, kept here as the reference).

The candidates are experiments written for this script, not the library's code; each must
decode (with its own decoder) within one quantization step of ``x`` (checked before timing).
Every variant is compiled with ``torch.compile`` and timed with CUDA events after warm-up (median
of ``--iters``); GB/s counts the bytes the encoder must move: ``x`` read once and its codes,
minimum and scale written.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import open_results, put_result  # noqa: E402
from fxcompress.codecs.base import Layout  # noqa: E402
from fxcompress.codecs.quant import _PHI, GroupAffine, _dither, _groups, _slices  # noqa: E402

GROUP, BITS = 256, 4
LEVELS = (1 << BITS) - 1
# ResNet-50's largest saved activations at batch 64, channels-last as Inductor lays them out
SHAPES = [(64, 256, 56, 56), (64, 64, 112, 112), (64, 512, 28, 28), (64, 2048, 7, 7)]


def _grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((hi * 0.5 - lo * 0.5) * (2.0 / LEVELS)).clamp_min(torch.finfo(torch.float32).tiny)
    return lo, scale


def _code(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, u) -> torch.Tensor:
    return ((x * 0.5 - lo * 0.5) * (2.0 / scale) + u).floor().clamp(0, LEVELS)


def _value(code: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (code.float() * (scale * 0.5) + lo * 0.5) * 2.0


class Library:
    """The library's encoder and decoder."""

    def __init__(self, x: torch.Tensor, stochastic: bool, kernel: bool = False) -> None:
        self.codec = GroupAffine(Layout.of(x), BITS, GROUP, stochastic, kernel)

    def encode(self, x):
        return self.codec.encode(x)

    def decode(self, *parts):
        return self.codec.decode(*parts)


class TwoPass:
    """Min and max over each contiguous group of 256, then the codes: element ``i`` and ``i + 128``
    of a group in one byte (the library's stored format); rounding to nearest, or the library's
    stochastic rounding (one draw per group spread by the golden-ratio sequence)."""

    def __init__(self, x: torch.Tensor, stochastic: bool = False) -> None:
        self.layout, self.stochastic = Layout.of(x), stochastic

    def encode(self, x):
        g = self.layout.flatten(x).view(-1, GROUP).float()
        lo, scale = _grid(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True))
        half = GROUP // 2
        r = torch.rand(g.shape[0], 1, device=g.device) if self.stochastic else None
        codes = []
        for j in (0, 1):
            if r is None:
                u = 0.5
            else:
                i = torch.arange(j * half, (j + 1) * half, device=g.device, dtype=torch.float32)
                u = r + i * _PHI
                u = u - u.floor()
            codes.append(_code(g[:, j * half:(j + 1) * half], lo, scale, u).to(torch.uint8))
        return (codes[0] | (codes[1] << BITS)).reshape(-1), lo, scale

    def decode(self, packed, lo, scale):
        p = packed.view(-1, 1, GROUP // 2)
        codes = torch.cat([p & LEVELS, p >> BITS], 1).view(-1, GROUP)
        return self.layout.unflatten(_value(codes, lo, scale).reshape(-1).to(self.layout.dtype))


class Words:
    """Eight codes per int32 word (word ``w`` holds elements ``w, w + 32, ...`` of its group), the
    word's codes combined elementwise before the reduction over the group's 32 words; the
    library's stochastic rounding."""

    per_word = 32 // BITS

    def __init__(self, x: torch.Tensor) -> None:
        self.layout = Layout.of(x)

    def encode(self, x):
        g = _groups(self.layout, x, GROUP, per_byte=self.per_word)  # (groups, 32, 8)
        slices = _slices(g)
        lo = functools.reduce(torch.minimum, slices).amin(-2, keepdim=True)
        hi = functools.reduce(torch.maximum, slices).amax(-2, keepdim=True)
        lo, scale = _grid(lo, hi)
        packed = None
        r = torch.rand(g.shape[0], 1, 1, device=g.device)
        for j, (s, u) in enumerate(zip(slices, _dither(g, r))):
            code = _code(s, lo, scale, u).to(torch.int32) << (BITS * j)
            packed = code if packed is None else packed | code
        return packed.reshape(-1), lo, scale

    def decode(self, packed, lo, scale):
        shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device).view(-1, 1)
        codes = (packed.view(lo.shape[0], 1, -1) >> shifts) & LEVELS  # (groups, place, word)
        values = _value(codes, lo.view(-1, 1, 1), scale.view(-1, 1, 1))
        return self.layout.unflatten(values.reshape(-1).to(self.layout.dtype))


class Copy:
    def __init__(self, x: torch.Tensor) -> None:
        pass

    def encode(self, x):
        return (x.clone(),)

    def decode(self, y):
        return y


VARIANTS = {
    "copy": Copy,
    "fxcompress": functools.partial(Library, stochastic=True),
    "fxcompress/det": functools.partial(Library, stochastic=False),
    "triton": functools.partial(Library, stochastic=True, kernel=True),
    "triton/det": functools.partial(Library, stochastic=False, kernel=True),
    "two-pass": TwoPass,
    "two-pass/sr": functools.partial(TwoPass, stochastic=True),
    "words": Words,
}


def _time(fn, x: torch.Tensor, iters: int) -> float:
    """Median milliseconds of ``fn(x)``: CUDA events on a GPU, wall time on a CPU."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(iters):
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(variant: str, shape: tuple[int, ...], device: str, iters: int) -> dict:
    """Compile, check the round trip, time. Raises AssertionError where a variant decodes wrong."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).relu().to(torch.bfloat16).to(memory_format=torch.channels_last)
    codec = VARIANTS[variant](x)
    encode, decode = torch.compile(codec.encode), torch.compile(codec.decode)
    started = time.perf_counter()
    parts = encode(x)
    compile_s = time.perf_counter() - started
    back = decode(*parts).float()
    g = Layout.of(x).flatten(x).view(-1, GROUP).float()
    step = ((g.amax(-1) - g.amin(-1)) / LEVELS).repeat_interleave(GROUP)  # one step, per element in memory order
    exact = Layout.of(x).flatten(x).float()
    err = (Layout.of(x).flatten(back) - exact).abs()
    bound = step * 1.001 + exact.abs() * 2**-8 + 1e-6  # one step, and the cast back to bf16 (half an ulp)
    assert (err <= bound).all(), f"{variant}: decodes {float((err - bound).max())} beyond one step"
    nbytes = x.numel() * x.element_size() + sum(p.numel() * p.element_size() for p in parts)
    ms = _time(encode, x, iters)
    decode_ms = _time(lambda _: decode(*parts), x, iters)
    return {"variant": variant, "shape": list(shape), "ms": ms, "gb_s": nbytes / ms / 1e6, "decode_ms": decode_ms,
            "mib": nbytes / 2**20, "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES],
                   help="comma-separated sizes, e.g. 64,256,56,56 (NCHW, stored channels-last)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args()
    data = open_results(args.out, "encoders", args.device, " ".join([os.path.relpath(__file__)] + sys.argv[1:]))
    print(f"{'shape':<20} {'variant':<15} {'encode ms':>10} {'GB/s':>7} {'decode ms':>10} {'MiB':>8} {'compile s':>10}")
    for spec in args.shapes:
        shape = tuple(int(s) for s in spec.split(","))
        for variant in args.variants:
            torch._dynamo.reset()
            row = measure(variant, shape, args.device, args.iters)
            print(f"{spec:<20} {variant:<15} {row['ms']:>10.3f} {row['gb_s']:>7.0f} {row['decode_ms']:>10.3f} "
                  f"{row['mib']:>8.1f} {row['compile_s']:>10.1f}", flush=True)
            put_result(args.out, data, "encoders", row, ("variant", "shape"))
    print(json.dumps(data["environment"]))


if __name__ == "__main__":
    main()
