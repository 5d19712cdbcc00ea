"""The compiled module as a user handles it: parameters, state_dict, modes, graph breaks, errors."""
import pytest
import torch
import torch.nn as nn

import fxcompress
from conftest import assert_grads_equal, compressed, make_model, train_step


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
    assert report.saved_bytes_after < report.saved_bytes_before


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
    Dynamo's do); what they run and show must still be their final, rewritten graph."""
    model, x = make_model("convnet")
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
