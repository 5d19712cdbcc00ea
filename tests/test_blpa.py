"""BLPA's BN-aware codes: exact ReLU masks (any gamma sign, saturation), bounded xhat error, end to end."""
import pytest
import torch

import fxcompress
from fxcompress.codecs import Layout
from fxcompress.codecs.blpa import BLPA, BLPAMask, BLPARelu
from conftest import check_predicate_readers, compressed, make_model, one_block_resnet, train_step, two_stage_cnn
from test_lossless import _stored_bytes
from test_quant import _no_dropout


def _bn_case(channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = 4, 12, 5, 5
    x = torch.randn(n, c, h, w, generator=g) * torch.linspace(0.1, 10, c).view(1, c, 1, 1) + 3.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    # gamma: positive, negative and zero; beta/|gamma| inside and far beyond the window
    gamma = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, 1e-3, -1e-3, 1.0, -2.0, 0.3, 1.0])
    beta = torch.tensor([0.0, 0.0, 1.0, 1.0, -3.0, 0.7, 0.1, -0.1, 50.0, -50.0, -0.2, 2.9])
    mean = x.mean(dim=(0, 2, 3))
    invstd = torch.rsqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    xhat = (x - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
    y = gamma.view(1, c, 1, 1) * xhat + beta.view(1, c, 1, 1)
    return x, y, gamma, beta, mean, invstd, xhat


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_relu_mask_from_code_is_exact(bits, channels_last, dtype):
    """fp16 included: a gamma ~ 0 channel's bins are below its subnormals, and stay positive."""
    x, y, gamma, beta, mean, invstd, xhat = _bn_case(channels_last)
    x, y = x.to(dtype), y.to(dtype)
    codec = BLPA(Layout.of(x), bits)
    parts = codec.encode(x, y, mean, invstd, gamma, beta)
    assert sum(p.nbytes for p in parts) == codec.nbytes()
    relu = BLPARelu(codec, x.dtype).decode(*parts)
    assert torch.equal(relu > 0, y > 0)  # the mask, including saturated and gamma <= 0 channels
    assert (relu >= 0).all()
    alone = BLPARelu(codec, x.dtype).decode_predicate(*parts)  # what Inductor's ReLU backward reads
    assert torch.equal(alone > 0, y > 0) and alone.stride() == relu.stride() and alone.dtype == relu.dtype
    assert codec.decode(*parts).stride() == x.stride()
    for mask_layout in {x.stride(): x, y.contiguous().stride(): y.contiguous()}.values():  # and the other layout
        mask = BLPAMask(codec, Layout.of(mask_layout <= 0)).decode(*parts)
        assert torch.equal(mask, y <= 0) and mask.stride() == mask_layout.stride()


@pytest.mark.parametrize("bits", [8, 4])
def test_xhat_error_within_half_a_bin_inside_the_window(bits):
    x, y, gamma, beta, mean, invstd, xhat = _bn_case()
    codec = BLPA(Layout.of(x), bits)
    packed, a, b, shift, gw = parts = codec.encode(x, y, mean, invstd, gamma, beta)
    xq = codec.decode(*parts)
    xhat_q = (xq - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    width = 6 / 2**bits
    # the window is six standard deviations wide: compare where the code did not
    # saturate (and gamma is not clamped to ~0)
    q = torch.round((xq - b.view(1, -1, 1, 1)) / a.view(1, -1, 1, 1))
    inside = (q > 0) & (q < 2**bits - 1) & (gamma.abs() > 0.1).view(1, -1, 1, 1)
    assert inside.float().mean() > 0.5
    err = (xhat_q - xhat).abs()[inside]
    assert (err <= width / 2 + 1e-4).all(), float(err.max())


@pytest.mark.parametrize("codec, threshold", [("blpa8", 0.999), ("blpa4", 0.99)])
def test_blpa_end_to_end_on_convnets(codec, threshold):
    for name in ("convnet", "resnet"):
        torch._dynamo.reset()
        model, x = make_model(name)
        _no_dropout(model)
        exact = train_step(model, x, compressed("none"))
        torch._dynamo.reset()
        got = train_step(model, x, compressed(codec))
        weights = [n for n, p in model.named_parameters() if p.dim() > 1]
        cos = torch.nn.functional.cosine_similarity(
            torch.cat([got.grads[n].flatten() for n in weights]),
            torch.cat([exact.grads[n].flatten() for n in weights]), dim=0)
        assert float(cos) >= threshold, f"{name} {codec}: {float(cos):.5f}"
        report = fxcompress.explain(got.module)
        codecs = {r.codec.split("(")[0] for r in report.rows}
        assert codec in codecs and f"{codec}:relu" in codecs, codecs
        assert _stored_bytes(got.module, model, x) == report.saved_bytes_after
        assert report.saved_bytes_after < report.saved_bytes_before / 2


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("options", [{"affine": False}, {"track_running_stats": False}])
def test_blpa_codes_batch_norms_without_affine_parameters_or_running_statistics(backend, options):
    """``affine=False``: y = xhat (gamma 1, beta 0); ``track_running_stats=False``: eager's
    ``_native_batch_norm_legit.no_stats``. Both were left exact as if they fed no batch-norm."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8, **options), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(4, 3, 10, 10)
    reference = copy.deepcopy(model)
    reference(x).pow(2).sum().backward()
    torch._dynamo.reset()
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="blpa4"), backend=backend)
    cm(x).pow(2).sum().backward()
    codecs = [r.codec.split("(")[0] for r in fxcompress.explain(cm).rows]
    assert "blpa4" in codecs and "blpa4:relu" in codecs, codecs
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert float(torch.nn.functional.cosine_similarity(got, exact, dim=0)) >= 0.99


class _TwoNorms(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)
        self.bn, self.bn2 = torch.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        c = self.conv(x)
        return (self.conv2(torch.relu(self.bn(c))) + self.conv2(torch.relu(self.bn2(c)))).pow(2).sum()


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_two_batch_norms_of_one_tensor_share_its_code(backend):
    """One code per tensor, in the first batch-norm's space: the ReLU of that one is decoded from it,
    the other stays exact. Inductor computes the two batch-norms' statistics once (its x - mean
    times rstd feeds both scalings): found as the first, not as a batch-norm without affine."""
    import copy

    torch.manual_seed(0)
    model, x = _TwoNorms(), torch.randn(4, 3, 10, 10)
    reference = copy.deepcopy(model)
    reference(x).backward()
    torch._dynamo.reset()
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="blpa4"), backend=backend)
    cm(x).backward()
    rows = [r for r in fxcompress.explain(cm).rows if r.shape == (4, 8, 8, 8) and not r.codec.startswith("alias")]
    assert sorted(r.codec for r in rows) == ["blpa4", "blpa4:relu(convolution)", "none"], rows
    (code,) = [r for r in rows if r.codec == "blpa4"]
    assert "no affine" not in code.reason
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert float(torch.nn.functional.cosine_similarity(got, exact, dim=0)) >= 0.99


def _weight_grads(step, model):
    return torch.cat([step.grads[n].flatten() for n, p in model.named_parameters() if p.dim() > 1])


def test_blpa_on_inductor_finds_the_decomposed_batch_norms():
    """Inductor decomposes batch-norm before fxcompress sees the graph: BLPA finds it as
    ``var_mean``, ``(x - mean) * rsqrt(var + eps) * gamma + beta``; the codes are eager's. A stem and
    one residual block with a projection shortcut: batch-norms before a ReLU, before the sum and on the
    shortcut (the zoo's ResNet, ten of them, took 35 s under -n 2 on a 2-core x86_64 CPU)."""
    model, x = one_block_resnet()
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    exact = _weight_grads(train_step(model, x, compressed("none")), model)
    eager = train_step(model, x, compressed("blpa4"))
    torch._dynamo.reset()
    inductor = train_step(model, x, compressed("blpa4", backend="inductor"))
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(_weight_grads(inductor, model), exact, dim=0)) >= 0.99
    assert float(cos(_weight_grads(inductor, model), _weight_grads(eager, model), dim=0)) >= 0.9999
    rows = {backend: [r.codec.split("(")[0] for r in fxcompress.explain(step.module).rows]
            for backend, step in (("eager", eager), ("inductor", inductor))}
    assert rows["inductor"].count("blpa4") == rows["eager"].count("blpa4") == norms == 4  # every batch-norm input
    assert rows["inductor"].count("blpa4:relu") >= 2  # each ReLU right after a batch-norm
    assert _stored_bytes(inductor.module, model, x) == fxcompress.explain(inductor.module).saved_bytes_after
    (capture,) = inductor.module.capture_log.captures()
    check_predicate_readers(capture.rewritten.bw.graph)


def test_blpa_on_inductor_under_autocast():
    """Under bf16 autocast the decomposition casts x to fp32 for its statistics and y back."""
    model, x = two_stage_cnn()
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="blpa4"), backend="inductor")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(x)
    out.float().pow(2).mean().backward()
    codecs = [r.codec.split("(")[0] for r in fxcompress.explain(cm).rows]
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert codecs.count("blpa4") == bns and "blpa4:relu" in codecs
    assert all(p.grad.isfinite().all() for p in model.parameters())


