"""Codec unit tests on real tensors: round trips, layouts, predicates."""
import pytest
import torch

from fxcompress.codecs import BitMask, Layout, NarrowInt, PredicateMask, ShapeOnly
from fxcompress.codecs.base import pack_bits, pack_codes, pack_slices, unpack_bits, unpack_codes, unpack_slices
from fxcompress.codecs.lossless import narrowest_int, packed_bits
from fxcompress.codecs.uses import Predicate


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_unpack_round_trip(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), bits)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_code_slices_pack_as_the_same_codes_in_memory_order(bits):
    """The codes of each place in a byte, computed apart (an encoder computes them so, so that all its
    ops run over the bytes' index: one kernel), pack like the same codes flattened."""
    per_byte = 8 // bits
    codes = torch.randint(0, 1 << bits, (5, 16 * per_byte), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    flat = pack_codes(codes.view(-1), bits)
    assert torch.equal(unpack_codes(flat, bits, codes.numel()), codes.view(-1))
    slices = [codes.view(5, 16, per_byte)[..., j:j + 1] for j in range(per_byte)]
    assert torch.equal(pack_slices(slices, bits), flat)
    assert torch.equal(unpack_slices(flat.view(5, 16), bits), codes.view(5, 16, per_byte).transpose(1, 2))
    with pytest.raises(ValueError, match=f"a byte holds {per_byte}"):
        pack_slices(slices[1:], bits)


def test_bit_order_is_little_endian_within_a_byte():
    bits = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pack_bits(bits).tolist() == [0b1000_0001, 0b1]


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 3, 5, 7),
    lambda: torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last),
    lambda: torch.randn(6, 5).t(),
    lambda: torch.randn(4, 1, 3),
])
def test_layout_flatten_unflatten_keeps_strides_without_copy(make):
    x = make()
    lay = Layout.of(x)
    assert lay.is_dense()
    flat = lay.flatten(x)
    assert flat.data_ptr() == x.data_ptr()  # a view in memory order, no copy
    y = lay.unflatten(flat)
    assert torch.equal(y, x)
    assert all(a == b for a, b, s in zip(y.stride(), x.stride(), x.shape) if s != 1)


def test_layout_not_dense():
    assert not Layout.of(torch.randn(3, 1).expand(3, 4)).is_dense()
    assert not Layout.of(torch.randn(4, 6)[:, ::2]).is_dense()


@pytest.mark.parametrize("make, overlaps", [
    (lambda: torch.randn(3, 1).expand(3, 4), True),
    (lambda: torch.randn(4, 6)[:, ::2], False),
    (lambda: torch.randn(2, 8, 4, 4)[:, 4:], False),
    (lambda: torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)[:, :4], False),
    (lambda: torch.randn(6, 5).t()[1:], False),
])
def test_a_layout_with_gaps_flattens_to_its_dense_copy(make, overlaps):
    x = make()
    lay = Layout.of(x)
    assert lay.overlaps() == overlaps
    if overlaps:
        return
    dense = lay.dense()
    assert dense.is_dense() and dense.order == lay.order and dense.shape == lay.shape
    codec = BitMask(dense)  # select's codec for a bool view with gaps
    y = codec.decode(*codec.encode(x > 0))
    assert torch.equal(y, x > 0) and y.stride() == dense.stride


def test_bitmask_round_trip_channels_last():
    x = (torch.randn(2, 3, 5, 5) > 0).to(memory_format=torch.channels_last)
    codec = BitMask(Layout.of(x))
    (packed,) = codec.encode(x)
    assert packed.numel() == (x.numel() + 7) // 8
    y = codec.decode(packed)
    assert torch.equal(y, x) and y.stride() == x.stride()


PREDICATES = [
    Predicate("le", (0.0,)), Predicate("lt", (0.5,)), Predicate("ge", (-1.0,)),
    Predicate("gt", (0.0,)), Predicate("outside", (0.0, 6.0)), Predicate("outside", (-1.0, 1.0)),
    Predicate("notinside", (0.0, 6.0)),
]


@pytest.mark.parametrize("pred", PREDICATES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_predicate_mask_preserves_the_predicate_exactly(pred, dtype):
    x = (torch.randn(1000) * 4).to(dtype)
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    x[4:8] = torch.tensor(pred.consts[:1] * 4)  # values on the boundary itself
    reps = pred.representatives(dtype)
    assert reps is not None
    codec = PredicateMask(Layout.of(x), pred, *reps)
    (packed,) = codec.encode(x)
    assert packed.numel() == 125
    y = codec.decode(packed)
    assert y.dtype == dtype and torch.equal(pred(y), pred(x))


def test_predicate_without_representatives():
    # no finite bf16 value lies above the largest finite bf16 value
    big = torch.finfo(torch.bfloat16).max
    assert Predicate("gt", (big,)).representatives(torch.bfloat16) is None


@pytest.mark.parametrize("op, pred, args", [
    (torch.ops.aten.threshold_backward.default, Predicate("le", (0.0,)), (0,)),
    (torch.ops.aten.hardtanh_backward.default, Predicate("notinside", (0.0, 6.0)), (0.0, 6.0)),
    (torch.ops.aten.leaky_relu_backward.default, Predicate("gt", (0.0,)), (0.1, False)),
    (torch.ops.aten.hardsigmoid_backward.default, Predicate("notinside", (-3.0, 3.0)), ()),
])
def test_backward_ops_give_identical_results_on_decoded_tensor(op, pred, args):
    x = torch.randn(4096) * 5
    x[:5] = torch.tensor([float("nan"), 0.0, 6.0, -3.0, 3.0])
    g = torch.randn(4096)
    codec = PredicateMask(Layout.of(x), pred, *pred.representatives(x.dtype))
    y = codec.decode(*codec.encode(x))
    assert torch.equal(op(g, y, *args), op(g, x, *args))


def test_shape_only_and_narrow():
    x = torch.randn(3, 4)
    codec = ShapeOnly(Layout.of(x))
    assert codec.encode(x) == ()
    y = codec.decode()
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype

    idx = torch.randint(0, 300, (5, 7))
    narrow = NarrowInt(Layout.of(idx), narrowest_int(300, torch.int64))
    (small,) = narrow.encode(idx)
    assert small.dtype == torch.int16 and torch.equal(narrow.decode(small), idx)


@pytest.mark.parametrize("bound, expected", [
    (1, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16),
    (32769, torch.int32), (2**31, torch.int32), (2**31 + 1, None),
])
def test_narrowest_int(bound, expected):
    assert narrowest_int(bound, torch.int64) == expected


@pytest.mark.parametrize("bound, expected", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (9, 4), (16, 4), (17, None)])
def test_packed_bits(bound, expected):
    assert packed_bits(bound) == expected
