"""save_predicates: comparisons the backward makes of recomputed values are saved exact."""
import copy
import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxcompress
from fxcompress.capture import extract_program
from fxcompress.codecs import BitMask, ShapeOnly
from fxcompress.passes.predicates import save_predicates
from fxcompress.passes.select import plan_codecs

ACTIVATIONS = {
    "relu": lambda: torch.nn.ReLU(),
    "relu6": lambda: torch.nn.ReLU6(),
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.1),
    "hardtanh": lambda: torch.nn.Hardtanh(-0.5, 0.7),
    "hardsigmoid": lambda: torch.nn.Hardsigmoid(),  # Inductor's: where(-3 < x & x < 3, g / 6, 0)
}


class _NormAct(torch.nn.Module):
    """conv -> batch-norm -> activation, its output weighted by a parameter: no op after the
    activation saves its output, so min-cut recomputes the batch-norm output in the backward, and the
    batch-norm bias's gradient is the sum of the weights the activation's mask lets through.
    ``branch``: a 1x1 convolution reads the batch-norm output too, so it is saved, and the backward
    compares the saved tensor itself (``le(y, 0) | ge(y, 6)`` for a ReLU6: two predicates).
    ``shape``: the batch-norm output's; at 2x8x2x2 min-cut recomputes the batch-norm's statistics
    (``var_mean``) in the backward too.
    """

    def __init__(self, act: torch.nn.Module, branch: bool = False, shape: tuple = (4, 8, 8, 8)) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.act = act
        self.weight = torch.nn.Parameter(torch.randn(shape))
        self.branch = torch.nn.Conv2d(8, 4, 1) if branch else None

    def forward(self, x):
        y = self.bn(self.conv(x))
        out = (self.act(y) * self.weight).sum()
        return out if self.branch is None else out + self.branch(y).sum()


@pytest.mark.parametrize("act, branch, shape", [(a, False, (4, 8, 8, 8)) for a in sorted(ACTIVATIONS)]
                         + [("relu6", True, (4, 8, 8, 8)), ("relu", False, (2, 8, 2, 2)),
                            ("hardtanh", False, (2, 8, 2, 2))])
def test_an_activation_mask_stays_exact_under_a_lossy_codec(act, branch, shape):
    torch.manual_seed(0)
    n, _, h, w = shape
    model, x = _NormAct(ACTIVATIONS[act](), branch, shape), torch.randn(n, 3, h, w) * 3
    reference = copy.deepcopy(model)
    reference(x).backward()
    # NB: what plain torch.compile saves, on one activation of each structure (an Inductor compile
    # each: the other activations' partitions are the same)
    plain = ("none",) if act == "relu" or branch else ()
    plain_saved = None
    for codec in (*plain, "int2"):
        compressed = copy.deepcopy(model)
        cm = fxcompress.compile(compressed, fxcompress.CompressConfig(codec=codec, min_bytes=0), backend="inductor")
        cm(x).backward()
        report = fxcompress.explain(cm)
        if codec == "none":
            plain_saved = report.saved_bytes_before
    # Each element whose mask flipped would move the bias gradient by a weight (about 1): int2's
    # decoded batch-norm input flipped dozens of them before save_predicates.
    torch.testing.assert_close(compressed.bn.bias.grad, reference.bn.bias.grad, rtol=1e-5, atol=1e-4)
    (mask,) = [r for r in report.rows if r.codec == "bitmask"]
    assert (mask.bytes_before, mask.bytes_after) == (0, math.prod(shape) // 8)
    assert "recomputed values" in mask.reason
    if plain_saved is not None:
        assert report.saved_bytes_before == plain_saved  # what plain torch.compile saves


def test_a_comparison_of_a_saved_tensor_itself_stays_with_its_codec():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3, padding=1))
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="int4", base_partitioner="min_cut"),
                            backend="eager")
    cm(torch.randn(2, 3, 8, 8)).sum().backward()
    (cap,) = cm.capture_log.captures()
    assert cap.partitioned is None and cap.before is cap.original  # the ReLU output is saved: its code keeps le(0)
    assert not any(s.added for s in cap.original.saved)