def test_blpa_decodes_the_relu_mask_inductor_recomputes_from_the_code():
    """Inductor's backward recomputes a ReLU's mask from the batch-norm input, and save_predicates
    saves it from the forward (1 bit an element beside blpa4's 4): BLPA's code has it exactly, so
    nothing of it is stored, and the bias gradient (the sum of what the mask lets through) stays exact."""
    import copy

    from test_predicates import ACTIVATIONS, _NormAct

    torch.manual_seed(0)
    model, x = _NormAct(ACTIVATIONS["relu"]()), torch.randn(4, 3, 8, 8) * 3
    reference = copy.deepcopy(model)
    reference(x).backward()
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="blpa4"), backend="inductor")
    cm(x).backward()
    rows = {r.name: r for r in fxcompress.explain(cm).rows}
    assert rows["le"].codec == "blpa4:mask(convolution)" and rows["le"].bytes_after == 0
    assert rows["convolution"].codec.startswith("blpa4")
    (capture,) = cm.capture_log.captures()
    assert not any(s.dtype == torch.bool for s in capture.rewritten.saved)
    torch.testing.assert_close(model.bn.bias.grad, reference.bn.bias.grad, rtol=1e-5, atol=1e-4)


class _ReturnsBNInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.weight = torch.nn.Parameter(torch.randn(8, 8, 8))

    def forward(self, x):
        c = self.conv(x)
        return (torch.relu(self.bn(c)) * self.weight).sum(), c


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_batch_norm_input_the_caller_gets_stays_exact_and_so_do_its_relus(backend):
    """A BN input that is also a forward output keeps no code (the caller holds it); the ReLU and
    mask that would be decoded from that code are then planned on their own (they raised KeyError)."""
    import copy

    torch.manual_seed(0)
    model, x = _ReturnsBNInput(), torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(model)
    out, c = reference(x)
    (out + c.sum()).backward()
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="blpa4"), backend=backend)
    out, c = cm(x)
    (out + c.sum()).backward()
    rows = {r.name: r for r in fxcompress.explain(cm).rows}
    assert "forward output" in rows["convolution"].reason
    assert not any(r.codec.startswith("blpa") for r in rows.values())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_blpa_fallback_quantizes_what_the_paper_keeps():
    model, x = make_model("resnet")
    plain = train_step(model, x, compressed("blpa4"))
    torch._dynamo.reset()
    fallback = train_step(model, x, compressed("blpa4", blpa_fallback="int4"))
    kept = [r for r in fxcompress.explain(plain.module).rows if "blpa_fallback='none'" in r.reason]
    assert kept, "the residual network has BN-free saved tensors"
    assert fxcompress.explain(fallback.module).saved_bytes_after < fxcompress.explain(plain.module).saved_bytes_after


def test_blpa_fallback_must_be_a_per_group_codec():
    with pytest.raises(fxcompress.ConfigError, match="blpa_fallback='blpa4'.*'int8'"):
        fxcompress.CompressConfig(codec="blpa4", blpa_fallback="blpa4")
