"""How a backward op reads a saved tensor: the per-op knowledge, one entry per op.

A codec may replace a saved tensor only if every backward op that reads it
can be fed the substitute and still compute bit-for-bit the same thing.
This registry says, per aten overload and argument position, what the op
really needs from the tensor:

- :class:`ShapeUse`: only its shape, strides, dtype and device;
- :class:`PredicateUse`: only one boolean predicate of each element
  (``threshold_backward(g, x, 0)`` needs ``x <= 0`` and nothing else);
- :class:`IndexUse`: integer values known to lie in ``[0, bound)``;
- :data:`VALUES` (anything not registered): the values themselves.

Adding an op is one entry in :data:`_ARG_USES`.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Union

import torch
import torch.fx as fx
import torch._inductor.inductor_prims  # registers prims.inductor_force_stride_order

from ..ir import target_name

aten = torch.ops.aten

__all__ = [
    "Predicate",
    "ShapeUse",
    "PredicateUse",
    "IndexUse",
    "ExactUse",
    "ValuesUse",
    "Use",
    "VIEW_OPS",
    "SPLIT_OPS",
    "view_parent",
    "view_root",
    "is_normalizer",
    "uses_of",
    "terminal_users",
]


@dataclasses.dataclass(frozen=True)
class Predicate:
    """An elementwise boolean test: ``le``, ``lt``, ``ge``, ``gt``, ``outside`` or ``notinside``.

    ``outside(lo, hi)`` is ``x <= lo or x >= hi`` and ``notinside(lo, hi)`` is
    ``not (lo < x < hi)``: the two agree except on NaN, and hardtanh's
    backward uses the first on CUDA and the second on CPU. Each is evaluated
    exactly as the aten op does, NaN included.
    """

    kind: str
    consts: tuple[float, ...]

    @property
    def two_sided(self) -> bool:
        """``outside``/``notinside``: true on both sides of an interval (the rest compare with one constant)."""
        return self.kind in ("outside", "notinside")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.consts
        if self.kind == "outside":
            return torch.logical_or(x <= c[0], x >= c[1])
        if self.kind == "notinside":
            return torch.logical_not(torch.logical_and(x > c[0], x < c[1]))
        return _COMPARE[self.kind](x, c[0])

    def representatives(self, dtype: torch.dtype) -> tuple[float, float] | None:
        """Values ``(v_true, v_false)`` of ``dtype`` for which the predicate is true / false.

        ``None`` when no such pair is found (say, a threshold at the end of
        the dtype's range): the predicate mask then does not apply.
        """
        c = self.consts
        if self.two_sided:
            candidates = (c[0], (c[0] + c[1]) / 2)
        else:
            step = {"le": (0, 1), "lt": (-1, 0), "ge": (0, -1), "gt": (1, 0)}[self.kind]
            candidates = (c[0] + step[0], c[0] + step[1])
        v_true, v_false = (torch.tensor(v, dtype=torch.float64).to(dtype) for v in candidates)
        if not all(math.isfinite(float(v)) for v in (v_true, v_false)):
            return None
        if bool(self(v_true)) and not bool(self(v_false)):
            return float(v_true), float(v_false)
        return None

    def near_values(self, dtype: torch.dtype) -> tuple[float, float]:
        """Values of ``dtype`` just on each side of the boundary, for :meth:`nearest`.

        For ``le/lt/ge/gt``: the values closest to the constant for which the
        predicate is true / false. For the two-sided kinds: the smallest and
        largest values strictly inside ``(lo, hi)``. Computed once at plan
        time (in Python, not in the traced code).
        """
        c = self.consts
        if self.two_sided:
            return _step(c[0], 1, dtype), _step(c[1], -1, dtype)
        at = float(torch.tensor(c[0], dtype=torch.float64).to(dtype))
        if self.kind == "le":
            return at, _step(at, 1, dtype)
        if self.kind == "lt":
            return _step(at, -1, dtype), at
        if self.kind == "ge":
            return at, _step(at, -1, dtype)
        return _step(at, 1, dtype), at  # gt

    def restore(self, q: torch.Tensor, want: torch.Tensor, near: tuple[float, float]) -> torch.Tensor:
        """``q`` where its predicate equals ``want``; elsewhere a value close to ``q`` on ``want``'s side.

        Used where a lossy copy ``q`` crossed the predicate's boundary: the
        exact side is restored by moving to the boundary, a distance the
        true value also lies beyond. ``near`` is :meth:`near_values`.
        """
        def const(v: float) -> torch.Tensor:
            return torch.scalar_tensor(v, dtype=q.dtype, device=q.device)

        if self.two_sided:
            lo, hi = self.consts
            on_true, on_false = torch.where(q - lo < hi - q, const(lo), const(hi)), q.clamp(near[0], near[1])
        else:
            on_true, on_false = const(near[0]), const(near[1])
        # NB: nested selects, not `where(self(q) == want, q, ...)`: Inductor's CPU code generator
        # emits C++ that does not compile for the equality of a float mask and a uint8 one (torch 2.13)
        q_true = self(q)
        return torch.where(want, torch.where(q_true, q, on_true), torch.where(q_true, on_false, q))

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{v:g}' for v in self.consts)})"


def _step(c: float, direction: int, dtype: torch.dtype) -> float:
    """A value of ``dtype`` strictly beyond ``c`` in ``direction``, as close as is safe.

    NB: the smallest *normal* number, not a subnormal, so that kernels that
    flush subnormals to zero still see the right side of the boundary.
    """
    info = torch.finfo(dtype)
    delta = max(abs(c) * info.eps, info.smallest_normal)
    for _ in range(4):
        v = float(torch.tensor(c + direction * delta, dtype=torch.float64).to(dtype))
        if (v - c) * direction > 0:
            return v
        delta *= 2
    raise ValueError(f"no {dtype} value beyond {c}")


_COMPARE: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "le": operator.le,
    "lt": operator.lt,
    "ge": operator.ge,
    "gt": operator.gt,
}


@dataclasses.dataclass(frozen=True)
class ShapeUse:
    """The op reads only metadata (shape, strides, dtype, device)."""


@dataclasses.dataclass(frozen=True)
class PredicateUse:
    predicate: Predicate


@dataclasses.dataclass(frozen=True)
class IndexUse:
    """Integer values in ``[0, bound)``; the op would have failed in forward otherwise."""

    bound: int


@dataclasses.dataclass(frozen=True)
class ExactUse:
    """Values that must stay exact (normalization statistics, attention's log-sum-exp)."""

    op: str


@dataclasses.dataclass(frozen=True)
class ValuesUse:
    """The op reads the values; only a value-preserving (or lossy) codec may feed it, with at
    least ``min_bits`` bits per element where that is set (an integer code per group)."""

    op: str
    min_bits: int = 0


Use = Union[ShapeUse, PredicateUse, IndexUse, ExactUse, ValuesUse]

# Ops that only re-describe their first argument's storage. In the backward
# they are looked through (a predicate of a view is a view of the predicate);
# in the forward, a saved tensor reached from another through them is an alias.
VIEW_OPS = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.permute.default,
        aten.t.default,
        aten.transpose.int,
        aten.expand.default,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.slice.Tensor,
        aten.select.int,
        aten.detach.default,
        aten.alias.default,
        # fxcompress's layout pin under Inductor (passes/rewrite.py): the same buffer, its layout fixed
        torch.ops.prims.inductor_force_stride_order.default,
    }
)

