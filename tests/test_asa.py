"""ASA (Woo & Jeon, ICLR 2023): a linear layer fed by an activation computes
``W(h + eps*sign(h)) + b``, stores ``sign(h)`` as 1 bit, and its weight gradient is
``lam * (eps*s)^T delta``; the input gradient stays exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress
from conftest import compressed, make_model, train_step
from fxcompress.errors import ConfigError

EPS, LAM = 0.01, 100.0


class FFN(nn.Module):
    def __init__(self, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), act(), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _asa(codec="lossless", backend="eager", **kw):
    return compressed(codec, backend, learning_rule="asa", **kw)


@pytest.mark.parametrize("act, backend", [
    (nn.GELU, "eager"), (nn.ReLU, "eager"), (nn.SiLU, "eager"), (nn.GELU, "inductor"),
])
def test_asa_matches_the_hand_written_rule(act, backend):
    torch.manual_seed(0)
    model, x = FFN(act), torch.randn(64, 16)
    # the reference: W(h + eps*sign(h)) + b with autograd, sign's own gradient being zero
    xr = x.clone().requires_grad_()
    h = model.act(model.fc1(xr))
    y_ref = model.fc2(h + EPS * torch.sign(h).detach())
    y_ref.retain_grad()
    y_ref.pow(2).mean().backward()
    delta, s = y_ref.grad, torch.sign(h.detach())
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    xa = x.clone().requires_grad_()
    step = train_step(model, xa, _asa(backend=backend))
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.output, y_ref.detach(), **tol)
    torch.testing.assert_close(xa.grad, xr.grad, **tol)  # exact input gradient
    torch.testing.assert_close(step.grads["fc2.weight"], LAM * EPS * delta.t() @ s, **tol)
    torch.testing.assert_close(step.grads["fc2.bias"], ref_grads["fc2.bias"], **tol)
    for name in ("fc1.weight", "fc1.bias"):  # exact backprop through the ASA forward
        torch.testing.assert_close(step.grads[name], ref_grads[name], **tol)
    assert not torch.allclose(step.grads["fc2.weight"], ref_grads["fc2.weight"])

    report = fxcompress.explain(step.module)
    assert [s.layer for s in report.substitutions if s.aux is not None] == ["fc2"]
    if backend == "eager":  # (Inductor's min-cut may instead recompute the sign from fc1's output)
        bits = [r for r in report.rows if r.counted and r.dtype == "bool" and r.shape == (64, 32)]
        assert len(bits) == 1 and bits[0].codec == "bitmask"  # sign(h) in 1 bit
        torch.manual_seed(0)  # NB: ASA changed the model's fc2 itself; backprop needs a fresh one
        exact = fxcompress.explain(train_step(FFN(act), x, compressed("lossless")).module)
        assert report.saved_bytes_after < exact.saved_bytes_after


def test_asa_forward_holds_in_eval_too():
    torch.manual_seed(0)
    model, x = FFN(), torch.randn(8, 16)
    cm = _asa()(model)
    train_out = cm(x)
    cm.eval()
    with torch.no_grad():
        eval_out = cm(x)
    h = model.act(model.fc1(x))
    torch.testing.assert_close(eval_out, F.linear(h + EPS * torch.sign(h), model.fc2.weight, model.fc2.bias))
    torch.testing.assert_close(train_out.detach(), eval_out)


def test_asa_on_the_transformer_saves_one_bit_per_ffn_input_and_combines_with_int8():
    model, x = make_model("transformer")
    plain = fxcompress.explain(train_step(model, x, compressed("lossless")).module)
    int8 = fxcompress.explain(train_step(model, x, compressed("int8")).module)
    asa = fxcompress.explain(train_step(model, x, _asa()).module)  # NB: changes the model itself
    layers = sorted(s.layer for s in asa.substitutions if s.aux is not None)
    assert layers == ["blocks.0.out", "blocks.1.out"]  # the FFN's second linear, after GELU
    assert asa.saved_bytes_after < plain.saved_bytes_after
    model, x = make_model("transformer")
    both = fxcompress.explain(train_step(model, x, _asa("int8")).module)
    assert both.saved_bytes_after < int8.saved_bytes_after


def test_asa_layers_by_pattern():
    model, x = make_model("transformer")
    step = train_step(model, x, _asa(asa_layers=("blocks.*.fc", "blocks.*.out")))
    layers = sorted(s.layer for s in fxcompress.explain(step.module).substitutions if s.aux is not None)
    assert layers == ["blocks.0.fc", "blocks.0.out", "blocks.1.fc", "blocks.1.out"]


def test_asa_without_the_pattern_is_backprop_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))  # no activation
    x = torch.randn(8, 16)
    exact = train_step(model, x, compressed("lossless"))
    step = train_step(model, x, _asa())
    for k, g in exact.grads.items():
        assert torch.equal(step.grads[k], g), k
    report = fxcompress.explain(step.module)
    assert len(report.substitutions) == 2
    assert all(s.aux is None and "not an activation" in s.reason for s in report.substitutions)


@pytest.mark.parametrize("field, bad", [
    ("asa_epsilon", 0), ("asa_epsilon", -0.1), ("asa_epsilon", float("nan")), ("asa_epsilon", "0.01"),
    ("asa_lambda", True), ("asa_lambda", float("inf")),
    ("asa_layers", ""), ("asa_layers", ()), ("asa_layers", (1,)), ("asa_layers", "ffn"),
])
def test_bad_asa_settings_are_rejected(field, bad):
    with pytest.raises(ConfigError, match=field):
        fxcompress.CompressConfig(learning_rule="asa", **{field: bad})


def test_compiling_an_asa_model_again_keeps_its_layers():
    torch.manual_seed(0)
    model, x = FFN(), torch.randn(8, 16)
    first = train_step(model, x, _asa())
    again = train_step(model, x, _asa())
    for step in (first, again):
        assert [s.layer for s in fxcompress.explain(step.module).substitutions if s.aux is not None] == ["fc2"]
    for k, g in first.grads.items():
        torch.testing.assert_close(again.grads[k], g)


class ConvMixer(nn.Module):
    """A 3x3 conv, ReLU, then a 1x1 conv (the pointwise half of a ConvMixer / bottleneck block)."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.point = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1)
        # fed by no activation, and strided: never ASA.
        # NB: 16 input channels, not fewer: oneDNN's channels-last 1x1 stride-2 weight gradient (used under
        # Inductor on CPU) reads past its workspace when there are fewer input channels than its block of
        # 8 (AVX2) or 16 (AVX-512), and was intermittently wrong here with 6 (oneDNN issue #6035)
        self.strided = nn.Conv2d(16, 4, 1, stride=2)

    def forward(self, x):
        return self.strided(self.point(self.act(self.conv(x))))


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_asa_on_a_1x1_convolution_matches_the_rule(backend):
    torch.manual_seed(0)
    model, x = ConvMixer(), torch.randn(4, 3, 6, 6)
    h = model.act(model.conv(x)).detach()
    s = torch.sign(h)
    xr = x.clone().requires_grad_()
    y_mid = F.conv2d(model.act(model.conv(xr)) + EPS * s, model.point.weight, model.point.bias)
    y_mid.retain_grad()
    model.strided(y_mid).pow(2).mean().backward()
    delta = y_mid.grad
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    xa = x.clone().requires_grad_()
    step = train_step(model, xa, _asa(backend=backend))
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xr.grad, **tol)  # exact input gradient
    expected = LAM * EPS * torch.einsum("nohw,nihw->oi", delta, s)[..., None, None]
    torch.testing.assert_close(step.grads["point.weight"], expected, **tol)
    for name in ("point.bias", "conv.weight", "conv.bias", "strided.weight", "strided.bias"):
        torch.testing.assert_close(step.grads[name], ref[name], **tol)
    report = fxcompress.explain(step.module)
    assert [s.layer for s in report.substitutions if s.aux is not None] == ["point"]
    model.eval()
    with torch.no_grad():  # the forward change holds in eval too
        torch.testing.assert_close(model(x), model.strided(y_mid).detach(), **tol)


def test_asa_learning_indicator_matches_its_definition():
    torch.manual_seed(0)
    model, x = FFN(), torch.randn(32, 16)
    step = train_step(model, x, _asa())
    li = fxcompress.learning_indicator(step.module, x)
    with torch.no_grad():
        h = model.act(model.fc1(x))
    s = torch.where(h > 0, 1.0, -1.0)
    real, aux = h + EPS * s, LAM * EPS * s
    assert li.keys() == {"fc2"}
    assert li["fc2"] == pytest.approx(float(1 - (real - aux).pow(2).sum() / real.pow(2).sum()), rel=1e-5)
    assert fxcompress.explain(step.module, inputs=(x,)).learning_indicator == li
