"""The compiled module as a user handles it: parameters, state_dict, modes, graph breaks, errors."""
import copy

import pytest
import torch
import torch.nn as nn

import fxcompress
from conftest import assert_grads_equal, compressed, grads_cosine, make_model, train_step
from fxcompress.models import ConvNet


def test_parameters_are_shared_and_state_dict_keys_match():
    model, x = make_model("convnet")
    cm = fxcompress.compile(model, backend="eager")
    assert [id(p) for p in cm.parameters()] == [id(p) for p in model.parameters()]
    assert list(cm.state_dict()) == list(model.state_dict())
    assert cm.module is model


def test_state_dict_round_trips_between_plain_and_compressed():
    model, x = make_model("convnet")
    cm = fxcompress.compile(model, backend="eager")
    train_step(model, x, lambda m: cm)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    plain, _ = make_model("convnet", seed=5)
    plain.load_state_dict(cm.state_dict())
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k

    other, _ = make_model("convnet", seed=6)
    cm2 = fxcompress.compile(other, backend="eager")
    cm2.load_state_dict(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="Unexpected key"):
        cm2.load_state_dict({**plain.state_dict(), "bogus": torch.zeros(1)})


def test_nested_compressed_module_state_dict():
    model, x = make_model("mlp")
    outer = nn.Sequential(fxcompress.compile(model, backend="eager"), nn.ReLU())
    keys = list(outer.state_dict())
    assert keys == [f"0.{k}" for k in model.state_dict()]
    outer.load_state_dict(outer.state_dict())


def test_eval_and_no_grad_run_the_plain_forward():
    model, x = make_model("convnet")
    cm = fxcompress.compile(model, backend="eager")
    cm.eval()
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(cm(x), ref)
    cm.train()
    with torch.no_grad():
        cm(x)
    with torch.inference_mode():
        cm(x)
    assert cm.capture_log.captures() == []  # nothing was compiled or saved
    cm(x).sum().backward()
    assert len(cm.capture_log.captures()) == 1


class TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.3))
        self.b = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_breaks_give_one_program_each_and_stay_exact():
    torch.manual_seed(0)
    model, x = TwoStage(), torch.randn(16, 32)
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed("lossless"))
    assert_grads_equal(ref.grads, got.grads)
    report = fxcompress.explain(got.module)
    assert sorted({r.program for r in report.rows}) == ["graph0", "graph1"]
    assert any("2 captured graphs" in n for n in report.notes)
    assert any("torch._dynamo.graph_break()" in n and "runs eagerly" in n for n in report.notes)
    assert report.saved_bytes_after < report.saved_bytes_before