_SHAPE_ONLY_OPS = frozenset(
    {
        aten.zeros_like.default,
        aten.empty_like.default,
        aten.ones_like.default,
        aten.full_like.default,
        aten.new_zeros.default,
        aten.new_empty.default,
        aten.new_ones.default,
        aten.new_full.default,
        aten.sym_size.int,
        aten.sym_stride.int,
        aten.sym_numel.default,
    }
)


def _scalar(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _compare(kind: str) -> Callable[[fx.Node], Use | None]:
    def use(node: fx.Node) -> Use | None:
        c = _scalar(node.args[1])
        return None if c is None else PredicateUse(Predicate(kind, (c,)))

    return use


def _threshold_backward(node: fx.Node) -> Use | None:
    # threshold_backward(grad, self, threshold) = self <= threshold ? 0 : grad
    c = _scalar(node.args[2])
    return None if c is None else PredicateUse(Predicate("le", (c,)))


def _hardtanh_backward(node: fx.Node) -> Use | None:
    # hardtanh_backward(grad, self, min, max) is 0 where self is outside (min, max).
    # NB: for NaN the kernels disagree: CUDA's tests (self <= min || self >= max)
    # and passes grad, CPU's tests !(min < self < max) and gives 0.
    lo, hi = _scalar(node.args[2]), _scalar(node.args[3])
    if lo is None or hi is None:
        return None
    cpu = node.args[1].meta["val"].device.type == "cpu"
    return PredicateUse(Predicate("notinside" if cpu else "outside", (lo, hi)))


def _hardsigmoid_backward(node: fx.Node) -> Use:
    # hardsigmoid_backward(grad, self) = -3 < self < 3 ? grad / 6 : 0, NaN to 0 (CPU and CUDA alike)
    return PredicateUse(Predicate("notinside", (-3.0, 3.0)))


def _leaky_relu_backward(node: fx.Node) -> Use | None:
    # leaky_relu_backward(grad, self, slope, self_is_result) = self > 0 ? grad : grad * slope
    return PredicateUse(Predicate("gt", (0.0,)))


def _pool_indices(spatial_dims: int) -> Callable[[fx.Node], Use | None]:
    def use(node: fx.Node) -> Use | None:
        # Indices address the flattened spatial plane of the pooled input (arg 1).
        shape = node.args[1].meta["val"].shape[-spatial_dims:]
        if not all(isinstance(s, int) for s in shape):
            return None
        return IndexUse(math.prod(shape))

    return use


def _pool_offsets(node: fx.Node) -> Use | None:
    # Inductor's low-memory max pool saves each output's offset within its window:
    # _low_memory_max_pool_offsets_to_indices(offsets, kernel_size, input_size, stride, padding, dilation)
    window = node.args[1]
    return IndexUse(math.prod(window)) if all(isinstance(k, int) for k in window) else None


def _embedding_indices(node: fx.Node) -> Use | None:
    # embedding_dense_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq)
    n = node.args[2]
    return IndexUse(n) if isinstance(n, int) else None


def _shape(node: fx.Node) -> Use:
    return ShapeUse()


def _exact(node: fx.Node) -> Use:
    return ExactUse(_op_name(node))


def _divisor(node: fx.Node) -> Use | None:
    # NB: an absolute error e in a divisor y moves x / y by e / y of itself: unbounded where y is
    # small against its group's range (a linear attention's normalizer, q . sum(k) + eps, is
    # near eps in places), and the backward divides by y twice (-g x / y^2). Only a divisor that
    # broadcasts (a normalizer, smaller than the quotient) is kept: an elementwise one may be a
    # whole activation (x / (1 + exp(-x))), and is coded as values.
    return ExactUse(f"{_op_name(node)} (as the divisor)") if is_normalizer(node.args[1], node) else None


def is_normalizer(divisor: object, div: fx.Node) -> bool:
    """Whether ``divisor`` is the divisor of ``div`` (``div.Tensor``) and broadcasts to a larger quotient."""
    y, out = getattr(divisor, "meta", {}).get("val"), div.meta.get("val")
    return (div.target is aten.div.Tensor and len(div.args) > 1 and div.args[1] is divisor
            and isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor) and y.numel() < out.numel())


