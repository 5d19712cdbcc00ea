"""The user's real setup: mixed precision with a GradScaler, retain_graph, long runs."""
import pytest
import torch

import fxcompress
from conftest import compressed, make_model
from test_quant import _no_dropout

CODECS = ["none", "lossless", "int8", "int4", "int2", "fp8"]


@pytest.mark.parametrize("codec", CODECS)
def test_fp16_grad_scaler_skips_the_same_steps_as_exact(codec):
    """A step whose exact gradients overflow also overflows under every codec (a non-finite
    group decodes to NaN), so the scaler skips it; the finite steps go through."""
    model, x = make_model("mlp")
    _no_dropout(model)
    cm = compressed(codec)(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped = []
    for scale_input in (1.0, 3e4, 1.0):  # 3e4: the fp16 forward overflows
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = cm(x * scale_input).float().pow(2).mean()
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
    assert skipped == [False, True, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_activations_are_compressed_not_skipped(dtype):
    model, x = make_model("convnet")
    cm = compressed("int4")(model)
    with torch.autocast("cpu", dtype=dtype):
        out = cm(x)
    out.float().pow(2).mean().backward()
    name = str(dtype).removeprefix("torch.")
    rows = [r for r in fxcompress.explain(cm).rows if r.counted and r.dtype == name and r.bytes_before >= 4096
            and "computed from parameters" not in r.reason]  # weight copies stay exact, by design
    assert len(rows) >= 4 and all(r.bytes_after < r.bytes_before for r in rows), rows


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_with_stochastic_rounding_is_close_and_reproducible(backend, dtype):
    """bf16/fp16 autocast on both backends: the low-precision activations are quantized, the
    gradients stay close to exact training under the same autocast, and with one seed
    stochastic rounding gives the same gradients run to run (another seed: others)."""
    model, x = make_model("mlp")
    _no_dropout(model)

    def step(run, seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=dtype):
            out = run(x)
        out.float().pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = step(model, 0)
    cm = compressed("int4", backend)(model)
    first, again, other = step(cm, 5), step(cm, 5), step(cm, 6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.nn.functional.cosine_similarity(first, exact, dim=0) > 0.99
    name = str(dtype).removeprefix("torch.")
    assert any(r.dtype == name and r.codec.startswith("int4") for r in fxcompress.explain(cm).rows)


@pytest.mark.parametrize("codec", ["lossless", "int4"])
def test_retain_graph_second_backward_repeats_the_first(codec):
    model, x = make_model("mlp")
    _no_dropout(model)
    cm = compressed(codec)(model)
    loss = cm(x).pow(2).mean()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()  # decodes the same codes again
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, first[n] + first[n]), n


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _gpu_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize("device, backend, measure, limit", [
    pytest.param("cpu", "eager", _rss_bytes, 16 * 2**20, id="cpu-rss",
                 marks=pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")),
    pytest.param("cuda", "inductor", _gpu_bytes, 1, id="cuda-allocated",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_two_hundred_steps_do_not_grow_memory(device, backend, measure, limit):
    model, x = make_model("convnet")
    model, x = model.to(device), x.to(device)
    cm = compressed("int4", backend)(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        cm(x).pow(2).mean().backward()
        opt.step()

    for _ in range(20):
        step()
    start = measure()
    for _ in range(200):
        step()
    grown = measure() - start
    assert grown < limit, f"{device} memory grew {grown / 2**20:.3f} MiB over 200 steps"