def _traced_pair():
    """A forward saving ``y = 2x`` and a backward reading it only through ``3y > 0``."""
    def fw(x):
        y = x * 2
        return y.sum(), y

    def bw(y, g):
        return torch.where(y * 3 > 0, g, torch.zeros_like(g))

    x = torch.randn(5, 7)
    fw_gm = make_fx(fw, tracing_mode="fake")(x)
    bw_gm = make_fx(bw, tracing_mode="fake")(x * 2, torch.randn(5, 7))
    return fw_gm, bw_gm, x


def test_save_predicates_moves_the_comparison_and_copies_what_it_changes():
    fw, bw, x = _traced_pair()
    before = (fw.code, bw.code)
    new_fw, new_bw = save_predicates(fw, bw, num_fwd_outputs=1)
    assert (fw.code, bw.code) == before  # its inputs are left as they were
    assert not any(n.target is torch.ops.aten.gt.Scalar for n in new_bw.graph.nodes)
    g = torch.randn(5, 7)
    total, y, mask = new_fw(x)
    torch.testing.assert_close(new_bw(y, mask, g), bw(y, g), rtol=0, atol=0)
    assert mask.dtype == torch.bool and torch.equal(mask, x * 2 * 3 > 0)

    program = extract_program(new_fw, new_bw, 1, "pair")
    assert [s.added for s in program.saved] == [False, True]
    y_decision, mask_decision = plan_codecs(program, fxcompress.CompressConfig(codec="int4", min_bytes=0)).decisions
    assert isinstance(y_decision.codec, ShapeOnly) and "no longer read" in y_decision.reason
    assert isinstance(mask_decision.codec, BitMask)


def test_save_predicates_returns_its_inputs_where_nothing_is_compared():
    fw, bw, _ = _traced_pair()
    plain_bw = make_fx(lambda y, g: y * g, tracing_mode="fake")(torch.randn(5, 7), torch.randn(5, 7))
    assert save_predicates(fw, plain_bw, num_fwd_outputs=1) == (fw, plain_bw)


def _norm_of_a_recomputed_sum(rows):
    """XCiT's class-token norm as Inductor's min-cut left it: the backward recomputes ``x + gamma * a``
    from two saved tensors and normalizes its first ``rows`` rows with saved statistics."""
    def fw(inp, a_in, gamma):
        x, a = inp * 1.5, a_in * 2
        head = (x + gamma * a)[:, :rows]
        var, mean = torch.var_mean(head, dim=-1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + 1e-6)
        return ((head - mean) * rstd).sum(), x, a, gamma, mean, rstd

    def bw(x, a, gamma, mean, rstd, g):
        return g * (((x + gamma * a)[:, :rows] - mean) * rstd)

    inputs = (torch.randn(4, 17, 128), torch.randn(4, 17, 128), torch.randn(128))
    fw_gm = make_fx(fw, tracing_mode="fake")(*inputs)
    saved = fw(*inputs)[1:]
    bw_gm = make_fx(bw, tracing_mode="fake")(*saved, torch.randn(4, rows, 1))
    return fw_gm, bw_gm, inputs


def test_a_small_norm_input_recomputed_from_saved_tensors_is_saved():
    """The class token's row, tiny beside its neighbours, shared their groups in ``a``'s codes, and the
    norm's rstd (large: the row is small) blew the error up: one-step int4 gradient cosine 0.16 on
    XCiT (Inductor). The recomputed input is saved instead, where it is at most half of each saved
    tensor it is made from; it is coded in the norm's space, or kept where it is tiny."""
    fw, bw, inputs = _norm_of_a_recomputed_sum(rows=1)
    new_fw, new_bw = save_predicates(fw, bw, num_fwd_outputs=1)
    outputs = new_fw(*inputs)
    (head,) = outputs[6:]
    assert head.shape == (4, 1, 128)
    g = torch.randn(4, 1, 1)
    torch.testing.assert_close(new_bw(*outputs[1:], g), bw(*outputs[1:6], g), rtol=0, atol=0)
    program = extract_program(new_fw, new_bw, 1, "pair")
    decision = plan_codecs(program, fxcompress.CompressConfig(codec="int4", min_bytes=0)).decisions[-1]
    assert decision.reason.startswith("a norm's input, which the backward recomputed, saved")
    assert "normalized input" in decision.reason

    fw, bw, _ = _norm_of_a_recomputed_sum(rows=17)  # as large as what it is made from: not saved twice
    assert save_predicates(fw, bw, num_fwd_outputs=1) == (fw, bw)