# (op, argument position) -> how the op reads that argument; None from the
# function means "not in a form we can prove anything about" (values).
_ARG_USES: dict[tuple[object, int], Callable[[fx.Node], Use | None]] = {
    (aten.le.Scalar, 0): _compare("le"),
    (aten.lt.Scalar, 0): _compare("lt"),
    (aten.ge.Scalar, 0): _compare("ge"),
    (aten.gt.Scalar, 0): _compare("gt"),
    (aten.threshold_backward.default, 1): _threshold_backward,
    (aten.hardtanh_backward.default, 1): _hardtanh_backward,
    (aten.leaky_relu_backward.default, 1): _leaky_relu_backward,
    (aten.hardsigmoid_backward.default, 1): _hardsigmoid_backward,
    (aten.max_pool2d_with_indices_backward.default, 1): _shape,
    (aten.max_pool2d_with_indices_backward.default, 7): _pool_indices(2),
    (aten.max_pool3d_with_indices_backward.default, 1): _shape,
    (aten.max_pool3d_with_indices_backward.default, 7): _pool_indices(3),
    (aten.embedding_dense_backward.default, 1): _embedding_indices,
    (torch.ops.prims._low_memory_max_pool_offsets_to_indices.default, 0): _pool_offsets,
    (aten.div.Tensor, 1): _divisor,
}
for _op in _SHAPE_ONLY_OPS:
    _ARG_USES[(_op, 0)] = _shape

