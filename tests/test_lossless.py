"""Lossless codecs: bit-identical gradients, fewer saved bytes, true byte counts (eager backend unless a test names another)."""
import math

import pytest
import torch

import fxcompress
from conftest import ZOO_NAMES, assert_grads_equal, compressed, make_model, train_step


@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_lossless_gradients_bit_identical_and_fewer_bytes(name, device):
    model, x = make_model(name)
    model, x = model.to(device), x.to(device)
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed("lossless"))
    assert torch.equal(ref.output, got.output)
    assert_grads_equal(ref.grads, got.grads)

    before, after = fxcompress.explain(ref.module), fxcompress.explain(got.module)
    assert before.saved_bytes_before == after.saved_bytes_before
    assert before.saved_bytes_after == before.saved_bytes_before  # codec="none" changes nothing
    assert after.saved_bytes_after < after.saved_bytes_before
    encoded = [r for r in after.rows if r.codec != "none"]
    assert encoded, "every zoo model has a tensor a lossless encoding applies to"
    for r in encoded:
        assert r.bytes_after < r.bytes_before or r.bytes_before == 0


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_codec_none_matches_plain_torch_compile(name):
    model, x = make_model(name)
    plain = train_step(model, x, lambda m: torch.compile(m, backend="aot_eager"))
    torch._dynamo.reset()
    none = train_step(model, x, compressed("none"))
    assert torch.equal(plain.output, none.output)
    assert_grads_equal(plain.grads, none.grads)


def _stored_bytes(cm, model, x) -> int:
    """Bytes autograd really stores for one step, outside graph inputs; checked row by row.

    Autograd packs the saved tensors in the rewritten forward's order, so each
    packed tensor is paired with its ``SavedTensor`` record. Graph inputs are
    excluded (Inductor may store a re-laid-out copy of one: its layout
    optimization, outside fxcompress's plan).
    """
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = cm(x)  # only the compiled step packs here; the loss below saves its own
    out.float().pow(2).mean().backward()
    saved = [s for cap in cm.capture_log.captures() for s in cap.rewritten.saved]
    assert [(tuple(t.shape), t.dtype) for t in packed] == [(s.shape, s.dtype) for s in saved]
    stored = 0
    for t, s in zip(packed, saved):
        if s.is_graph_input:
            continue
        if s.view_of is not None:  # shares the storage of the tensor it views
            assert t.untyped_storage().data_ptr() == packed[s.view_of].untyped_storage().data_ptr()
            continue
        assert t.untyped_storage().nbytes() == t.nbytes == s.nbytes, s.name
        stored += t.nbytes
    return stored


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("codec", ["none", "lossless"])
def test_report_bytes_after_equal_bytes_really_stored(name, codec):
    model, x = make_model(name)
    step = train_step(model, x, compressed(codec))
    report = fxcompress.explain(step.module)
    assert _stored_bytes(step.module, model, x) == report.saved_bytes_after


def test_report_rows_and_text():
    model, x = make_model("convnet")
    step = train_step(model, x, compressed("lossless"))
    report = fxcompress.explain(step.module)
    codecs = {r.codec for r in report.rows}
    assert {"bitmask", "narrow[uint8]"} <= codecs
    assert any(c.startswith("mask[") for c in codecs)
    for r in report.rows:
        assert r.reason, f"row {r.name} has no reason"
        if r.codec == "none":
            assert r.bytes_after == r.bytes_before
    text = str(report)
    assert "saved for backward:" in text and "narrow[uint8]" in text
    counted = [r for r in report.rows if r.counted]
    assert all(r.name in text for r in counted)
    inputs = len(report.rows) - len(counted)
    assert inputs and f"also saved, not counted: {inputs} graph inputs" in text
    # the summary by codec: every counted row in exactly one group, largest after first
    groups = report.by_codec()
    assert sum(g[1] for g in groups) == len(counted)
    assert sum(g[2] for g in groups) == report.saved_bytes_before
    assert sum(g[3] for g in groups) == report.saved_bytes_after
    assert [g[3] for g in groups] == sorted((g[3] for g in groups), reverse=True)
    labels = {g[0] for g in groups}
    assert {"bitmask", "narrow[uint8]", "kept: tiny"} <= labels and "alias" in labels
    assert "by codec, most bytes after first:" in text and all(g[0] in text for g in groups)


def test_relu_mask_is_exact_with_nan_and_inf_activations():
    # Non-finite activations must reach the gradients exactly as without compression.
    model, x = make_model("convnet")
    x[0, 0, :4, :4] = float("nan")
    x[1, 1, 2, 2] = float("inf")
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed("lossless"))
    for k in ref.grads:
        assert torch.equal(ref.grads[k].isnan(), got.grads[k].isnan())
        torch.testing.assert_close(ref.grads[k], got.grads[k], rtol=0, atol=0, equal_nan=True)


