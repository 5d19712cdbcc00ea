"""Shared helpers: one training step of a zoo model under a given config."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.codecs.uses import PredicateUse, ShapeUse, uses_of
from fxcompress.ir import META_KEY
from fxcompress.models import ZOO

# Bit-for-bit comparisons on CUDA need kernels that give the same bits run to run, with or
# without fxcompress; cuDNN's default weight-gradient algorithms need not (on an H200 the zoo's
# convnets' bitwise checks failed by up to 9e-7 in a first convolution's weight gradient,
# bench/results/logs/tests_all_h200.log). No effect on the CPU.
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False

# NB: under pytest-xdist (the README's -n 2) the workers share the cores: one intra-op thread pool each
# of its share, not each of all of them (subprocesses the tests start get their own)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@dataclasses.dataclass
class StepResult:
    module: nn.Module
    output: torch.Tensor
    grads: dict[str, torch.Tensor]


def make_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = ZOO[name]()
    return model, model.example_input()


def two_stage_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    """Two conv-BN-ReLU stages (16, then 32 channels), pooled, and a linear head, with its input: for
    the Inductor tests that need batch-norms and their ReLUs, not the zoo ConvNet's max pools and
    dropout. Each Inductor compile costs the suite seconds; one model shared by several tests
    shares their compiles in Inductor's cache."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).to(dtype)
    return model, torch.randn(4, 3, 16, 16, dtype=dtype)


def one_block_resnet(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    """A conv-BN-ReLU stem and one residual block with a projection shortcut (batch-norms before a
    ReLU, before the sum and on the shortcut), pooled, and a linear head, with its input: the zoo
    ResNet's four blocks cost its Inductor compiles tens of seconds more."""
    from fxcompress.models import BasicBlock

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          BasicBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(dtype)
    return model, torch.randn(4, 3, 16, 16, dtype=dtype)


def train_step(model: nn.Module, x: torch.Tensor, wrap, *, seed: int = 1) -> StepResult:
    """Run ``wrap(model)`` forward/backward once with a fixed RNG; return output and gradients."""
    model.zero_grad(set_to_none=True)
    module = wrap(model)
    module.train()
    torch.manual_seed(seed)
    out = module(x)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return StepResult(module, out.detach(), grads)


def compressed(codec: str, backend: str = "eager", **kw):
    return lambda m: fxcompress.compile(m, fxcompress.CompressConfig(codec=codec, **kw), backend=backend)


def assert_grads_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"gradient of {k} differs: max |d| = {(a[k] - b[k]).abs().max()}"


def grads_cosine(a: dict, b: dict) -> float:
    """Cosine similarity of two gradient dicts, all parameters as one vector."""
    flat = [torch.cat([d[k].flatten().float() for k in sorted(d)]) for d in (a, b)]
    return float(torch.nn.functional.cosine_similarity(*flat, dim=0))


def assert_grads_close(a: dict, b: dict, rtol=1e-5, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


ZOO_NAMES = sorted(ZOO)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


_PREDICATE_OPS = (torch.ops.aten.le.Scalar, torch.ops.aten.lt.Scalar, torch.ops.aten.ge.Scalar, torch.ops.aten.gt.Scalar)


def check_predicate_readers(graph) -> None:
    """A backward compiled by Inductor: the ReLU-like backwards (decomposed, ``where(le(x, 0), 0, g)``)
    read a predicate decode of their own, never the decoded values, and each selection they gate
    is pinned (written once)."""
    decoded = {n for n in graph.nodes if n.meta.get(META_KEY, {}).get("role") == "decode"}
    predicates = [n for n in graph.nodes if n.target in _PREDICATE_OPS and n.args[0] in decoded and n not in decoded]
    assert predicates
    for p in predicates:
        uses = [(u, use) for u, use in uses_of(p.args[0]) if u not in decoded]
        # a decode for the predicate alone (and shapes: torch 2.11's max-pool backward reads its input's)
        assert all(isinstance(use, (PredicateUse, ShapeUse)) for _, use in uses), (p, uses)
    gated = [u for p in predicates for u in p.users if u.target is torch.ops.aten.where.self]
    assert gated
    for where in gated:
        assert [u.target for u in where.users] == [torch.ops.prims.inductor_force_stride_order.default], where
