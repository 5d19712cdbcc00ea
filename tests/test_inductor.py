"""The Inductor backend: same rewrite, compiled; configs never share compiled graphs."""
import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import fxcompress
from fxcompress.capture import CaptureLog, Partitioner
from fxcompress.config import Backend
from fxcompress.passes.liveness import analyze_liveness
from conftest import (ZOO_NAMES, assert_grads_close, check_predicate_readers, compressed, make_model,
                      one_block_resnet, train_step, two_stage_cnn)
from test_lossless import _stored_bytes


# NB: plain torch.compile is compared on the two models whose Inductor compiles are
# quick (each compile costs the suite tens of seconds of C++ on a cold cache); the
# CNNs' `none` graphs are the same min-cut partition, compiled the same way.
PLAIN_TOO = ("mlp", "transformer")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_inductor_lossless_matches_none_and_plain_compile(name):
    model, x = make_model(name)
    if name in PLAIN_TOO:
        plain = train_step(model, x, lambda m: torch.compile(m))
        torch._dynamo.reset()
    none = train_step(model, x, compressed("none", "inductor"))
    # Same process, second config: must run the second config's graphs.
    lossless = train_step(model, x, compressed("lossless", "inductor"))

    # NB: not bit-exact even between two compiles of one graph: Inductor's CPU
    # scatter-add (embedding backward) accumulates across threads in any order.
    if name in PLAIN_TOO:
        torch.testing.assert_close(none.output, plain.output, rtol=1e-6, atol=1e-9)
        assert_grads_close(plain.grads, none.grads, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(lossless.output, none.output, rtol=1e-6, atol=1e-6)
    assert_grads_close(none.grads, lossless.grads, rtol=1e-5, atol=1e-7)

    r_none, r_lossless = fxcompress.explain(none.module), fxcompress.explain(lossless.module)
    assert r_lossless.saved_bytes_after < r_none.saved_bytes_after
    assert _stored_bytes(lossless.module, model, x) == r_lossless.saved_bytes_after
    assert _stored_bytes(none.module, model, x) == r_none.saved_bytes_after


def test_partitioner_uuid_follows_the_config():
    log = CaptureLog()
    ids = {
        codec: Partitioner(fxcompress.CompressConfig(codec=codec), Backend.INDUCTOR, log).uuid()
        for codec in ("none", "lossless")
    }
    assert ids["none"] != ids["lossless"]
    same = Partitioner(fxcompress.CompressConfig(codec="none"), Backend.INDUCTOR, CaptureLog()).uuid()
    assert same == ids["none"]
    other_min = Partitioner(fxcompress.CompressConfig(min_bytes=0), Backend.INDUCTOR, log).uuid()
    assert other_min != ids["lossless"]
    # torch 2.11 pickles the partitioner into its FX graph cache key; the capture log's lock does not pickle
    partitioner = Partitioner(fxcompress.CompressConfig(), Backend.INDUCTOR, log)
    assert pickle.loads(pickle.dumps(partitioner)) == ids["lossless"]
    assert copy.copy(partitioner) is partitioner and copy.deepcopy(partitioner) is partitioner


def test_the_record_is_the_program_fxcompress_built():
    """Inductor's passes edit the graphs they compile in place (on torch 2.11 its noop removal
    erased a saved cast that the record still named): the compilers get copies. The graphs of
    test_blpa.py's autocast test (one compile in Inductor's cache for both)."""
    model, x = two_stage_cnn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = train_step(model, x, compressed("blpa4", "inductor"))
    (cap,) = trained.module.capture_log.captures()
    for program in (cap.original, cap.rewritten):
        fw, bw = set(program.fw.graph.nodes), set(program.bw.graph.nodes)
        assert all(s.fw_node in fw and s.bw_placeholder in bw for s in program.saved)
        program.fw.graph.lint()
        program.bw.graph.lint()
    fxcompress.explain(trained.module)


_CHILD = textwrap.dedent(
    """
    import sys, torch, fxcompress
    sys.path.insert(0, "tests")
    from conftest import make_model
    from test_lossless import _stored_bytes
    model, x = make_model("mlp")
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec=sys.argv[1]))
    cm(x).sum().backward()
    report = fxcompress.explain(cm)
    print(_stored_bytes(cm, model, x), report.saved_bytes_after)
    """
)


def test_config_change_between_processes_never_reuses_cached_graphs():
    # NB: Inductor's cache as this session has it (the tests above compiled these graphs, so the
    # children compile little): the second process finds the first one's graphs in it, and others
    stored = {}
    for codec in ("lossless", "none"):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, codec], capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        stored[codec], reported = map(int, out.stdout.split())
        assert stored[codec] == reported
    assert stored["none"] > stored["lossless"]