class CheckpointedMaskedAttention(torch.nn.Module):
    """Attention under activation checkpointing with an additive mask of 0 and -inf made from the
    input (a padding mask): the checkpoint saves the mask for its recomputation, as Hugging Face's
    GPT-2 with gradient checkpointing does."""

    def __init__(self, d: int = 16, t: int = 8) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.register_buffer("causal", torch.ones(t, t, dtype=torch.bool).tril())

    def block(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward(self, x):
        keep = self.causal & (x[..., 0] > -1)[:, None, :]
        return torch.utils.checkpoint.checkpoint(self.block, x, torch.where(keep, 0.0, -math.inf), use_reentrant=False)


@pytest.mark.parametrize("codec", ["lossless", "int4"])
def test_an_additive_mask_of_minus_inf_is_stored_as_one_bit_exactly(codec):
    # NB: a per-group code of a group holding -inf decodes to NaN (as a non-finite input must);
    # int4 made every gradient NaN here before the select of two constants got its own codec
    torch.manual_seed(0)
    model, x = CheckpointedMaskedAttention(), torch.randn(4, 8, 16)
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed(codec))
    assert_grads_equal(ref.grads, got.grads)  # the block is recomputed: the mask is all it saves
    (row,) = [r for r in fxcompress.explain(got.module).rows if r.op == "where.self"]
    assert row.codec == "select" and row.bytes_after == row.bytes_before // 32
    assert "a select of two constants (0, -inf)" in row.reason


class _CheckpointedDropoutAttention(torch.nn.Module):
    """Attention with dropout under activation checkpointing: the checkpoint saves the random
    generator's state, for the recomputation to draw the same dropout mask."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def block(self, x):
        return torch.nn.functional.scaled_dot_product_attention(*self.qkv(x).chunk(3, -1), dropout_p=0.3)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("codec", ["lossless", "int4"])
def test_a_checkpointed_random_op_keeps_its_generator_state_whole(codec):
    torch.manual_seed(0)
    model, x = _CheckpointedDropoutAttention(), torch.randn(4, 8, 16)
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed(codec))
    assert_grads_equal(ref.grads, got.grads)  # the same mask drawn, the block recomputed
    (row,) = [r for r in fxcompress.explain(got.module).rows if r.dtype == "uint8"]
    assert row.codec == "none" and "random generator's state" in row.reason


def test_channels_last_inputs_stay_bit_identical():
    model, x = make_model("resnet")
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed("lossless"))
    assert_grads_equal(ref.grads, got.grads)
    assert fxcompress.explain(got.module).saved_bytes_after < fxcompress.explain(ref.module).saved_bytes_after


def test_several_steps_train_identically():
    results = {}
    for codec in ("none", "lossless"):
        model, x = make_model("mlp")
        cm = fxcompress.compile(model, fxcompress.CompressConfig(codec=codec), backend="eager")
        opt = torch.optim.SGD(cm.parameters(), lr=0.1)
        torch.manual_seed(3)
        for _ in range(5):
            opt.zero_grad()
            cm(x).pow(2).mean().backward()
            opt.step()
        results[codec] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(results["none"], results["lossless"]))


class _Pool(torch.nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.conv, self.window = torch.nn.Conv2d(3, 8, 3, padding=1), window

    def forward(self, x):
        return torch.nn.functional.max_pool2d(self.conv(x) * 1.5, self.window, 2, self.window // 2)


@pytest.mark.parametrize("backend, window, size, saved, codec", [
    ("inductor", 3, 16, "_low_memory_max_pool_with_offsets[1]", "packed[4b]"),  # offsets < 9 in a window
    ("inductor", 2, 16, "_low_memory_max_pool_with_offsets[1]", "packed[2b]"),
    ("eager", 2, 4, "max_pool2d_with_indices[1]", "packed[4b]"),  # indices < 16 in a 4x4 plane
    ("eager", 3, 16, "max_pool2d_with_indices[1]", "narrow[uint8]"),
])
def test_pool_indices_and_window_offsets_pack_below_a_byte(backend, window, size, saved, codec):
    torch.manual_seed(0)
    model, x = _Pool(window), torch.randn(4, 3, size, size)
    ref = train_step(model, x, compressed("none", backend))
    got = train_step(model, x, compressed("lossless", backend, min_bytes=0))
    assert torch.equal(ref.output, got.output)
    assert_grads_equal(ref.grads, got.grads)
    (row,) = [r for r in fxcompress.explain(got.module).rows if r.op == saved]
    assert row.codec == codec and row.bytes_after < row.bytes_before
    if codec.startswith("packed"):
        numel, bits = math.prod(row.shape), int(codec[len("packed["):-len("b]")])
        assert row.bytes_after == -(-numel * bits // 8)


def test_a_hard_sigmoid_input_is_one_bit_and_bit_identical():
    """hardsigmoid_backward(g, x) is g / 6 inside (-3, 3) and 0 outside (NaN included): it reads x
    through that predicate alone (a squeeze-excite gate's input, MobileNetV3's and LCNet's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Hardsigmoid(), torch.nn.Linear(64, 4))
    x = torch.randn(64, 16) * 4
    x[0, 0] = float("nan")  # a row of NaN activations: their gradient is 0, as without fxcompress
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed("lossless"))
    (row,) = [r for r in fxcompress.explain(got.module).rows if r.op == "addmm" and r.shape == (64, 64)]
    assert row.codec == "mask[notinside(-3, 3)]" and row.bytes_after == 64 * 64 // 8
    for k in ref.grads:
        torch.testing.assert_close(ref.grads[k], got.grads[k], rtol=0, atol=0, equal_nan=True)