def test_an_alias_the_backward_no_longer_reads_is_dropped_beside_its_coded_base():
    """A saved view whose placeholder has no reader (what the backward read of it is saved instead)
    while its base is coded: nothing is replayed for it (its replay went to the graph's start)."""
    from fxcompress.passes.rewrite import rewrite_saved_tensors

    def fw(x):
        y = x * 2
        return y.sum(), y, y.t()

    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(64, 32)
    with FakeTensorMode() as mode:  # NB: one mode for both graphs, as AOTAutograd's
        fake = mode.from_tensor(x)
        fw_gm = make_fx(fw)(fake)
        y = fake * 2
        bw_gm = make_fx(lambda y, v, g: y * g)(y, y.t(), fake * 3)
    program = extract_program(fw_gm, bw_gm, 1, "alias")
    plan = plan_codecs(program, fxcompress.CompressConfig(codec="int8", min_bytes=0))
    assert [d.codec.name if d.codec else d.alias_of for d in plan.decisions] == ["int8", 0]
    rewritten = rewrite_saved_tensors(program, plan)
    g = torch.randn(64, 32)
    total, *codes = rewritten.fw(x)
    got, want = rewritten.bw(*codes, g), 2 * x * g
    assert (got - want).norm() < 0.01 * want.norm()  # int8's error


def _activation_step(fn, x):
    """``h = 1.5 x`` saved for ``fn(h)``'s backward, both graphs as Inductor decomposes them; and the
    backward, to run on real tensors."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fw(x):
        h = x * 1.5
        return fn(h).sum(), h

    def bw(h, g):
        return torch.autograd.grad(fn(h.requires_grad_()), h, g)[0]

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        fw_gm = make_fx(fw, decomposition_table=select_decomp_table())(fake)
        bw_gm = make_fx(bw, decomposition_table=select_decomp_table())(fake * 1.5, fake * 2)
    return fw_gm, bw_gm, bw


@pytest.mark.parametrize("act", ["silu", "gelu", "hardswish", "mish"])
def test_a_factored_derivative_computes_what_the_backward_did(act):
    """``factor_derivatives`` on a backward as Inductor decomposes it: run on exact values, the
    rewritten graphs give the original gradient up to rounding (the factors multiply first), and the
    saved input is read no more."""
    x = torch.randn(64, 32) * 4
    fw_gm, bw_gm, bw = _activation_step(getattr(torch.nn.functional, act), x)
    new_fw, new_bw = save_predicates(fw_gm, bw_gm, num_fwd_outputs=1)
    (h_ph, derivative_ph, _) = [n for n in new_bw.graph.nodes if n.op == "placeholder"]
    assert not h_ph.users and derivative_ph.users  # the input is read no more
    g = torch.randn(64, 32)
    total, h, derivative = new_fw(x)
    torch.testing.assert_close(new_bw(h, derivative, g), bw(x * 1.5, g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [torch.relu, lambda h: (h * 3.0 + 1.0) * h], ids=["relu", "quadratic"])
def test_no_factor_is_saved_for_a_mask_or_an_affine_derivative(fn):
    """A derivative made of comparisons alone (ReLU's) keeps the input's 1-bit mask, and an affine one
    (a quadratic's; a norm's ``x̂``) codes as well as its input: neither is factored out."""
    fw_gm, bw_gm, _ = _activation_step(fn, torch.randn(64, 32))
    new_fw, _ = save_predicates(fw_gm, bw_gm, num_fwd_outputs=1)
    added = list(new_fw.graph.output_node().args[0])[2:]  # NB: after the loss and h
    assert all(n.meta["val"].dtype == torch.bool for n in added)  # ReLU's: its recomputed mask, as bits