def test_inductor_int4_stochastic_rounding_reproducible_and_close():
    from test_quant import _no_dropout

    model, x = make_model("mlp")  # NB: the smallest zoo model: each Inductor compile is C++ on a cold CI cache
    _no_dropout(model)
    exact = train_step(model, x, compressed("none", "eager"))
    torch._dynamo.reset()
    first = train_step(model, x, compressed("int4", "inductor"), seed=5)
    again = train_step(model, x, lambda m: first.module, seed=5)  # same compiled graphs, same seed
    other = train_step(model, x, lambda m: first.module, seed=6)
    assert_grads_close(first.grads, again.grads, rtol=0, atol=0)
    assert any(not torch.equal(first.grads[k], other.grads[k]) for k in first.grads)
    weights = [n for n, p in model.named_parameters() if p.dim() > 1]
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([first.grads[n].flatten() for n in weights]),
        torch.cat([exact.grads[n].flatten() for n in weights]), dim=0)
    assert float(cos) >= 0.99
    report = fxcompress.explain(first.module)
    assert any(r.codec.startswith("int4") for r in report.rows)
    assert _stored_bytes(first.module, model, x) == report.saved_bytes_after


def test_backward_keeps_the_rewrites_order(monkeypatch):
    """Inductor's reorder_for_peak_memory may run every decoder first (they read only graph
    inputs), holding all decoded activations at once (seen on an H100: ResNet-50 int4 kept
    9.5 of 10.1 GiB). fxcompress turns it off for its forward and its (later) backward."""
    import torch._inductor.memory as memory

    calls = []
    real = memory.reorder_for_peak_memory
    monkeypatch.setattr(memory, "reorder_for_peak_memory", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, x = make_model("mlp")
    # NB: config.patch, not monkeypatch: on torch 2.11 monkeypatch's undo hid the option for good
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit skips scheduling
        train_step(model, x, compressed("int4", "inductor"))
        assert calls == []
        torch._dynamo.reset()
        train_step(model, x, lambda m: torch.compile(m))
    assert len(calls) >= 2  # plain torch.compile: forward and backward both reordered


def test_codecs_group_in_the_layout_inductor_gives_the_tensor():
    """Inductor's layout optimization makes a conv net channels-last (with oneDNN on a CPU, always),
    where the traced graph says contiguous: the codecs group those tensors channels-last, so that each
    group is contiguous in the buffer Inductor really writes, and every reader of an encoded tensor
    reads it through a pin to that layout, so that Inductor cannot lay it out otherwise."""
    from torch._prims_common import make_channels_last_strides_for

    model, x = two_stage_cnn()
    exact = train_step(model, x, compressed("none", "eager"))
    eager = train_step(model, x, compressed("int4", "eager"))
    torch._dynamo.reset()
    inductor = train_step(model, x, compressed("int4", "inductor"))
    (cap,) = inductor.module.capture_log.captures()
    (eager_cap,) = eager.module.capture_log.captures()

    def conv_outputs(program):
        return [s for s in program.saved if s.fw_node.target is torch.ops.aten.convolution.default]

    assert all(s.stride == tuple(make_channels_last_strides_for(s.shape)) for s in conv_outputs(cap.original))
    assert len(conv_outputs(cap.original)) == len(conv_outputs(eager_cap.original)) == 2
    assert all(s.fw_node.meta["val"].is_contiguous() for s in conv_outputs(eager_cap.original))
    pins = [n for n in cap.rewritten.fw.graph.nodes if n.target is torch.ops.prims.inductor_force_stride_order.default]
    assert len(pins) >= 2 and all(list(p.args[0].users) == [p] for p in pins)

    weights = [n for n, p in model.named_parameters() if p.dim() > 1]
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([inductor.grads[n].flatten() for n in weights]),
        torch.cat([exact.grads[n].flatten() for n in weights]), dim=0)
    assert float(cos) >= 0.99
    report = fxcompress.explain(inductor.module)
    assert _stored_bytes(inductor.module, model, x) == report.saved_bytes_after
    check_predicate_readers(cap.rewritten.bw.graph)
    # Inductor's C++ code: the plan counts every value; its Triton code: it leaves out what the
    # kernels compute inline (test_liveness.py)
    assert report.predicted_peak_bytes_after == analyze_liveness(cap.rewritten).peak_bytes
    with torch._inductor.config.patch(cpu_backend="triton"):
        triton = fxcompress.explain(inductor.module).predicted_peak_bytes_after
        assert triton == analyze_liveness(cap.rewritten, inductor=True).peak_bytes
    assert triton < report.predicted_peak_bytes_after