# Statistics and attention internals: a small error here is amplified (an
# inverse standard deviation scales a whole row; the fused attention backward
# recomputes the softmax as exp(q k^T * scale - logsumexp), where an error in
# the log-sum-exp or the mask moves an exponent), so no lossy codec. An error in
# q or k moves it too, in proportion to the error: they take 8-bit codes at
# least (QK_MIN_BITS). The attention backward reads value and out only linearly
# (dP = dO v^T; D = rowsum(dO * out)), like a matmul its input: those take a
# lossy codec as any activation does.
_EXACT_ARGS = {
    aten.native_batch_norm_backward.default: ("save_mean", "save_invstd"),
    aten.native_layer_norm_backward.default: ("mean", "rstd"),
    aten.native_group_norm_backward.default: ("mean", "rstd"),
}
_ATTENTION_EXACT = ("logsumexp", "attn_bias", "bias", "attn_mask")
QK_MIN_BITS = 8
_ATTENTION_OPS = (
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
    aten._scaled_dot_product_cudnn_attention_backward.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    aten._flash_attention_backward.default,
    aten._efficient_attention_backward.default,
)
for _op in _ATTENTION_OPS:
    _EXACT_ARGS[_op] = _ATTENTION_EXACT
    for _slot, _arg in enumerate(_op._schema.arguments):
        if _arg.name in ("query", "key"):
            _ARG_USES[(_op, _slot)] = lambda node: ValuesUse(_op_name(node), QK_MIN_BITS)
for _op, _names in _EXACT_ARGS.items():
    for _slot, _arg in enumerate(_op._schema.arguments):
        if _arg.name in _names:
            _ARG_USES.setdefault((_op, _slot), _exact)


# Ops whose outputs (through getitem) are views of their first argument, in the forward.
SPLIT_OPS = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default})


def view_parent(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` is a view of, one step up: a view op's input, or for one output of
    a split (``getitem(split(x), i)``) the split's input; ``None`` if ``node`` is no view."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target in VIEW_OPS:
        return node.args[0]
    split = node.args[0]
    if node.target is operator.getitem and split.op == "call_function" and split.target in SPLIT_OPS:
        return split.args[0]
    return None


def view_root(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` views (``node`` itself if it is no view)."""
    while node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def terminal_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node``, looking through view ops (deterministic order)."""
    out: list[fx.Node] = []
    for user in node.users:
        if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is node:
            out.extend(terminal_users(user))
        else:
            out.append(user)
    return out


def uses_of(node: fx.Node) -> list[tuple[fx.Node, Use]]:
    """How each terminal user of ``node`` reads it (one entry per argument slot)."""
    result: list[tuple[fx.Node, Use]] = []
    sources = view_closure(node)
    for user in terminal_users(node):
        slots = [i for i, a in enumerate(user.args) if a in sources]
        slots += [k for k, a in user.kwargs.items() if a in sources]
        if not slots or user.op != "call_function":
            result.append((user, ValuesUse(_op_name(user))))
            continue
        for slot in slots:
            rule = _ARG_USES.get((user.target, slot)) if isinstance(slot, int) else None
            use = rule(user) if rule is not None else None
            result.append((user, use if use is not None else ValuesUse(_op_name(user))))
    return result


def view_closure(node: fx.Node) -> set[fx.Node]:
    """``node`` and every view of it, through chains of view ops."""
    seen = {node}
    for user in node.users:
        if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is node:
            seen |= view_closure(user)
    return seen


def _op_name(node: fx.Node) -> str:
    return "output" if node.op == "output" else target_name(node)
