"""Liveness agrees with FX's own last-use markers and with what the report counts."""
import re

import pytest
import torch.fx as fx

import fxcompress
from fxcompress.passes.liveness import analyze_liveness
from conftest import ZOO_NAMES, compressed, make_model, train_step

_LINE = re.compile(r"^\s+(\w+) = .*?;\s+((?:\w+ = )+)None$")


def fx_last_uses(graph: fx.Graph) -> dict[str, str]:
    """value name -> name of the node after whose line FX's generated code sets it to None."""
    out = {}
    for line in graph.python_code("self").src.splitlines():
        m = _LINE.match(line)
        if m:
            for name in m.group(2).split(" = ")[:-1]:
                out[name.strip()] = m.group(1)
    return out


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("codec", ["none", "lossless", "int4"])
def test_last_use_matches_fx_markers(name, codec):
    model, x = make_model(name)
    step = train_step(model, x, compressed(codec))
    (cap,) = step.module.capture_log.captures()
    for program in (cap.original, cap.rewritten):
        live = analyze_liveness(program)
        for gm in (program.fw, program.bw):
            markers = fx_last_uses(gm.graph)
            assert markers, "the parser found no last-use markers"
            ours = {n.name: u.name for n, u in live.last_use.items() if n.graph is gm.graph}
            outputs = {n.name for n in gm.graph.output_node().all_input_nodes}
            # FX drops every value except the graph's outputs after its last use
            assert {k: v for k, v in ours.items() if k not in outputs} == markers


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_saved_ranges_match_the_report_and_respect_their_invariant(name):
    model, x = make_model(name)
    step = train_step(model, x, compressed("int4"))
    (cap,) = step.module.capture_log.captures()
    report = fxcompress.explain(step.module)
    live = analyze_liveness(cap.rewritten)
    assert live.saved_bytes == report.saved_bytes_after
    assert analyze_liveness(cap.original).saved_bytes == report.saved_bytes_before
    for r in live.ranges:
        assert 0 <= r.start <= r.end < len(live.order)
        if r.saved:  # produced in the forward, last read in the backward
            assert r.start < live.num_forward <= r.end
    assert report.predicted_peak_bytes_after <= report.predicted_peak_bytes_before
    assert report.predicted_peak_bytes_after == live.peak_bytes


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_predicted_peak_falls_with_int4(name):
    model, x = make_model(name)
    if name == "mlp":
        # at batch 16 the MLP's step peak is its weight gradients, which no codec touches
        x = model.example_input(512)
    report = fxcompress.explain(train_step(model, x, compressed("int4")).module)
    assert report.predicted_peak_bytes_after < report.predicted_peak_bytes_before
    assert "predicted step peak:" in str(report)