def test_statistics_of_decomposed_norms_stay_exact():
    """Inductor decomposes batch- and layer-norm before fxcompress sees the graph, and their backward
    reads mean and inverse std through plain sub/mul ops: the statistics are found from the forward
    (what var_mean leads to). ResNet-50's (C,) statistics pass the default min_bytes from 512 channels
    on; they had been quantized. Here min_bytes=0 lets 16 and 32 channels show it."""
    model, x = two_stage_cnn()
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="int4", min_bytes=0), backend="inductor")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(x)
    out.float().pow(2).mean().backward()
    rows = fxcompress.explain(cm).rows
    statistics = [r for r in rows if "normalization statistic" in r.reason]
    assert {r.op for r in statistics} >= {"var_mean.correction[1]", "rsqrt", "convert_element_type"}
    assert all(r.codec == "none" and r.shape[-1] in (1, 16, 32) for r in statistics)
    assert any(r.codec.startswith("int4") for r in rows)


def test_what_counts_as_a_normalization_statistic():
    from torch.fx.experimental.proxy_tensor import make_fx
    from fxcompress.passes.select import _statistic_of

    def norms(x):
        var, mean = torch.ops.aten.var_mean.correction(x, [0, 2, 3], correction=0, keepdim=True)
        invstd = torch.rsqrt(var + 1e-5)
        rms = torch.rsqrt(x.pow(2).mean(dim=[1], keepdim=True) + 1e-6)
        return invstd.squeeze().to(torch.bfloat16), mean, (x - mean) * invstd, x.mean(dim=[2, 3]), rms

    graph = make_fx(norms)(torch.randn(4, 3, 5, 5)).graph
    outputs = graph.output_node().args[0]
    assert [_statistic_of(n) for n in outputs] == ["var_mean.correction", "var_mean.correction", None, None, "mean.dim"]


def test_predicate_decodes_change_the_gradients_by_rounding_only(monkeypatch):
    """Inductor's ReLU backwards read a decode of the predicate alone and their output is pinned
    (``rewrite._decode_into``): a different graph, fused differently, so float sums round in another
    order, but the masks are the same as when every reader decodes the values. In float64 that
    rounding is ~1e-14 of a gradient; a single ReLU mask element flipped in a 4x16x8x8 stage
    moves a gradient by far more than 1e-12. Neither compile may serve the other from a cache: the
    partitioner's uuid does not see the monkeypatch. One residual block: a ReLU after a norm and one
    after the sum (the zoo's ResNet has four blocks; two float64 compiles of it took 72 s under -n 2
    on a 2-core x86_64 CPU)."""
    from fxcompress.passes import rewrite

    model, x = one_block_resnet(dtype=torch.float64)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        split = train_step(model, x, compressed("int4", "inductor"))
        check_predicate_readers(split.module.capture_log.captures()[0].rewritten.bw.graph)
        monkeypatch.setattr(rewrite, "_predicate_readers", lambda ph, codec: [])
        torch._dynamo.reset()
        whole = train_step(model, x, compressed("int4", "inductor"))
        with pytest.raises(AssertionError):
            check_predicate_readers(whole.module.capture_log.captures()[0].rewritten.bw.graph)
    assert torch.equal(split.output, whole.output)
    for name, g in split.grads.items():
        assert float((g - whole.grads[name]).abs().max()) <= 1e-12 * float(g.abs().max()), name
