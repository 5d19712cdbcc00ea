"""The one node-insertion helper: traces are shared between equal codecs, values are not."""
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from fxcompress.codecs.base import Layout
from fxcompress.codecs.quant import GroupAffine
from fxcompress.passes import splice as splice_mod
from conftest import make_model, train_step, compressed


def _graph_with_inputs(mode, n):
    graph = fx.Graph()
    nodes = []
    for i in range(n):
        node = graph.placeholder(f"x{i}")
        with mode:
            node.meta["val"] = torch.empty(4, 8, 16, 16).to(memory_format=torch.channels_last)
        nodes.append(node)
    return graph, nodes


def test_equal_codecs_share_one_trace_and_get_their_own_values():
    made = splice_mod.TRACE_COUNTS["made"]
    mode = FakeTensorMode()
    graph, (a, b) = _graph_with_inputs(mode, 2)
    codec = lambda node: GroupAffine(Layout.of(node.meta["val"]), 4, 256, True)  # noqa: E731
    assert codec(a) == codec(b) and codec(a) is not codec(b)
    out_a = splice_mod.splice(graph, codec(a).encode, [a], tag={"role": "encode"})
    first = {StorageWeakRef(n.meta["val"].untyped_storage()) for n in graph.nodes if n.op == "call_function"}
    before = set(graph.nodes)
    out_b = splice_mod.splice(graph, codec(b).encode, [b], tag={"role": "encode"})
    assert splice_mod.TRACE_COUNTS["made"] == made + 1  # two codec objects, one trace

    second = [n for n in graph.nodes if n not in before]
    assert len(second) == sum(n.op == "call_function" for n in before) > 0
    for node in second:
        val = node.meta["val"]
        assert isinstance(val, FakeTensor) and val.fake_mode is mode
        assert StorageWeakRef(val.untyped_storage()) not in first  # the second copy aliases nothing of the first
    for x, y in zip(out_a, out_b):
        vx, vy = x.meta["val"], y.meta["val"]
        assert (vx.shape, vx.stride(), vx.dtype, vx.device) == (vy.shape, vy.stride(), vy.dtype, vy.device)


def test_views_inside_a_trace_still_alias_their_base():
    mode = FakeTensorMode()
    graph, (a,) = _graph_with_inputs(mode, 1)

    def fn(x):
        y = x * 2
        return y, y.permute(0, 2, 3, 1).reshape(-1)

    y, flat = splice_mod.splice(graph, fn, [a], tag={"role": "test"})
    vy, vflat = y.meta["val"], flat.meta["val"]
    assert StorageWeakRef(vy.untyped_storage()) == StorageWeakRef(vflat.untyped_storage())
    assert tuple(vflat.shape) == (4 * 8 * 16 * 16,)


def test_repeated_blocks_are_traced_once_per_layout():
    # the transformer's two blocks have the same layouts: the second block's tensors reuse the first's traces
    before = dict(splice_mod.TRACE_COUNTS)
    model, x = make_model("transformer")
    train_step(model, x, compressed("int4"))
    made, reused = (splice_mod.TRACE_COUNTS[k] - before.get(k, 0) for k in ("made", "reused"))
    assert reused > 0 and reused >= made // 2, (made, reused)


def test_a_trace_is_never_served_to_another_fake_mode():
    # NB: an id of a dead fake mode can come back for a new one; a trace must not follow it
    graph_a, (a,) = _graph_with_inputs(FakeTensorMode(), 1)
    codec = GroupAffine(Layout.of(a.meta["val"]), 8, 256, False)
    splice_mod.splice(graph_a, codec.encode, [a], tag={"role": "encode"})
    made = splice_mod.TRACE_COUNTS["made"]
    mode_b = FakeTensorMode()
    graph_b, (b,) = _graph_with_inputs(mode_b, 1)
    splice_mod.splice(graph_b, codec.encode, [b], tag={"role": "encode"})
    assert splice_mod.TRACE_COUNTS["made"] == made + 1
    assert all(n.meta["val"].fake_mode is mode_b for n in graph_b.nodes if n.op == "call_function")
