"""``encoders="triton"``: the one-kernel encoder computes what the aten encoder computes.

The Triton kernel runs here in Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors, numpy arithmetic: no fused multiply-adds), where it must match the aten
code bit for bit (``test_gpu.py`` checks the same on CUDA, where it is launched without
fused multiply-adds). The op around it runs the aten code on the CPU, so whole steps
compare exactly on the eager backend.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import fxcompress
from fxcompress.codecs import Layout, kernels
from fxcompress.codecs.quant import ClampedAffine, GroupAffine, SplitAffine
from fxcompress.codecs.uses import Predicate
from fxcompress.passes import select
from conftest import assert_grads_close, assert_grads_equal, compressed, grads_cosine, make_model, train_step

ENCODE = torch.ops.fxcompress.affine_encode.default


def _input(n, dtype, clamp, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, dtype=torch.float64) * 3 + 0.5
    if clamp is not None:
        x = x.clamp_min(clamp)
    x[::7] += 1e-50  # NB: above a clamp at 0 in float64, 0 in float32: the predicate is read in x's dtype
    return x.to(dtype)


CASES = [  # (dtype, bits, group, clamp, stochastic): every bit width, both codecs and roundings, odd groups
    (torch.bfloat16, 4, 256, None, True),
    (torch.bfloat16, 4, 256, 0.0, True),
    (torch.bfloat16, 2, 256, 0.0, False),
    (torch.float16, 2, 72, None, True),
    (torch.float32, 8, 256, None, False),
    (torch.float32, 8, 264, 0.0, True),
    (torch.float16, 4, 40, 0.5, False),
    (torch.bfloat16, 8, 8, None, True),
    (torch.float64, 4, 256, 0.0, True),
]
NONFINITE_GROUP, NONFINITE_GROUPS = 64, 6


def _nonfinite_input(clamp):
    """Groups 0-2 hold a NaN, an inf and a -inf (a clamp's output: an inf); group 3 a huge finite value."""
    g = NONFINITE_GROUP
    x = _input(NONFINITE_GROUPS * g, torch.float32, clamp)
    x[3], x[g + 5], x[2 * g + 7], x[3 * g] = math.nan, math.inf, -math.inf if clamp is None else math.inf, 1e38
    return x


NORM_CASES = [  # (shape, channels_last, dtype, shift, bits, stochastic): a norm's input coded normalized
    ((4, 17, 64), False, torch.bfloat16, False, 4, True),  # a layer-norm's rows (a group spans four)
    ((4, 17, 64), False, torch.float32, True, 2, False),  # ... less a position embedding (1, 17, 64)
    ((3, 24, 5, 7), True, torch.bfloat16, False, 4, True),  # a channels-last batch-norm's channels
    ((3, 24, 5, 7), False, torch.float16, False, 8, False),  # a contiguous one's
]


def _norm_input(shape, channels_last, dtype, shift):
    """A norm's input in memory order, its statistics as :class:`Normalized` passes them to the op."""
    from fxcompress.codecs.quant import Normalized

    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    x[:, 0] *= 1e-3  # a narrow row or channel
    x = x.to(dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    dims = (0, 2, 3) if len(shape) == 4 else (-1,)
    p = torch.randn(1, *shape[1:]) * 0.02 if shift else None
    xs = x.float() + (p if shift else 0)
    mean, rstd = xs.mean(dims, keepdim=True), (xs.var(dims, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    inner = GroupAffine(Layout.of(x.float()), 4, 256, True, kernel=True)
    codec = Normalized(inner, dtype, tuple(mean.shape), *((tuple(p.shape), p.dtype) if shift else ()))
    norm = kernels.Norm(mean.reshape(-1), rstd.reshape(-1), p.reshape(-1) if shift else None, codec.kernel_index())
    return Layout.of(x).flatten(x), norm


def _interpret_cases(path: str) -> None:
    """Run in a process started with ``TRITON_INTERPRET=1``: the kernel's and the aten code's
    encodings of every case, saved to ``path``."""
    kernel = kernels.encode_kernel()
    out = {}
    for case in CASES:
        dtype, bits, group, clamp, stochastic = case
        n = 17 * group + 11  # NB: the last group is padded, and the last program's block of groups is partial
        x = _input(n, dtype, clamp)
        seed = kernels.new_seed(x.device) if stochastic else None
        stream = len(out)  # a stream per case
        out[str(case)] = (kernels.launch_encode(kernel, x, seed, stream, bits, group, clamp),
                          kernels._reference(x, seed, stream, bits, group, clamp))
    for clamp in (None, 0.0):
        x, seed = _nonfinite_input(clamp), kernels.new_seed("cpu")
        out[f"nonfinite {clamp}"] = (kernels.launch_encode(kernel, x, seed, 5, 4, NONFINITE_GROUP, clamp),
                                     kernels._reference(x, seed, 5, 4, NONFINITE_GROUP, clamp))
    for case in NORM_CASES:
        x, norm = _norm_input(*case[:4])
        seed = kernels.new_seed(x.device) if case[5] else None
        out[str(case)] = (kernels.launch_encode(kernel, x, seed, 9, case[4], 256, None, norm),
                          kernels._reference(x, seed, 9, case[4], 256, None, norm))
    x, seed = _input(300 * 64 + 1, torch.float32, None), torch.tensor([0x0123456789ABCDEF >> 2])  # both key words
    out["draws"] = (kernels.launch_encode(kernel, x, seed, (1 << 31) - 1, 4, 64, None),
                    kernels._reference(x, seed, (1 << 31) - 1, 4, 64, None))
    torch.save(out, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """``{case: (kernel's encoding, aten code's encoding)}``, the kernel run by Triton's interpreter.

    NB: in a process of its own: ``TRITON_INTERPRET=1`` must be set before Triton is first
    imported (its own library functions are made interpretable then), and Inductor imports it.
    """
    pytest.importorskip("triton", reason="the test extra installs Triton (its interpreter runs kernels on the CPU)")
    path = tmp_path_factory.mktemp("kernels") / "encodings.pt"
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_kernels; test_kernels._interpret_cases({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_the_aten_encoder_bit_for_bit(interpreted, case):
    got, want = interpreted[str(case)]
    for name, a, b in zip(("codes", "lo", "scale"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} of {a.numel()} differ"


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_kernel_normalizes_a_norms_input_as_the_aten_code_does(interpreted, case):
    """Layer-norm rows, channels of both layouts, a shift: the statistics found by memory index."""
    got, want = interpreted[str(case)]
    for name, a, b in zip(("codes", "lo", "scale"), got, want):
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} of {a.numel()} differ"


def test_memory_index_follows_the_layout_or_declines():
    nchw, nhwc = Layout.of(torch.empty(2, 3, 4, 5)), Layout.of(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert kernels.memory_index(nchw, (1, 3, 1, 1)) == (20, 3)
    assert kernels.memory_index(nhwc, (1, 3, 1, 1)) == (1, 3)
    assert kernels.memory_index(nchw, (2, 3, 1, 1)) == (20, 6)
    assert kernels.memory_index(nhwc, (2, 3, 1, 1)) is None  # n and c not adjacent in memory
    rows = Layout.of(torch.empty(4, 17, 64))
    assert kernels.memory_index(rows, (4, 17, 1)) == (64, 68)
    assert kernels.memory_index(rows, (1, 17, 64)) == (1, 17 * 64)
    transposed = Layout.of(torch.empty(64, 17).t())
    assert kernels.memory_index(transposed, (17, 1)) == (1, 17)  # a row's statistic: the innermost dim in memory
    assert kernels.memory_index(transposed, (17, 64)) is None  # dims in memory in the other order than its own


def test_kernel_draws_are_the_reference_draws(interpreted):
    """A seed with both key words set, the largest stream, 301 groups: the same codes."""
    got, want = interpreted["draws"]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# Random123's known answers for Philox-4x32-10 (its kat_vectors file): counter, key, result
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT)
def test_the_reference_generator_is_philox(counter, key, want):
    got = kernels.philox(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor(k) for k in key))
    assert [int(w) for w in got] == list(want)


def test_draws_are_uniform_and_apart_for_every_seed_and_stream():
    n = 1 << 16
    a = kernels.draws(torch.tensor([12345]), 0, n)
    assert a.dtype == torch.float32 and 0 <= a.min() and a.max() < 1
    counts = torch.histc(a, bins=16, min=0, max=1)
    assert (counts - n / 16).abs().max() < 5 * math.sqrt(n / 16)  # five standard deviations
    for other in (kernels.draws(torch.tensor([12345]), 1, n), kernels.draws(torch.tensor([12346]), 0, n),
                  kernels.draws(torch.tensor([12345 + (1 << 32)]), 0, n)):  # the key's high word
        assert (a == other).float().mean() < 1e-3
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1]) < 0.02


@pytest.mark.parametrize("clamp", [None, 0.0])
def test_kernel_poisons_groups_with_nan_or_inf_as_the_aten_encoder_does(interpreted, clamp):
    (packed, lo, scale), (ref_packed, ref_lo, ref_scale) = interpreted[f"nonfinite {clamp}"]
    lo, ref_lo, scale, ref_scale = lo.view(-1), ref_lo.view(-1), scale.view(-1), ref_scale.view(-1)
    assert lo[:3].isnan().all() and torch.equal(lo.isnan(), ref_lo.isnan())  # the three non-finite groups
    finite = ~ref_lo.isnan()
    assert torch.equal(lo[finite], ref_lo[finite])
    assert torch.equal(scale.nan_to_num(7.0, 7.0, 7.0), ref_scale.nan_to_num(7.0, 7.0, 7.0))
    rows = packed.view(NONFINITE_GROUPS, -1)
    assert torch.equal(rows[finite], ref_packed.view(NONFINITE_GROUPS, -1)[finite])
    x = _nonfinite_input(clamp)
    codec = GroupAffine(Layout.of(x), 4, NONFINITE_GROUP, True)
    if clamp is not None:
        relu = Predicate("le", (clamp,))
        codec = ClampedAffine(codec, relu, relu.near_values(x.dtype))
    y = codec.decode(packed, lo.view(-1, 1, 1), scale.view(-1, 1, 1)).view(NONFINITE_GROUPS, -1)
    assert y[:3].isnan().all() and y[3:].isfinite().all()


@pytest.mark.parametrize("clamp", [None, 0.0])
def test_the_op_is_the_codec_encoder_and_its_fake_has_the_real_shapes(clamp):
    x = _input(1000, torch.bfloat16, clamp)
    seed = kernels.new_seed("cpu")
    torch.library.opcheck(ENCODE, (x, seed, 3, 4, 256, clamp))
    torch.library.opcheck(ENCODE, (x, None, 0, 2, 256, clamp))
    for stochastic in (True, False):
        codec = GroupAffine(Layout.of(x), 4, 256, stochastic)
        if clamp is not None:
            relu = Predicate("le", (clamp,))
            codec = ClampedAffine(codec, relu, relu.near_values(x.dtype))
        torch.manual_seed(3)
        got = kernel_codec(codec).encode(x)
        torch.manual_seed(3)
        seed = kernels.new_seed("cpu") if stochastic else None  # the seed the op drew
        r = None if seed is None else kernels.draws(seed, 0, 4).view(-1, 1, 1)
        for a, b in zip(got, codec._encode(x, r)):
            assert torch.equal(a.reshape(b.shape), b)


def kernel_codec(codec):
    import dataclasses

    if isinstance(codec, GroupAffine):
        return dataclasses.replace(codec, kernel=True)
    return dataclasses.replace(codec, inner=dataclasses.replace(codec.inner, kernel=True))


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_a_step_with_kernel_encoders_equals_the_aten_one(name):
    """Rounding to nearest: the same codes, so the same step (the draws differ: the next test)."""
    model, x = make_model(name)
    want = train_step(model, x, compressed("int4", stochastic_rounding=False))
    model, x = make_model(name)
    got = train_step(model, x, compressed("int4", encoders="triton", stochastic_rounding=False))
    assert torch.equal(got.output, want.output)
    assert_grads_equal(got.grads, want.grads)
    captures = got.module.capture_log.captures()
    encoders = [n for c in captures for n in c.rewritten.fw.graph.nodes if n.target is ENCODE]
    codecs = [getattr(d.codec, "inner", d.codec) for c in captures for d in c.plan.decisions
              if not isinstance(d.codec, SplitAffine)]  # NB: its encoder stays aten code
    assert encoders and len(encoders) == sum(isinstance(c, GroupAffine) and c.kernel for c in codecs)


@pytest.mark.parametrize("backend,name", [("eager", "resnet"), ("inductor", "mlp")])  # NB: mlp: compile time
def test_stochastic_kernel_encoders_share_one_seed_per_graph_and_reproduce(backend, name):
    model, x = make_model(name)
    first = train_step(model, x, compressed("int4", backend, encoders="triton"))
    model, x = make_model(name)
    second = train_step(model, x, compressed("int4", backend, encoders="triton"))
    assert_grads_equal(first.grads, second.grads)  # NB: a fresh compile, the same torch.manual_seed
    model, x = make_model(name)
    aten = train_step(model, x, compressed("int4", backend))
    assert grads_cosine(first.grads, aten.grads) > 0.99  # other draws, the same codec
    model, x = make_model(name)
    other = train_step(model, x, compressed("int4", backend, encoders="triton"), seed=2)
    assert not all(torch.equal(other.grads[k], first.grads[k]) for k in first.grads)  # draws follow the generator
    for capture in first.module.capture_log.captures():
        nodes = capture.rewritten.fw.graph.nodes
        encoders = [n for n in nodes if n.target is ENCODE]
        assert len(encoders) >= 2 and len({n.args[1] for n in encoders}) == 1  # one seed ...
        assert sorted(n.args[2] for n in encoders) == list(range(len(encoders)))  # ... and a stream each
        seeds = [n for n in nodes if n.target is torch.ops.aten.randint.low]
        assert len(seeds) == (1 if backend == "eager" else 0)  # Inductor's seeded ops replace it


def test_a_step_with_kernel_encoders_under_inductor():
    model, x = make_model("mlp")
    want = train_step(model, x, compressed("int4", "inductor", stochastic_rounding=False))
    model, x = make_model("mlp")
    got = train_step(model, x, compressed("int4", "inductor", encoders="triton", stochastic_rounding=False))
    assert any(n.target is ENCODE for c in got.module.capture_log.captures() for n in c.rewritten.fw.graph.nodes)
    assert_grads_close(got.grads, want.grads)


def test_a_norms_input_less_an_embedding_takes_the_kernel_under_inductor():
    """A ViT stem under Inductor: the saved tokens before the position embedding is added, coded
    normalized by the kernel op (its statistics and the embedding passed in), the aten step's gradients."""
    from fxcompress.codecs.quant import Normalized
    from test_quant import _ClassTokenEncoder

    torch.manual_seed(0)
    model, x = _ClassTokenEncoder(), torch.randn(4, 16, 48)
    want = train_step(model, x, compressed("int4", "inductor", stochastic_rounding=False))
    got = train_step(model, x, compressed("int4", "inductor", encoders="triton", stochastic_rounding=False))
    normalized = [d.codec for c in got.module.capture_log.captures() for d in c.plan.decisions
                  if isinstance(d.codec, Normalized)]
    assert [(c.inner.kernel, c.shift_shape) for c in normalized] == [(True, (1, 17, 64))]
    encoders = [n for c in got.module.capture_log.captures() for n in c.rewritten.fw.graph.nodes if n.target is ENCODE]
    assert any(n.args[8] is not None for n in encoders)  # the shift
    assert_grads_close(got.grads, want.grads)


def test_encoders_is_checked(monkeypatch):
    with pytest.raises(fxcompress.ConfigError, match="'aten', 'triton'"):
        fxcompress.CompressConfig(codec="int4", encoders="cuda")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    cuda = Layout((4, 256), (256, 1), torch.float32, torch.device("cuda"))
    with pytest.raises(fxcompress.UnsupportedError, match="needs Triton"):
        select._group_affine(cuda, 4, fxcompress.CompressConfig(codec="int4", encoders="triton"))
    assert not select._group_affine(cuda, 4, fxcompress.CompressConfig(codec="int4")).kernel


@pytest.mark.parametrize("bits,clamp", [(4, None), (2, 0.0), (8, None)])
def test_the_kernel_compiles_for_a_gpu_to_vector_loads_and_exact_arithmetic(bits, clamp):
    """Compiled for an sm_90 GPU (Triton needs no GPU to compile): bf16 read 16 bytes at a time,
    a correctly rounded division and no fused multiply-adds (what makes it the aten code's bytes)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fxcompress.codecs._triton_encode import affine_encode_kernel

    constants = kernels._launch_constants(bits, 256, clamp, torch.bfloat16, True)
    signature = {"x_ptr": "*bf16", "seed_ptr": "*i64", "stream": "i32", "packed_ptr": "*u8", "lo_ptr": "*fp32",
                 "scale_ptr": "*fp32", "n": "i32", "n_groups": "i32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                 "shift_ptr": "*fp32", "stat_div": "i32", "stat_mod": "i32", "shift_div": "i32", "shift_mod": "i32",
                 **{name: "constexpr" for name in constants}}
    names = list(signature)
    source = ASTSource(fn=affine_encode_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 5, 6)})  # pointers and n
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=kernels._NO_FMA).asm["ptx"]
    assert "ld.global.v4.b32" in ptx  # 8 bf16 per load
    assert ptx.count("ld.global.b16") <= 1  # only the last element, the padding's value
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "fma." not in ptx


def test_one_compile_serves_every_encoder_of_a_codec():
    """Triton compiles a kernel per specialization of its arguments; a graph's encoders differ in
    their stream and sizes, and a step's first launches would compile each class cold (6 per codec
    over these launches without ``do_not_specialize``). Keys computed as Triton's launcher does."""
    pytest.importorskip("triton")
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import create_function_from_signature

    from fxcompress.codecs._triton_encode import affine_encode_kernel as kernel

    bind = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
    x, seed = torch.empty(64, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int64)
    keys = {}
    for clamp in (None, 0.0):
        constants = kernels._launch_constants(4, 256, clamp, torch.bfloat16, True)
        for stream in range(40):
            for n in (4096, 100352, 802816, 256 * 17):  # group counts of every class: 16, 392, 3136, 17
                _, spec, _ = bind(x, seed, stream, x, x, x, n, n // 256, x, x, x, 1, 1, 1, 1, **constants)
                keys.setdefault(clamp, set()).add(str(spec))
    assert {clamp: len(k) for clamp, k in keys.items()} == {None: 1, 0.0: 1}


def test_an_encoder_whose_seed_is_not_its_own_draw_keeps_it():
    """share_seed merges only seeds that are an encoder's own ``randint``; another keeps its key."""
    import torch.fx as fx

    graph = fx.Graph()
    x = graph.placeholder("x")
    given = graph.placeholder("seed")  # say, a decomposition's
    drawn = [graph.call_function(torch.ops.aten.randint.low, (0, kernels.SEED_BOUND, [1])) for _ in range(2)]
    seeds = [drawn[0], given, drawn[1]]
    encoders = [graph.call_function(ENCODE, (x, seed, 0, 4, 256, None)) for seed in seeds]
    graph.output(tuple(encoders))
    kernels.share_seed(graph)
    assert [(e.args[1], e.args[2]) for e in encoders] == [(drawn[0], 0), (given, 0), (drawn[0], 1)]
    assert drawn[1] not in graph.nodes
