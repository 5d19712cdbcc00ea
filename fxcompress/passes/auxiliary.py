"""Auxiliary activations (Woo & Jeon, ICLR 2023): ``apply_ara(program, strides)``.

ARA, on the partitioned graphs. In a residual network a block's output is
``x_{k+1} = relu(F(x_k) + x_k)`` (an identity shortcut); such blocks form a
*chain* ``x_0, x_1, ...`` of same-shape block inputs, ending where a
projection shortcut changes the shape. Each chain is cut into groups of
``stride`` consecutive block inputs; inside a group, every convolution that
reads ``x_i`` (a block's first conv, a projection shortcut) computes its
weight gradient from the group's first input ``x_g`` instead:

    convolution_backward(grad, x_i, w, ...)  ->  convolution_backward(grad, x_g, w, ...)

``convolution_backward`` reads its ``input`` argument for the weight gradient
only, so the backpropagated error stays exact. ``x_i`` is then read only by
its ReLU's backward, through the predicate ``x_i <= 0``, and the codec
policy stores it as a 1-bit mask.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..codecs.uses import view_root
from ..errors import ConfigError
from ..ir import Program, module_path

__all__ = ["Substitution", "apply_ara", "apply_asa", "buffers_restored", "residual_chains"]

_RELU = torch.ops.aten.relu.default
_ADD = torch.ops.aten.add.Tensor
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_CONV = torch.ops.aten.convolution.default


@dataclasses.dataclass(frozen=True)
class Substitution:
    """What ARA did to one convolution's weight gradient.

    ``aux`` is the saved tensor the weight gradient now reads instead of
    ``real``, or ``None`` when the layer keeps its real input (``reason`` says why).
    ``layer``/``aux_layer`` are module paths: the convolution, and a
    convolution that reads ``aux`` in the forward (whose input is ``aux``).
    """

    program: str
    layer: str
    real: str
    aux: str | None
    aux_layer: str | None
    reason: str


def residual_chains(fw: fx.Graph) -> list[list[fx.Node]]:
    """Chains of same-shape block inputs linked by identity shortcuts, in forward order.

    ``x_{k+1}`` follows ``x_k`` when ``x_{k+1} = relu(add(a, b))`` with ``x_k``
    one of ``a``, ``b``.
    """
    following: dict[fx.Node, fx.Node] = {}
    preceded: set[fx.Node] = set()
    for node in fw.nodes:
        if node.target is not _RELU or not isinstance(node.args[0], fx.Node):
            continue
        add = node.args[0]
        if add.target is not _ADD:
            continue
        a, b = add.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        # NB: the shortcut operand x_k is an ancestor of the branch F(x_k).
        shortcut = b if _is_ancestor(b, a) else a if _is_ancestor(a, b) else None
        if shortcut is not None and _same_shape(shortcut, node) and shortcut not in following:
            following[shortcut] = node
            preceded.add(node)
    chains = []
    for start in fw.nodes:
        if start in following and start not in preceded:
            chain = [start]
            while chain[-1] in following:
                chain.append(following[chain[-1]])
            chains.append(chain)
    return chains


def apply_ara(program: Program, stride: int | tuple[int, ...]) -> tuple[Program, tuple[Substitution, ...]]:
    """A copy of ``program`` whose backward reads auxiliary activations; what was substituted."""
    chains = residual_chains(program.fw.graph)
    strides = (stride,) * len(chains) if isinstance(stride, int) else tuple(stride)
    if len(strides) != len(chains):
        found = "; ".join(f"chain {i}: {len(c)} block inputs of shape {_shape(c[0])}" for i, c in enumerate(chains))
        raise ConfigError(
            f"ara_stride={stride!r} gives {len(strides)} strides, but {program.name} has {len(chains)} "
            f"residual chains ({found or 'none'}); give one stride per chain or a single int"
        )
    bw = copy.deepcopy(program.bw)
    by_name = {n.name: n for n in bw.graph.nodes if n.op == "placeholder"}
    # forward node -> the copied backward's placeholders that carry it (itself or saved views of it)
    carriers: dict[fx.Node, list[fx.Node]] = {}
    for s in program.saved:
        carriers.setdefault(view_root(s.fw_node), []).append(by_name[s.bw_placeholder.name])
    readers = _conv_readers(program.fw.graph)
    conv_backwards = [n for n in bw.graph.nodes if n.target is _CONV_BACKWARD]
    substitutions = []
    for c, (chain, k) in enumerate(zip(chains, strides)):
        for i, x in enumerate(chain):
            first = chain[i - i % k]
            for conv in [n for n in conv_backwards if _reads(n, carriers.get(x, ()))]:
                layer = _layer(conv)
                if first is x:
                    reason = "first input of its group: kept" if k > 1 else "ara stride 1: kept"
                    substitutions.append(Substitution(program.name, layer, x.name, None, None, reason))
                    continue
                if not carriers.get(first):
                    reason = f"group input {first.name} is not saved for the backward"
                    substitutions.append(Substitution(program.name, layer, x.name, None, None, reason))
                    continue
                conv.update_arg(1, carriers[first][0])
                aux_layer = readers.get(first)
                reason = f"weight gradient from {first.name}, input of block {i - i % k} of chain {c}"
                substitutions.append(Substitution(program.name, layer, x.name, first.name, aux_layer, reason))
    if not chains:
        substitutions.append(Substitution(program.name, "-", "-", None, None,
                                          "no residual block (relu(add(F(x), x))) found: plain backprop"))
    bw.graph.lint()
    bw.recompile()
    from ..capture import extract_program  # NB: capture imports the passes

    ara = extract_program(program.fw, bw, program.num_fwd_outputs, program.name, program.parameters)
    return ara, tuple(substitutions)


def _is_ancestor(candidate: fx.Node, node: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for parent in n.all_input_nodes:
            if parent is candidate:
                return True
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def _reads(conv: fx.Node, carriers) -> bool:
    arg = conv.args[1]
    return isinstance(arg, fx.Node) and view_root(arg) in carriers


def _conv_readers(fw: fx.Graph) -> dict[fx.Node, str]:
    """Forward node -> module path of a convolution that reads it."""
    out: dict[fx.Node, str] = {}
    for node in fw.nodes:
        if node.target is _CONV and isinstance(node.args[0], fx.Node):
            out.setdefault(view_root(node.args[0]), _layer(node))
    return out


def _layer(node: fx.Node) -> str:
    return module_path(node) or node.name


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    return "x".join(map(str, val.shape)) if isinstance(val, torch.Tensor) else "?"


# --- ASA ---------------------------------------------------------------------------------------
# NB: ASA changes the forward (x = h + eps * sign(h), also in eval), so it is not a graph
# rewrite: the chosen layers' forward is replaced on the model itself, by a custom autograd
# function whose backward is the ASA rule. torch.compile traces it like any other function.

_ACTIVATIONS = frozenset({"gelu", "relu", "silu", "relu_"})  # torch functions, by name
_NONNEG = {"relu", "relu_", "ReLU", "relu6", "ReLU6"}  # activations whose output is never negative: sign(h) is h > 0
_ACTIVATION_MODULE = re.compile(r"gelu|relu|silu|swish|activation", re.IGNORECASE)


class _ASA(torch.autograd.Function):
    """``y = layer(h + eps * s)``; saves ``h > 0`` (1 bit) and the weight; ``dW = lam * (eps * s)^T dy``.

    ``s = sign(h)`` from one bit: ``h > 0`` as 1/0 after a non-negative activation
    (ReLU, where it equals ``sign(h)`` exactly), else ``+1``/``-1`` (``sign(0)`` taken as -1).
    ``kind`` is the layer's weight layout: ``"linear"`` for ``nn.Linear`` (``y = x W^T + b``),
    ``"conv1d"`` for GPT-2's ``Conv1D`` (``y = x W + b``), ``"conv1x1"`` for a 1x1 ``nn.Conv2d``
    (a linear layer over the channel dimension at every pixel).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, kind: str, nonneg: bool, eps: float, lam: float):
        positive = h > 0
        x = h + eps * _sign(positive, nonneg, h.dtype)
        if kind == "conv1x1":
            y = F.conv2d(x, weight, bias)
        else:
            y = x @ weight if kind == "conv1d" else x @ weight.t()
            if bias is not None:
                y = y + bias
        ctx.save_for_backward(positive, weight)
        ctx.config = (kind, nonneg, eps, lam, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        positive, weight = ctx.saved_tensors
        kind, nonneg, eps, lam, has_bias = ctx.config
        s = _sign(positive, nonneg, dy.dtype)
        if kind == "conv1x1":  # exact: dx/dh = 1
            dh = F.conv2d(dy, weight.transpose(0, 1))
            dw = torch.einsum("nohw,nihw->oi", dy, s)[..., None, None] * (lam * eps)
            return dh, dw, dy.sum((0, 2, 3)) if has_bias else None, None, None, None, None
        dh = dy @ weight.t() if kind == "conv1d" else dy @ weight
        s, d2 = s.flatten(0, -2), dy.flatten(0, -2)
        dw = (s.t() @ d2 if kind == "conv1d" else d2.t() @ s) * (lam * eps)
        return dh, dw, d2.sum(0) if has_bias else None, None, None, None, None


def _sign(positive: torch.Tensor, nonneg: bool, dtype: torch.dtype) -> torch.Tensor:
    s = positive.to(dtype)
    return s if nonneg else 2 * s - 1


def asa_kind(module: torch.nn.Module) -> str | None:
    """``_ASA``'s layout for ``module``, or ``None`` when ASA cannot change it."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    if (
        isinstance(module, torch.nn.Conv2d)
        and module.kernel_size == (1, 1) and module.stride == (1, 1) and module.dilation == (1, 1)
        and module.groups == 1 and module.padding in ((0, 0), "valid")
    ):
        return "conv1x1"
    return None


def asa_forward(module: torch.nn.Module, kind: str, nonneg: bool, eps: float, lam: float):
    """A replacement ``forward`` for ``module`` (see :func:`asa_kind`) under ASA."""

    def forward(h):
        return _ASA.apply(h, module.weight, module.bias, kind, nonneg, eps, lam)

    forward.asa_nonneg = nonneg  # NB: marks the module as changed (a second compile must see it)
    return forward


def find_asa_layers(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """Module path -> the activation feeding it, for each linear layer whose input is an
    activation's output (through dropout), found by running ``model`` once without gradients."""
    from torch.overrides import TorchFunctionMode

    param_owner = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if asa_kind(m) and isinstance(w, torch.nn.Parameter):
            param_owner[id(w)] = name
    found: dict[str, str] = {}

    class Probe(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.activation_of: dict[int, str] = {}  # id(tensor) -> activation name
            self.keep: list[torch.Tensor] = []  # NB: alive while probing, so ids are not reused

        def mark(self, out, name):
            self.activation_of[id(out)] = name
            self.keep.append(out)

        def __torch_function__(self, func, types, fargs=(), fkwargs=None):
            fkwargs = fkwargs or {}
            out = func(*fargs, **fkwargs)
            name = getattr(func, "__name__", "")
            first = fargs[0] if fargs else None
            if name in _ACTIVATIONS and isinstance(out, torch.Tensor):
                self.mark(out, name)
            elif name in ("dropout", "view", "reshape") and isinstance(first, torch.Tensor) and id(first) in self.activation_of:
                self.mark(out, self.activation_of[id(first)])
            elif name in ("linear", "conv2d") and len(fargs) >= 2:
                self._check(fargs[0], fargs[1])
            elif name == "addmm" and len(fargs) >= 3:
                self._check(fargs[1], fargs[2])
            return out

        def _check(self, inp, weight):
            layer = param_owner.get(id(weight))
            if layer is not None and isinstance(inp, torch.Tensor) and id(inp) in self.activation_of:
                found.setdefault(layer, self.activation_of[id(inp)])

    probe = Probe()
    # activation modules that compute their function from primitives (GPT-2's NewGELUActivation)
    hooks = [
        m.register_forward_hook(lambda mod, a, out: probe.mark(out, type(mod).__name__))
        for m in model.modules()
        if _ACTIVATION_MODULE.search(type(m).__name__)
    ]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with buffers_restored(model), torch.no_grad(), probe:
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return found


@contextlib.contextmanager
def buffers_restored(model: torch.nn.Module):
    """Put ``model``'s buffers (batch-norm running statistics) back after a diagnostic forward."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


def apply_asa(model: torch.nn.Module, config, args: tuple, kwargs: dict) -> tuple[Substitution, ...]:
    """Give the chosen linear layers of ``model`` the ASA forward (in train and eval alike)."""
    fed_by = find_asa_layers(model, args, kwargs)
    linear = {n: m for n, m in model.named_modules() if asa_kind(m)}
    for name, module in linear.items():  # changed by an earlier compile: its probe sees no linear call
        if hasattr(module.forward, "asa_nonneg"):
            fed_by.setdefault(name, "ReLU" if module.forward.asa_nonneg else "activation")
    if config.asa_layers == "after_activation":
        chosen = [n for n in linear if n in fed_by]
        why_not = "input is not an activation's output"
    else:
        chosen = [n for n in linear if any(fnmatch.fnmatchcase(n, p) for p in config.asa_layers)]
        why_not = f"matches none of asa_layers={config.asa_layers!r}"
    subs = []
    for name, module in linear.items():
        if name not in chosen:
            subs.append(Substitution("-", name, "input", None, None, f"kept: {why_not}"))
            continue
        act = fed_by.get(name)
        module.forward = asa_forward(module, asa_kind(module), act in _NONNEG,
                                     config.asa_epsilon, config.asa_lambda)
        source = f"{act} output" if act else "input"
        subs.append(Substitution("-", name, source, "sign (1 bit)", None,
                                 f"forward {source} + {config.asa_epsilon:g}*sign; weight gradient "
                                 f"{config.asa_lambda:g}*({config.asa_epsilon:g}*sign)^T delta"))
    if not linear:
        subs.append(Substitution("-", "-", "-", None, None, "no linear layer or 1x1 convolution found: plain backprop"))
    return tuple(subs)
