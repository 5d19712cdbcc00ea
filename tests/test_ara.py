"""ARA (Woo & Jeon, ICLR 2023): convolutions that read a residual block's input take their
weight gradient from the group's first block input; everything else stays exact backprop."""
import pytest
import torch
import torch.nn as nn

import fxcompress
from conftest import compressed, make_model, train_step
from fxcompress.errors import ConfigError
from test_lossless import _stored_bytes


def _ara(codec="lossless", backend="eager", **kw):
    return compressed(codec, backend, learning_rule="ara", **kw)


def _conv_io(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Plain backprop on ``model``: each conv's input and the exact gradient of its output."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, args, out, name=name):
                seen[name] = [args[0].detach(), None]
                out.register_hook(lambda g: seen[name].__setitem__(1, g.detach()))
            hooks.append(m.register_forward_hook(hook))
    model.zero_grad(set_to_none=True)
    model(x).float().pow(2).mean().backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {k: tuple(v) for k, v in seen.items()}


@pytest.mark.parametrize("stride", [2, 3])
def test_ara_substitutes_only_weight_gradients(stride):
    model, x = make_model("resnet")
    x = x.requires_grad_()
    exact = train_step(model, x, compressed("lossless"))
    exact_input_grad = x.grad.clone()
    x.grad = None
    ara = train_step(model, x, _ara(ara_stride=stride))
    report = fxcompress.explain(ara.module)
    subs = [s for s in report.substitutions if s.aux is not None]
    assert len(subs) == {2: 1, 3: 3}[stride]

    assert torch.equal(x.grad, exact_input_grad)  # the backpropagated error stays exact
    torch.testing.assert_close(ara.output, exact.output, rtol=0, atol=0)
    substituted = {f"{s.layer}.weight" for s in subs}
    for name, g in exact.grads.items():
        if name not in substituted:
            assert torch.equal(ara.grads[name], g), name

    io = _conv_io(model, x.detach())
    modules = dict(model.named_modules())
    for s in subs:
        conv = modules[s.layer]
        aux_input = io[s.aux_layer][0]
        grad_out = io[s.layer][1]
        want = torch.nn.grad.conv2d_weight(aux_input, conv.weight.shape, grad_out, conv.stride, conv.padding,
                                           conv.dilation, conv.groups)
        torch.testing.assert_close(ara.grads[f"{s.layer}.weight"], want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(ara.grads[f"{s.layer}.weight"], exact.grads[f"{s.layer}.weight"])

    exact_report = fxcompress.explain(exact.module)
    assert report.saved_bytes_after < exact_report.saved_bytes_after
    assert _stored_bytes(ara.module, model, x.detach()) == report.saved_bytes_after
    for s in subs:  # the real input is left with its ReLU's 1-bit mask
        row = next(r for r in report.rows if r.name == s.real)
        assert row.codec.startswith("mask[") and row.bytes_after * 8 * 4 == row.bytes_before, row  # fp32


def test_ara_combines_with_int4_and_inductor():
    model, x = make_model("resnet")
    int4 = fxcompress.explain(train_step(model, x, compressed("int4")).module)
    both = train_step(model, x, _ara("int4", ara_stride=3))
    report = fxcompress.explain(both.module)
    assert sum(s.aux is not None for s in report.substitutions) == 3
    assert report.saved_bytes_after < int4.saved_bytes_after
    torch._dynamo.reset()
    ind = train_step(model, x, _ara("lossless", "inductor", ara_stride=3))
    eager = train_step(model, x, _ara("lossless", "eager", ara_stride=3))
    for name, g in eager.grads.items():
        torch.testing.assert_close(ind.grads[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_ara_without_residual_blocks_is_backprop_and_says_so(name):
    model, x = make_model(name)
    exact = train_step(model, x, compressed("lossless"))
    ara = train_step(model, x, _ara())
    for k, g in exact.grads.items():
        assert torch.equal(ara.grads[k], g), k
    report = fxcompress.explain(ara.module)
    assert all(s.aux is None for s in report.substitutions)
    assert "no residual block" in str(report)


@pytest.mark.parametrize("bad", [0, -1, True, "2", (), (2, 0), 1.5])
def test_bad_ara_stride_is_rejected(bad):
    with pytest.raises(ConfigError, match="ara_stride"):
        fxcompress.CompressConfig(learning_rule="ara", ara_stride=bad)


def test_per_chain_strides_must_match_the_chains():
    model, x = make_model("resnet")  # two chains: stage 1 (+ stage 2's input), stage 2
    ok = train_step(model, x, _ara(ara_stride=(3, 1)))
    assert sum(s.aux is not None for s in fxcompress.explain(ok.module).substitutions) == 3
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match="2 residual chains"):
        train_step(model, x, _ara(ara_stride=(2, 2, 2)))


def test_learning_indicator_matches_its_definition_and_leaves_buffers_alone():
    model, x = make_model("resnet")
    ara = train_step(model, x, _ara(ara_stride=3))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    li = fxcompress.learning_indicator(ara.module, x)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    subs = [s for s in fxcompress.explain(ara.module).substitutions if s.aux is not None]
    assert set(li) == {s.layer for s in subs}

    io = _conv_io(model, x)  # real inputs, from an independent run
    for s in subs:
        real, aux = io[s.layer][0], io[s.aux_layer][0]
        want = 1 - ((real - aux) ** 2).sum() / (real**2).sum()
        assert li[s.layer] == pytest.approx(want.item(), rel=1e-5)
        assert li[s.layer] < 1
    assert "LI=" in str(fxcompress.explain(ara.module, inputs=(x,)))