class ConvLSTM(nn.Module):
    """A recurrent layer, which Dynamo does not trace, after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.rnn = nn.LSTM(64, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).permute(0, 3, 1, 2).flatten(2)  # (batch, 16 steps, 64)
        out, _ = self.rnn(h)
        return self.head(out[:, -1])


def test_code_dynamo_leaves_out_is_named_in_the_report():
    # NB: the LSTM runs eagerly and saves its tensors outside fxcompress's graphs: the report
    # must not read as if it covered the whole step
    torch.manual_seed(0)
    model, x = ConvLSTM(), torch.randn(4, 1, 8, 16)
    ref = train_step(model, x, compressed("none"))
    got = train_step(model, x, compressed("lossless"))
    assert_grads_equal(ref.grads, got.grads)
    notes = fxcompress.explain(got.module).notes
    assert any("RNN, GRU, or LSTM" in n and "neither listed here nor compressed" in n for n in notes), notes
    assert "RNN, GRU, or LSTM" in str(fxcompress.explain(got.module))  # the printed report shows it


def test_fullgraph_with_a_graph_break_is_a_capture_error():
    cm = fxcompress.compile(TwoStage(), fxcompress.CompressConfig(fullgraph=True), backend="eager")
    with pytest.raises(fxcompress.CaptureError, match="could not capture TwoStage"):
        cm(torch.randn(2, 32))


def test_model_error_during_capture_is_reported_clearly():
    cm = fxcompress.compile(nn.Linear(4, 4), backend="eager")
    with pytest.raises(fxcompress.CaptureError, match="could not capture Linear"):
        cm(torch.randn(2, 5))


def test_new_batch_size_recompiles_and_report_follows_latest():
    model, x = make_model("mlp")
    cm = fxcompress.compile(model, backend="eager")
    cm(x).sum().backward()
    cm(x[:5]).sum().backward()  # the last, smaller batch of an epoch
    report = fxcompress.explain(cm)
    assert {r.shape[0] for r in report.rows if r.counted and r.shape} == {5}


def test_gradient_accumulation_two_forwards_before_backward():
    """Two micro-batches saved at once, one backward: same gradients as plain torch.compile."""
    grads = {}
    for label in ("plain", "lossless"):
        model, x = make_model("mlp")
        wrapped = (
            torch.compile(model, backend="aot_eager")
            if label == "plain"
            else fxcompress.compile(model, backend="eager")
        )
        torch.manual_seed(1)
        loss = wrapped(x[:8]).pow(2).mean() + wrapped(x[8:]).pow(2).mean()
        loss.backward()
        grads[label] = {n: p.grad for n, p in model.named_parameters()}
        torch._dynamo.reset()
    assert_grads_equal(grads["plain"], grads["lossless"])


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_rewritten_graph_modules_run_the_code_of_their_graphs(backend):
    """The GraphModules fxcompress builds during compilation generate their code lazily (as
    Dynamo's do); what they run and show must still be their final, rewritten graph. The zoo's MLP:
    its Inductor compile is the quickest."""
    model, x = make_model("mlp")
    cm = train_step(model, x, compressed("int8", backend)).module
    (cap,) = cm.capture_log.captures()
    for before, gm in ((cap.original.fw, cap.rewritten.fw), (cap.original.bw, cap.rewritten.bw)):
        assert gm.code == gm.graph.python_code("self").src
        assert gm.code != before.code  # the codec's encode/decode ops are in it


@pytest.mark.parametrize("wrap", ["direct", "inside a model"])
def test_an_outer_torch_compile_leaves_the_model_to_fxcompress(wrap):
    # an outer torch.compile would otherwise trace through the model and compile it with its
    # own backend, saving everything uncompressed; the compressed module is a graph break
    model, x = make_model("convnet")
    around = (lambda m: m) if wrap == "direct" else (lambda m: nn.Sequential(m, nn.Tanh()))
    plain = train_step(model, x, around)
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="lossless"), backend="eager")
    got = train_step(model, x, lambda m: torch.compile(around(cm), backend="aot_eager"))
    assert_grads_equal(got.grads, plain.grads)
    assert torch.equal(got.output, plain.output)
    report = fxcompress.explain(cm)
    assert report.saved_bytes_after < report.saved_bytes_before


class _CheckpointedConvNet(ConvNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.utils.checkpoint.checkpoint(self.features, x, use_reentrant=False))


@pytest.mark.parametrize("codec", ["lossless", "int4"])
def test_activation_checkpointing_inside_the_model(codec):
    # the checkpointed batch norms run again in the backward, reading the running statistics
    # that the forward then updates in place: saved outside the graph, that update failed
    # autograd's version check on the eager backend
    torch.manual_seed(0)
    model = _CheckpointedConvNet()
    x = model.example_input()
    plain = train_step(model, x, lambda m: m)
    got = train_step(model, x, compressed(codec))
    if codec == "lossless":
        assert_grads_equal(got.grads, plain.grads)
    else:
        assert grads_cosine(got.grads, plain.grads) > 0.99


def test_batch_norm_running_statistics_are_updated_once_and_not_saved():
    model, x = make_model("convnet")
    reference = copy.deepcopy(model)
    train_step(reference, x, lambda m: m)
    step = train_step(model, x, compressed("int4"))
    for (name, ours), theirs in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(ours, theirs), name
    # a training-mode norm's backward reads its batch statistics, not its running ones
    rows = [r for r in fxcompress.explain(step.module).rows if r.op.endswith(("functional[3]", "functional[4]"))]
    assert len(rows) == 6  # two per norm: counted before, nothing stored after
    for row in rows:
        assert row.bytes_before > 0 and row.bytes_after == 0, row
        assert "running statistic" in row.reason, row


def test_a_norm_in_eval_mode_inside_a_training_model_keeps_its_running_statistics():
    # frozen statistics, as when fine-tuning: that norm's backward reads them (train_step would
    # switch the norm back to training mode, so the steps run here)
    model, x = make_model("convnet")
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="lossless"), backend="eager")
    grads = []
    for module in (model, cm):
        model.zero_grad(set_to_none=True)
        module.train()
        model.features[1].eval()
        torch.manual_seed(1)
        module(x).pow(2).mean().backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    assert_grads_equal(grads[1], grads[0])
    (cap,) = cm.capture_log.captures()
    norms = cap.rewritten.bw.graph.find_nodes(op="call_function", target=torch.ops.aten.native_batch_norm_backward.default)
    frozen = [n for n in norms if n.args[7] is False]
    assert len(frozen) == 1 and frozen[0].args[3] is not None and frozen[0].args[4] is not None


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_the_compressed_module_compresses_on_its_own(how, tmp_path):
    # copy.deepcopy is how EMA helpers copy a model; torch.save(module) pickles it whole
    model, x = make_model("convnet")
    cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="lossless"), backend="eager")
    train_step(model, x, lambda m: cm)
    if how == "deepcopy":
        twin = copy.deepcopy(cm)
    else:
        torch.save(cm, tmp_path / "cm.pt")
        twin = torch.load(tmp_path / "cm.pt", weights_only=False)
    assert isinstance(twin, fxcompress.CompressedModule) and twin.config == cm.config
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in model.parameters()}
    assert twin.capture_log.captures() == []
    plain = train_step(copy.deepcopy(model), x, lambda m: m)
    got = train_step(twin.module, x, lambda m: twin)
    assert_grads_equal(got.grads, plain.grads)
    report = fxcompress.explain(twin)
    assert report.saved_bytes_after < report.saved_bytes_before
    assert len(cm.capture_log.captures()) == 1  # the original's records are its own
