"""The Triton kernel behind ``fxcompress.affine_encode`` (:mod:`fxcompress.codecs.kernels` says what it computes).

A module of its own because Triton kernels must be module globals: it imports
Triton, and is imported only where a kernel runs. ``TRITON_INTERPRET=1`` at
its import makes the kernels run in Triton's interpreter (on CPU tensors; the tests).
"""
import triton
import triton.language as tl


@triton.jit
def _nan_min(a, b):  # NB: NaN wins, as torch.amin: a NaN group must poison its range
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _nan_max(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _draws(seed_ptr, stream, g, ROUNDS: tl.constexpr):
    """Groups ``g``'s uniform draws: Philox-4x32 at counter ``(g, stream, 0, 0)`` under the key ``seed``,
    the first word's top 24 bits (``kernels.draws``, the same in aten ops)."""
    seed = tl.load(seed_ptr)
    k0 = seed.to(tl.uint32)  # NB: the low word (a truncation)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = g.to(tl.uint32)
    c1 = c0 * 0 + stream
    c2 = c0 * 0
    c3 = c2
    for _ in tl.static_range(ROUNDS):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


# NB: Triton compiles a kernel once per "specialization" of its integer arguments (== 1, or a multiple
# of 16), for each value class it meets. The encoder's stream (one per encoder of a graph) and group
# count would make six compiles of each codec's kernel where one does: cold, serially, at a step's
# first launch. ``n`` stays specialized: its multiple of 16 proves the loads' masks constant over
# vector runs (tests/test_kernels.py).
@triton.jit(do_not_specialize=["stream", "n_groups", "stat_div", "stat_mod", "shift_div", "shift_mod"])
def affine_encode_kernel(
    x_ptr, seed_ptr, stream, packed_ptr, lo_ptr, scale_ptr, n, n_groups,
    mean_ptr, rstd_ptr, shift_ptr, stat_div, stat_mod, shift_div, shift_mod,
    GROUP: tl.constexpr, BITS: tl.constexpr, BYTES: tl.constexpr, BYTES_P2: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr, CLAMPED: tl.constexpr, C: tl.constexpr,
    STEP_FACTOR: tl.constexpr, LEVELS: tl.constexpr, PHI: tl.constexpr, MIN_SCALE: tl.constexpr,
    ROUNDS: tl.constexpr, NORM: tl.constexpr, SHIFT: tl.constexpr,
):
    # One program: BLOCK_GROUPS groups as a [groups, places in a byte, bytes] tile; element
    # ``j * BYTES + b`` of a group goes to bit offset ``BITS * j`` of its byte ``b`` (quant._groups).
    PER_BYTE: tl.constexpr = 8 // BITS
    g = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    j = tl.arange(0, PER_BYTE)
    b = tl.arange(0, BYTES_P2)
    g3 = g[:, None, None].to(tl.int64)
    place = j[None, :, None] * BYTES + b[None, None, :]  # the element's place in its group
    if BYTES == BYTES_P2:
        ok = g3 < n_groups
    else:  # a group size that is not a power of two: lanes past its bytes are idle
        ok = (g3 < n_groups) & (b[None, None, :] < BYTES)
    index = g3 * GROUP + place
    # NB: the last group is padded by repeating the last element, as quant._groups pads it. A
    # mask and a select, not an index clamped to n - 1: Triton proves contiguous runs of the
    # index (vector loads) through a mask, not through a minimum.
    inside = index < n
    xs = tl.load(x_ptr + index, mask=ok & inside, other=0.0)
    xs = tl.where(inside, xs, tl.load(x_ptr + n - 1))
    x = xs.to(tl.float32)
    if NORM:  # a norm's input, coded as ((x + shift) - mean) * rstd (quant.Normalized), statistics by memory index
        at = tl.where(inside, index, n - 1).to(tl.int32)  # NB: the padding is the last element's, normalized
        if SHIFT:
            x = x + tl.load(shift_ptr + (at // shift_div) % shift_mod).to(tl.float32)
        k = (at // stat_div) % stat_mod
        x = (x - tl.load(mean_ptr + k)) * tl.load(rstd_ptr + k)
    if CLAMPED:
        at_c = xs <= C  # NB: in x's own dtype, as the op reads it (C is the clamp value rounded to it)
        hi = tl.reduce(tl.reduce(tl.where(ok, x, -float("inf")), 2, _nan_max), 1, _nan_max)
        above = tl.where(at_c, float("inf"), x)  # NB: a NaN is not at c, and stays
        lo = tl.reduce(tl.reduce(tl.where(ok, above, float("inf")), 2, _nan_min), 1, _nan_min)
        lo = tl.where((lo < hi) | (lo != lo), lo, hi)
    else:
        lo = tl.reduce(tl.reduce(tl.where(ok, x, float("inf")), 2, _nan_min), 1, _nan_min)
        hi = tl.reduce(tl.reduce(tl.where(ok, x, -float("inf")), 2, _nan_max), 1, _nan_max)
    scale = (hi * 0.5 - lo * 0.5) * STEP_FACTOR
    scale = tl.where(scale < MIN_SCALE, MIN_SCALE, scale)
    # NB: as aten's ``2.0 / scale`` (a reciprocal, then times 2), the reciprocal correctly rounded
    # (Triton's ``/`` is an approximate division on CUDA)
    per_step = tl.math.div_rn(1.0, scale) * 2.0
    steps = (x * 0.5 - (lo * 0.5)[:, None, None]) * per_step[:, None, None]
    if STOCHASTIC:
        r = _draws(seed_ptr, stream, g, ROUNDS)
        u = r[:, None, None] + place.to(tl.float32) * PHI
        u = u - tl.floor(u)
    else:
        u = 0.5
    code = tl.floor(steps + u)
    lo_out = lo + scale * 0.0  # NaN for a group holding NaN or inf (quant._poison_nonfinite)
    if CLAMPED:
        code = tl.minimum(tl.maximum(code, 0.0), LEVELS - 1) + 1.0
        code = tl.where(at_c, 0.0, code)
        code = tl.where((lo_out == lo_out)[:, None, None], code, 1.0)
    else:
        code = tl.minimum(tl.maximum(code, 0.0), LEVELS)
    shifted = code.to(tl.int32) << (j[None, :, None] * BITS)
    byte = tl.sum(shifted, axis=1).to(tl.uint8)  # NB: the places' bits are disjoint, so a sum is an or
    g2 = g[:, None].to(tl.int64)
    tl.store(packed_ptr + g2 * BYTES + b[None, :], byte, mask=(g2 < n_groups) & (b[None, :] < BYTES))
    tl.store(lo_ptr + g, lo_out, mask=g < n_groups)
    tl.store(scale_ptr + g, scale, mask=g < n_groups)
